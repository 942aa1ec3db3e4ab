"""One training run: a model, a clipping method, a dataset, and a run directory that never loses work.

:func:`run` trains ``config.model`` on ``config.dataset`` with clipping method
``config.method`` in batch-norm mode ``config.mode`` and writes everything into
:func:`run_dir_for` = ``<logdir>/<dataset>/<model>_models/method_<method>_<mode>_<seed>/``::

    config.json        every setting (resolved), library version, git commit, torch version, device,
                       intra-op thread count, deterministic flags, threads_history (the count
                       each attempt's epochs ran at)
    ckpt_last.pth      state after the last finished epoch (ckpt_prev.pth: the one before)
    ckpt_best.pth      state after the epoch with the best test accuracy
    metrics.csv        one row per epoch: epoch, train_loss, train_acc, test_loss, test_acc, lr,
                       wall_time (seconds spent on that epoch), lsv/<layer> (sigma_1 per layer as
                       the method tracks it, ``method.layer_norms``); accuracies in percent
    events.out.tfevents.*   TensorBoard: train/acc, train/loss, test/acc, test/loss per epoch,
                       train/lsv_<layer> every ``lsv_every`` steps and after each epoch;
                       x-axis = 0-based index of the optimiser step (an epoch's scalars at
                       its last step)
    train.log          the run's log
    DONE               written last; a finished run is skipped unless ``force``

Training step (the method is a plug-in, :class:`fastclip.methods.base.Method`)::

    loss = CE(model(x), y) + method.penalty(model)
    loss.backward(); optimiser.step(); method.after_step(model, step)

and ``method.finish_epoch(model)`` after an epoch's last step (every schedule fires, so
the evaluated and checkpointed model is one the method has just bounded).

Optimiser defaults follow the paper: CIFAR-10 SGD(lr 0.1, momentum 0.9, wd 5e-4),
batch 128, 200 epochs; MNIST / Fashion-MNIST Adam(lr 1e-3, wd 1e-4, eps 1e-7),
batch 128, 120 epochs; StepLR(40, 0.1) for both. Settings left ``None`` in
:class:`TrainConfig` are resolved per dataset and stored resolved in config.json.

Reproducibility and resume: every epoch reseeds torch, numpy, random and the
DataLoader's generator from ``(seed, epoch)``, so an epoch's shuffling and
augmentation do not depend on what ran before it in the process. A checkpoint is
written (atomically, after rotating the previous one to ``ckpt_prev.pth``) after each
epoch; a rerun of the same command resumes after the last good checkpoint, drops
later metrics rows, purges later TensorBoard events, and ends with the same metrics
as an uninterrupted run on the CPU at the same thread count (``threads``, set with
``torch.set_num_threads`` before any work; a resume under another count warns).
Checkpoints carry a SHA-256 of their contents (:mod:`fastclip.checkpoint`), checked
before a resume: a damaged one is skipped with one warning line. DONE and the resume
point are decided under the run directory's lock, which also makes it safe to remove
the temp files that killed attempts left (:func:`fastclip.io.clean_stale_temps`).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import fcntl
import io
import json
import logging
import math
import os
import platform
import random
import subprocess
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fastclip.cli import OneLineErrorParser, int_at_least, nonneg_float, positive_float
from fastclip.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastclip.io import atomic_write_json, atomic_write_text, clean_stale_temps

__all__ = ["TrainConfig", "ConfigError", "DATASET_DEFAULTS", "get_args_parser", "config_from_args", "resolve",
           "run", "run_dir_for", "load_model", "build_model", "choose_device", "make_optimizer", "train_epoch",
           "evaluate", "read_metrics", "epoch_seeds", "model_tag", "default_threads"]

logger = logging.getLogger(__name__)

#: Paper defaults per dataset, used for settings left ``None``.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, adam_eps=None, epochs=200,
                  batch_size=128),
    "mnist": dict(optimizer="adam", lr=1e-3, momentum=None, weight_decay=1e-4, adam_eps=1e-7, epochs=120,
                  batch_size=128),
    "fashion-mnist": dict(optimizer="adam", lr=1e-3, momentum=None, weight_decay=1e-4, adam_eps=1e-7,
                          epochs=120, batch_size=128),
}
OPTIMIZERS = ("sgd", "adam")

#: Settings that choose where/how a run executes but not what it computes; they may
#: differ between a run's first start and its resumption.
EXECUTION_FIELDS = frozenset({"logdir", "data_dir", "download", "device", "num_workers", "force", "threads"})

CKPT_LAST, CKPT_PREV, CKPT_BEST = "ckpt_last.pth", "ckpt_prev.pth", "ckpt_best.pth"
CONFIG, METRICS, DONE, LOG, LOCK = "config.json", "metrics.csv", "DONE", "train.log", ".lock"
BASE_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "wall_time")
CKPT_KEYS = ("model", "optimizer", "scheduler", "method", "epoch", "global_step", "best_acc", "rng", "config")


class ConfigError(ValueError):
    """Bad settings or a run directory that cannot take this run. Raised before anything
    is written; the command line turns it into a one-line error with exit code 2."""


@dataclass
class TrainConfig:
    """Every setting of one training run. ``None`` means "the paper's default for this
    dataset" (see :data:`DATASET_DEFAULTS`); :func:`resolve` fills them in.

    Example::

        >>> cfg = resolve(TrainConfig(dataset="mnist", model="SimpleConv", method="fastclip"))
        >>> cfg.optimizer, cfg.lr, cfg.epochs, cfg.adam_eps
        ('adam', 0.001, 120, 1e-07)
    """

    dataset: str = "fashion-mnist"
    model: str = "SimpleConv"
    method: str = "fastclip"
    mode: str = "wBN"
    seed: int = 1
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    adam_eps: float | None = None
    lr_step: int = 40
    lr_gamma: float = 0.1
    clip: float = 1.0
    #: Hyper-parameters of the method (fields of ``fastclip.methods.get_class(method).Config``
    #: other than ``clip``); resolved to the method's full config.
    method_args: dict[str, Any] = field(default_factory=dict)
    halve_shortcut: bool = False
    #: Architecture options of the model beyond the common ones
    #: (:func:`fastclip.models.model_options`; SimpleConv: kernel_size, padding, stride,
    #: dilation, padding_mode); resolved to the values that differ from the model's defaults.
    model_args: dict[str, Any] = field(default_factory=dict)
    #: Training-set augmentation (:data:`fastclip.data.AUGMENTATIONS`): "paper" as the authors, "none".
    augment: str = "paper"
    #: Input normalisation inside the model (:data:`fastclip.data.INPUT_NORMS`): "paper"
    #: (the authors' constants), "dataset" (the dataset's own mean/std) or "none".
    input_norm: str = "paper"
    #: Also record the converged sigma_1 of every conv, linear and Conv+BN composition
    #: after each epoch (metrics.csv columns ``exact/<layer>``).
    exact_norms: bool = False
    train_subset: int | None = None
    test_subset: int | None = None
    lsv_every: int = 50
    data_dir: str | None = None
    download: bool = False
    logdir: str = "logs"
    device: str = "auto"
    num_workers: int = 0
    #: Intra-op CPU threads (``torch.set_num_threads``); None: :func:`default_threads`.
    #: CPU results are bit-identical only between runs with the same count.
    threads: int | None = None
    force: bool = False

    def identity(self) -> dict[str, Any]:
        """The settings that determine what the run computes (all but :data:`EXECUTION_FIELDS`)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in EXECUTION_FIELDS}


# -- command line -----------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None/False (those say "per dataset" or "off" in their help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The flags of one training run (``experiments/train.py``); usable as a parent parser
    (``argparse.ArgumentParser(parents=[get_args_parser(add_help=False)])``).

    Example::

        >>> args = get_args_parser().parse_args(["--dataset", "mnist", "--method", "gouk", "--epochs", "3"])
        >>> config_from_args(args).epochs
        3
    """
    from fastclip.data import AUGMENTATIONS, DATASETS, INPUT_NORMS
    from fastclip.methods import MODES, add_method_arguments, available
    from fastclip.models import available as available_models
    from fastclip.models.simple_conv import PADDING_MODES

    d = TrainConfig()
    p = OneLineErrorParser(description="Train one model with one clipping method; resumable.",
                            add_help=add_help, formatter_class=_HelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="dataset")
    g.add_argument("--model", choices=available_models(), default=d.model, help="architecture")
    g.add_argument("--method", choices=available(), default=d.method, help="clipping method")
    g.add_argument("--mode", choices=MODES, default=d.mode, help="batch-norm mode")
    g.add_argument("--seed", type=int_at_least(0), default=d.seed, help="seed of initialisation, shuffling, methods")
    g.add_argument("--clip", type=positive_float, default=d.clip, help="target spectral norm c")
    g.add_argument("--halve-shortcut", action="store_true",
                   help="ResNet18: halve (block output + conv shortcut), as the authors' FastClip ResNet18")
    g = p.add_argument_group("SimpleConv's conv (default 3x3, padding 1, stride 1, dilation 1, zeros)")
    g.add_argument("--kernel-size", type=int_at_least(1), default=None, help="kernel size")
    g.add_argument("--padding", type=int_at_least(0), default=None, help="padding")
    g.add_argument("--stride", type=int_at_least(1), default=None, help="stride")
    g.add_argument("--dilation", type=int_at_least(1), default=None, help="dilation")
    g.add_argument("--padding-mode", choices=PADDING_MODES, default=None, help="padding mode")
    g = p.add_argument_group("optimisation (default: the paper's setting for the dataset)")
    g.add_argument("--epochs", type=int_at_least(1), default=None, help="cifar 200, mnist/fashion-mnist 120")
    g.add_argument("--lr", type=positive_float, default=None, help="cifar 0.1, mnist/fashion-mnist 1e-3")
    g.add_argument("--batch-size", type=int_at_least(1), default=None, help="128")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="cifar sgd, mnist/fashion-mnist adam")
    g.add_argument("--momentum", type=nonneg_float, default=None, help="sgd: 0.9")
    g.add_argument("--weight-decay", type=nonneg_float, default=None, help="cifar 5e-4, mnist/fashion-mnist 1e-4")
    g.add_argument("--adam-eps", type=positive_float, default=None, help="adam: 1e-7")
    g.add_argument("--lr-step", type=int_at_least(1), default=d.lr_step, help="StepLR step (epochs)")
    g.add_argument("--lr-gamma", type=positive_float, default=d.lr_gamma, help="StepLR factor")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=d.data_dir, help="dataset root (default: see fastclip.data)")
    g.add_argument("--download", action="store_true", help="download the dataset if missing")
    g.add_argument("--train-subset", type=int_at_least(1), default=None, help="use the first N training examples")
    g.add_argument("--test-subset", type=int_at_least(1), default=None, help="use the first N test examples")
    g.add_argument("--num-workers", type=int_at_least(0), default=d.num_workers, help="DataLoader workers")
    g.add_argument("--augment", choices=AUGMENTATIONS, default=d.augment,
                   help="training augmentation: paper (cifar: crop 32 pad 4 + flip; mnist-style: crop 28 + flip, "
                        "the authors') or none")
    g.add_argument("--input-norm", choices=INPUT_NORMS, default=d.input_norm,
                   help="normalisation inside the model: paper (mnist 0.5/0.5, cifar its mean/std), dataset "
                        "(the dataset's mean/std) or none")
    g = p.add_argument_group("output and execution")
    g.add_argument("--logdir", default=d.logdir, help="runs go to <logdir>/<dataset>/<model>_models/...")
    g.add_argument("--device", default=d.device, help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int_at_least(1), default=None,
                   help="intra-op CPU threads, set before any work and recorded in config.json (default: "
                        "$OMP_NUM_THREADS, else $SLURM_CPUS_PER_TASK, else the CPUs this process may use); "
                        "CPU metrics are bit-identical only at the same count")
    g.add_argument("--lsv-every", type=int_at_least(0), default=d.lsv_every,
                   help="write train/lsv_<layer> to TensorBoard every N steps and after each epoch "
                        "(0: after each epoch only); fastclip's wrapper writes its own")
    g.add_argument("--exact-norms", action="store_true",
                   help="also write the converged sigma_1 of every layer after each epoch (exact/<layer> columns)")
    g.add_argument("--force", action="store_true", help="start afresh even if the run exists or finished")
    add_method_arguments(p)
    return p


def config_from_args(args: argparse.Namespace, **changes: Any) -> TrainConfig:
    """A :class:`TrainConfig` from parsed flags (``changes`` override single fields, e.g.
    ``method=`` in a grid). Raises :class:`ConfigError` for a flag of another method.

    Example::

        >>> args = get_args_parser().parse_args(["--method", "gouk", "--gouk-n-iter", "10"])
        >>> config_from_args(args).method_args
        {'n_iter': 10}
    """
    from fastclip.methods import method_overrides

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    options = {k: getattr(args, k) for k in MODEL_OPTION_FLAGS if getattr(args, k, None) is not None}
    if options:
        values["model_args"] = options
    values.update(changes)
    if "method_args" not in changes:
        try:
            values["method_args"] = method_overrides(args, values.get("method", TrainConfig.method))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return TrainConfig(**values)


# -- resolving and checking settings ------------------------------------------------------
def choose_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu; otherwise the named device, checked.
    Raises :class:`ConfigError` for an unknown or unavailable device.

    Example::

        >>> choose_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}; choose auto, cpu, cuda or cuda:N")
    return device


def resolve(config: TrainConfig) -> TrainConfig:
    """A copy of ``config`` with names checked, ``None`` settings replaced by the
    dataset's defaults, and ``method_args`` expanded to the method's full config.
    Raises :class:`ConfigError` naming the bad value and the choices.

    Example::

        >>> resolve(TrainConfig(dataset="cifar", model="ResNet18", method="orig")).lr
        0.1
    """
    from fastclip.data import AUGMENTATIONS, DATASETS, INPUT_NORMS
    from fastclip.methods import MODES, available, get
    from fastclip.models import available as available_models, model_options

    def choose(label: str, value: Any, choices: Any) -> None:
        if value not in choices:
            raise ConfigError(f"unknown {label} {value!r}; choose one of {', '.join(map(str, choices))}")

    choose("dataset", config.dataset, DATASETS)
    choose("model", config.model, available_models())
    choose("method", config.method, available())
    choose("mode", config.mode, MODES)
    choose("augment", config.augment, AUGMENTATIONS)
    choose("input_norm", config.input_norm, INPUT_NORMS)
    defaults = DATASET_DEFAULTS[config.dataset]
    values = dataclasses.asdict(config)
    for key, default in defaults.items():
        if values[key] is None:
            values[key] = default
    if values["optimizer"] is None:
        values["optimizer"] = defaults["optimizer"]
    choose("optimizer", values["optimizer"], OPTIMIZERS)
    # Settings of the other optimiser would be silently ignored: refuse them instead.
    if values["optimizer"] == "sgd":
        if config.adam_eps is not None:
            raise ConfigError(f"adam_eps={config.adam_eps} is an Adam setting, but the optimizer is sgd")
        values["adam_eps"] = None
        if values["momentum"] is None:
            values["momentum"] = 0.9
    else:
        if config.momentum is not None:
            raise ConfigError(f"momentum={config.momentum} is an SGD setting, but the optimizer is adam")
        values["momentum"] = None
        if values["adam_eps"] is None:
            values["adam_eps"] = 1e-7
    for key in ("epochs", "batch_size", "lr_step"):
        if not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < 1:
            raise ConfigError(f"{key} must be a positive integer, got {values[key]!r}")
    for key in ("train_subset", "test_subset"):
        if values[key] is not None and (not isinstance(values[key], int) or values[key] < 1):
            raise ConfigError(f"{key} must be a positive integer or None, got {values[key]!r}")
    if not isinstance(values["seed"], int) or values["seed"] < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {values['seed']!r}")
    for key in ("lr", "lr_gamma", "clip"):
        if not (isinstance(values[key], (int, float)) and values[key] > 0 and math.isfinite(values[key])):
            raise ConfigError(f"{key} must be a positive number, got {values[key]!r}")
    if values["num_workers"] < 0 or values["lsv_every"] < 0:
        raise ConfigError(f"num_workers and lsv_every must be >= 0, got {values['num_workers']}, "
                          f"{values['lsv_every']}")
    if values["threads"] is None:
        values["threads"] = default_threads()
    if not isinstance(values["threads"], int) or isinstance(values["threads"], bool) or values["threads"] < 1:
        raise ConfigError(f"threads must be a positive integer, got {values['threads']!r}")
    if values["halve_shortcut"] and config.model != "ResNet18":
        raise ConfigError(f"halve_shortcut applies to ResNet18 only, got model {config.model!r}")
    known = model_options(config.model)
    unknown = sorted(set(config.model_args) - set(known))
    if unknown:
        raise ConfigError(f"model {config.model} has no option {', '.join(unknown)} "
                          f"(its options: {', '.join(known) or 'none'})")
    # Only values that differ from the model's defaults are kept, so a run given the
    # defaults explicitly is the same run (same config.json, same directory).
    values["model_args"] = {k: v for k, v in sorted(config.model_args.items()) if v != known[k]}
    try:
        method = get(config.method, clip=float(config.clip), mode=config.mode, **config.method_args)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    values["method_args"] = {k: v for k, v in dataclasses.asdict(method.config).items() if k != "clip"}
    values["clip"] = float(config.clip)
    resolved = TrainConfig(**values)
    if resolved.model_args:
        # A conv variant can be impossible (no output left) or outside what a method
        # handles (nsedghi's polyphase form needs the stride to divide the input):
        # building and preparing the small model once finds out before anything is written.
        try:
            with torch.random.fork_rng(devices=[]):
                build_model(resolved)
        except ValueError as e:
            raise ConfigError(f"model {config.model} with {_options_text(resolved.model_args)}, method "
                              f"{config.method}: {str(e).splitlines()[0]}") from None
    return resolved


def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def default_threads() -> int:
    """The intra-op thread count of a run started without ``--threads``: ``$OMP_NUM_THREADS``,
    else ``$SLURM_CPUS_PER_TASK`` (the CPUs a SLURM task was given), else the CPUs this
    process may run on. Fixed by the environment, never by what torch picked itself."""
    for var in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return len(os.sched_getaffinity(0))


def run_dir_for(config: TrainConfig) -> Path:
    """``<logdir>/<dataset>/<model>_models/method_<method>_<mode>_<seed>``, the layout of
    the authors' pipeline (with wBN spelt out instead of left empty).

    Example::

        >>> run_dir_for(TrainConfig(dataset="cifar", model="ResNet18", method="fastclip", seed=1))
        PosixPath('logs/cifar/ResNet18_models/method_fastclip_wBN_1')
    """
    return (Path(config.logdir) / config.dataset / f"{model_tag(config)}_models"
            / f"method_{config.method}_{config.mode}_{config.seed}")


#: Flags of the model options and their short tags in a run directory's name.
MODEL_OPTION_FLAGS = {"kernel_size": "k", "padding": "p", "stride": "s", "dilation": "d", "padding_mode": ""}


def model_tag(config: TrainConfig) -> str:
    """The model's name plus its non-default options, e.g. ``SimpleConv_k5_p0_circular``
    (the folder ``<tag>_models`` keeps each architecture variant's grid apart)."""
    parts = [config.model]
    for key, value in sorted(config.model_args.items(), key=lambda kv: list(MODEL_OPTION_FLAGS).index(kv[0])
                             if kv[0] in MODEL_OPTION_FLAGS else len(MODEL_OPTION_FLAGS)):
        parts.append(f"{MODEL_OPTION_FLAGS.get(key, key)}{value}")
    return "_".join(parts)


def _check_writable_path(run_dir: Path) -> None:
    from fastclip.cli import output_dir_problem

    for parent in [run_dir, *run_dir.parents]:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"logdir path {str(parent)!r} exists and is not a directory")
    problem = output_dir_problem(run_dir, "logdir")
    if problem:
        raise ConfigError(problem)


