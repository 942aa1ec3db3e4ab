"""Batch normalisation in eval mode is a diagonal map: closed forms for its spectrum.

In eval mode, channel ``c`` is scaled by ``s_c = gamma_c / sqrt(running_var_c + eps)``
(and shifted), so the singular values of the linear part are ``|s_c|``, each repeated
once per spatial position, and ``sigma_1 = max_c |s_c|``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastclip.linalg.operator import BN_TYPES

__all__ = ["bn_scale", "bn_singular_values", "clamp_bn_"]


def _check_bn(bn: nn.Module) -> None:
    if not isinstance(bn, BN_TYPES):
        raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
    if bn.running_var is None:
        raise ValueError(
            f"{type(bn).__name__} has track_running_stats=False: it is not a fixed affine "
            "map in eval mode, so it has no spectrum of its own"
        )


def bn_scale(bn: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-channel scale ``gamma / sqrt(running_var + eps)`` of an eval-mode BN, computed
    in ``dtype`` (default: the layer's own)."""
    _check_bn(bn)
    var = bn.running_var.to(dtype or bn.running_var.dtype)
    gamma = bn.weight.to(var.dtype) if bn.affine else torch.ones_like(var)
    return gamma / torch.sqrt(var + bn.eps)


@torch.no_grad()
def bn_singular_values(
    bn: nn.Module,
    k: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Top-``k`` singular values of an eval-mode BN, descending, in ``dtype`` (default:
    the layer's own).

    With ``input_shape`` = (C, *spatial) each channel's value is repeated
    prod(spatial) times, which is the exact multiset of singular values of the
    layer at that input size; without it, one value per channel.

    Example::

        >>> bn = nn.BatchNorm2d(4).eval()
        >>> bn_singular_values(bn, k=1)
        tensor([1.0000])
    """
    s = bn_scale(bn, dtype).detach().abs()
    if input_shape is not None:
        if input_shape[0] != s.numel():
            raise ValueError(
                f"input_shape {tuple(input_shape)} does not fit {type(bn).__name__}({s.numel()}): "
                f"expected {s.numel()} channels first"
            )
        reps = 1
        for d in input_shape[1:]:
            reps *= int(d)
        s = s.repeat_interleave(reps)
    s = torch.sort(s, descending=True).values
    if k is not None:
        if k > s.numel():
            raise ValueError(f"k={k} is larger than the operator's dimension {s.numel()}")
        s = s[:k]
    return s


@torch.no_grad()
def clamp_bn_(bn: nn.Module, max_norm: float) -> tuple[float, float]:
    """Clamp every channel's scale into [-max_norm, max_norm] by rescaling gamma
    (Gouk et al. 2021's BN projection). Exact: the result's sigma_1 is
    min(sigma_1, max_norm) and channels already below are untouched.
    Returns sigma_1 before and after."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    _check_bn(bn)
    if not bn.affine:
        raise ValueError(f"{type(bn).__name__} has affine=False: there is no gamma to clamp")
    s = bn_scale(bn).abs()
    before = float(s.max())
    factor = torch.clamp(max_norm / s.clamp_min(torch.finfo(s.dtype).tiny), max=1.0)
    bn.weight.mul_(factor)
    return before, float(bn_scale(bn).abs().max())
