"""The command line of one training run (``fastclip-train``, ``experiments/train.py``)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from fastclip.pipeline.cli import OneLineErrorParser, int_at_least, path_arg, real_in
from fastclip.pipeline.data import AUGMENTATIONS, DATASETS, INPUT_NORMS
from fastclip.pipeline.methods import MODES, add_method_arguments, available, method_overrides
from fastclip.pipeline.models import available as available_models
from fastclip.pipeline.models.simple_conv import PADDING_MODES
from fastclip.pipeline.training.config import (
    INT_RANGES,
    MODEL_OPTION_FLAGS,
    OPTIMIZERS,
    REAL_RANGES,
    ConfigError,
    TrainConfig,
)


def _int(name: str, what: str = "an integer") -> Callable[[str], int]:
    low, high = INT_RANGES[name]
    return int_at_least(low, what, maximum=high)


def _real(name: str) -> Callable[[str], float]:
    low, high, open_low = REAL_RANGES[name]
    return real_in(low, high, open_min=open_low)


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
    d = TrainConfig()
    p = OneLineErrorParser(
        description="Train one model with one clipping method; resumable.",
        add_help=add_help,
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="dataset")
    g.add_argument("--model", choices=available_models(), default=d.model, help="architecture")
    g.add_argument("--method", choices=available(), default=d.method, help="clipping method")
    g.add_argument("--mode", choices=MODES, default=d.mode, help="batch-norm mode")
    g.add_argument(
        "--seed",
        type=_int("seed", "an integer seed"),
        default=d.seed,
        help="seed of initialisation, shuffling, methods",
    )
    g.add_argument("--clip", type=_real("clip"), default=d.clip, help="target spectral norm c")
    g.add_argument(
        "--halve-shortcut",
        action="store_true",
        help="ResNet18: halve (block output + conv shortcut), as the authors' FastClip ResNet18",
    )
    g = p.add_argument_group("SimpleConv's conv (default 3x3, padding 1, stride 1, dilation 1, zeros)")
    g.add_argument("--kernel-size", type=_int("kernel_size"), default=None, help="kernel size")
    g.add_argument("--padding", type=_int("padding"), default=None, help="padding")
    g.add_argument("--stride", type=_int("stride"), default=None, help="stride")
    g.add_argument("--dilation", type=_int("dilation"), default=None, help="dilation")
    g.add_argument("--padding-mode", choices=PADDING_MODES, default=None, help="padding mode")
    g = p.add_argument_group("optimisation (default: the paper's setting for the dataset)")
    g.add_argument("--epochs", type=_int("epochs"), default=None, help="cifar 200, mnist/fashion-mnist 120")
    g.add_argument("--lr", type=_real("lr"), default=None, help="cifar 0.1, mnist/fashion-mnist 1e-3")
    g.add_argument("--batch-size", type=_int("batch_size"), default=None, help="128")
    g.add_argument(
        "--optimizer", choices=OPTIMIZERS, default=None, help="cifar sgd, mnist/fashion-mnist adam"
    )
    g.add_argument("--momentum", type=_real("momentum"), default=None, help="sgd: 0.9")
    g.add_argument(
        "--weight-decay",
        type=_real("weight_decay"),
        default=None,
        help="cifar 5e-4, mnist/fashion-mnist 1e-4",
    )
    g.add_argument("--adam-eps", type=_real("adam_eps"), default=None, help="adam: 1e-7")
    g.add_argument("--lr-step", type=_int("lr_step"), default=d.lr_step, help="StepLR step (epochs)")
    g.add_argument("--lr-gamma", type=_real("lr_gamma"), default=d.lr_gamma, help="StepLR factor")
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-dir",
        type=path_arg,
        default=d.data_dir,
        help="dataset root (default: see fastclip.pipeline.data)",
    )
    g.add_argument("--download", action="store_true", help="download the dataset if missing")
    g.add_argument(
        "--train-subset", type=_int("train_subset"), default=None, help="use the first N training examples"
    )
    g.add_argument(
        "--test-subset", type=_int("test_subset"), default=None, help="use the first N test examples"
    )
    g.add_argument(
        "--num-workers", type=_int("num_workers"), default=d.num_workers, help="DataLoader workers"
    )
    g.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        default=d.augment,
        help="training augmentation: paper (cifar: crop 32 pad 4 + flip; mnist-style: crop 28 + flip, "
        "the authors') or none",
    )
    g.add_argument(
        "--input-norm",
        choices=INPUT_NORMS,
        default=d.input_norm,
        help="normalisation inside the model: paper (mnist 0.5/0.5, cifar its mean/std), dataset "
        "(the dataset's mean/std) or none",
    )
    g = p.add_argument_group("output and execution")
    g.add_argument(
        "--logdir", type=path_arg, default=d.logdir, help="runs go to <logdir>/<dataset>/<model>_models/..."
    )
    g.add_argument("--device", default=d.device, help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    g.add_argument(
        "--threads",
        type=_int("threads"),
        default=None,
        help="intra-op CPU threads, set before any work and recorded in config.json (default: "
        "$OMP_NUM_THREADS, else $SLURM_CPUS_PER_TASK, else the CPUs this process may use); "
        "CPU metrics are bit-identical only at the same count",
    )
    g.add_argument(
        "--lsv-every",
        type=_int("lsv_every"),
        default=d.lsv_every,
        help="write train/lsv_<layer> to TensorBoard every N steps and after each epoch "
        "(0: after each epoch only); fastclip's wrapper writes its own",
    )
    g.add_argument(
        "--exact-norms",
        action="store_true",
        help="also write the converged sigma_1 of every layer after each epoch (exact/<layer> columns)",
    )
    g.add_argument(
        "--sync-bn",
        action="store_true",
        help="several processes on CUDA: batch-norm statistics over all ranks (SyncBatchNorm) instead of "
        "per rank; refused on the CPU",
    )
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
