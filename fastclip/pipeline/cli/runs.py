"""What the commands over trained runs share: finding the runs a prefix names (labelled by
their config.json, a FAILED run refused unless asked for), the device and a run's model,
each ending the command with a one-line error (exit code 2) when it cannot be had, the
identity of the checkpoint an evaluation measures and whether an earlier result still
measures it (:mod:`fastclip.pipeline.provenance`), and one-line warnings."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastclip.pipeline.checkpoint import CheckpointError
from fastclip.pipeline.methods.base import MODES
from fastclip.pipeline.provenance import CheckpointId, checkpoint_id, stale_result
from fastclip.pipeline.results import Run, check_runs, describe_runs, find_runs, identify
from fastclip.pipeline.training import ConfigError, TrainConfig, choose_device, load_model
from fastclip.pipeline.training.validate import RunFilesError, read_failed

__all__ = [
    "find_runs_or_exit",
    "failure_of",
    "refuse_failed_or_exit",
    "warn",
    "device_or_exit",
    "load_model_or_exit",
    "checkpoint_id_or_exit",
    "stale_result",
]

#: The flag that evaluates a FAILED run anyway.
INCLUDE_FAILED = "--include-failed"


def warn(parser: argparse.ArgumentParser, message: str) -> None:
    """One warning line on stderr, ``<prog>: warning: <message>`` (whatever the logging
    level: a command that keeps its log quiet still says what it relabelled or dropped)."""
    print(f"{parser.prog}: warning: {message}", file=sys.stderr)


def failure_of(run: Run | str | os.PathLike) -> str | None:
    """Why the run ended FAILED (the reason in its FAILED marker, written by train.py when
    the loss diverged), or None when it did not."""
    return read_failed(run.path if isinstance(run, Run) else Path(run))


def refuse_failed_or_exit(
    parser: argparse.ArgumentParser, runs: list[Run] | list[Path], include_failed: bool
) -> dict[Path, str]:
    """The failed ones of ``runs`` (path -> reason). Without ``include_failed`` a failed
    run ends the command with one line naming it and its failure: its weights are those
    of a diverged training (sigma_1 of 1e11), and its numbers must not pass for a
    result; with it, each is evaluated, with a warning, and the caller marks its rows."""
    paths = [r.path if isinstance(r, Run) else Path(r) for r in runs]
    failed = {p: why for p in paths if (why := failure_of(p)) is not None}
    if failed and not include_failed:
        (path, why), *more = failed.items()
        others = f" ({len(more)} more failed: {', '.join(p.name for p, _ in more)})" if more else ""
        parser.error(f"run {path} ended FAILED: {why}{others}; {INCLUDE_FAILED} evaluates it anyway")
    for path, why in failed.items():
        warn(parser, f"evaluating run {path} that ended FAILED ({why}), as {INCLUDE_FAILED} asks")
    return failed


def find_runs_or_exit(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    method: str | None = None,
    include_failed: bool | None = None,
    **check: Any,
) -> list[Run]:
    """The runs ``<args.model_prefix><method>_<mode>_<seed>`` that ``args`` select (``method``:
    instead of ``args.method``), each labelled, and selected, by the method, mode and seed of
    its config.json (:func:`fastclip.pipeline.results.identify`; a warning names a directory
    whose name says otherwise), checked with :func:`fastclip.pipeline.results.check_runs`
    against ``check`` (``dataset=``, ``model=``, ``checkpoint=``) when given; a one-line
    error when none matches or one fails the check. ``include_failed`` False refuses a run
    that ended FAILED, True evaluates it (:func:`refuse_failed_or_exit`), None does not
    look."""
    method = args.method if method is None else method
    runs, labelled = [], []
    for found in find_runs(args.model_prefix):
        run, note = identify(found)
        labelled.append(run)
        if method != "all" and run.method != method or args.mode != "all" and run.mode != args.mode:
            continue
        if args.seed is not None and run.seed not in set(args.seed):
            continue
        if note:
            warn(parser, note)
        runs.append(run)
    if not runs:
        parser.error(
            f"no run matches {args.model_prefix}<method>_<mode>_<seed> with method {method!r}, "
            f"mode {args.mode!r}, seeds {args.seed or 'all'}: {describe_runs(args.model_prefix, labelled)}"
        )
    runs.sort(key=lambda r: (r.method, MODES.index(r.mode) if r.mode in MODES else len(MODES), r.seed))
    same: dict[tuple[str, str, int], list[Run]] = {}
    for run in runs:
        same.setdefault((run.method, run.mode, run.seed), []).append(run)
    for (m, md, sd), group in same.items():
        if len(group) > 1:
            warn(
                parser,
                f"runs {', '.join(str(r.path) for r in group)} are all method {m}, mode {md}, "
                f"seed {sd} by their config.json",
            )
    if include_failed is not None:  # before the other checks: a failed run lacks files for this reason
        refuse_failed_or_exit(parser, runs, include_failed)
    # Check every run before working on any, so a bad one fails in seconds, not after hours.
    problem = check_runs(runs, **check) if check else None
    if problem:
        parser.error(problem)
    return runs


def device_or_exit(parser: argparse.ArgumentParser, name: str | None) -> torch.device:
    """The device ``--device`` names (None: cuda if available, else cpu)."""
    try:
        return choose_device(name or "auto")
    except ConfigError as e:
        parser.error(str(e))


def load_model_or_exit(
    parser: argparse.ArgumentParser,
    path: str | os.PathLike,
    which: str,
    device: torch.device,
    what: str | None = None,
) -> tuple[nn.Module, TrainConfig]:
    """The model of the run at ``path`` from ``ckpt_<which>.pth`` (``what``: how the error
    names the checkpoint, default ``ckpt_<which>.pth``)."""
    try:
        return load_model(path, which=which, device=device)
    except RunFilesError as e:  # config.json's own fault, not the checkpoint's
        parser.error(str(e))
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        parser.error(f"cannot load {what or f'ckpt_{which}.pth'} of {path}: {first}")


def checkpoint_id_or_exit(
    parser: argparse.ArgumentParser, path: str | os.PathLike, which: str
) -> CheckpointId:
    """The identity (kind, SHA-256, the rule that chose it) of the run's ``ckpt_<which>.pth``,
    which an evaluation writes beside its numbers."""
    try:
        return checkpoint_id(path, which)
    except (CheckpointError, OSError) as e:
        parser.error(f"cannot read ckpt_{which}.pth of {path}: {e}")
