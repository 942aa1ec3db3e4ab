"""Valid ranges of numbers and paths, checked where a value comes in (a flag, a config)
before any work: the argparse ``type=`` callables every command uses, and the same
bounds for the library's configs.

Every checked type carries its range as ``valid_range`` (``--help`` shows it); the
ceilings below apply to every count and real-valued setting that names no tighter one.

Example::

    >>> int_at_least(1, maximum=100)("7")
    7
    >>> int_at_least(1).valid_range
    '1..1000000000'
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = [
    "MAX_COUNT",
    "MAX_REAL",
    "MAX_SEED",
    "int_at_least",
    "int_seed",
    "real_in",
    "positive_float",
    "nonneg_float",
    "finite_float",
    "path_arg",
    "check_int",
    "check_real",
]

#: The ceiling of every count a flag takes unless it names its own: no loop, size or
#: count of this library is meant to go near it, so a value above it is a typo (a run of
#: 10**23 epochs "trains on" forever).
MAX_COUNT = 10**9
#: The ceiling of every real-valued flag unless it names its own.
MAX_REAL = 1e12
#: Seeds: what ``torch.manual_seed`` accepts.
MAX_SEED = 2**63 - 1


def _range_text(low: str, high: str) -> str:
    return f"{low}..{high}"


def int_at_least(
    minimum: int, what: str = "an integer", why: str = "", maximum: int = MAX_COUNT
) -> Callable[[str], int]:
    """An argparse type: an integer in ``minimum..maximum``; the error reads ``expected
    <what> >= <minimum>`` (``a positive integer`` for 1), or ``... <= <maximum>``,
    followed by ``why`` when given. The range is the callable's ``valid_range`` (shown
    by ``--help``, see :class:`OneLineErrorParser`)."""
    bound = "a positive integer" if minimum == 1 and what == "an integer" else f"{what} >= {minimum}"
    suffix = f" ({why})" if why else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {what if minimum != 1 else bound}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {bound}{suffix}, got {text!r}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"expected {what} in {minimum}..{maximum}{suffix}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"  # argparse names the type in some messages
    parse.valid_range = _range_text(str(minimum), str(maximum))  # type: ignore[attr-defined]
    return parse


def int_seed(text: str) -> int:
    """An argparse type: a seed, an integer in ``0..2**63-1``."""
    return _seed(text)


_seed = int_at_least(0, "an integer seed", maximum=MAX_SEED)
int_seed.valid_range = _seed.valid_range  # type: ignore[attr-defined]


def real_in(
    minimum: float | None = None,
    maximum: float = MAX_REAL,
    *,
    open_min: bool = False,
    what: str | None = None,
) -> Callable[[str], float]:
    """An argparse type: a finite number in ``[minimum, maximum]`` (``(minimum, maximum]``
    with ``open_min``; no lower bound but finiteness and ``-maximum`` for None). NaN
    and infinities are refused whatever the bounds."""
    low = -maximum if minimum is None else minimum
    if what is None:
        if minimum == 0:
            what = "a positive finite number" if open_min else "a finite number >= 0"
        else:
            what = f"a finite number {'>' if open_min else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (open_min and value == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"expected {what} <= {maximum:g}, got {text}")
        return value

    parse.__name__ = "real"
    parse.valid_range = f"{'(' if open_min else '['}{low:g}, {maximum:g}]"  # type: ignore[attr-defined]
    return parse


positive_float = real_in(0, open_min=True)
positive_float.__doc__ = "An argparse type: a finite number > 0 (and <= MAX_REAL)."
nonneg_float = real_in(0)
nonneg_float.__doc__ = "An argparse type: a finite number >= 0 (and <= MAX_REAL)."
finite_float = real_in(None)
finite_float.__doc__ = "An argparse type: a finite number of magnitude <= MAX_REAL."


def path_arg(text: str) -> str:
    """An argparse type: a path, never the empty string (which would mean the working
    directory, or nothing, depending on who reads it) and without NUL bytes."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r} (a NUL byte)")
    return text


path_arg.__name__ = "path"


# -- the same bounds for values that come from Python, not a command line ------------------------
def check_int(name: str, value: object, minimum: int, maximum: int = MAX_COUNT) -> int:
    """``value`` if it is an integer (not a bool) in ``minimum..maximum``; else a
    one-line ``ValueError`` naming ``name``, the value and the range."""
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r} (valid: {minimum}..{maximum})")
    return value


def check_real(
    name: str, value: object, minimum: float | None = None, maximum: float = MAX_REAL, open_min: bool = False
) -> float:
    """``float(value)`` if it is a finite real in the range (see :func:`real_in`); else a
    one-line ``ValueError`` naming ``name``, the value and the range."""
    low = -maximum if minimum is None else minimum
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value <= maximum and not (open_min and value == low)
    if not ok:
        what = "a positive number" if minimum == 0 and open_min else "a finite number"
        bounds = f"{'(' if open_min else '['}{low:g}, {maximum:g}]"
        raise ValueError(f"{name} must be {what}, got {value!r} (valid: {bounds})")
    return float(value)
