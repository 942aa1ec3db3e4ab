"""``miyato``: spectral normalisation (Miyato et al. 2018) as shipped by PyTorch.

Each conv and linear weight is reparametrised as ``W = W_orig / sigma_1(mat(W_orig))``,
where ``mat(W)`` is the kernel reshaped to ``(out_channels, -1)`` and sigma_1 is
estimated by ``n_power_iterations`` persistent power iterations per training forward
(:func:`torch.nn.utils.parametrizations.spectral_norm`).

What it bounds is the reshaped matrix, **not** the convolution: for a k x k kernel the
conv's operator norm can be up to k times larger (or smaller) than ``||mat(W)||_2``.
The target ``clip`` c scales the normalised weight: ``W = c * W_orig / sigma`` (c = 1
is the published setting).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from fastclip.linalg.operator import full_precision
from fastclip.pipeline.methods.base import Method, MethodConfig, named_layers

__all__ = ["Miyato", "MiyatoConfig", "reshaped_norm"]


@dataclass
class MiyatoConfig(MethodConfig):
    n_power_iterations: int = field(
        default=1,
        metadata={
            "help": "power iterations on the reshaped kernel per training forward (persistent vectors)",
            "range": (1, 10_000),
        },
    )
    eps: float = field(
        default=1e-12,
        metadata={
            "help": "epsilon of the power iteration's normalisation",
            "range": (0.0, 1.0),
            "open_min": True,
        },
    )


class _Scale(nn.Module):
    """Multiplies the (already normalised) weight by the target norm c."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = float(c)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.c

    def extra_repr(self) -> str:
        return f"c={self.c}"


class _FullPrecisionSpectralNorm(_SpectralNorm):
    """``torch.nn.utils.parametrizations.spectral_norm``'s parametrisation with autocast
    off: the power iteration and the normalised weight stay in the weight's precision
    (autocast casts the layer's own op afterwards, as for any weight)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with full_precision(weight.device):
            return super().forward(weight)


def reshaped_norm(weight: torch.Tensor) -> float:
    """sigma_1 of the kernel reshaped to ``(weight.shape[0], -1)``, what Miyato et al.
    normalise (exact up to the weight's precision, by SVD of the small matrix).

    Example::

        >>> reshaped_norm(torch.eye(3).reshape(3, 3, 1, 1))
        1.0
    """
    w = weight.detach().reshape(weight.shape[0], -1)
    return float(torch.linalg.matrix_norm(w, ord=2))


class Miyato(Method):
    """Spectral normalisation of every conv and linear layer's reshaped kernel.

    ``prepare`` registers the parametrisation on each layer (the layer stays at the same
    place; its weight becomes ``layer.parametrizations.weight.original`` plus the power
    iteration's ``_u``/``_v`` buffers, all in the model's state_dict). In eval mode the
    stored vectors are used as they are, so evaluation is deterministic.

    Example::

        >>> m = Miyato(mode="wBN")
        >>> model = m.prepare(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), (3, 16, 16))
        >>> m.layer_norms(model)   # ~1.0 per layer: the reshaped matrix's norm
    """

    name = "miyato"
    Config = MiyatoConfig

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...], writer: Any = None) -> nn.Module:
        model = super().prepare(model, input_shape, writer=writer)
        for name, layer in named_layers(model):
            if parametrize.is_parametrized(layer, "weight"):
                raise ValueError(
                    f"layer {name!r} already has a weight parametrisation; prepare a model only once"
                )
            # torch's spectral_norm, with its power iteration kept out of autocast
            # (on CUDA autocast would run its mv in half precision)
            dim = 1 if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
            parametrize.register_parametrization(
                layer,
                "weight",
                _FullPrecisionSpectralNorm(
                    layer.weight, self.config.n_power_iterations, dim, self.config.eps
                ),
            )
            if self.config.clip != 1.0:
                parametrize.register_parametrization(layer, "weight", _Scale(self.config.clip))
        return model

    def layer_norms(self, model: nn.Module) -> dict[str, float]:
        """The reshaped-matrix sigma_1 of each layer's effective weight (what the
        method enforces, = c up to the power iteration's lag), plus BN closed forms."""
        norms = {name: reshaped_norm(layer.weight) for name, layer in named_layers(model)}
        norms.update(super().layer_norms(model))
        return norms
