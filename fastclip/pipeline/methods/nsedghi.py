"""``nsedghi``: per-frequency SVD clamp of circular convolutions (Sedghi et al. 2019,
as used by Senderovich et al. 2022), every ``clip_steps`` steps.

A stride-1 circular 2-D convolution on an H x W input is block circulant: in the
Fourier basis it is block diagonal with the c_out x c_in blocks
``K_hat[p, q] = sum_{a,b} K[:, :, a, b] e^{-2 pi i (p a / H + q b / W)}``. The
projection clamps each block's singular values to c (the nearest operator with
sigma_1 <= c, in Frobenius norm), transforms back, and keeps only the kernel's
k x k support (this last step can raise sigma_1 a little above c again; the clamp is
exact only before it, and exact for circular padding only: zero-padded layers are
treated as if circular).

**Stride** is handled exactly by the polyphase form: with stride s (s | H) and
dilation d, the strided conv equals (up to a permutation of the input, which does not
change singular values) a stride-1 circular conv on (H/s) x (W/s) with s^2 c_in input
channels and kernel ``P[o, (c, r_h, r_w), m_h, m_w] = K[o, c, a, b]`` where
``d a = s m_h + r_h`` and ``d b = s m_w + r_w``. Dilation goes through the same
formula. **Groups** are clamped block by block (the operator is block diagonal).
Refused with a ``ValueError`` at ``prepare``: non-2-D convs, inputs not divisible by the
stride, and kernels wider than the (phase) input, whose taps would wrap around.
Linear layers are not touched (the published baseline clamps convolutions only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastclip.linalg.fourier import _pair, _taps, kernel_fft, polyphase_kernel
from fastclip.pipeline.limits import MAX_COUNT
from fastclip.pipeline.methods.base import Method, MethodConfig, named_layers

__all__ = [
    "NSedghi",
    "NSedghiConfig",
    "polyphase_kernel",
    "from_polyphase",
    "clamp_circular_kernel",
    "conv_circular_geometry",
    "circular_sigma",
]


@dataclass
class NSedghiConfig(MethodConfig):
    clip_steps: int = field(
        default=100,
        metadata={
            "help": "clamp every conv's per-frequency singular values every N steps",
            "range": (1, MAX_COUNT),
        },
    )


def from_polyphase(
    P: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    """Inverse of :func:`polyphase_kernel` on its support: read the k x k kernel's taps back
    (entries of ``P`` off the support are dropped)."""
    kh, kw = kernel_size
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    rh, mh, Mh = _taps(kh, sh, dh)
    rw, mw, Mw = _taps(kw, sw, dw)
    cout = P.shape[0]
    cin = P.shape[1] // (sh * sw)
    P = P[:, :, :Mh, :Mw].reshape(cout, cin, sh, sw, Mh, Mw)
    return P[:, :, rh[:, None], rw[None, :], mh[:, None], mw[None, :]]


def conv_circular_geometry(conv: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """Phase input size (H/s_h, W/s_w) of a 2-D conv at ``input_shape`` = (C, H, W), or a
    ``ValueError`` saying why the circular (polyphase) model does not apply."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"the Fourier clamp handles nn.Conv2d only, got {type(conv).__name__}")
    if len(input_shape) != 3:
        raise ValueError(f"expected a (C, H, W) input shape for {conv!r}, got {tuple(input_shape)}")
    _, H, W = (int(d) for d in input_shape)
    (sh, sw), (dh, dw) = _pair(conv.stride), _pair(conv.dilation)
    kh, kw = conv.kernel_size
    if H % sh or W % sw:
        raise ValueError(
            f"{conv!r} at input {H}x{W}: the polyphase form needs the input size divisible by "
            f"the stride {(sh, sw)}"
        )
    h, w = H // sh, W // sw
    Mh, Mw = ((kh - 1) * dh) // sh + 1, ((kw - 1) * dw) // sw + 1
    if Mh > h or Mw > w:
        raise ValueError(
            f"{conv!r} at input {H}x{W}: its (phase) kernel {Mh}x{Mw} is larger than the phase "
            f"input {h}x{w}, so its taps wrap around and the kernel cannot be recovered "
            "from the clamped spectrum"
        )
    return h, w


def _group_weights(conv: nn.Conv2d, weight: torch.Tensor) -> list[torch.Tensor]:
    return list(weight.chunk(conv.groups, dim=0))


