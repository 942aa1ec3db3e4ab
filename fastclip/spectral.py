"""Top singular values and vectors of implicitly linear layers.

Three iterations, all driven by the same operator products (:class:`AffineOperator`:
one forward + one backward pass of the layer gives ``A^T A X``):

* :func:`power_iteration` - plain power iteration on ``A^T A`` (k = 1).
* :func:`power_qr` - the published PowerQR: ``X <- qr(X + A^T A X)``,
  ``sigma_i = sqrt(|R_ii - 1|)``. Warm-startable; one call of one iteration is what
  training does per step.
* :func:`lanczos` - thick-restart block Lanczos on ``A^T A`` with full
  reorthogonalisation, written as a Rayleigh-Ritz / residual expansion (in exact
  arithmetic the same Krylov subspace as block Lanczos). The default for
  measurement: the published iteration converges like ((1+s2^2)/(1+s1^2))^t, which is
  very slow when the top singular values are clustered, as they are in trained
  convolutions; a Krylov method converges like a Chebyshev polynomial of the gap.

:func:`singular_values` is the front door: it picks the closed form for batch norm and
block Lanczos otherwise, runs to convergence, and leaves the module untouched.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fastclip import exact
from fastclip.linalg import warm_start
from fastclip.linalg.batchnorm import bn_singular_values
from fastclip.linalg.krylov import StopRule, block_lanczos
from fastclip.linalg.operator import (
    BN_TYPES,
    AffineOperator,
    check_finite,
    eval_mode,
    full_precision,
    gram_many,
    module_device_dtype,
    plain_layer_type,
    unwrap,
)

__all__ = [
    "SpectralResult",
    "CHECK_EVERY",
    "default_check_every",
    "power_iteration",
    "power_qr",
    "power_qr_many",
    "lanczos",
    "singular_values",
    "METHODS",
    "unwrap",
]

log = logging.getLogger(__name__)

METHODS = ("auto", "lanczos", "powerqr", "power", "explicit", "svds", "fft")


@dataclass
class SpectralResult:
    """Top-k singular triples: ``values`` (k,) descending, ``right`` ``(k, *input_shape)``
    unit right singular vectors, ``left`` ``(k, *output_shape)`` unit left ones
    (``A v_i = sigma_i u_i``), the number of layer passes used, and whether the
    stopping rule was met."""

    values: torch.Tensor
    right: torch.Tensor
    left: torch.Tensor | None = None
    passes: int = 0
    converged: bool = False
    history: list[float] = field(default_factory=list)  # sigma_1 after each pass (for benchmarks)
    top: float | None = None  # values[0] as a host float, where the iteration read it anyway (lanczos)


#: Lanczos reads its stopping rule back every this many passes, by device type
#: (:func:`default_check_every`); the tests set ``"cpu"`` to the GPU's value to count
#: the syncs a GPU would make.
CHECK_EVERY = {"cpu": 1, "default": 4}


def default_check_every(device: torch.device | str) -> int:
    """Passes between the host reads of :func:`lanczos`'s stopping rule on ``device``."""
    return CHECK_EVERY.get(torch.device(device).type, CHECK_EVERY["default"])


def _round_to(x: float, dtype: torch.dtype) -> float:
    """A host float rounded to ``dtype`` (what ``float(t.to(dtype))`` gives), without a device read."""
    if dtype == torch.float64:
        return x
    return torch.tensor([x], dtype=torch.float64).to(dtype).tolist()[0]


