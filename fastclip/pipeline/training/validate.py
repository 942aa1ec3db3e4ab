"""Every file of a run directory is either verified or rebuilt, and a run that cannot go on
says so in one line.

* ``metrics.csv`` is rebuilt from the checkpoint, which carries the metrics history
  (key ``metrics``): a deleted or damaged file costs one warning, never a row.
* ``config.json`` is read by :func:`read_settings`, whose errors name config.json (not
  a checkpoint).
* A run whose loss is no longer finite ends with :class:`Diverged`: a ``FAILED`` marker
  (JSON: the reason, the step, the epoch, the loss term) that the status table reports,
  and that only ``--force`` clears.
* :func:`run_files_problem` finds the damaged files of a finished run for the status
  table (``damaged``, with the file and the reason).
* :func:`state_dict_mismatch` says which keys and shapes of a checkpoint differ from a
  model (the first few), where torch's own error stops at "Error(s) in loading".
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastclip.pipeline.checkpoint import CheckpointError
from fastclip.pipeline.io import atomic_write_json
from fastclip.pipeline.training.config import CKPT_BEST, CKPT_LAST, CKPT_PREV, CONFIG, DONE, FAILED, METRICS
from fastclip.pipeline.training.metrics import MetricsError, _summary, _write_metrics, read_metrics
from fastclip.pipeline.training.state import _load_checkpoint

__all__ = [
    "Diverged",
    "RunFailed",
    "RunFilesError",
    "Interrupted",
    "read_settings",
    "checkpoint_settings",
    "read_failed",
    "write_failed",
    "resume_rows",
    "finished_rows",
    "run_files_problem",
    "state_dict_mismatch",
    "check_finite",
]


class RunFilesError(ValueError):
    """A file of a run directory that cannot be used (one line: the file and why)."""


class RunFailed(RuntimeError):
    """The run cannot go on (it diverged, now or before): one line; the command exits 1."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training: where it struck (``epoch`` being trained, the
    0-based index ``step`` of the next optimiser step) and ``done``, the last epoch whose
    checkpoint is on disk, which a rerun of the same command resumes after."""

    def __init__(self, epoch: int | None = None, step: int | None = None, done: int | None = None) -> None:
        self.epoch, self.step, self.done = epoch, step, done
        super().__init__(self.line)

    @property
    def line(self) -> str:
        where = f" at epoch {self.epoch}" if self.epoch is not None else ""
        where += f" step {self.step}" if self.step is not None else ""
        kept = (
            f"the checkpoint after epoch {self.done} is intact"
            if self.done
            else "nothing was checkpointed yet"
            if self.done == 0
            else "the files written before are intact"
        )
        return f"interrupted{where}; {kept}: rerun the same command to resume"


class Diverged(FloatingPointError):
    """A loss term that is no longer finite: which term, its value, the step and epoch."""

    def __init__(self, term: str, value: float, step: int, epoch: int | None = None) -> None:
        self.term, self.value, self.step, self.epoch = term, value, step, epoch
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        where = f"step {self.step}" + (f" (epoch {self.epoch})" if self.epoch is not None else "")
        return f"diverged: {self.term} is {self.value} at {where}"


# -- config.json --------------------------------------------------------------------------------
def read_settings(run_dir: str | Path) -> dict[str, Any]:
    """The ``settings`` of a run's config.json; :class:`RunFilesError` naming config.json
    when it is missing, not JSON, or not a run config of this library."""
    path = Path(run_dir) / CONFIG
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RunFilesError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunFilesError(
            f"{path} is unreadable ({getattr(e, 'strerror', None) or type(e).__name__})"
        ) from None
    try:
        settings = json.loads(text)["settings"]
    except ValueError as e:
        raise RunFilesError(f"{path} is damaged (not JSON: {str(e).splitlines()[0]})") from None
    except (KeyError, TypeError):
        raise RunFilesError(f"{path} is damaged (no 'settings' entry)") from None
    if not isinstance(settings, dict):
        raise RunFilesError(f"{path} is damaged ('settings' is a {type(settings).__name__}, not a mapping)")
    return settings


def checkpoint_settings(run_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """(file name, settings) of the newest usable checkpoint of a run (ckpt_last.pth, else
    ckpt_prev.pth): what the run computed when its config.json is gone; None without one."""
    for name in (CKPT_LAST, CKPT_PREV):
        try:
            config = _load_checkpoint(run_dir / name).get("config")
        except (CheckpointError, OSError):
            continue
        if isinstance(config, dict):
            return name, config
    return None


# -- FAILED ------------------------------------------------------------------------------------
def write_failed(run_dir: Path, error: Diverged) -> None:
    """The FAILED marker of a diverged run (JSON, written atomically)."""
    atomic_write_json(
        run_dir / FAILED,
        {
            "reason": error.reason,
            "term": error.term,
            "value": str(error.value),
            "step": error.step,
            "epoch": error.epoch,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def read_failed(run_dir: str | Path) -> str | None:
    """The reason in a run's FAILED marker (or why the marker itself is unreadable);
    None when there is none."""
    path = Path(run_dir) / FAILED
    if not path.exists():
        return None
    try:
        return str(json.loads(path.read_text())["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{FAILED} marker present (unreadable)"


# -- metrics.csv ---------------------------------------------------------------------------------
def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    def key(rows: list[dict[str, Any]]) -> list[Any]:
        return [{k: repr(v) for k, v in r.items()} for r in rows]

    return key(a) == key(b)


def resume_rows(path: Path, ckpt: dict[str, Any] | None) -> tuple[list[dict[str, Any]], list[str]]:
    """The metrics rows a run resumed from ``ckpt`` starts with (up to its epoch) and the
    warnings to log: the checkpoint's history when it carries one (metrics.csv rebuilt
    from it if that is missing, damaged or disagrees), else metrics.csv's rows."""
    if ckpt is None:
        return [], []  # a fresh start keeps no row, whatever the file holds
    epoch = int(ckpt["epoch"])
    history = ckpt.get("metrics")
    try:
        on_disk, problem = [r for r in read_metrics(path) if r["epoch"] <= epoch], None
        if not os.path.lexists(path):
            problem = f"{path.name} is missing"
        elif not path.is_file():
            problem = f"{path.name} is not a regular file"
    except (MetricsError, OSError) as e:
        on_disk, problem = [], str(e)
    if history is None:
        if problem:
            return on_disk, [
                f"{problem}; this checkpoint holds no metrics history, so rows before epoch {epoch + 1} are lost"
            ]
        return on_disk, []
    rows = [dict(r) for r in history]
    if problem or not _same(on_disk, rows):
        why = problem or f"{path.name} disagrees with the checkpoint's history"
        return rows, [f"{why}; rebuilt from the checkpoint ({len(rows)} row(s))"]
    return rows, []


