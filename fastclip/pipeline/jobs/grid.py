"""Runs and grids: what a dispatch computes, named by its runs, and the manifest format
that records it (:func:`load_manifest`)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The paper's seeds, used when no ``--seed`` is given.
DEFAULT_SEEDS: list[int] = [10**i for i in range(10)]
BACKENDS = ("slurm", "local")
#: Run states of :func:`grid_status`, in table order.
STATES = ("done", "running", "queued", "damaged", "stale", "failed", "missing")

_MANIFEST_VERSION = 1


class GridError(ValueError):
    """A grid that cannot be dispatched (unknown name, bad flag, nothing to attack...).
    Raised before anything is submitted; the command lines turn it into exit code 2."""


class SubmissionError(RuntimeError):
    """The scheduler refused or could not be asked (sbatch / squeue failed)."""


# -- grids ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One grid point: the command that computes it and where its results go.

    ``argv`` is the whole command (``argv[0]`` the Python interpreter); ``done_file``
    exists once the run finished; the script's logs go to ``run_dir/logs/<log_name>_*``.
    """

    name: str
    kind: str
    run_dir: Path
    argv: tuple[str, ...]
    done_file: Path
    log_name: str
    #: A file that must exist before the run can start (an attack needs a finished training run).
    requires: Path | None = None

    @property
    def uid(self) -> str:
        """Identifies the run across grids: two grids sharing a run share its jobs."""
        return str(self.done_file)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "run_dir": str(self.run_dir),
            "argv": list(self.argv),
            "done_file": str(self.done_file),
            "log_name": self.log_name,
            "requires": None if self.requires is None else str(self.requires),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Run:
        return cls(
            name=d["name"],
            kind=d["kind"],
            run_dir=Path(d["run_dir"]),
            argv=tuple(d["argv"]),
            done_file=Path(d["done_file"]),
            log_name=d["log_name"],
            requires=None if d.get("requires") is None else Path(d["requires"]),
        )


@dataclass
class Grid:
    """The runs of one grid and ``home``, the directory holding the manifests of all
    grids over the same runs (``<logdir>/grids``)."""

    kind: str
    runs: list[Run]
    home: Path

    @property
    def name(self) -> str:
        """``<kind>-<10 hex digits of the runs' identity>``: the same runs give the same
        name whatever other flags (epochs, subsets) were passed."""
        digest = hashlib.sha1("\n".join(sorted(r.uid for r in self.runs)).encode()).hexdigest()[:10]
        return f"{self.kind}-{digest}"

    @property
    def dir(self) -> Path:
        return self.home / self.name

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    @classmethod
    def from_manifest(cls, path: str | os.PathLike) -> Grid:
        """The grid recorded in a manifest written by a dispatch."""
        path = Path(path)
        m = load_manifest(path)
        if not m["runs"]:
            raise GridError(
                f"{path} records no runs; expected a manifest written by batch_job_submit.py "
                f"or batch_attack_submit.py"
            )
        return cls(
            kind=m["kind"],
            runs=[Run.from_json(e["run"]) for e in m["runs"].values()],
            home=path.parent.parent,
        )


def expand(values: Sequence[str] | str | None, choices: Sequence[str], what: str) -> list[str]:
    """``values`` with ``all`` replaced by every choice, duplicates dropped, order kept.

    Example::

        >>> expand(["all"], ["wBN", "noBN", "clipBN"], "mode")
        ['wBN', 'noBN', 'clipBN']
        >>> expand(["fastclip", "gouk"], ["orig", "fastclip", "gouk"], "method")
        ['fastclip', 'gouk']
        >>> expand(["fast"], ["orig", "fastclip"], "method")
        Traceback (most recent call last):
        ...
        fastclip.pipeline.jobs.grid.GridError: unknown method 'fast'; choose from orig, fastclip, all
    """
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for v in values:
        if v == "all":
            new = list(choices)
        elif v in choices:
            new = [v]
        else:
            raise GridError(f"unknown {what} {v!r}; choose from {', '.join([*choices, 'all'])}")
        out += [n for n in new if n not in out]
    return out


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """A grid manifest (``{"kind", "runs": {uid: {"run": Run.to_json(), "jobs": [...]}}}``);
    an empty one if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return {"version": _MANIFEST_VERSION, "kind": None, "runs": {}}
    try:
        m = json.loads(path.read_text())
        if not isinstance(m.get("runs"), dict):
            raise ValueError("no 'runs' mapping")
    except (ValueError, OSError) as e:
        raise GridError(f"{path} is not a grid manifest ({e})") from None
    return m
