"""``gouk``: projection by power iteration after every step (Gouk et al. 2021).

After each optimiser step, for every conv and linear layer: a few power iterations on
``A^T A`` of the layer's true linear map at its real input size (stride, padding,
dilation and groups included, via :class:`fastclip.linalg.operator.AffineOperator`),
warm-started from the previous step's vector, give ``sigma = ||A v||``; then
``W <- W / max(1, sigma / c)``. The bias is left alone (it does not enter the linear
part). ``sigma`` is a lower bound on sigma_1 that tightens over the steps, so the bound
is approximate until the warm-started vector has converged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastclip.linalg.operator import AffineOperator
from fastclip.pipeline.limits import MAX_COUNT, MAX_SEED
from fastclip.pipeline.methods.base import Method, MethodConfig, named_layers
from fastclip.spectral import power_iteration

__all__ = ["Gouk", "GoukConfig"]


@dataclass
class GoukConfig(MethodConfig):
    n_iter: int = field(
        default=5,
        metadata={
            "help": "power iterations per layer after every step (warm-started from the previous step)"
        },
    )
    init_iter: int = field(
        default=5,
        metadata={
            "help": "power iterations from the random start the first time a layer is projected",
            "range": (1, MAX_COUNT),
        },
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the random start vectors", "range": (0, MAX_SEED)}
    )


class Gouk(Method):
    """``W <- W / max(1, sigma_1 / c)`` for every conv and linear layer after every step.

    State (for checkpoints): the warm-start vector of each layer.

    Example::

        >>> m = Gouk(mode="wBN", clip=1.0)
        >>> model = m.prepare(model, (3, 32, 32))
        >>> ...; opt.step(); m.after_step(model, step)
    """

    name = "gouk"
    Config = GoukConfig

    def __init__(self, mode: str = "wBN", **overrides: Any) -> None:
        super().__init__(mode=mode, **overrides)
        if self.config.n_iter < 1 or self.config.init_iter < 1:
            raise ValueError(
                f"n_iter and init_iter must be >= 1, got {self.config.n_iter}, {self.config.init_iter}"
            )
        self.vectors: dict[str, torch.Tensor] = {}
        self.sigmas: dict[str, torch.Tensor | float] = {}  # after the last projection

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...], writer: Any = None) -> nn.Module:
        model = super().prepare(model, input_shape, writer=writer)
        for name, _ in named_layers(model):
            if name not in self.input_shapes:
                raise ValueError(
                    f"layer {name!r} was not used in the forward pass at input shape {input_shape}; "
                    "its input size is unknown"
                )
        return model

    def estimate(self, name: str, layer: nn.Module) -> float:
        """Power-iteration estimate of the layer's sigma_1 (warm-started; updates the vector)."""
        return float(self._estimate(name, layer))

    def _estimate(self, name: str, layer: nn.Module) -> torch.Tensor:
        # the estimate as a 0-dim tensor on the layer's device (no host sync); the
        # random start is drawn there, by a generator seeded ``seed``
        op = AffineOperator(layer, self.input_shapes[name])
        v = self.vectors.get(name)
        if v is None:
            g = torch.Generator(device=op.device).manual_seed(self.config.seed)
            v0 = torch.randn((1, *op.input_shape), generator=g, dtype=op.dtype, device=op.device)
            sigma, v = power_iteration(op, v0, n_iter=self.config.init_iter)
        else:
            sigma, v = power_iteration(op, v, n_iter=self.config.n_iter)
        self.vectors[name] = v.detach()
        return sigma

    @torch.no_grad()
    def project(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """One projection of every layer; returns each layer's estimate before it (0-dim
        tensors: the projection makes no host sync, what a GPU training step needs)."""
        c = self.config.clip
        before = {}
        for name, layer in named_layers(model):
            sigma = self._estimate(name, layer)
            before[name] = sigma
            layer.weight.div_(torch.clamp(sigma / c, min=1.0).to(layer.weight.dtype))
            self.sigmas[name] = torch.clamp(sigma, max=c)
        return before

    def after_step(self, model: nn.Module, step: int) -> None:
        self.project(model)
        super().after_step(model, step)

    def layer_norms(self, model: nn.Module) -> dict[str, float]:
        """The power-iteration sigma_1 of every conv/linear layer after the last
        projection (estimated now for a layer not projected yet), and BN."""
        norms = {}
        with torch.no_grad():
            for name, layer in named_layers(model):
                norms[name] = float(self.sigmas[name]) if name in self.sigmas else self.estimate(name, layer)
        norms.update(super().layer_norms(model))
        return norms

    def state_dict(self) -> dict[str, Any]:
        return {
            "vectors": {n: v.cpu() for n, v in self.vectors.items()},
            "sigmas": {n: float(s) for n, s in self.sigmas.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vectors = {n: v.clone() for n, v in state.get("vectors", {}).items()}
        self.sigmas = {n: float(s) for n, s in state.get("sigmas", {}).items()}
