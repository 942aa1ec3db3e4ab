"""Counting the host synchronisations a piece of code would make on a GPU.

On a CUDA device every read of a tensor's value by the host (``.item()``, ``float(t)``,
``bool(t)``, ``if t > x:``, ``.tolist()``), and every op whose output size depends on
the data (``nonzero``, boolean-mask indexing), waits for the stream to drain. On the
CPU these calls are free, so a regression is invisible there, but they all go through
a few dispatcher ops, which :class:`SyncCounter` counts on any device:

* ``aten._local_scalar_dense`` - what ``item()``, ``float()``, ``int()``, ``bool()``
  and Python comparisons of a 0-dim tensor call;
* ``aten.nonzero``, ``masked_select``, and indexing with a boolean mask (``bool_index``);
* ``aten.equal`` (``torch.equal``) and ``aten.is_nonzero``;
* :func:`to_host`, the library's batched read of several values (``to_host``).

Example::

    >>> with SyncCounter() as syncs:
    ...     loss = model(x).sum(); loss.backward(); opt.step()
    >>> syncs.count, syncs.by_op
    (0, {})
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncCounter", "SYNC_OPS", "to_host"]

_aten = torch.ops.aten
_ACTIVE: list[SyncCounter] = []
_INDEX_OPS = (_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_)


def _has_bool_index(args: tuple) -> bool:
    idx = args[1] if len(args) > 1 else None
    return isinstance(idx, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in idx
    )


#: Dispatcher ops (overload packets) that read device data back to the host.
SYNC_OPS = {
    _aten._local_scalar_dense: "_local_scalar_dense",
    _aten.nonzero: "nonzero",
    _aten.nonzero_static: "nonzero_static",
    _aten.masked_select: "masked_select",
    _aten.equal: "equal",
    _aten.is_nonzero: "is_nonzero",
}


class SyncCounter(TorchDispatchMode):
    """A ``TorchDispatchMode`` that counts the ops which synchronise a GPU with the host
    (see the module docstring). ``count`` is the total, ``by_op`` the count per op.

    ``nonzero_static`` is not a sync (its output size is given); it is listed in
    ``SYNC_OPS`` only so that ``by_op`` shows it, and not counted in ``count``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(v for k, v in self.by_op.items() if k != "nonzero_static")

    def reset(self) -> None:
        self.by_op.clear()

    def __enter__(self) -> SyncCounter:
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = SYNC_OPS.get(func.overloadpacket)
        if name is not None:
            self.by_op[name] += 1
        elif func.overloadpacket in _INDEX_OPS and _has_bool_index(args):
            # boolean-mask indexing: its output size is the mask's count
            self.by_op["bool_index"] += 1
        return func(*args, **(kwargs or {}))


def to_host(t: torch.Tensor) -> list:
    """``t.tolist()``: the library's one way of reading several device values at once
    (one transfer, one wait on a GPU). Counted by every active :class:`SyncCounter` as
    ``to_host`` (``tolist`` itself does not go through the dispatcher as a sync op)."""
    for c in _ACTIVE:
        c.by_op["to_host"] += 1
    return t.detach().cpu().tolist()
