"""Exact references for the spectrum of an affine module (for tests, benchmarks and users).

* :func:`explicit_matrix` / :func:`exact_singular_values`: the operator's matrix built
  column by column from the identity basis, then a dense SVD, all in float64.
  Exact to rounding; for operators up to a few thousand inputs.
* :func:`svds_singular_values`: ``scipy.sparse.linalg.svds`` (ARPACK) on a
  ``LinearOperator`` whose matvec is the layer's bias-free forward and rmatvec its
  adjoint by autograd, in float64. For layers too large for a dense matrix.
* :func:`fft_singular_values`: the Fourier formula for stride-1 circular 2-D
  convolutions (Sedghi et al. 2019).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fastclip.linalg.batchnorm import bn_singular_values
from fastclip.linalg.fourier import circular_singular_values
from fastclip.linalg.operator import BN_TYPES, AffineOperator, plain_layer_type, unwrap

__all__ = [
    "explicit_matrix",
    "exact_singular_values",
    "gram_singular_values",
    "svds_singular_values",
    "fft_singular_values",
    "exact_top",
]

#: Above this many inputs the dense path refuses (the matrix alone would be too big).
MAX_EXPLICIT_INPUTS = 20_000


def explicit_matrix(module: nn.Module, input_shape: Sequence[int], *, chunk: int = 512) -> torch.Tensor:
    """The (m, n) float64 matrix of ``x -> module(x) - module(0)`` at ``input_shape``,
    with inputs and outputs flattened in C order.

    Example::

        >>> explicit_matrix(nn.Linear(5, 3), (5,)).shape
        torch.Size([3, 5])
    """
    op = AffineOperator(module, input_shape, dtype=torch.float64, closed_form=False)
    if op.n > MAX_EXPLICIT_INPUTS:
        raise ValueError(
            f"input_shape {op.input_shape} has {op.n} inputs; the explicit matrix is limited to "
            f"{MAX_EXPLICIT_INPUTS} (use svds_singular_values for large layers)"
        )
    cols = []
    eye = torch.eye(op.n, dtype=torch.float64, device=op.device)
    for start in range(0, op.n, chunk):
        basis = eye[start : start + chunk].reshape(-1, *op.input_shape)
        cols.append(op.matvec(basis).reshape(basis.shape[0], -1))
    return torch.cat(cols, dim=0).T.cpu()


def exact_singular_values(
    module: nn.Module, input_shape: Sequence[int], k: int | None = None
) -> torch.Tensor:
    """All (or the top ``k``) singular values, descending, by dense SVD in float64."""
    M = explicit_matrix(module, input_shape)
    if M.shape[0] > 2 * M.shape[1]:
        # Tall matrix: the triangular factor of a QR has the same singular values and
        # is much cheaper to decompose.
        M = torch.linalg.qr(M, mode="r").R
    elif M.shape[1] > 2 * M.shape[0]:
        M = torch.linalg.qr(M.T, mode="r").R
    s = torch.linalg.svdvals(M)
    if k is not None:
        if k > s.numel():
            raise ValueError(f"k={k} is larger than the operator's dimension {s.numel()}")
        s = s[:k]
    return s


def svds_singular_values(
    module: nn.Module, input_shape: Sequence[int], k: int = 1, tol: float = 1e-10, maxiter: int | None = None
) -> torch.Tensor:
    """Top-``k`` singular values by ARPACK (``scipy.sparse.linalg.svds``) on the
    layer as a LinearOperator, in float64."""
    # Lazy: scipy.sparse.linalg takes longer to import than the rest of fastclip, and
    # `import fastclip` (through spectral) must not pay it for a reference most never run.
    from scipy.sparse.linalg import LinearOperator, svds

    op = AffineOperator(module, input_shape, dtype=torch.float64, closed_form=False)
    if k >= min(op.n, op.m):
        raise ValueError(
            f"svds needs k < min(n, m) = {min(op.n, op.m)}, got k={k}; use exact_singular_values"
        )

    def mv(x: np.ndarray) -> np.ndarray:
        X = (
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
            .reshape(-1, *op.input_shape)
            .to(op.device)
        )
        return op.matvec(X).reshape(-1).cpu().numpy()

    def rmv(y: np.ndarray) -> np.ndarray:
        Y = (
            torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64))
            .reshape(-1, *op.output_shape)
            .to(op.device)
        )
        return op.rmatvec(Y).reshape(-1).cpu().numpy()

    lo = LinearOperator((op.m, op.n), matvec=mv, rmatvec=rmv, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(min(op.m, op.n))
    s = svds(lo, k=k, tol=tol, maxiter=maxiter, return_singular_vectors=False, v0=v0)
    return torch.from_numpy(np.sort(s)[::-1].copy())


def fft_singular_values(conv: nn.Module, input_shape: Sequence[int], k: int | None = None) -> torch.Tensor:
    """Singular values of a stride-1, groups-1, circular-padded 2-D convolution by the
    Fourier formula (exact; float64). Raises ``ValueError`` for any other layer."""
    if (
        not isinstance(conv, nn.Conv2d)
        or conv.padding_mode != "circular"
        or tuple(conv.stride) != (1, 1)
        or conv.groups != 1
    ):
        raise ValueError(
            "the FFT formula is exact for stride-1, groups-1 nn.Conv2d with padding_mode='circular' "
            f"only, got {conv!r}"
        )
    c, h, w = (int(d) for d in input_shape)
    # the padding as torch applies it (also for padding="same"/"valid"): (left, right, top, bottom)
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    out_h = h + top + bottom - conv.dilation[0] * (conv.kernel_size[0] - 1)
    out_w = w + left + right - conv.dilation[1] * (conv.kernel_size[1] - 1)
    if (out_h, out_w) != (h, w):
        raise ValueError(
            f"the FFT formula needs a 'same' circular conv (output size = input size), "
            f"got {h}x{w} -> {out_h}x{out_w}"
        )
    if c != conv.in_channels:
        raise ValueError(
            f"input_shape {tuple(input_shape)} does not fit {conv!r}: expected {conv.in_channels} channels"
        )
    return circular_singular_values(conv.weight, (h, w), k=k, dilation=(conv.dilation[0], conv.dilation[1]))


#: Up to this many inputs, :func:`exact_top` forms the n x n Gram matrix (n^2 float64).
MAX_GRAM_INPUTS = 4096


def gram_singular_values(
    module: nn.Module, input_shape: Sequence[int], k: int = 1, *, chunk: int = 256
) -> torch.Tensor:
    """Top-``k`` singular values from the eigenvalues of the n x n Gram matrix ``A^T A``,
    built from the identity basis by the layer's forward and adjoint in float64.

    Far cheaper than the dense SVD for tall operators (SimpleConv's conv: n = 784 inputs,
    m = 50176 outputs), and exact to rounding for the top values (the relative error of
    ``sigma_i`` is about ``eps * sigma_1^2 / sigma_i^2``; use the dense SVD for the small
    end of the spectrum).

    Example::

        >>> conv = nn.Conv2d(1, 8, 3, padding=1)
        >>> g = gram_singular_values(conv, (1, 12, 12), k=2)
        >>> torch.allclose(g, exact_singular_values(conv, (1, 12, 12), k=2))
        True
    """
    op = AffineOperator(module, input_shape, dtype=torch.float64, closed_form=False)
    if op.n > MAX_GRAM_INPUTS:
        raise ValueError(
            f"input_shape {op.input_shape} has {op.n} inputs; the Gram matrix is limited to "
            f"{MAX_GRAM_INPUTS} (use svds_singular_values)"
        )
    if not 1 <= k <= op.n:
        raise ValueError(f"k must be between 1 and {op.n}, got {k}")
    eye = torch.eye(op.n, dtype=torch.float64, device=op.device)
    gram = torch.cat(
        [
            op.gram(eye[i : i + chunk].reshape(-1, *op.input_shape)).reshape(-1, op.n)
            for i in range(0, op.n, chunk)
        ]
    )
    values = torch.linalg.eigvalsh(0.5 * (gram + gram.T)).flip(0)[:k]
    return values.clamp_min(0).sqrt().cpu()


def exact_top(module: nn.Module, input_shape: Sequence[int], k: int = 1) -> torch.Tensor:
    """Top-``k`` singular values by the cheapest exact reference that applies: the SVD
    of the weight for ``nn.Linear``, the closed form for an eval-mode batch norm, the Gram
    matrix up to ``MAX_GRAM_INPUTS`` inputs, ARPACK beyond. float64."""
    inner = unwrap(module)
    kind = plain_layer_type(inner)  # (a subclass with its own forward goes the general way)
    if kind is nn.Linear and tuple(input_shape) == (inner.in_features,):
        AffineOperator(module, input_shape)  # validates the shape
        return torch.linalg.svdvals(inner.weight.detach().double().cpu())[:k]
    if kind is not None and issubclass(kind, BN_TYPES) and not inner.training:
        # Diagonal: each channel's |gamma| / sqrt(var + eps), repeated over the spatial
        # positions. ARPACK on that spectrum (every value hundreds of times over) can
        # take minutes when the top two channels are close.
        return bn_singular_values(inner, k=k, input_shape=tuple(input_shape), dtype=torch.float64).cpu()
    n = 1
    for d in input_shape:
        n *= int(d)
    if n <= MAX_GRAM_INPUTS:
        return gram_singular_values(module, input_shape, k=k)
    return svds_singular_values(module, input_shape, k=k)
