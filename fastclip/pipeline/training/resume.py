"""Whether a run directory may be used, and what a run does with it: skip, resume or start afresh.

Before anything is written, :func:`_check_writable_path` and :func:`_check_same_settings`
refuse a logdir that cannot hold the run and a directory that holds a run with other
settings. :func:`_decide` then runs under the directory's lock (:func:`_run_lock`): a
finished run (DONE) is skipped, a diverged one (FAILED) stops with its reason, and
otherwise the run resumes after its last good checkpoint or starts afresh
(:func:`_clear_run` empties the directory for ``--force``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastclip.pipeline.checkpoint import CheckpointError
from fastclip.pipeline.cli import output_dir_problem
from fastclip.pipeline.io import atomic_write, clean_stale_temps
from fastclip.pipeline.training.config import (
    CKPT_BEST,
    CKPT_LAST,
    CKPT_PREV,
    CONFIG,
    DONE,
    FAILED,
    LOCK,
    LOG,
    METRICS,
    ConfigError,
    TrainConfig,
    _conflicts,
)
from fastclip.pipeline.training.distributed import Replica
from fastclip.pipeline.training.metrics import _summary
from fastclip.pipeline.training.state import _find_resume_checkpoint, _load_checkpoint
from fastclip.pipeline.training.validate import (
    RunFailed,
    RunFilesError,
    checkpoint_settings,
    finished_rows,
    read_failed,
    read_settings,
)

logger = logging.getLogger("fastclip.pipeline.training")


def _check_writable_path(run_dir: Path) -> None:
    for parent in [run_dir, *run_dir.parents]:
        if os.path.exists(parent) and not os.path.isdir(parent):  # no raise on a too long name
            raise ConfigError(f"logdir path {str(parent)!r} exists and is not a directory")
    problem = output_dir_problem(run_dir, "logdir")
    if problem:
        raise ConfigError(problem)


@contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on the run directory (released by the OS if the process dies)."""
    with open(run_dir / LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"run directory {str(run_dir)!r} is in use by another process") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clear_run(run_dir: Path) -> None:
    for p in run_dir.iterdir():
        if p.name in (
            CONFIG,
            METRICS,
            DONE,
            FAILED,
            LOG,
            CKPT_LAST,
            CKPT_PREV,
            CKPT_BEST,
        ) or p.name.startswith("events.out.tfevents."):
            p.unlink()


def _check_same_settings(run_dir: Path, identity: dict[str, Any]) -> None:
    if not (run_dir / CONFIG).is_file():
        # config.json gone (a finished run would be skipped unchecked): its checkpoint says
        # what the run computed.
        found = checkpoint_settings(run_dir) if run_dir.is_dir() else None
        conflicts = _conflicts(found[1], identity) if found else []
        if conflicts:
            raise ConfigError(
                f"{run_dir} has no {CONFIG}, and its {found[0]} was written by a run with other "
                f"settings ({'; '.join(conflicts)}); use --force to start afresh or another --logdir"
            )
        return
    try:
        conflicts = _conflicts(read_settings(run_dir), identity)
    except (RunFilesError, TypeError, AttributeError) as e:
        why = (
            str(e)
            if isinstance(e, RunFilesError)
            else f"{run_dir / CONFIG} is not a run config of this library"
        )
        raise ConfigError(f"{why}; use --force to start afresh or another --logdir") from None
    if conflicts:
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({'; '.join(conflicts)}); "
            f"use --force to start afresh or another --logdir"
        )


def _decide(run_dir: Path, cfg: TrainConfig, identity: dict[str, Any]) -> dict[str, Any]:
    """Under the run lock: skip (DONE), resume (a usable checkpoint) or start afresh.
    Also removes the debris of killed attempts, which only a lock holder may do."""
    removed = clean_stale_temps(
        run_dir, owned=(CONFIG, METRICS, DONE, FAILED, CKPT_LAST, CKPT_PREV, CKPT_BEST)
    )
    (run_dir / (CKPT_PREV + ".link")).unlink(missing_ok=True)
    out: dict[str, Any] = {"skip": False, "ckpt": None, "warnings": [], "history": []}
    if removed:
        out["warnings"].append(
            f"removed {len(removed)} temp file(s) left by interrupted writes: "
            f"{', '.join(p.name for p in removed)}"
        )
    if cfg.force:
        return out
    _check_same_settings(run_dir, identity)  # again: the config may have changed before the lock
    failed = read_failed(run_dir)
    if failed:
        raise RunFailed(f"{run_dir} ended before: {failed} ({FAILED}); use --force to start over")
    repaired = _verify_finished(run_dir) if (run_dir / DONE).exists() else None
    if (run_dir / DONE).exists():
        if repaired is not None:
            logger.warning(repaired)  # restored: the run stays finished
        logger.info("%s finished already (DONE); skipping (use --force to retrain)", run_dir)
        rows, warnings = finished_rows(run_dir)
        for line in warnings:
            logger.warning(line)
        return {**out, "skip": True, "summary": _summary_of_done(run_dir, rows)}
    ckpt, warnings = _find_resume_checkpoint(run_dir, identity)
    if repaired is not None:
        # One line for the finished run's damage and what is done about it.
        fallback = f"resuming after epoch {ckpt['epoch']}" if ckpt is not None else "retraining from scratch"
        warnings = [f"{repaired}; {fallback}"]
    out["ckpt"], out["warnings"] = ckpt, out["warnings"] + warnings
    if ckpt is not None:
        try:
            out["history"] = list(json.loads((run_dir / CONFIG).read_text()).get("threads_history") or [])
        except (OSError, ValueError, AttributeError):
            out["history"] = []
        old = ckpt.get("threads")
        if old is not None and old != cfg.threads:
            out["warnings"].append(
                f"resuming after epoch {ckpt['epoch']}, which ran with {old} CPU thread(s), with {cfg.threads}: "
                f"later epochs may differ in the last bits from an uninterrupted run (--threads {old} matches it)"
            )
    return out


