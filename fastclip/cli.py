"""What every command-line script shares: one-line errors and checked number types.

Bad input must end a script with one line naming the value (exit code 2), not a usage
block or a traceback; the argparse ``type=`` callables below reject a value with an
``ArgumentTypeError`` that argparse prefixes with the flag.

Example::

    >>> p = OneLineErrorParser(prog="train.py")
    >>> _ = p.add_argument("--epochs", type=int_at_least(1))
    >>> p.parse_args(["--epochs", "3"]).epochs
    3
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

__all__ = ["OneLineErrorParser", "int_at_least", "positive_float", "nonneg_float"]


class OneLineErrorParser(argparse.ArgumentParser):
    """Reports a bad argument as one line on stderr (exit code 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(minimum: int, what: str = "an integer", why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``; the error reads ``expected <what> >=
    <minimum>`` (``a positive integer`` for 1), followed by ``why`` when given."""
    bound = "a positive integer" if minimum == 1 and what == "an integer" else f"{what} >= {minimum}"
    suffix = f" ({why})" if why else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what if minimum != 1 else bound}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {bound}{suffix}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"  # argparse names the type in some messages
    return parse


def _float(text: str, ok: Callable[[float], bool], bound: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {bound}, got {text!r}") from None
    if not (ok(value) and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected {bound}, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    return _float(text, lambda v: v > 0, "a positive finite number")


def nonneg_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    return _float(text, lambda v: v >= 0, "a finite number >= 0")