def _random_block(op: AffineOperator, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k random vectors (float64) on the operator's device, drawn there by ``generator``
    (default: a fresh one on that device seeded 0; a generator on another device draws
    there and the block is moved)."""
    g = generator if generator is not None else torch.Generator(device=op.device).manual_seed(0)
    return torch.randn((k, *op.input_shape), generator=g, dtype=torch.float64, device=g.device).to(op.device)


def _in_full_precision(fn):
    """Run ``fn(op_or_ops, ...)`` with autocast off on the operator's device: its small
    dense algebra (Gram-Schmidt, Rayleigh-Ritz) stays in the basis precision."""

    @functools.wraps(fn)
    def wrapper(op, *args, **kwargs):
        first = op[0] if isinstance(op, (list, tuple)) and op else op
        with full_precision(getattr(first, "device", "cpu")):
            return fn(op, *args, **kwargs)

    return wrapper


def _left_vectors(op: AffineOperator, V: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    AV = op.matvec(V.to(op.dtype))
    scale = values.to(AV.dtype).clamp_min(torch.finfo(AV.dtype).tiny).view(-1, *([1] * (AV.dim() - 1)))
    return AV / scale


@_in_full_precision
def power_iteration(
    op: AffineOperator,
    v: torch.Tensor | None = None,
    n_iter: int = 5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain power iteration on ``A^T A``: ``v <- A^T A v / ||A^T A v||``.

    Returns ``(sigma, v)`` with ``sigma = ||A v||`` for the final unit ``v`` (a lower
    bound on sigma_1 that increases monotonically) and ``v`` of shape ``(1, *input_shape)``,
    to be passed back in as a warm start.

    Example::

        >>> op = AffineOperator(nn.Conv2d(3, 8, 3, padding=1), (3, 16, 16))
        >>> sigma, v = power_iteration(op, n_iter=50)
    """
    if v is None:
        v = _random_block(op, 1, generator).to(op.dtype)
    v = v.detach().to(device=op.device, dtype=op.dtype).reshape(1, *op.input_shape)
    with torch.no_grad():
        v = v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)
        for _ in range(n_iter):
            w = op.gram(v)
            nrm = w.norm()
            # a zero image (A v = 0) keeps v, as a stop would: no host sync per iteration
            v = torch.where(nrm > 0, w / nrm.clamp_min(torch.finfo(w.dtype).tiny), v)
        sigma = op.matvec(v).norm()
    return sigma, v


