"""What a run changes in its process while it trains, and restores afterwards.

:func:`_log_to` sends the library's log records to the run's ``train.log`` as well;
:func:`_quiet_unless` keeps ranks other than 0 to warnings and errors (rank 0 speaks for
the run); :func:`_deterministic` turns on torch's deterministic algorithms on the CPU, so
that a resumed run ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class _QuietFileHandler(logging.FileHandler):
    # A full disk must end the run with one line, not a "--- Logging error ---" traceback
    # per record: the log file is where the failure would be written, so it fails quietly.
    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        pass


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Send the library's log records to ``path`` (and, as usual, to the root handlers)."""
    pkg = logging.getLogger("fastclip")
    handler = _QuietFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(old_level)
        handler.close()


@contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    # Only on the CPU: CUDA would need CUBLAS_WORKSPACE_CONFIG and loses speed.
    before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextmanager
def _quiet_unless(main: bool) -> Iterator[None]:
    """Ranks other than 0 log warnings and errors only (rank 0 speaks for the run)."""
    pkg = logging.getLogger("fastclip")
    old = pkg.level
    if not main:
        pkg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        pkg.setLevel(old)
