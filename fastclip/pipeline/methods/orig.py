"""``orig``: the unclipped baseline. It changes nothing (in clipBN mode the base class
still clamps batch norm, which is what the paper's "orig + clipBN" runs do)."""

from __future__ import annotations

from dataclasses import dataclass

from fastclip.pipeline.methods.base import Method, MethodConfig

__all__ = ["Orig", "OrigConfig"]


@dataclass
class OrigConfig(MethodConfig):
    """No hyper-parameters of its own."""


class Orig(Method):
    """No clipping: ``prepare`` only records input shapes, ``penalty`` is 0 and
    ``after_step`` only acts in clipBN mode.

    Example::

        >>> m = Orig(mode="wBN")
        >>> model = m.prepare(model, (3, 32, 32))   # the same model, untouched
    """

    name = "orig"
    Config = OrigConfig
