"""What the commands over trained runs share: finding the runs a prefix names, the device
and a run's model, each ending the command with a one-line error (exit code 2) when it
cannot be had."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch import nn

from fastclip.pipeline.results import Run, check_runs, describe_runs, find_runs
from fastclip.pipeline.training import ConfigError, TrainConfig, choose_device, load_model
from fastclip.pipeline.training.validate import RunFilesError

__all__ = ["find_runs_or_exit", "device_or_exit", "load_model_or_exit"]


def find_runs_or_exit(
    parser: argparse.ArgumentParser, args: argparse.Namespace, method: str | None = None, **check: Any
) -> list[Run]:
    """The runs ``<args.model_prefix><method>_<mode>_<seed>`` that ``args`` select (``method``:
    instead of ``args.method``), checked with :func:`fastclip.pipeline.results.check_runs` against
    ``check`` (``dataset=``, ``model=``, ``checkpoint=``) when given; a one-line error when
    none matches or one fails the check."""
    method = args.method if method is None else method
    runs = find_runs(args.model_prefix, method, args.mode, args.seed)
    if not runs:
        parser.error(
            f"no run matches {args.model_prefix}<method>_<mode>_<seed> with method {method!r}, "
            f"mode {args.mode!r}, seeds {args.seed or 'all'}: {describe_runs(args.model_prefix)}"
        )
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