def _orthonormal(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of the columns of Y with R's diagonal made non-negative."""
    if Y.shape[1] == 1:  # one column (k = 1, what training tracks): a normalisation
        nrm = Y.norm().reshape(1, 1)
        return Y / nrm.clamp_min(torch.finfo(Y.dtype).tiny), nrm
    Q, R = torch.linalg.qr(Y)
    d = torch.sign(torch.diagonal(R))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return Q * d, R * d.unsqueeze(1)


@_in_full_precision
def power_qr(
    op: AffineOperator,
    X: torch.Tensor | None = None,
    k: int = 1,
    n_iter: int = 1,
    generator: torch.Generator | None = None,
    with_left: bool = False,
    record_history: bool = False,
) -> SpectralResult:
    """The published PowerQR iteration for the top-``k`` singular values.

    One iteration: ``G = A^T A X`` (one forward + backward on the k vectors),
    ``Y = X + G``, ``Y = Q R``, ``X <- Q``, ``sigma_i = sqrt(|R_ii - 1|)``.
    Warm start by passing the previous ``right`` vectors as ``X``; with ``n_iter=1`` the
    cost is one forward+backward of the layer on k inputs (what training pays per step).

    Example::

        >>> op = AffineOperator(nn.Conv2d(3, 8, 3, padding=1), (3, 16, 16))
        >>> r = power_qr(op, k=2, n_iter=100)        # cold start
        >>> r = power_qr(op, X=r.right, n_iter=1)    # one warm-started step
    """
    if X is None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(op.n, op.m):
            raise ValueError(
                f"k must be an integer in 1..{min(op.n, op.m)} (the operator's dimension), got {k!r}"
            )
        X = _random_block(op, k, generator)
    return power_qr_many([op], [X], n_iter=n_iter, with_left=with_left, record_history=record_history)[0]


@_in_full_precision
def power_qr_many(
    ops: Sequence[AffineOperator],
    Xs: Sequence[torch.Tensor],
    n_iter: int = 1,
    with_left: bool = False,
    record_history: bool = False,
) -> list[SpectralResult]:
    """:func:`power_qr` on several operators at once, each from its own warm start
    ``Xs[i]``; the products of every iteration come from one
    :func:`~fastclip.linalg.operator.gram_many` call, so operators that start with the same
    layer (a conv and its Conv+BN pair) share its pass. The results are those of
    separate ``power_qr`` calls.

    Example::

        >>> pair = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        >>> ops = [AffineOperator(pair[0], (3, 16, 16)), AffineOperator(pair, (3, 16, 16))]
        >>> r_conv, r_pair = power_qr_many(ops, [torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)])
    """
    if len(ops) != len(Xs):
        raise ValueError(
            f"power_qr_many needs one start per operator, got {len(ops)} operators and {len(Xs)} starts"
        )
    with torch.no_grad():
        Qs, values = [], []
        history: list[list[float]] = []
        for op, X in zip(ops, Xs):
            k = X.shape[0]
            if k > op.n:
                raise ValueError(f"k={k} is larger than the operator's dimension {op.n}")
            Qs.append(_orthonormal(X.detach().reshape(k, -1).to(device=op.device, dtype=op.dtype).T)[0])
            values.append(torch.zeros(k, dtype=op.dtype, device=op.device))
            history.append([])
        for _ in range(n_iter):
            Gs = gram_many(ops, [Q.T.reshape(Q.shape[1], *op.input_shape) for op, Q in zip(ops, Qs)])
            for i, (Q, G) in enumerate(zip(Qs, Gs)):
                Qs[i], R = _orthonormal(Q + G.reshape(Q.shape[1], -1).T)
                values[i] = torch.sqrt(torch.abs(torch.diagonal(R) - 1))
                if record_history:
                    history[i].append(float(values[i][0]))
        results = []
        for op, Q, vals, hist in zip(ops, Qs, values, history):
            V = Q.T.reshape(Q.shape[1], *op.input_shape)
            left = _left_vectors(op, V, vals) if with_left else None
            results.append(
                SpectralResult(values=vals, right=V, left=left, passes=n_iter, converged=False, history=hist)
            )
    return results


@_in_full_precision
def lanczos(
    op: AffineOperator,
    k: int = 1,
    X: torch.Tensor | None = None,
    *,
    block: int | None = None,
    tol: float | None = None,
    max_passes: int | None = None,
    max_basis: int | None = None,
    generator: torch.Generator | None = None,
    with_left: bool = True,
    record_history: bool = False,
    min_value: float | None = None,
    stop_above: float | None = None,
    stop_below: float | None = None,
    min_passes: int = 1,
    extra_random: int = 0,
    tol_floor: float | None = None,
    check_every: int | None = None,
    predict_checks: bool = False,
    budget: int | None = None,
    budget_above: float | None = None,
) -> SpectralResult:
    """Top-``k`` singular triples by thick-restart block Lanczos on ``A^T A``
    (:func:`fastclip.linalg.krylov.block_lanczos`: the basis, the stopping rule, the loop).

    Each pass applies ``A^T A`` to one block of ``max(block, k, rows of the start)``
    vectors; the residual ``||A^T A y_i - theta_i y_i||`` of every Ritz pair comes from
    the projected problem, and the run stops when each of the top ``k`` is below
    ``tol * theta_1`` (which bounds the relative error of ``sigma_i^2``, hence of
    ``sigma_i`` by ``tol / 2``). When the basis reaches ``max_basis`` rows it restarts
    from the best Ritz vectors (thick restart, no extra pass).

    Args:
        k: number of singular triples.
        X: optional warm start, ``(b, *input_shape)``.
        block: vectors per pass (default k, at least 1; the start's rows if more).
        tol: relative residual tolerance (default 1e-6 in float64, 1e-5 in float32).
        max_passes: cap on layer passes (default 1000).
        max_basis: basis size that triggers a restart (default max(40, 4 (k + block))).
        min_value: also return every further Ritz pair of the final basis whose value
            is at least this (approximations, lower bounds of the true singular
            values; the stopping rule still looks at the top ``k`` only). Clipping
            uses it to shrink every direction above ``c`` at once when the top of
            the spectrum is flat.
        stop_above: stop once ``min_passes`` passes are done and the top Ritz value is
            at least this. Ritz values never exceed the true ones, so this proves
            ``sigma_1 >= stop_above`` (``converged`` stays False); for a caller that
            only needs to know it is above a threshold.
        stop_below: with ``stop_above``, stop early only while the top Ritz value is
            below this: a caller that acts on a value above it (e.g. rescales by it)
            needs that one converged.
        budget, budget_above: once ``budget`` passes are done, also stop as soon as the
            top Ritz value is at least ``budget_above`` (``converged`` False); below it the
            run goes on to convergence (or ``max_passes``). For a caller that acts alike
            on every value above a threshold and keeps the value below it (a clip step:
            above its band it fits again, below it records sigma_1).
        min_passes: no stop of either kind before this many passes. A small residual
            proves an eigenpair, not the largest one: a warm start that is an exact
            singular vector (e.g. one a clip just fitted) spans an invariant subspace
            and "converges" in one pass on a value below sigma_1. Give such starts
            ``extra_random`` vectors and a few passes.
        extra_random: random vectors (from ``generator``) added to the warm start ``X``.
        tol_floor: measure the residuals relative to ``max(sigma_1, tol_floor)^2``
            instead of ``sigma_1^2``: a caller that compares sigma_1 with a threshold
            needs it to ``tol`` of the threshold, not of itself (a layer far below its
            clip value then stops sooner).
        check_every: read the stopping rule back to the host every this many passes
            (default :func:`default_check_every`: 1 on the CPU, where a read is free,
            4 on a GPU, where each read waits for the stream). The result is that of
            the first pass where the rule held, so this changes only how often the
            host waits and how many passes past the stop the operator computes (at
            most ``check_every - 1``, in ``op.passes``).
        predict_checks: on the CPU (``check_every`` 1), solve the projected problem
            only at the passes where the residuals' rate of decrease predicts a stop
            (:meth:`fastclip.linalg.krylov.StopRule.next_check`): the result may come a few
            passes later than the first pass where the rule held, never less accurate
            (ignored with ``record_history``, which needs every pass).

    Host syncs: one read per check (and a few more for a pass off the common path:
    a numerically dependent direction), none per pass; ``r.top`` is sigma_1 as a host
    float, read with the rule.

    Example::

        >>> op = AffineOperator(nn.Conv2d(16, 16, 3, padding=1), (16, 32, 32))
        >>> r = lanczos(op, k=3)
        >>> r.values.shape, r.converged
        (torch.Size([3]), True)
    """
    n = op.n
    if k < 1 or k > n:
        raise ValueError(f"k must be between 1 and the operator's dimension {n}, got k={k}")
    block = max(1, block or k)
    if tol is None:
        tol = 1e-6 if op.dtype == torch.float64 else 1e-5
    # The basis lives in the operator's precision (float32 at least): it is read twice
    # per pass, and a float32 basis holds the residuals of float32 products to the
    # float32 default tolerance. The projected problem is solved in float64 either way.
    bdt = torch.float64 if op.dtype == torch.float64 else torch.float32

    # one stream for every draw of the run (a fresh seed per draw would repeat the start)
    gen = generator if generator is not None else torch.Generator(device=op.device).manual_seed(0)

    def random(c: int) -> torch.Tensor:
        return _random_block(op, c, gen).reshape(c, -1).to(bdt)

    with torch.no_grad():
        Y0 = (
            random(max(block, k))
            if X is None
            else X.detach().reshape(X.shape[0], -1).to(device=op.device, dtype=bdt)
        )
        if extra_random:
            Y0 = torch.cat([Y0, random(extra_random)])
        if Y0.shape[0] < max(block, k):
            Y0 = torch.cat([Y0, random(max(block, k) - Y0.shape[0])])
        Y0 = Y0[:n]
        b0 = Y0.shape[0]
        max_basis = max(max_basis or max(40, 4 * (k + block)), k + 3 * b0)
        rule = StopRule(
            k=k,
            tol=tol,
            max_passes=1000 if max_passes is None else max_passes,
            min_passes=min_passes,
            floor=float(tol_floor or 0.0),
            above=stop_above,
            below=stop_below,
            predict=predict_checks and not record_history,
            budget=budget,
            budget_above=budget_above,
        )  # (a history needs every pass)
        check_every = default_check_every(op.device) if check_every is None else max(1, int(check_every))

        def gram(P: torch.Tensor) -> torch.Tensor:
            return (
                op.gram(P.reshape(P.shape[0], *op.input_shape).to(op.dtype)).reshape(P.shape[0], -1).to(bdt)
            )

        out = block_lanczos(
            gram,
            Y0,
            rule,
            n=n,
            max_basis=max_basis,
            random=random,
            check_every=check_every,
            min_value=min_value,
            record_history=record_history,
        )
        kk = out.vectors.shape[0]
        values = torch.sqrt(out.theta[:kk].clamp_min(0))
        Vk = out.vectors.reshape(kk, *op.input_shape)
        left = _left_vectors(op, Vk, values) if with_left else None
    return SpectralResult(
        values=values.to(op.dtype),
        right=Vk.to(op.dtype),
        left=left,
        passes=out.passes,
        converged=out.converged,
        history=out.history if record_history else [],
        top=_round_to(math.sqrt(max(out.top, 0.0)), op.dtype),
    )


def singular_values(
    module: nn.Module,
    input_shape: Sequence[int],
    k: int = 1,
    *,
    method: str = "auto",
    tol: float | None = None,
    max_iter: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    check_affine: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Top-``k`` singular values, descending, of ``x -> module(x) - module(0)`` at the
    per-sample ``input_shape``.

    Args:
        module: any affine module: Conv1d/2d/3d (any stride, padding, padding_mode,
            dilation, groups), ConvTranspose, Linear, BatchNorm (running statistics),
            and compositions (e.g. ``nn.Sequential(conv, bn)``), possibly wrapped by
            :class:`fastclip.SpectralNorm`.
        input_shape: shape of one input without the batch dimension.
        k: how many.
        method: ``"auto"`` (closed form for batch norm, SVD of the weight for
            ``nn.Linear``, else ``"lanczos"``),
            ``"lanczos"`` (block Krylov, runs to convergence), ``"powerqr"`` (the
            published iteration, ``max_iter`` iterations, default 2000), ``"power"``
            (k = 1), or an exact reference: ``"explicit"`` (dense SVD), ``"svds"``
            (scipy ARPACK), ``"fft"`` (circular stride-1 conv).
        tol: relative residual tolerance for ``"lanczos"``.
        max_iter: cap on iterations (layer passes).
        dtype, device: compute in this precision / place (a converted copy of the
            module is used, the module itself is not modified).
        check_affine: verify affinity on random inputs first.

    The module's parameters, buffers and train/eval flags are left exactly as they were.

    Example::

        >>> import fastclip
        >>> conv = nn.Conv2d(3, 16, 3, padding=1)
        >>> fastclip.singular_values(conv, (3, 32, 32), k=3)
        tensor([...])
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    check_finite(unwrap(module))
    if dtype is None and module_device_dtype(module)[1] in (torch.float16, torch.bfloat16):
        # (half-precision kernels are missing on the CPU and too coarse for Lanczos anywhere)
        log.info(
            "singular_values: %s has %s weights; computed in float32",
            type(module).__name__,
            module_device_dtype(module)[1],
        )
        dtype = torch.float32
    # Measured in eval mode throughout: a parametrization (torch's spectral_norm) reads its
    # weight without its training-time update, and nothing of the module changes.
    with eval_mode(module):
        return _singular_values(
            module, input_shape, k, method, tol, max_iter, dtype, device, check_affine, generator
        )


def _singular_values(
    module: nn.Module,
    input_shape: Sequence[int],
    k: int,
    method: str,
    tol: float | None,
    max_iter: int | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    check_affine: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    inner = unwrap(module)
    kind = plain_layer_type(inner)  # closed forms only where the forward is torch's own
    if method in ("explicit", "svds", "fft"):
        if method == "explicit":
            return exact.exact_singular_values(module, input_shape, k=k)
        if method == "svds":
            return exact.svds_singular_values(module, input_shape, k=k)
        return exact.fft_singular_values(inner, input_shape, k=k)
    if method == "auto" and kind is not None and issubclass(kind, BN_TYPES) and inner.running_var is not None:
        return bn_singular_values(inner, k=k, input_shape=tuple(input_shape), dtype=dtype)
    if method == "auto" and kind is nn.Linear and input_shape and int(input_shape[-1]) == inner.in_features:
        # Linear on (..., in_features) applies W to each row: W's singular values, repeated.
        AffineOperator(module, input_shape)  # validates the shape
        W = inner.weight.detach().to(device=device or inner.weight.device, dtype=dtype or inner.weight.dtype)
        s = torch.linalg.svdvals(W)
        reps = math.prod(int(d) for d in input_shape[:-1])
        s = torch.sort(s.repeat(reps), descending=True).values
        if k > s.numel():
            raise ValueError(
                f"k={k} is larger than the operator's dimension {s.numel()} at input_shape "
                f"{tuple(input_shape)}"
            )
        return s[:k]
    op = AffineOperator(module, input_shape, dtype=dtype, device=device, check_affine=check_affine)
    if k > min(op.n, op.m):
        raise ValueError(
            f"k={k} is larger than the operator's dimension min({op.n}, {op.m}) "
            f"= {min(op.n, op.m)} at input_shape {op.input_shape}"
        )
    if method in ("auto", "lanczos"):
        X = warm_start.start_for(inner, op.input_shape, generator) if k == 1 else None
        return lanczos(
            op,
            k=k,
            X=X,
            tol=tol,
            max_passes=max_iter,
            generator=generator,
            with_left=False,
            predict_checks=True,
        ).values
    if method == "powerqr":
        return power_qr(op, k=k, n_iter=max_iter or 2000, generator=generator).values
    if k != 1:
        raise ValueError(f"method 'power' gives sigma_1 only, got k={k}; use 'lanczos' or 'powerqr'")
    sigma, _ = power_iteration(op, n_iter=max_iter or 2000, generator=generator)
    return sigma.reshape(1)
