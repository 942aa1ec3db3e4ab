"""Counting the aten ops a piece of code dispatches: what it would launch on a GPU.

On a GPU nearly every dispatched op is one kernel launch (5-10 us whatever its size),
so the number of ops a training step dispatches is a device-independent proxy of what
small-op code costs there, which a CPU timing hides. :class:`OpCounter` is a
``TorchDispatchMode`` that counts every ``__torch_dispatch__`` call (views included: they
launch nothing on a GPU but still cost a dispatch on the host). The count is
deterministic: tests may hold a budget on it.

Example::

    >>> with OpCounter() as ops:
    ...     loss = model(x).sum(); loss.backward(); opt.step()
    >>> ops.count, ops.by_op.most_common(3)
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter"]


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it: ``count`` in all, ``by_op`` per op
    (overload packet name, e.g. ``convolution``)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.by_op.values())

    def reset(self) -> None:
        self.by_op.clear()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.by_op[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
