"""What the file system will refuse about a path, found before anything is written:
names longer than it takes, pseudo file systems (``/proc``, ``/sys``, ...) that hold no
files of ours, and existing entries that are not what the writer expects. Reads only.

Example::

    >>> name_problem("/tmp/" + "x" * 300)
    "name 'xxxxxxxxxxxx...xxxxxxxx' is 300 bytes long; the file system takes at most 255"
    >>> pseudo_filesystem("/proc/self")
    'proc'
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PSEUDO_FILESYSTEMS", "name_problem", "pseudo_filesystem", "nearest_existing"]

#: Kernel file systems whose entries are the kernel's own: a run's files cannot be made there
#: (root's os.access says "writable" for some of them, so they are named instead).
PSEUDO_FILESYSTEMS = frozenset(
    {
        "proc",
        "sysfs",
        "cgroup",
        "cgroup2",
        "debugfs",
        "tracefs",
        "securityfs",
        "configfs",
        "pstore",
        "bpf",
        "fusectl",
        "efivarfs",
        "binfmt_misc",
        "devpts",
        "mqueue",
        "hugetlbfs",
        "nsfs",
    }
)


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` (made absolute) or its nearest ancestor that exists."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    for q in [p, *p.parents]:
        if os.path.lexists(q):
            return q
    return Path("/")


def _limit(directory: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(directory, name))
    except (OSError, ValueError):
        return default


def name_problem(path: str | os.PathLike) -> str | None:
    """Why the file system would refuse ``path``'s name (a component longer than
    ``NAME_MAX`` bytes, the whole longer than ``PATH_MAX``), or None."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    base = nearest_existing(p)
    if not base.is_dir():
        base = base.parent
    name_max = _limit(base, "PC_NAME_MAX", 255)
    for part in p.parts[1:]:
        size = len(os.fsencode(part))
        if size > name_max:
            short = part if len(part) <= 24 else part[:12] + "..." + part[-8:]
            return f"name {short!r} is {size} bytes long; the file system takes at most {name_max}"
    path_max = _limit(base, "PC_PATH_MAX", 4096)
    if len(os.fsencode(str(p))) >= path_max:
        return (
            f"the path is {len(os.fsencode(str(p)))} bytes long; the file system takes less than {path_max}"
        )
    return None


def _mounts() -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount this process sees; [] off Linux."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and right:
                    # mountinfo escapes blanks in paths as octal (\040)
                    point = fields[4].encode().decode("unicode_escape")
                    out.append((point, right.split()[0]))
    except OSError:
        return []
    return out


def pseudo_filesystem(path: str | os.PathLike) -> str | None:
    """The type of the pseudo file system (:data:`PSEUDO_FILESYSTEMS`) that ``path`` (or its
    nearest existing ancestor) lies on, or None."""
    real = os.path.realpath(nearest_existing(path))
    best, kind = "", None
    for point, fstype in _mounts():
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind if kind in PSEUDO_FILESYSTEMS else None
