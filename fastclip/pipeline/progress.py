"""Progress of long loops: a tqdm bar on a terminal, plain log lines everywhere else.

A bar redraws itself with carriage returns, which is what a terminal wants and what a
SLURM log or ``make demo > log`` does not: there every redraw stays in the file. So
:func:`progress` returns a tqdm bar only when stderr is a terminal; otherwise a
:class:`LogProgress` with the same interface (iteration, ``update``, ``set_postfix``,
``close``, a context manager) that writes one log line every ``every`` seconds (never,
for ``every=None``: the caller logs its own summary line).

Example::

    >>> with progress(total=3, desc="runs", unit="run", every=None) as bar:
    ...     for _ in range(3):
    ...         bar.update(1)
    >>> bar.n
    3
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["interactive", "progress", "LogProgress"]

logger = logging.getLogger(__name__)


def interactive() -> bool:
    """Whether progress bars may be drawn: stderr (where tqdm draws) is a terminal."""
    return bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())


class LogProgress:
    """What a tqdm bar shows, as a log line (``<desc>: <n>/<total> <unit> <postfix> (<s> s)``)
    at most every ``every`` seconds, and none for ``every=None``."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        every: float | None = 30.0,
        log: logging.Logger | None = None,
    ) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit, self.every = desc, unit, every
        self.log = log or logger
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.every is not None and now - self._last >= self.every:
            self._last = now
            self.log.info("%s", self.line())

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def line(self) -> str:
        done = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        post = "".join(f" {k}={v}" for k, v in self.postfix.items())
        return f"{self.desc}: {done} {self.unit}{post} ({time.monotonic() - self._start:.1f} s)"

    def close(self) -> None:
        pass


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    every: float | None = 30.0,
    disable: bool = False,
    log: logging.Logger | None = None,
    **tqdm_kwargs: Any,
) -> Any:
    """A tqdm bar over ``iterable`` (or ``total`` steps) when stderr is a terminal and not
    ``disable``; otherwise a :class:`LogProgress` (silent when ``disable``)."""
    if interactive() and not disable:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, **tqdm_kwargs)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, every=None if disable else every, log=log)