def finished_rows(run_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The metrics rows of a finished (DONE) run and the warnings to log: metrics.csv's,
    or, when it is missing or damaged, the history in ckpt_last.pth, which is then
    written back to metrics.csv. Call it under the run's lock."""
    path = run_dir / METRICS
    try:
        rows = read_metrics(path)
        if rows:
            return rows, _rebuild_done(run_dir, rows)
        problem = f"{METRICS} is missing" if not path.exists() else f"{METRICS} has no rows"
    except MetricsError as e:
        problem = str(e)
    try:
        history = _load_checkpoint(run_dir / CKPT_LAST).get("metrics")
    except (CheckpointError, OSError) as e:
        history, problem = None, f"{problem}, and {CKPT_LAST} cannot rebuild it ({e})"
    if history is None:
        return [], [f"{problem}; the summary comes from {DONE}"]
    rows = [dict(r) for r in history]
    _write_metrics(path, rows)
    return rows, [f"{problem}; rebuilt from {CKPT_LAST} ({len(rows)} row(s))", *_rebuild_done(run_dir, rows)]


def _read_done(run_dir: Path) -> dict[str, Any] | None:
    """The DONE marker's summary, or None if it is missing or not one."""
    try:
        done = json.loads((run_dir / DONE).read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) and {"epochs", "final", "best_test_acc"} <= set(done) else None


def _rebuild_done(run_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Rewrite an unreadable DONE marker from the metrics rows (the warning, if it was)."""
    if _read_done(run_dir) is not None:
        return []
    summary = _summary(run_dir, rows, skipped=False)
    atomic_write_json(run_dir / DONE, {k: summary[k] for k in ("epochs", "best_test_acc", "final")})
    return [f"{DONE} was unreadable; rebuilt from {METRICS}"]


# -- the status table -----------------------------------------------------------------------------
def _zip_problem(path: Path) -> str | None:
    """Cheap structural check of a checkpoint (a torch zip: its directory is readable). A
    resume verifies the full SHA-256; the status table only looks."""
    try:
        with zipfile.ZipFile(path) as z:
            if not z.namelist():
                return f"{path.name} is empty"
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        return f"{path.name} is unreadable ({type(e).__name__})"
    return None


def run_files_problem(run_dir: str | Path, deep: bool = False) -> str | None:
    """Why a finished run's files cannot be trusted (the first problem found: config.json,
    DONE, metrics.csv, ckpt_last.pth, ckpt_best.pth), or None (also for a directory
    holding none of this trainer's files). ``deep`` loads and
    verifies the checkpoints' SHA-256 instead of only their zip structure."""
    run_dir = Path(run_dir)
    if not any((run_dir / name).exists() for name in (CONFIG, CKPT_LAST, CKPT_BEST)):
        return None  # not a run directory of this trainer (another script's done file)
    try:
        read_settings(run_dir)
    except RunFilesError as e:
        return str(e).replace(str(run_dir / CONFIG), CONFIG)
    if not (run_dir / DONE).exists():
        return f"{DONE} is missing"
    done = _read_done(run_dir)
    if done is None:
        return f"{DONE} is damaged (not the JSON summary of a run)"
    try:
        rows = read_metrics(run_dir / METRICS)
    except MetricsError as e:
        return str(e)
    if not rows:
        return f"{METRICS} is missing or empty"
    if isinstance(done.get("epochs"), int) and rows[-1]["epoch"] != done["epochs"]:
        return f"{METRICS} ends at epoch {rows[-1]['epoch']}, {DONE} says {done['epochs']}"
    for name in (CKPT_LAST, CKPT_BEST):
        if deep:
            try:
                _load_checkpoint(run_dir / name)
            except CheckpointError as e:
                return str(e)
            except FileNotFoundError:
                return f"{name} is missing"
        else:
            problem = _zip_problem(run_dir / name)
            if problem:
                return problem
    return None


# -- loading weights into a model ---------------------------------------------------------------
def state_dict_mismatch(model: nn.Module, state: dict[str, Any], first: int = 3) -> str | None:
    """What keeps ``state`` from loading strictly into ``model``: the keys it lacks, the
    keys it has that the model does not, and the shapes that differ (the first ``first``
    of each, with counts); None when they match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state
        and isinstance(state[k], torch.Tensor)
        and isinstance(own[k], torch.Tensor)
        and tuple(state[k].shape) != tuple(own[k].shape)
    ]

    def part(label: str, items: list[str]) -> str:
        more = f" and {len(items) - first} more" if len(items) > first else ""
        return f"{len(items)} {label} ({', '.join(items[:first])}{more})"

    parts = [
        part(label, items)
        for label, items in (
            ("shape(s) differ, checkpoint vs model:", shapes),
            ("missing key(s)", missing),
            ("unexpected key(s)", unexpected),
        )
        if items
    ]
    return "; ".join(parts) if parts else None


def check_finite(model: nn.Module, step: int) -> None:
    """Raise :class:`Diverged` naming the first parameter or buffer of ``model`` that holds
    a NaN or an infinity (after step ``step``)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        t = t.detach()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise Diverged(f"parameter {name}", float(t[~torch.isfinite(t)].flatten()[0]), step)
