"""The interface every clipping method implements, and the batch-norm modes."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fastclip.linalg.batchnorm import bn_singular_values, clamp_bn_
from fastclip.linalg.operator import BN_TYPES
from fastclip.pipeline.limits import MAX_COUNT, MAX_REAL, check_int, check_real

MODES = ("wBN", "noBN", "clipBN")

__all__ = ["MODES", "Method", "MethodConfig", "check_mode", "named_layers", "field_range", "numeric_type"]


def numeric_type(hint: Any) -> type | None:
    """int or float out of a config field's annotation (``int``, ``float | None``), else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


def field_range(f: dataclasses.Field, kind: type) -> tuple[float, float, bool]:
    """``(low, high, low excluded)`` of a numeric config field: its ``metadata["range"]``
    (and ``metadata["open_min"]``), else ``[0, MAX_COUNT]`` for a count and ``[0,
    MAX_REAL]`` for a real. The flags of :func:`fastclip.pipeline.methods.add_method_arguments`
    and :class:`Method`'s own check use it, so the command line and the library agree."""
    low, high = f.metadata.get("range", (0, MAX_COUNT if kind is int else MAX_REAL))
    return low, high, bool(f.metadata.get("open_min", False))


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


@dataclass
class MethodConfig:
    """Hyper-parameters shared by every method. Subclasses add their own fields,
    each with the published default."""

    clip: float = dataclasses.field(
        default=1.0,
        metadata={
            "help": "target spectral norm c of every clipped layer",
            "range": (0.0, 1e6),
            "open_min": True,
        },
    )
    bn_count: int = dataclasses.field(
        default=50,
        metadata={
            "help": "clipBN: clamp every BN's sigma_1 to c every N steps (Gouk et al. 2021)",
            "range": (1, MAX_COUNT),
        },
    )


def named_layers(
    model: nn.Module, types: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every layer of the given types, in definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, types)]


class Method:
    """A clipping method as a plug-in of the training loop.

    Usage::

        m = fastclip.pipeline.methods.get("gouk", clip=1.0, mode="wBN")
        model = m.prepare(model, (3, 32, 32))
        for step, (x, y) in enumerate(loader):
            loss = criterion(model(x), y) + m.penalty(model)
            loss.backward(); opt.step(); opt.zero_grad()
            m.after_step(model, step)
        m.layer_norms(model)   # {layer name: sigma_1 the method tracks}

    ``prepare`` records every conv/linear layer's true input shape with one forward
    pass in eval mode (``self.input_shapes``), so no method needs hand-typed sizes.
    """

    name: ClassVar[str] = "base"
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, mode: str = "wBN", **overrides: Any) -> None:
        self.mode = check_mode(mode)
        fields = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"unknown hyper-parameter(s) {', '.join(unknown)} for method {self.name!r}; "
                f"choose from {', '.join(sorted(fields))}"
            )
        hints = typing.get_type_hints(self.Config)
        for f in dataclasses.fields(self.Config):
            kind = numeric_type(hints[f.name])
            if kind is None or overrides.get(f.name) is None or f.name == "clip":  # clip: below
                continue
            low, high, open_low = field_range(f, kind)
            if kind is int:
                check_int(f.name, overrides[f.name], int(low), int(high))
            else:
                check_real(f.name, overrides[f.name], low, high, open_min=open_low)
        self.config = self.Config(**overrides)
        if not 0 < self.config.clip < math.inf:  # also NaN
            raise ValueError(f"clip must be > 0 and finite, got {self.config.clip}")
        for f in dataclasses.fields(self.config):
            choices = f.metadata.get("choices")
            if choices and getattr(self.config, f.name) not in choices:
                raise ValueError(
                    f"{f.name} must be one of {', '.join(map(str, choices))}; "
                    f"got {getattr(self.config, f.name)!r}"
                )
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.writer: Any = None

    # -- hooks -----------------------------------------------------------------
    def prepare(self, model: nn.Module, input_shape: tuple[int, ...], writer: Any = None) -> nn.Module:
        """Record layer input shapes, check the mode; subclasses wrap layers after
        calling this. ``writer`` (a TensorBoard SummaryWriter or None) is kept as
        ``self.writer`` for methods that log per step (fastclip: ``train/lsv_<layer>``)."""
        self.writer = writer
        if self.mode == "noBN":
            bns = [n for n, m in model.named_modules() if isinstance(m, BN_TYPES)]
            if bns:
                raise ValueError(
                    f"mode 'noBN' expects a model built without batch norm (bn=False), "
                    f"but it has {len(bns)} BN layers, e.g. {bns[0]!r}"
                )
        self.input_shapes = record_input_shapes(model, input_shape)
        return model

    def penalty(self, model: nn.Module) -> torch.Tensor:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.mode == "clipBN" and step % self.config.bn_count == 0:
            for _, bn in named_layers(model, BN_TYPES):
                clamp_bn_(bn, self.config.clip)

    def finish_epoch(self, model: nn.Module) -> None:
        """Fire every schedule now (clip, projection, BN clamp), after an epoch's last
        step and before the model is evaluated and checkpointed.

        A method that bounds the layers only every N steps leaves the model up to
        N - 1 optimiser steps away from its last bound (Adam moves a 50k-input Linear's
        sigma_1 by ~1 in 50 steps); firing here makes every evaluated and saved model
        one the method has just bounded. The base class clamps BN in clipBN mode."""
        if self.mode == "clipBN":
            for _, bn in named_layers(model, BN_TYPES):
                clamp_bn_(bn, self.config.clip)

    def layer_norms(self, model: nn.Module) -> dict[str, float]:
        """sigma_1 of each layer as this method sees it (BN layers by closed form)."""
        return {n: float(bn_singular_values(bn, k=1)[0]) for n, bn in named_layers(model, BN_TYPES)}

    def state_dict(self) -> dict[str, Any]:
        """Method state that is not in the model's state_dict (e.g. power-iteration
        vectors kept outside the model), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def record_input_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """One eval-mode forward on zeros; the per-sample input shape of every submodule."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, mod in model.named_modules():

        def hook(m, args, name=name):
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(name, tuple(args[0].shape[1:]))

        hooks.append(mod.register_forward_pre_hook(hook))
    was_training = model.training
    p = next(model.parameters(), None)
    try:
        model.eval()
        with torch.no_grad():
            model(
                torch.zeros(
                    (1, *input_shape),
                    device=p.device if p is not None else None,
                    dtype=p.dtype if p is not None else None,
                )
            )
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes
