"""One training run: a model, a clipping method, a dataset, and a run directory that never
loses work (see :mod:`fastclip.training.runner` for the run directory's files).

Modules, in import order: :mod:`~fastclip.training.config` (settings, defaults, run
directory), :mod:`~fastclip.training.state` (seeds, RNG state, checkpoints),
:mod:`~fastclip.training.model` (model, optimiser, a trained run's model),
:mod:`~fastclip.training.defaults` (:func:`resolve`), :mod:`~fastclip.training.args`
(the command line), :mod:`~fastclip.training.metrics` (metrics.csv),
:mod:`~fastclip.training.validate` (run files verified or rebuilt, FAILED, one-line
errors), :mod:`~fastclip.training.engine` (the training step and the evaluation pass) and
:mod:`~fastclip.training.runner` (:func:`run`: resume, skip, the epoch loop).
"""

from __future__ import annotations

from fastclip.training.args import config_from_args, get_args_parser
from fastclip.training.config import (
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
from fastclip.training.defaults import resolve
from fastclip.training.engine import evaluate, train_epoch
from fastclip.training.metrics import _write_metrics, read_metrics
from fastclip.training.model import build_model, load_model, make_optimizer
from fastclip.training.runner import run
from fastclip.training.state import _save_checkpoint, epoch_seeds
from fastclip.training.validate import RunFailed, RunFilesError

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
    "runner",
)
