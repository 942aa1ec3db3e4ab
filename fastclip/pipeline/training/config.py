"""The settings of a training run: defaults, the run directory they name, the device and
thread count they run on."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastclip.pipeline.limits import MAX_COUNT, MAX_SEED

#: Paper defaults per dataset, used for settings left ``None``.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar": dict(
        optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, adam_eps=None, epochs=200, batch_size=128
    ),
    "mnist": dict(
        optimizer="adam", lr=1e-3, momentum=None, weight_decay=1e-4, adam_eps=1e-7, epochs=120, batch_size=128
    ),
    "fashion-mnist": dict(
        optimizer="adam", lr=1e-3, momentum=None, weight_decay=1e-4, adam_eps=1e-7, epochs=120, batch_size=128
    ),
}
OPTIMIZERS = ("sgd", "adam")

#: Settings that choose where/how a run executes but not what it computes; they may
#: differ between a run's first start and its resumption.
#: ``sync_bn`` is one of them: at world size 1 it changes nothing, and a resume may change
#: the world size anyway (it warns).
EXECUTION_FIELDS = frozenset(
    {"logdir", "data_dir", "download", "device", "num_workers", "force", "threads", "sync_bn"}
)

CKPT_LAST, CKPT_PREV, CKPT_BEST = "ckpt_last.pth", "ckpt_prev.pth", "ckpt_best.pth"
CONFIG, METRICS, DONE, LOG, LOCK = "config.json", "metrics.csv", "DONE", "train.log", ".lock"
#: Written instead of DONE by a run that cannot go on (its loss diverged): JSON with the reason.
FAILED = "FAILED"
BASE_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "wall_time")
CKPT_KEYS = ("model", "optimizer", "scheduler", "method", "epoch", "global_step", "best_acc", "rng", "config")


#: The valid range of every integer setting (inclusive), checked by :func:`resolve` and by
#: the command line's types (``fastclip.pipeline.training.args``): one table for both.
INT_RANGES: dict[str, tuple[int, int]] = {
    "seed": (0, MAX_SEED),
    "epochs": (1, 100_000),
    "batch_size": (1, 1_000_000),
    "lr_step": (1, 100_000),
    "train_subset": (1, MAX_COUNT),
    "test_subset": (1, MAX_COUNT),
    "lsv_every": (0, MAX_COUNT),
    "num_workers": (0, 1024),
    "threads": (1, 4096),
    "kernel_size": (1, 1024),
    "padding": (0, 1024),
    "stride": (1, 1024),
    "dilation": (1, 1024),
}
#: The valid range of every real setting: (low, high, low excluded); NaN and infinities never.
REAL_RANGES: dict[str, tuple[float, float, bool]] = {
    "clip": (0.0, 1e6, True),
    "lr": (0.0, 1e3, True),
    "lr_gamma": (0.0, 1e3, True),
    "momentum": (0.0, 1.0, False),
    "weight_decay": (0.0, 1e3, False),
    "adam_eps": (0.0, 1.0, True),
}


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
    #: Hyper-parameters of the method (fields of ``fastclip.pipeline.methods.get_class(method).Config``
    #: other than ``clip``); resolved to the method's full config.
    method_args: dict[str, Any] = field(default_factory=dict)
    halve_shortcut: bool = False
    #: Architecture options of the model beyond the common ones
    #: (:func:`fastclip.pipeline.models.model_options`; SimpleConv: kernel_size, padding, stride,
    #: dilation, padding_mode); resolved to the values that differ from the model's defaults.
    model_args: dict[str, Any] = field(default_factory=dict)
    #: Training-set augmentation (:data:`fastclip.pipeline.data.AUGMENTATIONS`): "paper" as the authors, "none".
    augment: str = "paper"
    #: Input normalisation inside the model (:data:`fastclip.pipeline.data.INPUT_NORMS`): "paper"
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
    #: Under several processes on CUDA: SyncBatchNorm (batch statistics over all ranks)
    #: instead of per-rank statistics. Refused on the CPU.
    sync_bn: bool = False
    force: bool = False

    def identity(self) -> dict[str, Any]:
        """The settings that determine what the run computes (all but :data:`EXECUTION_FIELDS`)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in EXECUTION_FIELDS}


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
            raise ConfigError(
                f"device {name!r} requested but CUDA is not available; use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}; choose auto, cpu, cuda or cuda:N")
    return device


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
    return (
        Path(config.logdir)
        / config.dataset
        / f"{model_tag(config)}_models"
        / f"method_{config.method}_{config.mode}_{config.seed}"
    )


#: Flags of the model options and their short tags in a run directory's name.
MODEL_OPTION_FLAGS = {"kernel_size": "k", "padding": "p", "stride": "s", "dilation": "d", "padding_mode": ""}


def model_tag(config: TrainConfig) -> str:
    """The model's name plus its non-default options, e.g. ``SimpleConv_k5_p0_circular``
    (the folder ``<tag>_models`` keeps each architecture variant's grid apart)."""
    parts = [config.model]
    for key, value in sorted(
        config.model_args.items(),
        key=lambda kv: (
            list(MODEL_OPTION_FLAGS).index(kv[0]) if kv[0] in MODEL_OPTION_FLAGS else len(MODEL_OPTION_FLAGS)
        ),
    ):
        parts.append(f"{MODEL_OPTION_FLAGS.get(key, key)}{value}")
    return "_".join(parts)


def _conflicts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted((set(old) | set(new)) - EXECUTION_FIELDS)
    return [
        f"{k}={old.get(k, '<missing>')!r} there vs {new.get(k, '<missing>')!r} now"
        for k in keys
        if old.get(k, "<missing>") != new.get(k, "<missing>")
    ]
