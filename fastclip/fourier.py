"""Fourier view of circular convolutions (Sedghi et al. 2019).

A stride-1 2-D convolution with circular padding on an H x W input is block-circulant:
its singular values are the union over the H*W frequencies (p, q) of the singular
values of the c_out x c_in matrix ``K_hat[p, q] = sum_{a,b} K[:, :, a, b] e^{-2 pi i (pa/H + qb/W)}``.
The padding amount only shifts phases, so it does not change the spectrum.
"""
from __future__ import annotations

import torch

__all__ = ["kernel_fft", "circular_singular_values"]


def kernel_fft(weight: torch.Tensor, input_size: tuple[int, int], dilation: int | tuple[int, int] = 1) -> torch.Tensor:
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


def circular_singular_values(weight: torch.Tensor, input_size: tuple[int, int], k: int | None = None,
                             dilation: int | tuple[int, int] = 1) -> torch.Tensor:
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
