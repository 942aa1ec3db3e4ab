"""Fourier view of circular convolutions (Sedghi et al. 2019).

A stride-1 2-D convolution with circular padding on an H x W input is block-circulant:
its singular values are the union over the H*W frequencies (p, q) of the singular
values of the c_out x c_in matrix ``K_hat[p, q] = sum_{a,b} K[:, :, a, b] e^{-2 pi i (pa/H + qb/W)}``.
The padding amount only shifts phases, so it does not change the spectrum.
"""

from __future__ import annotations

import torch

__all__ = ["kernel_fft", "circular_singular_values", "polyphase_kernel"]


def kernel_fft(
    weight: torch.Tensor, input_size: tuple[int, int], dilation: int | tuple[int, int] = 1
) -> torch.Tensor:
    """FFT of a conv kernel (c_out, c_in, kh, kw) zero-padded to ``input_size`` with
    taps at dilated offsets. Returns a complex tensor of shape (H, W, c_out, c_in).
    Differentiable."""
    if weight.dim() != 4:
        raise ValueError(f"expected a 2-D conv kernel (c_out, c_in, kh, kw), got shape {tuple(weight.shape)}")
    H, W = int(input_size[0]), int(input_size[1])
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    cout, cin, kh, kw = weight.shape
    if (kh - 1) * dh + 1 > H or (kw - 1) * dw + 1 > W:
        # Taps wrap around: add them up modulo the input size, which is what the circular map does.
        padded = weight.new_zeros(cout, cin, H, W)
        for a in range(kh):
            for b in range(kw):
                padded[:, :, (a * dh) % H, (b * dw) % W] += weight[:, :, a, b]
    else:
        padded = weight.new_zeros(cout, cin, H, W)
        padded[:, :, : (kh - 1) * dh + 1 : dh, : (kw - 1) * dw + 1 : dw] = weight
    return torch.fft.fft2(padded).permute(2, 3, 0, 1)


def circular_singular_values(
    weight: torch.Tensor,
    input_size: tuple[int, int],
    k: int | None = None,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    """All (or the top ``k``) singular values, descending, of the stride-1 circular
    convolution with kernel ``weight`` on inputs of spatial size ``input_size``
    (groups=1). Computed in float64.

    Example::

        >>> w = torch.randn(8, 4, 3, 3)
        >>> circular_singular_values(w, (16, 16), k=1)   # sigma_1 of the 4x16x16 -> 8x16x16 map
    """
    with torch.no_grad():
        f = kernel_fft(weight.detach().double(), input_size, dilation)
        s = torch.linalg.svdvals(f).flatten()
    s = torch.sort(s, descending=True).values
    return s if k is None else s[:k]


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _taps(k: int, s: int, d: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Phase r and phase offset m of each tap a (d a = s m + r), and the phase kernel size."""
    t = torch.arange(k) * d
    return t % s, torch.div(t, s, rounding_mode="floor"), int(t[-1]) // s + 1


def polyphase_kernel(
    weight: torch.Tensor, stride: int | tuple[int, int] = 1, dilation: int | tuple[int, int] = 1
) -> torch.Tensor:
    """The stride-1, dilation-1 kernel (c_out, c_in s_h s_w, M_h, M_w) whose circular conv on
    the phases (H/s_h, W/s_w) has the singular values of the strided, dilated circular
    conv with ``weight`` on H x W. Differentiable.

    Input channel ``(c, r_h, r_w)`` (flattened in that order) is phase
    ``x[c, s_h i + r_h, s_w j + r_w]`` of the input.

    Example::

        >>> polyphase_kernel(torch.randn(8, 4, 3, 3), stride=2).shape
        torch.Size([8, 16, 2, 2])
    """
    cout, cin, kh, kw = weight.shape
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    rh, mh, Mh = _taps(kh, sh, dh)
    rw, mw, Mw = _taps(kw, sw, dw)
    P = weight.new_zeros(cout, cin, sh, sw, Mh, Mw)
    P[:, :, rh[:, None], rw[None, :], mh[:, None], mw[None, :]] = weight
    return P.reshape(cout, cin * sh * sw, Mh, Mw)
