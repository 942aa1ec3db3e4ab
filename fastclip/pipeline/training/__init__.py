"""One training run: a model, a clipping method, a dataset, and a run directory that never
loses work (see :mod:`fastclip.pipeline.training.runner` for the run directory's files).

Modules, in import order: :mod:`~fastclip.pipeline.training.config` (settings, defaults, run
directory), :mod:`~fastclip.pipeline.training.state` (seeds, RNG state, checkpoints),
:mod:`~fastclip.pipeline.training.model` (model, optimiser, a trained run's model),
:mod:`~fastclip.pipeline.training.defaults` (:func:`resolve`), :mod:`~fastclip.pipeline.training.args`
(the command line), :mod:`~fastclip.pipeline.training.metrics` (metrics.csv),
:mod:`~fastclip.pipeline.training.validate` (run files verified or rebuilt, FAILED, one-line
errors), :mod:`~fastclip.pipeline.training.engine` (the training step and the evaluation pass),
:mod:`~fastclip.pipeline.training.process_settings` (the log file, quiet ranks, deterministic
algorithms while a run trains), :mod:`~fastclip.pipeline.training.resume` (the run directory's
lock and checks; skip, resume or start afresh), :mod:`~fastclip.pipeline.training.session` (one
epoch trained, evaluated and checkpointed), :mod:`~fastclip.pipeline.training.attempt` (config.json,
the epoch loop, DONE or FAILED) and :mod:`~fastclip.pipeline.training.runner` (:func:`run`: the
decision on rank 0, followed by every rank, then the attempt).
"""

from __future__ import annotations

from fastclip.pipeline.training.args import config_from_args, get_args_parser
from fastclip.pipeline.training.config import (
    BASE_COLUMNS,
    CKPT_BEST,
    CKPT_KEYS,
    CKPT_LAST,
    CKPT_PREV,
    CONFIG,
    DATASET_DEFAULTS,
    DONE,
    EXECUTION_FIELDS,
    LOCK,
    LOG,
    METRICS,
    MODEL_OPTION_FLAGS,
    OPTIMIZERS,
    ConfigError,
    TrainConfig,
    choose_device,
    default_threads,
    model_tag,
    run_dir_for,
)
from fastclip.pipeline.training.defaults import resolve
from fastclip.pipeline.training.engine import evaluate, train_epoch
from fastclip.pipeline.training.metrics import _write_metrics, read_metrics
from fastclip.pipeline.training.model import build_model, load_model, make_optimizer
from fastclip.pipeline.training.runner import run
from fastclip.pipeline.training.state import _save_checkpoint, epoch_seeds
from fastclip.pipeline.training.validate import RunFailed, RunFilesError

__all__ = [
    "TrainConfig",
    "ConfigError",
    "RunFailed",
    "RunFilesError",
    "DATASET_DEFAULTS",
    "get_args_parser",
    "config_from_args",
    "resolve",
    "run",
    "run_dir_for",
    "load_model",
    "build_model",
    "choose_device",
    "make_optimizer",
    "train_epoch",
    "evaluate",
    "read_metrics",
    "epoch_seeds",
    "model_tag",
    "default_threads",
    "SUBMODULES",
]

#: The modules of the package, in import order (tests run their doctests).
SUBMODULES = (
    "config",
    "state",
    "metrics",
    "validate",
    "model",
    "defaults",
    "args",
    "distributed",
    "engine",
    "process_settings",
    "resume",
    "session",
    "attempt",
    "runner",
)