def _verify_finished(run_dir: Path) -> str | None:
    """Verify the SHA-256 of a finished run's checkpoints (under the run lock). None when
    they are sound; otherwise what was found and done, one line: a damaged ckpt_best.pth
    of the same epoch as a sound ckpt_last.pth / ckpt_prev.pth is restored from it (the
    run stays finished, DONE kept); any other damage removes DONE, so that the run resumes
    from its last good checkpoint, or starts afresh (a lost best epoch clears the run)."""
    problems: dict[str, str] = {}
    last = None
    for name in (CKPT_LAST, CKPT_BEST):
        try:
            ckpt = _load_checkpoint(run_dir / name)
            last = ckpt if name == CKPT_LAST else last
        except FileNotFoundError:
            problems[name] = f"{name} is missing"
        except (CheckpointError, OSError) as e:
            problems[name] = str(e)
    if not problems:
        return None
    what = f"{run_dir} finished (DONE), but {'; '.join(problems.values())}"
    if CKPT_BEST in problems:
        source = _checkpoint_of_epoch(run_dir, _best_epoch(last), last) if last is not None else None
        if source is None:
            # The best epoch's state is in no sound checkpoint: only a run from scratch remakes it.
            _clear_run(run_dir)
            return f"{what}, and its best epoch is in no sound checkpoint"
        _copy_atomic(run_dir / source, run_dir / CKPT_BEST)
        return f"{what}; restored {CKPT_BEST} from {source}, which holds the same epoch"
    (run_dir / DONE).unlink()  # ckpt_last.pth: resume from the checkpoint before it
    return what


def _best_epoch(ckpt: dict[str, Any]) -> int | None:
    """The epoch ckpt_best.pth was written after: the first with the highest test accuracy."""
    rows = [r for r in ckpt.get("metrics") or [] if isinstance(r, dict) and "test_acc" in r]
    if not rows:
        return None
    best = max(float(r["test_acc"]) for r in rows)
    return int(next(r["epoch"] for r in rows if float(r["test_acc"]) == best))


def _checkpoint_of_epoch(run_dir: Path, epoch: int | None, last: dict[str, Any]) -> str | None:
    """A sound checkpoint (ckpt_last.pth, else ckpt_prev.pth) saved after ``epoch``: the
    best checkpoint of that epoch is the same state, saved from the same dict."""
    if epoch is None:
        return None
    if int(last["epoch"]) == epoch:
        return CKPT_LAST
    try:
        if int(_load_checkpoint(run_dir / CKPT_PREV)["epoch"]) == epoch:
            return CKPT_PREV
    except (CheckpointError, OSError):
        pass
    return None


def _copy_atomic(src: Path, dest: Path) -> None:
    with open(src, "rb") as source:
        atomic_write(dest, lambda f: shutil.copyfileobj(source, f))


def _summary_of_done(run_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    if rows:
        return _summary(run_dir, rows, skipped=True)
    try:
        done = json.loads((run_dir / DONE).read_text())
        return {
            "run_dir": str(run_dir),
            "skipped": True,
            **{k: done[k] for k in ("epochs", "final", "best_test_acc")},
        }
    except (OSError, ValueError, KeyError, TypeError):
        return _summary(run_dir, [], skipped=True)


def _world_size_warnings(decision: dict[str, Any], cfg: TrainConfig, replica: Replica) -> list[str]:
    ckpt = decision.get("ckpt")
    old = int(ckpt.get("world_size", 1)) if ckpt else replica.world_size
    if old == replica.world_size:
        return []
    return [
        f"resuming after epoch {ckpt['epoch']}, which ran on {old} process(es), on {replica.world_size}: "
        f"the global batch changes from {old * cfg.batch_size} to {replica.world_size * cfg.batch_size} "
        f"(--batch-size is per process)"
    ]
