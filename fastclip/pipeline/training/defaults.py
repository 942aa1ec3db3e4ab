"""Checking a run's settings and filling in the dataset's defaults (:func:`resolve`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from fastclip.pipeline.data import AUGMENTATIONS, DATASETS, INPUT_NORMS
from fastclip.pipeline.limits import check_int, check_real
from fastclip.pipeline.methods import MODES, available, get
from fastclip.pipeline.models import available as available_models
from fastclip.pipeline.models import model_options
from fastclip.pipeline.training.config import (
    DATASET_DEFAULTS,
    INT_RANGES,
    OPTIMIZERS,
    REAL_RANGES,
    ConfigError,
    TrainConfig,
    _options_text,
    default_threads,
)
from fastclip.pipeline.training.model import build_model


def _choose(label: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {label} {value!r}; choose one of {', '.join(map(str, choices))}")


def _check_names(config: TrainConfig) -> None:
    _choose("dataset", config.dataset, DATASETS)
    _choose("model", config.model, available_models())
    _choose("method", config.method, available())
    _choose("mode", config.mode, MODES)
    _choose("augment", config.augment, AUGMENTATIONS)
    _choose("input_norm", config.input_norm, INPUT_NORMS)


def _fill_optimizer(config: TrainConfig, values: dict[str, Any]) -> None:
    """The dataset's defaults for the settings left None, and those of the chosen optimiser."""
    defaults = DATASET_DEFAULTS[config.dataset]
    for key, default in defaults.items():
        if values[key] is None:
            values[key] = default
    if values["optimizer"] is None:
        values["optimizer"] = defaults["optimizer"]
    _choose("optimizer", values["optimizer"], OPTIMIZERS)
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


def _check_numbers(values: dict[str, Any]) -> None:
    """Counts, rates and sizes in their ranges (:data:`INT_RANGES`, :data:`REAL_RANGES`:
    the command line checks the same), ``threads`` filled in (:func:`default_threads`)."""
    if values["threads"] is None:
        values["threads"] = default_threads()
    try:
        for key, (low, high) in INT_RANGES.items():
            if key in values and (values[key] is not None or key not in _OPTIONAL):
                check_int(key, values[key], low, high)
        for key, value in values["model_args"].items():
            if key in INT_RANGES and isinstance(value, (int, float)):
                check_int(key, value, *INT_RANGES[key])
        for key, (low, high, open_low) in REAL_RANGES.items():
            if values[key] is not None:
                check_real(key, values[key], low, high, open_min=open_low)
    except ValueError as e:
        raise ConfigError(str(e)) from None


_OPTIONAL = ("train_subset", "test_subset")


def _check_paths(values: dict[str, Any]) -> None:
    # "" is no directory: Path("") is the working directory, so a run would land there.
    for key in ("logdir", "data_dir"):
        value = values[key]
        blank = value is None or (isinstance(value, (str, os.PathLike)) and not os.fspath(value).strip())
        if blank and (value is not None or key == "logdir"):
            raise ConfigError(f"{key} must be a path, got {value!r}")


def _model_args(config: TrainConfig) -> dict[str, Any]:
    """The model options that differ from the model's defaults (so that a run given the
    defaults explicitly is the same run: same config.json, same directory)."""
    if config.halve_shortcut and config.model != "ResNet18":
        raise ConfigError(f"halve_shortcut applies to ResNet18 only, got model {config.model!r}")
    known = model_options(config.model)
    unknown = sorted(set(config.model_args) - set(known))
    if unknown:
        raise ConfigError(
            f"model {config.model} has no option {', '.join(unknown)} "
            f"(its options: {', '.join(known) or 'none'})"
        )
    return {k: v for k, v in sorted(config.model_args.items()) if v != known[k]}


def _method_args(config: TrainConfig) -> dict[str, Any]:
    """The method's full config but ``clip``."""
    try:
        method = get(config.method, clip=float(config.clip), mode=config.mode, **config.method_args)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    return {k: v for k, v in dataclasses.asdict(method.config).items() if k != "clip"}


def _check_buildable(resolved: TrainConfig) -> None:
    # A conv variant can be impossible (no output left) or outside what a method
    # handles (nsedghi's polyphase form needs the stride to divide the input):
    # building and preparing the small model once finds out before anything is written.
    try:
        with torch.random.fork_rng(devices=[]):
            build_model(resolved)
    except ValueError as e:
        raise ConfigError(
            f"model {resolved.model} with {_options_text(resolved.model_args)}, method "
            f"{resolved.method}: {str(e).splitlines()[0]}"
        ) from None


def resolve(config: TrainConfig) -> TrainConfig:
    """A copy of ``config`` with names checked, ``None`` settings replaced by the
    dataset's defaults, and ``method_args`` expanded to the method's full config.
    Raises :class:`ConfigError` naming the bad value and the choices.

    Example::

        >>> resolve(TrainConfig(dataset="cifar", model="ResNet18", method="orig")).lr
        0.1
    """
    _check_names(config)
    values = dataclasses.asdict(config)
    _fill_optimizer(config, values)
    _check_numbers(values)
    _check_paths(values)
    values["model_args"] = _model_args(config)
    values["method_args"] = _method_args(config)
    values["clip"] = float(config.clip)
    resolved = TrainConfig(**values)
    if resolved.model_args:
        _check_buildable(resolved)
    return resolved