def _conflicts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted((set(old) | set(new)) - EXECUTION_FIELDS)
    return [f"{k}={old.get(k, '<missing>')!r} there vs {new.get(k, '<missing>')!r} now"
            for k in keys if old.get(k, "<missing>") != new.get(k, "<missing>")]


# -- seeding ------------------------------------------------------------------------------------
def epoch_seeds(seed: int, epoch: int) -> dict[str, int]:
    """Independent seeds for torch, the DataLoader, numpy and random in ``epoch`` of a run
    with ``seed`` (epoch 0 = model construction), from ``numpy.random.SeedSequence``.

    Example::

        >>> epoch_seeds(1, 3) == epoch_seeds(1, 3), epoch_seeds(1, 3) == epoch_seeds(1, 4)
        (True, False)
    """
    words = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(5, dtype=np.uint32)
    return {"torch": int(words[0]) << 32 | int(words[1]), "loader": int(words[2]), "numpy": int(words[3]),
            "random": int(words[4])}


def _seed_all(seeds: dict[str, int]) -> None:
    torch.manual_seed(seeds["torch"])
    np.random.seed(seeds["numpy"])
    random.seed(seeds["random"])


def _seed_worker(worker_id: int) -> None:
    # DataLoader seeds torch in each worker from the loader's generator; numpy and random follow it.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
           "random": {"version": version, "state": list(state), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        out["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return out


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    r = state["random"]
    random.setstate((r["version"], tuple(r["state"]), r["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- model, optimiser, data -------------------------------------------------------------------
def build_model(config: TrainConfig, device: torch.device | str = "cpu", writer: Any = None,
                ) -> tuple[nn.Module, Any]:
    """The model of a (resolved) config, on ``device``, prepared by its clipping method:
    returns ``(model, method)``. Initialisation is seeded by ``config.seed``.

    Example::

        >>> model, method = build_model(resolve(TrainConfig(dataset="mnist", method="gouk")))
        >>> model(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    from fastclip.data import dataset_info, input_normalization
    from fastclip.methods import get
    from fastclip.models import get_model

    info = dataset_info(config.dataset)
    mean, std = input_normalization(config.dataset, config.input_norm)
    _seed_all(epoch_seeds(config.seed, 0))
    model = get_model(config.model, in_channels=info.in_channels, num_classes=info.num_classes,
                      input_size=info.input_size, bn=config.mode != "noBN", mean=mean, std=std,
                      halve_shortcut=config.halve_shortcut, options=config.model_args).to(device)
    method = get(config.method, clip=config.clip, mode=config.mode, **config.method_args)
    model = method.prepare(model, info.input_shape, writer=writer)
    return model, method


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD(lr, momentum, weight_decay) or Adam(lr, weight_decay, eps) of a resolved config
    over the model's trainable parameters.

    Example::

        >>> make_optimizer(resolve(TrainConfig(dataset="cifar", method="orig")), model)   # SGD, lr 0.1
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, eps=config.adam_eps)


def _loader(dataset: Any, config: TrainConfig, shuffle: bool, generator: torch.Generator | None,
            device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=shuffle, generator=generator,
                      num_workers=config.num_workers, worker_init_fn=_seed_worker if config.num_workers else None,
                      pin_memory=device.type == "cuda", drop_last=False)


# -- metrics.csv --------------------------------------------------------------------------------
def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.csv as dicts (numbers as float, ``epoch`` as int); [] if missing.

    Example::

        rows = read_metrics("logs/mnist/SimpleConv_models/method_fastclip_wBN_1/metrics.csv")
        rows[-1]["test_acc"]
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                if k == "epoch":
                    row[k] = int(v)
                else:
                    row[k] = float(v) if v not in ("", None) else float("nan")
            rows.append(row)
    return rows


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(BASE_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for row in rows:
        # repr keeps every bit of a float, so reruns compare exactly.
        w.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


# -- checkpoints --------------------------------------------------------------------------------
def _load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (weights_only, SHA-256 verified when it has a digest), or
    raise CheckpointError if it is unusable."""
    ckpt = load_checkpoint(path)
    if any(k not in ckpt for k in CKPT_KEYS):
        raise CheckpointError(f"{path.name} lacks the keys {', '.join(k for k in CKPT_KEYS if k not in ckpt)}")
    return ckpt


def _find_resume_checkpoint(run_dir: Path, identity: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """The newest usable checkpoint (ckpt_last, else ckpt_prev) or None to start afresh,
    and one warning line per unusable checkpoint skipped. Only reads. A checkpoint of
    other settings is a ConfigError, not a fallback."""
    warnings = []
    for name in (CKPT_LAST, CKPT_PREV):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            ckpt = _load_checkpoint(path)
        except CheckpointError as e:
            fallback = CKPT_PREV if name == CKPT_LAST and (run_dir / CKPT_PREV).exists() else "a fresh start"
            warnings.append(f"{e}; falling back to {fallback}")
            continue
        conflicts = _conflicts(ckpt["config"], identity)
        if conflicts:
            raise ConfigError(f"{path} was written by a run with other settings ({'; '.join(conflicts)}); "
                              f"use --force to start afresh or another --logdir")
        return ckpt, warnings
    return None, warnings


def _save_checkpoint(run_dir: Path, state: dict[str, Any], best: bool) -> None:
    last, prev = run_dir / CKPT_LAST, run_dir / CKPT_PREV
    if best:
        save_checkpoint(state, run_dir / CKPT_BEST)
    # Keep the previous good checkpoint (if ckpt_last is ever damaged, resume from it),
    # by a hard link so that ckpt_last exists at every moment: a kill between the two
    # steps leaves both files, never neither.
    link = run_dir / (CKPT_PREV + ".link")
    link.unlink(missing_ok=True)
    # After a kill between this rotation and the save below, prev and last are one file;
    # rename(2) between two links of one file does nothing (and would leave the .link),
    # so there is nothing to rotate then.
    if last.exists() and not (prev.exists() and os.path.samefile(last, prev)):
        os.link(last, link)
        os.replace(link, prev)
    link.unlink(missing_ok=True)
    save_checkpoint(state, last)


def _metadata(device: torch.device) -> dict[str, Any]:
    import fastclip

    commit, dirty = None, None
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:
            dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                        capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"fastclip_version": fastclip.__version__, "git_commit": commit, "git_dirty": dirty,
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "device": str(device), "hostname": platform.node(),
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            # What CPU results depend on besides the settings: same values here, same metrics.
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "deterministic": {"use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                              "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
                              "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# -- the run ------------------------------------------------------------------------------------
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


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Send the library's log records to ``path`` (and, as usual, to the root handlers)."""
    pkg = logging.getLogger("fastclip")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(old_level)
        handler.close()


@contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    # Only on the CPU: CUDA would need CUBLAS_WORKSPACE_CONFIG and loses speed.
    before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _clear_run(run_dir: Path) -> None:
    for p in run_dir.iterdir():
        if p.name in (CONFIG, METRICS, DONE, LOG, CKPT_LAST, CKPT_PREV, CKPT_BEST) \
                or p.name.startswith("events.out.tfevents."):
            p.unlink()


def _summary(run_dir: Path, rows: list[dict[str, Any]], skipped: bool) -> dict[str, Any]:
    last = rows[-1] if rows else {}
    return {"run_dir": str(run_dir), "skipped": skipped, "epochs": last.get("epoch", 0),
            "final": last, "best_test_acc": max((r["test_acc"] for r in rows), default=float("nan"))}


def run(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume, or skip if finished) the run described by ``config``; return
    ``{"run_dir", "skipped", "epochs", "final": last metrics row, "best_test_acc"}``.

    Raises :class:`ConfigError` - before writing anything - for unknown names, bad
    values, a logdir that is not a directory, a run directory in use, or an existing
    run with other settings (unless ``config.force``, which starts afresh).

    Example::

        >>> out = run(TrainConfig(dataset="mnist", model="SimpleConv", method="fastclip", epochs=2,
        ...                       train_subset=256, test_subset=128, logdir="/tmp/logs"))
        >>> out["final"]["test_acc"]        # percent
    """
    from fastclip.data import DatasetCorruptError, DatasetNotFoundError, get_datasets

    cfg = resolve(config)
    device = choose_device(cfg.device)
    run_dir = run_dir_for(cfg)
    _check_writable_path(run_dir)
    identity = cfg.identity()
    if not cfg.force:
        _check_same_settings(run_dir, identity)  # reads only: a refused run damages nothing

    # The thread count is chosen before any work: CPU kernels split reductions by it, so
    # it decides the last bits of every metric.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with ExitStack() as stack:
            # Decide DONE / resume under the run directory's lock: another process may be
            # finishing or clearing this run right now.
            decision = None
            if run_dir.is_dir():
                stack.enter_context(_run_lock(run_dir))
                decision = _decide(run_dir, cfg, identity)
                if decision["skip"]:
                    return decision["summary"]
            try:
                train_set, test_set, _ = get_datasets(cfg.dataset, cfg.data_dir, download=cfg.download,
                                                      train_subset=cfg.train_subset, test_subset=cfg.test_subset,
                                                      augment=cfg.augment)
            except (DatasetNotFoundError, DatasetCorruptError) as e:
                raise ConfigError(str(e).splitlines()[0]) from None
            if decision is None:
                try:
                    run_dir.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise ConfigError(f"cannot create run directory {str(run_dir)!r}: {e.strerror}") from None
                stack.enter_context(_run_lock(run_dir))
                decision = _decide(run_dir, cfg, identity)
                if decision["skip"]:
                    return decision["summary"]
            if cfg.force:
                _clear_run(run_dir)
            stack.enter_context(_log_to(run_dir / LOG))
            for line in decision["warnings"]:
                logger.warning(line)
            stack.enter_context(_deterministic(device))
            return _train(cfg, device, run_dir, train_set, test_set, decision["ckpt"], decision["history"])
    finally:
        torch.set_num_threads(threads_before)


def _check_same_settings(run_dir: Path, identity: dict[str, Any]) -> None:
    if not (run_dir / CONFIG).is_file():
        return
    try:
        old_config = json.loads((run_dir / CONFIG).read_text())["settings"]
        conflicts = _conflicts(old_config, identity)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{run_dir / CONFIG} is not a run config of this library; "
                          f"use --force to start afresh or another --logdir") from None
    if conflicts:
        raise ConfigError(f"{run_dir} holds a run with other settings ({'; '.join(conflicts)}); "
                          f"use --force to start afresh or another --logdir")


def _decide(run_dir: Path, cfg: TrainConfig, identity: dict[str, Any]) -> dict[str, Any]:
    """Under the run lock: skip (DONE), resume (a usable checkpoint) or start afresh.
    Also removes the debris of killed attempts, which only a lock holder may do."""
    removed = clean_stale_temps(run_dir, owned=(CONFIG, METRICS, DONE, CKPT_LAST, CKPT_PREV, CKPT_BEST))
    (run_dir / (CKPT_PREV + ".link")).unlink(missing_ok=True)
    out: dict[str, Any] = {"skip": False, "ckpt": None, "warnings": [], "history": []}
    if removed:
        out["warnings"].append(f"removed {len(removed)} temp file(s) left by interrupted writes: "
                               f"{', '.join(p.name for p in removed)}")
    if cfg.force:
        return out
    _check_same_settings(run_dir, identity)  # again: the config may have changed before the lock
    if (run_dir / DONE).exists():
        logger.info("%s finished already (DONE); skipping (use --force to retrain)", run_dir)
        return {**out, "skip": True, "summary": _summary(run_dir, read_metrics(run_dir / METRICS), skipped=True)}
    ckpt, warnings = _find_resume_checkpoint(run_dir, identity)
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
                f"later epochs may differ in the last bits from an uninterrupted run (--threads {old} matches it)")
    return out


def _train(cfg: TrainConfig, device: torch.device, run_dir: Path, train_set: Any, test_set: Any,
           ckpt: dict[str, Any] | None, history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    # torch's writer (the tensorboard package's event writer), not tensorboardX: its
    # flush() waits for the queue to drain, so an epoch's scalars are on disk before its
    # checkpoint; tensorboardX 2.6's flush() returns with events still queued, and a kill
    # right after the checkpoint lost them.
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.contrib.logging import logging_redirect_tqdm

    start_epoch = int(ckpt["epoch"]) if ckpt else 0
    global_step = int(ckpt["global_step"]) if ckpt else 0
    best_acc = float(ckpt["best_acc"]) if ckpt else -1.0
    meta = _metadata(device)
    # Which epochs ran at which thread count, over every attempt of the run.
    history = list(history or []) if ckpt else []
    if not history or history[-1].get("threads") != cfg.threads:
        history.append({"from_epoch": start_epoch + 1, "threads": cfg.threads})
    meta["threads_history"] = history
    atomic_write_json(run_dir / CONFIG, {"settings": dataclasses.asdict(cfg), **meta})
    logger.info("run %s on %s: %s", run_dir, device, json.dumps(cfg.identity(), sort_keys=True))
    if ckpt:
        logger.info("resuming after epoch %d (step %d, best test acc %.2f)", start_epoch, global_step, best_acc)

    # TensorBoard steps are 0-based step indices: an epoch's scalars sit at the index of
    # its last step, so events of a killed attempt after the checkpoint all have
    # index >= global_step, and TensorBoard drops them (purge_step).
    writer = SummaryWriter(str(run_dir), purge_step=global_step if ckpt or any(run_dir.glob("events.out.*")) else None)
    try:
        model, method = build_model(cfg, device, writer=writer)
        optimizer = make_optimizer(cfg, model)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
        if ckpt:
            model.load_state_dict(ckpt["model"], strict=True)
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            method.load_state_dict(ckpt["method"])
            _set_rng_state(ckpt["rng"])
        rows = [r for r in read_metrics(run_dir / METRICS) if r["epoch"] <= start_epoch]
        _write_metrics(run_dir / METRICS, rows)
        writes_own_lsv = bool(getattr(method, "writes_layer_norms", cfg.method == "fastclip"))
        generator = torch.Generator()
        test_loader = _loader(test_set, cfg, shuffle=False, generator=None, device=device)

        # Console log lines go through tqdm.write so they don't break the bar; only a root
        # logger that already has console handlers is redirected (never add one to it).
        root = logging.getLogger()
        with logging_redirect_tqdm(loggers=[root] if root.handlers else []):
            for epoch in range(start_epoch + 1, cfg.epochs + 1):
                t0 = time.perf_counter()
                seeds = epoch_seeds(cfg.seed, epoch)
                _seed_all(seeds)
                generator.manual_seed(seeds["loader"])
                train_loader = _loader(train_set, cfg, shuffle=True, generator=generator, device=device)
                lr = optimizer.param_groups[0]["lr"]
                stats = train_epoch(model, method, optimizer, train_loader, device, step=global_step,
                                    writer=None if writes_own_lsv else writer, lsv_every=cfg.lsv_every,
                                    desc=f"epoch {epoch}/{cfg.epochs}")
                global_step = stats["step"]
                scheduler.step()
                method.finish_epoch(model)
                test_loss, test_acc = evaluate(model, test_loader, device)
                norms = method.layer_norms(model)
                row: dict[str, Any] = {"epoch": epoch, "train_loss": stats["loss"], "train_acc": stats["acc"],
                                       "test_loss": test_loss, "test_acc": test_acc, "lr": float(lr),
                                       "wall_time": time.perf_counter() - t0}
                row.update({f"lsv/{k}": float(v) for k, v in norms.items()})
                if cfg.exact_norms:
                    row.update(_exact_norms(model, cfg))
                rows.append(row)
                for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
                    split, what = key.split("_")
                    writer.add_scalar(f"{split}/{what}", row[key], global_step - 1)
                writer.add_scalar("train/lr", lr, global_step - 1)
                if not writes_own_lsv and not (cfg.lsv_every and (global_step - 1) % cfg.lsv_every == 0):
                    for name, value in norms.items():
                        writer.add_scalar(f"train/lsv_{name}", value, global_step - 1)
                writer.flush()
                _write_metrics(run_dir / METRICS, rows)
                is_best = test_acc > best_acc
                best_acc = max(best_acc, test_acc)
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "method": method.state_dict(), "epoch": epoch,
                         "global_step": global_step, "best_acc": best_acc, "rng": _rng_state(),
                         "config": cfg.identity(), "threads": torch.get_num_threads()}
                _save_checkpoint(run_dir, state, best=is_best)
                logger.info("epoch %d/%d: train loss %.4f acc %.2f | test loss %.4f acc %.2f%s | %.1f s",
                            epoch, cfg.epochs, row["train_loss"], row["train_acc"], test_loss, test_acc,
                            " (best)" if is_best else "", row["wall_time"])
    finally:
        writer.close()
    summary = _summary(run_dir, rows, skipped=False)
    atomic_write_json(run_dir / DONE, {"epochs": summary["epochs"], "best_test_acc": summary["best_test_acc"],
                                       "final": summary["final"]})
    logger.info("finished %s: test acc %.2f (best %.2f)", run_dir, summary["final"].get("test_acc", float("nan")),
                summary["best_test_acc"])
    return summary


def _exact_norms(model: nn.Module, cfg: TrainConfig) -> dict[str, float]:
    from fastclip.data import dataset_info
    from fastclip.results import measure_layer_norms

    # Eval mode: the layers as evaluated (BN running statistics), and no wrapper
    # tracks or clips while it is measured.
    was_training = model.training
    model.eval()
    try:
        rows = measure_layer_norms(model, dataset_info(cfg.dataset).input_shape, progress=False)
    finally:
        model.train(was_training)
    return {f"exact/{r['layer']}": r["sigma1"] for r in rows}


def train_epoch(model: nn.Module, method: Any, optimizer: torch.optim.Optimizer, loader: Any,
                device: torch.device | str, *, step: int = 0, writer: Any = None, lsv_every: int = 0,
                max_steps: int | None = None, desc: str = "train") -> dict[str, Any]:
    """One pass of training steps over ``loader`` (at most ``max_steps``)::

        loss = CE(model(x), y) + method.penalty(model)
        loss.backward(); optimizer.step(); method.after_step(model, step); step += 1

    ``step`` is the 0-based index of the next step in the whole run. After each step
    whose index is a multiple of ``lsv_every``, ``method.layer_norms`` go to ``writer``
    as ``train/lsv_<layer>`` at that index (the convention of FastClip's wrapper).
    Returns ``{"loss": mean CE per example, "acc": percent, "step": the index of the
    next step after the pass, "steps": steps taken}``.

    Example::

        >>> stats = train_epoch(model, method, torch.optim.SGD(model.parameters(), lr=0.1), loader, "cpu")
        >>> stats["steps"] == len(loader)
        True
    """
    from tqdm import tqdm

    model.train()
    loss_sum, correct, seen, first = 0.0, 0, 0, step
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
               total=len(loader) if max_steps is None else min(len(loader), max_steps))
    try:
        for x, y in bar:
            if max_steps is not None and step - first >= max_steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            ce = nn.functional.cross_entropy(out, y)
            loss = ce + method.penalty(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            method.after_step(model, step)
            ce_value = ce.item()
            if not math.isfinite(ce_value):
                raise FloatingPointError(f"training loss is {ce_value} at step {step} ({desc})")
            loss_sum += ce_value * y.numel()
            correct += int((out.argmax(1) == y).sum())
            seen += y.numel()
            if writer is not None and lsv_every and step % lsv_every == 0:
                for name, value in method.layer_norms(model).items():
                    writer.add_scalar(f"train/lsv_{name}", value, step)
            step += 1
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100.0 * correct / seen:.2f}")
    finally:
        bar.close()
    return {"loss": loss_sum / max(seen, 1), "acc": 100.0 * correct / max(seen, 1), "step": step,
            "steps": step - first}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (percent) of ``model`` in eval mode over ``loader``.

    Example::

        >>> loss, acc = evaluate(model, DataLoader(test_set, batch_size=256), "cpu")
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            seen += y.numel()
    finally:
        model.train(was_training)
    return loss_sum / max(seen, 1), 100.0 * correct / max(seen, 1)


def load_model(run_dir: str | os.PathLike, which: str = "best", device: torch.device | str = "cpu",
               ) -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model of a run (architecture, clipping method's wrapping) from its
    config.json and load ``ckpt_<which>.pth`` (``which`` = "best" or "last") strictly,
    with ``torch.load(weights_only=True)``, verified against its SHA-256. Returns ``(model in eval mode, config)``.

    Example::

        >>> model, cfg = load_model("logs/mnist/SimpleConv_models/method_fastclip_wBN_1")
        >>> model(torch.rand(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    run_dir = Path(run_dir)
    config_path, ckpt_path = run_dir / CONFIG, run_dir / f"ckpt_{which}.pth"
    if not config_path.is_file() or not ckpt_path.is_file():
        raise FileNotFoundError(f"expected {config_path.name} and {ckpt_path.name} in {run_dir}, "
                                f"found {sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else 'no directory'}")
    settings = json.loads(config_path.read_text())["settings"]
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in settings.items() if k in known})
    ckpt = load_checkpoint(ckpt_path)  # CheckpointError (a ValueError) if damaged
    rng = _rng_state()
    try:
        model, method = build_model(config, device)
    finally:
        _set_rng_state(rng)  # building seeds the global RNGs; don't leak that into the caller
    model.load_state_dict(ckpt["model"], strict=True)
    method.load_state_dict(ckpt["method"])
    return model.eval(), config
