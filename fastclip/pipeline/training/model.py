"""The model and optimiser of a run, and a trained run's model loaded back."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastclip.pipeline.checkpoint import CheckpointError, load_checkpoint
from fastclip.pipeline.data import dataset_info, input_normalization
from fastclip.pipeline.methods import get
from fastclip.pipeline.models import get_model
from fastclip.pipeline.training.config import CONFIG, TrainConfig
from fastclip.pipeline.training.state import _rng_state, _seed_all, _set_rng_state, epoch_seeds
from fastclip.pipeline.training.validate import RunFilesError, read_settings, state_dict_mismatch


def build_model(
    config: TrainConfig,
    device: torch.device | str = "cpu",
    writer: Any = None,
) -> tuple[nn.Module, Any]:
    """The model of a (resolved) config, on ``device``, prepared by its clipping method:
    returns ``(model, method)``. Initialisation is seeded by ``config.seed``.

    Example::

        >>> model, method = build_model(resolve(TrainConfig(dataset="mnist", method="gouk")))
        >>> model(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    info = dataset_info(config.dataset)
    mean, std = input_normalization(config.dataset, config.input_norm)
    _seed_all(epoch_seeds(config.seed, 0))
    model = get_model(
        config.model,
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        input_size=info.input_size,
        bn=config.mode != "noBN",
        mean=mean,
        std=std,
        halve_shortcut=config.halve_shortcut,
        options=config.model_args,
    ).to(device)
    if config.sync_bn and torch.distributed.is_initialized():
        # before the method wraps anything: the methods see the layers that will run
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
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
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, eps=config.adam_eps)


def load_model(
    run_dir: str | os.PathLike,
    which: str = "best",
    device: torch.device | str = "cpu",
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
        raise FileNotFoundError(
            f"expected {config_path.name} and {ckpt_path.name} in {run_dir}, "
            f"found {sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else 'no directory'}"
        )
    settings = read_settings(run_dir)  # RunFilesError (a ValueError) naming config.json
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        config = TrainConfig(**{k: v for k, v in settings.items() if k in known})
    except TypeError as e:
        raise RunFilesError(f"{config_path} is damaged ({e})") from None
    ckpt = load_checkpoint(ckpt_path)  # CheckpointError (a ValueError) if damaged
    if not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{ckpt_path.name} holds no model weights")
    rng = _rng_state()
    try:
        model, method = build_model(config, device)
    finally:
        _set_rng_state(rng)  # building seeds the global RNGs; don't leak that into the caller
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        # torch's first line stops at "Error(s) in loading state_dict for ...": say which
        # keys and shapes differ (wrappers may load keys a fresh model does not list yet,
        # so only a refused load is explained).
        why = state_dict_mismatch(model, ckpt["model"]) or str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(
            f"{ckpt_path.name} does not fit {config.model} as config.json describes it: {why}"
        ) from None
    method.load_state_dict(ckpt["method"])
    return model.eval(), config