def _half_spectrum(P: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """FFT blocks (h, w//2 + 1, c_out, c_in) of a real kernel: the other half are complex
    conjugates (same singular values), so only this half is computed on."""
    return kernel_fft(P, size)[:, : size[1] // 2 + 1]


@torch.no_grad()
def circular_sigma(conv: nn.Conv2d, input_shape: tuple[int, ...], dtype: torch.dtype | None = None) -> float:
    """sigma_1 of ``conv`` as a circular convolution at ``input_shape`` (polyphase for
    strides, block by block for groups), computed in ``dtype`` (default: the weight's)."""
    h, w = conv_circular_geometry(conv, input_shape)
    best = 0.0
    for wg in _group_weights(conv, conv.weight.detach().to(dtype or conv.weight.dtype)):
        P = polyphase_kernel(wg, conv.stride, conv.dilation)
        best = max(best, float(torch.linalg.svdvals(_half_spectrum(P, (h, w))).max()))
    return best


@torch.no_grad()
def clamp_circular_kernel(
    weight: torch.Tensor,
    input_size: tuple[int, int],
    max_norm: float,
    stride: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
) -> tuple[torch.Tensor, float]:
    """Clamp the singular values of the circular conv with ``weight`` (groups 1) on
    ``input_size`` = (H, W) to ``max_norm`` at every frequency, and return the kernel
    restricted back to its k x k support, with the sigma_1 before the clamp.

    ``K_hat[f] = U S V^H  ->  U min(S, c) V^H = K_hat[f] V diag(min(1, c / S)) V^H``,
    with ``V, S^2`` from the Hermitian eigendecomposition of the smaller Gram matrix
    (several times cheaper than an SVD; rounding only affects directions far below c,
    which are kept as they are), then inverse FFT and the kernel's support. Computed in
    the weight's dtype.

    Example::

        >>> w2, before = clamp_circular_kernel(torch.randn(8, 8, 3, 3), (16, 16), 1.0)
    """
    sh, sw = _pair(stride)
    h, w = int(input_size[0]) // sh, int(input_size[1]) // sw
    P = polyphase_kernel(weight.detach(), stride, dilation)
    F = _half_spectrum(P, (h, w))  # (h, w//2+1, cout, cin')
    right = F.shape[-1] <= F.shape[-2]  # act on the input side when it is the smaller one
    lam, V = torch.linalg.eigh(F.mH @ F if right else F @ F.mH)
    s = lam.clamp_min(0).sqrt()
    before = float(s.max())
    if before <= max_norm:
        return weight.detach().clone(), before
    factor = (max_norm / s.clamp_min(torch.finfo(s.dtype).tiny)).clamp(max=1).to(V.dtype)
    proj = (V * factor.unsqueeze(-2)) @ V.mH
    F = F @ proj if right else proj @ F
    padded = torch.fft.irfft2(F.permute(2, 3, 0, 1), s=(h, w))
    return from_polyphase(padded, tuple(weight.shape[-2:]), stride, dilation).to(weight.dtype), before


class NSedghi(Method):
    """Every ``clip_steps`` steps (steps with ``step % clip_steps == 0``), replace each
    2-D conv's kernel by its per-frequency singular-value clamp to c at the layer's
    real input size (see the module docstring for stride, dilation and groups).

    Example::

        >>> m = NSedghi(mode="wBN")
        >>> model = m.prepare(model, (3, 32, 32))
        >>> m.after_step(model, 0)   # projects (step 0, 100, 200, ...)
    """

    name = "nsedghi"
    Config = NSedghiConfig

    def __init__(self, mode: str = "wBN", **overrides: Any) -> None:
        super().__init__(mode=mode, **overrides)
        if self.config.clip_steps < 1:
            raise ValueError(f"clip_steps must be >= 1, got {self.config.clip_steps}")

    def _convs(self, model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
        return named_layers(model, (nn.Conv1d, nn.Conv2d, nn.Conv3d))

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...], writer: Any = None) -> nn.Module:
        model = super().prepare(model, input_shape, writer=writer)
        for name, conv in self._convs(model):
            if name not in self.input_shapes:
                raise ValueError(
                    f"conv {name!r} was not used in the forward pass at input shape {input_shape}; "
                    "its input size is unknown"
                )
            try:
                conv_circular_geometry(conv, self.input_shapes[name])
            except ValueError as e:
                raise ValueError(f"method 'nsedghi' cannot clamp layer {name!r}: {e}") from None
        return model

    @torch.no_grad()
    def project(self, model: nn.Module) -> dict[str, float]:
        """Clamp every conv now; returns each layer's circular sigma_1 before the clamp."""
        before = {}
        for name, conv in self._convs(model):
            _, H, W = self.input_shapes[name]
            groups = []
            worst = 0.0
            for wg in _group_weights(conv, conv.weight):
                new, b = clamp_circular_kernel(wg, (H, W), self.config.clip, conv.stride, conv.dilation)
                groups.append(new)
                worst = max(worst, b)
            conv.weight.copy_(torch.cat(groups, dim=0))
            before[name] = worst
        return before

    def after_step(self, model: nn.Module, step: int) -> None:
        if step % self.config.clip_steps == 0:
            self.project(model)
        super().after_step(model, step)

    def finish_epoch(self, model: nn.Module) -> None:
        self.project(model)
        super().finish_epoch(model)

    def layer_norms(self, model: nn.Module) -> dict[str, float]:
        """Circular sigma_1 of every conv at its input size (what the clamp controls), and BN."""
        norms = {name: circular_sigma(conv, self.input_shapes[name]) for name, conv in self._convs(model)}
        norms.update(super().layer_norms(model))
        return norms
