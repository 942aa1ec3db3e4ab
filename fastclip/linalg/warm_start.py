"""A start vector for Lanczos on a 2-D convolution from its circular counterpart.

The circular convolution with the same kernel on the same grid is block diagonal in the
Fourier basis (:mod:`fastclip.linalg.fourier`): its top right singular vector is the plane
wave ``x[c, i, j] = Re(v_c e^{2 pi i (p i / H + q j / W)})`` of the frequency ``(p, q)``
whose ``c_out x c_in`` block has the largest singular value, ``v`` that block's top right
singular vector. A strided conv is a stride-1 conv on the input's phases (the polyphase
form, :func:`fastclip.linalg.fourier.polyphase_kernel`), so the wave lives on the phases and is
interleaved back. With zero (or reflect, replicate) padding the top singular vector of
the real layer is, to first order, that wave under the lowest mode of the box,
``sin(pi (i + 1) / (H + 1)) sin(pi (j + 1) / (W + 1))``: the spectrum is flat near its
maximum frequency, and the boundary selects the smoothest envelope.

The frequency search ranks every block by the top eigenvalue of the Gram matrix of its
smaller side (exactly for small sides, by a few batched power iterations otherwise; a
coarse grid when the blocks are many) and takes an exact SVD of the few leaders. Its cost
grows with c_in c_out times the frequencies, so :func:`start_for` uses it only on narrow
layers, where it costs less than the passes it saves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fastclip.linalg.fourier import _pair, polyphase_kernel

__all__ = ["conv_start", "start_for", "supports"]


def _conv_and_scale(module: nn.Module) -> tuple[nn.Conv2d, torch.Tensor | None] | None:
    """The Conv2d of ``module`` (a bare conv, or a conv followed by an eval-mode batch
    norm) and the batch norm's per-channel scale, or None."""
    if isinstance(module, nn.Conv2d):
        return module, None
    if (
        isinstance(module, nn.Sequential)
        and len(module) == 2
        and isinstance(module[0], nn.Conv2d)
        and isinstance(module[1], nn.BatchNorm2d)
        and module[1].running_var is not None
    ):
        bn = module[1]
        scale = torch.rsqrt(bn.running_var.detach() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach()
        return module[0], scale
    return None


def supports(module: nn.Module, input_shape: Sequence[int]) -> bool:
    """Whether :func:`conv_start` gives a start for ``module`` at ``input_shape``."""
    found = _conv_and_scale(module)
    if found is None or len(input_shape) != 3:
        return False
    conv = found[0]
    (sh, sw) = _pair(conv.stride)
    return conv.groups == 1 and int(input_shape[1]) % sh == 0 and int(input_shape[2]) % sw == 0


def _blocks(
    w: torch.Tensor, size: tuple[int, int], dilation: tuple[int, int], freqs: torch.Tensor
) -> torch.Tensor:
    """The blocks ``K_hat[p, q]`` (nf, c_out, c_in) of kernel ``w`` at the frequencies
    ``freqs`` (nf, 2) only: one product of the (nf, taps) phase matrix with the taps."""
    cout, cin, kh, kw = w.shape
    a = torch.arange(kh, dtype=torch.float64, device=w.device) * dilation[0] / size[0]
    b = torch.arange(kw, dtype=torch.float64, device=w.device) * dilation[1] / size[1]
    f = freqs.to(torch.float64)
    phase = f[:, :1, None] * a[None, :, None] + f[:, 1:, None] * b[None, None, :]  # (nf, kh, kw)
    E = torch.exp(-2j * math.pi * phase).reshape(len(freqs), kh * kw)
    taps = w.permute(2, 3, 0, 1).reshape(kh * kw, cout * cin).to(E.dtype)
    return (E @ taps).reshape(len(freqs), cout, cin)


def _top_frequency(
    w: torch.Tensor, size: tuple[int, int], dilation: tuple[int, int], n_iter: int
) -> tuple[int, int, torch.Tensor]:
    """The frequency (p, q) of the largest block singular value and that block's top right
    singular vector. The block's singular values are a trigonometric polynomial of
    low degree in (p, q): a coarse grid (about 8 x 5 of the half spectrum; the other
    half are conjugate blocks) finds the peak, and the grid around it refines it."""
    h, wd = size
    cout, cin = w.shape[:2]
    nq = wd // 2 + 1
    # all frequencies when that is cheap, else a coarse grid of about as many blocks
    budget = max(1, _BUDGET // (cout * cin))
    stride = 1
    while math.ceil(h / stride) * math.ceil(nq / stride) > budget and stride < max(h, nq):
        stride += 1
    gen = torch.Generator(device=w.device).manual_seed(0)

    def best(freqs: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
        # (the frequency of the largest block singular value, and its top right singular vector)
        K = _blocks(w, size, dilation, freqs)
        G = K.mH @ K if cin <= cout else K @ K.mH  # the Gram matrix of the smaller side
        if G.shape[-1] <= _EXACT_SIDE:
            gain = torch.linalg.eigvalsh(G)[:, -1]
        else:  # batched power iteration, one per block
            v = torch.randn(
                G.shape[0], G.shape[1], 1, generator=gen, dtype=torch.float64, device=w.device
            ).to(G.dtype)
            for _ in range(iters):
                v = G @ v
                v = v / v.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
            gain = (v.mH @ G @ v).real[:, 0, 0] / (v.abs() ** 2).sum(dim=(1, 2)).clamp_min(1e-300)
        # (a few power iterations rank close blocks only roughly: the leaders by exact SVD)
        top = gain.topk(min(8, len(gain))).indices
        _, S, Vh = torch.linalg.svd(K[top])
        i = int(S[:, 0].argmax())
        return freqs[top[i]], Vh[i, 0].conj()

    def grid(ps, qs) -> torch.Tensor:
        return torch.cartesian_prod(torch.as_tensor(list(ps)), torch.as_tensor(list(qs))).reshape(-1, 2)

    f, v = best(grid(range(0, h, stride), range(0, nq, stride)), n_iter)
    if stride > 1:
        p0, q0 = (int(t) for t in f)
        near = grid(
            sorted({(p0 + d) % h for d in range(1 - stride, stride)}),
            sorted({min(max(q0 + d, 0), nq - 1) for d in range(1 - stride, stride)}),
        )
        f, v = best(near, n_iter)
    return int(f[0]), int(f[1]), v


#: Block entries (c_out x c_in x frequencies) searched exhaustively; beyond, a coarse grid.
_BUDGET = 1 << 18
#: Gram sides up to this size are ranked by their exact top eigenvalue.
_EXACT_SIDE = 16


def conv_start(module: nn.Module, input_shape: Sequence[int], n_iter: int = 6) -> torch.Tensor:
    """A (1, C, H, W) unit start vector for the top right singular vector of ``module``
    (see the module docstring), in float64 on the weight's device.

    Example::

        >>> conv = nn.Conv2d(16, 32, 3, padding=1)
        >>> x0 = conv_start(conv, (16, 32, 32))
        >>> lanczos(AffineOperator(conv, (16, 32, 32)), X=x0)
    """
    if not supports(module, input_shape):
        raise ValueError(
            f"conv_start needs a Conv2d (groups=1, input divisible by the stride), optionally "
            f"followed by a BatchNorm2d, at a (C, H, W) input; got {type(module).__name__} at "
            f"{tuple(input_shape)}"
        )
    conv, scale = _conv_and_scale(module)
    C, H, W = (int(d) for d in input_shape)
    (sh, sw), (dh, dw) = _pair(conv.stride), _pair(conv.dilation)
    with torch.no_grad():
        w = conv.weight.detach().double()
        if scale is not None:
            w = w * scale.double().view(-1, 1, 1, 1)
        h, wd = H // sh, W // sw
        if (sh, sw) != (1, 1):
            w, (dh, dw) = polyphase_kernel(w, (sh, sw), (dh, dw)), (1, 1)
        p, q, vt = _top_frequency(w, (h, wd), (dh, dw), n_iter)
        ii = torch.arange(h, dtype=torch.float64, device=w.device)
        jj = torch.arange(wd, dtype=torch.float64, device=w.device)
        phase = 2 * math.pi * (p * ii[:, None] / h + q * jj[None, :] / wd)
        wave = torch.exp(-1j * phase)  # (h, wd): the sign of kernel_fft's transform, for a cross-correlation
        x = (vt[:, None, None] * wave[None]).real  # (cin', h, wd)
        if (sh, sw) != (1, 1):
            # phase channel (c, r_h, r_w) is x[c, s_h i + r_h, s_w j + r_w]
            x = x.reshape(C, sh, sw, h, wd).permute(0, 3, 1, 4, 2).reshape(C, H, W)
        # the conv reads x[s i + d a - pad]: the wave of the unpadded (polyphase) form, shifted
        pad = _pair(conv.padding) if not isinstance(conv.padding, str) else (0, 0)
        x = torch.roll(x, shifts=(-pad[0], -pad[1]), dims=(1, 2))
        if conv.padding_mode != "circular":
            ei = torch.sin(math.pi * (torch.arange(H, dtype=torch.float64, device=w.device) + 1) / (H + 1))
            ej = torch.sin(math.pi * (torch.arange(W, dtype=torch.float64, device=w.device) + 1) / (W + 1))
            x = x * ei[:, None] * ej[None, :]
        x = x / x.norm().clamp_min(1e-300)
    return x.reshape(1, C, H, W)


def start_for(
    module: nn.Module, input_shape: Sequence[int], generator: torch.Generator | None = None, mix: float = 0.3
) -> torch.Tensor | None:
    """:func:`conv_start` plus ``mix`` of a random unit vector, where it pays: a conv
    whose blocks over all frequencies are few (``c_in c_out`` times the half spectrum at
    most ``_BUDGET`` entries: the search then costs less than the passes it saves); None
    elsewhere (wide layers: the search costs more than the passes it saves).

    The random part keeps the start off invariant subspaces: on a circular layer the
    wave of a frequency that is not the top one is an exact singular vector, from which
    Lanczos alone would "converge" in one pass on the wrong value."""
    if not supports(module, input_shape):
        return None
    conv, _ = _conv_and_scale(module)
    (sh, sw) = _pair(conv.stride)
    h, wd = int(input_shape[1]) // sh, int(input_shape[2]) // sw
    cin = conv.in_channels * sh * sw
    if cin * conv.out_channels * h * (wd // 2 + 1) > _BUDGET:
        return None
    x = conv_start(module, input_shape)
    g = generator if generator is not None else torch.Generator(device=x.device).manual_seed(0)
    r = torch.randn(x.shape, generator=g, dtype=x.dtype, device=g.device).to(x.device)
    return x + mix * r / r.norm()
