"""What the backends share about a run's child process: its environment, how to stop it,
where its logs go and the line of a log that says why it failed."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

# -- logs -------------------------------------------------------------------------------------------
_ERROR_RE = re.compile(r"(Error|Exception|error:|Traceback|Killed|CANCELLED|TIME LIMIT|OOM|out of memory)")


def last_error_line(path: str | os.PathLike | None, max_bytes: int = 256_000) -> str:
    """The last line of a log that reads like an error (``...Error: ...``, ``train.py:
    error: ...``, SLURM's ``CANCELLED``/``TIME LIMIT``), else its last non-empty line; ""
    for a missing or empty file. Progress-bar redraws (``\\r``) count as line breaks."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    for ln in reversed(lines):
        if _ERROR_RE.search(ln) and not ln.startswith("Traceback"):
            return ln
    return lines[-1] if lines else ""


def _log_paths(run_dir: Path, log_name: str, tag: str) -> tuple[Path, Path, Path]:
    base = run_dir / "logs" / f"{log_name}_{tag}"
    return base.with_suffix(".out"), base.with_suffix(".err"), base.with_suffix(".json")


def _metrics_rows(run_dir: Path) -> int | None:
    path = run_dir / "metrics.csv"
    try:
        with open(path, errors="replace") as f:
            return max(0, sum(1 for line in f if line.strip()) - 1)
    except (OSError, ValueError):
        return None


# -- the task a SLURM array element runs ------------------------------------------------------------
def _child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    # Several runs share a node: one BLAS/OpenMP pool per core they were given, not per core
    # of the node. The user's own OMP_NUM_THREADS wins.
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _stop_child(pid: int, timeout: float = 60.0) -> None:
    """SIGTERM a child, reap it, SIGKILL it after ``timeout`` s. Called from submitit's
    signal handler while ``Popen.wait`` holds the Popen's lock in the interrupted frame,
    so this uses os.kill/os.waitpid rather than Popen methods (which would block on it)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
