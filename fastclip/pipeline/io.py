"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The temporary file of a write lies beside its target and is named
``.<target>.<host>-<pid>.<random>.tmp``, so that a later process can tell whether the
writer of a temp left behind by a kill is gone (:func:`clean_stale_temps`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "WriteError",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "clean_stale_temps",
    "KILL_HOOK_ENV",
]

logger = logging.getLogger(__name__)

#: Test hook: ``<file name>:<n>`` makes the process SIGKILL itself just before the n-th
#: rename of a temp onto a file of that name (n defaults to 1), to test what a kill at
#: the worst moment leaves behind. Unset in normal use.
KILL_HOOK_ENV = "FASTCLIP_KILL_BEFORE_RENAME"
_renames: dict[str, int] = {}

_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.tmp$")
# Temps of versions before the host-pid tag: ".<target>.<8 random chars>.tmp" (mkstemp).
_LEGACY_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp$")


class WriteError(OSError):
    """A write that the operating system refused part-way (a full disk, an I/O error, a
    quota): one line naming the file and the OS error. The file as it was before the
    write is intact and the write's temp file is gone, so once the cause is fixed the
    same command can simply run again."""

    def __str__(self) -> str:
        return f"cannot write {str(self.filename)!r}: {self.strerror} (errno {self.errno})"


def _host() -> str:
    # The first label only, without characters that would break the name pattern.
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname().split(".")[0]) or "host"


def _maybe_kill(path: Path) -> None:
    hook = os.environ.get(KILL_HOOK_ENV)
    if not hook:
        return
    name, _, count = hook.partition(":")
    if path.name != name:
        return
    _renames[name] = _renames.get(name, 0) + 1
    if _renames[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync it, then rename it
    over ``path``. The rename is atomic on POSIX, so a crash leaves the previous file intact."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.{_host()}-{os.getpid()}.", suffix=".tmp", dir=path.parent
        )
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from None
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _maybe_kill(path)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError) and e.errno is not None:
            raise WriteError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temps(directory: str | os.PathLike, owned: Iterable[str] = ()) -> list[Path]:
    """Remove the temps of atomic writes in ``directory`` whose writer is gone: tagged with
    this host and the pid of a process that no longer exists. Temps of the files named in
    ``owned`` are removed whatever their tag (also untagged ones of older versions): the
    caller holds the lock that every writer of those files takes, so none is in flight.
    Temps of other hosts, of live processes and of this process are kept. Returns the
    removed paths."""
    directory = Path(directory)
    owned = set(owned)
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    host, me = _host(), os.getpid()
    for p in entries:
        if not p.name.endswith(".tmp") or not p.name.startswith("."):
            continue
        m = _TEMP_RE.match(p.name)
        if m:
            pid = int(m["pid"])
            stale = m["host"] == host and pid != me and (m["target"] in owned or not _pid_alive(pid))
            stale = stale or (m["host"] != host and m["target"] in owned)
        else:
            legacy = _LEGACY_TEMP_RE.match(p.name)
            stale = bool(legacy) and legacy["target"] in owned
        if stale:
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    if removed:
        logger.info("removed %d temp file(s) of interrupted writes in %s", len(removed), directory)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    # Serialised in memory first: torch's zip writer turns a failed write (a full disk)
    # into a RuntimeError without the OS error; a plain write of the bytes keeps it.
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    atomic_write(path, lambda f: f.write(data))
