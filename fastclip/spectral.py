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
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from fastclip import exact
from fastclip.batchnorm import bn_singular_values
from fastclip.operator import AffineOperator, full_precision, gram_many, unwrap
from fastclip.syncs import to_host

__all__ = ["SpectralResult", "CHECK_EVERY", "default_check_every", "power_iteration", "power_qr", "power_qr_many", "lanczos", "singular_values", "METHODS",
           "unwrap"]

METHODS = ("auto", "lanczos", "powerqr", "power", "explicit", "svds", "fft")


@dataclass
class SpectralResult:
    """Top-k singular triples: ``values`` (k,) descending, ``right`` (k, *input_shape)
    unit right singular vectors, ``left`` (k, *output_shape) unit left ones
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
def power_iteration(op: AffineOperator, v: torch.Tensor | None = None, n_iter: int = 5,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain power iteration on ``A^T A``: ``v <- A^T A v / ||A^T A v||``.

    Returns ``(sigma, v)`` with ``sigma = ||A v||`` for the final unit ``v`` (a lower
    bound on sigma_1 that increases monotonically) and ``v`` of shape (1, *input_shape),
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
def power_qr(op: AffineOperator, X: torch.Tensor | None = None, k: int = 1, n_iter: int = 1,
             generator: torch.Generator | None = None, with_left: bool = False,
             record_history: bool = False) -> SpectralResult:
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
        X = _random_block(op, k, generator)
    return power_qr_many([op], [X], n_iter=n_iter, with_left=with_left, record_history=record_history)[0]


@_in_full_precision
def power_qr_many(ops: Sequence[AffineOperator], Xs: Sequence[torch.Tensor], n_iter: int = 1,
                  with_left: bool = False, record_history: bool = False) -> list[SpectralResult]:
    """:func:`power_qr` on several operators at once, each from its own warm start
    ``Xs[i]``; the products of every iteration come from one
    :func:`~fastclip.operator.gram_many` call, so operators that start with the same
    layer (a conv and its Conv+BN pair) share its pass. The results are those of
    separate ``power_qr`` calls.

    Example::

        >>> pair = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        >>> ops = [AffineOperator(pair[0], (3, 16, 16)), AffineOperator(pair, (3, 16, 16))]
        >>> r_conv, r_pair = power_qr_many(ops, [torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)])
    """
    if len(ops) != len(Xs):
        raise ValueError(f"power_qr_many needs one start per operator, got {len(ops)} operators and {len(Xs)} starts")
    with torch.no_grad():
        Qs, values, history = [], [], []
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
            results.append(SpectralResult(values=vals, right=V, left=left, passes=n_iter, converged=False,
                                          history=hist))
    return results


@_in_full_precision
def lanczos(op: AffineOperator, k: int = 1, X: torch.Tensor | None = None, *, block: int | None = None,
            tol: float | None = None, max_passes: int | None = None, max_basis: int | None = None,
            generator: torch.Generator | None = None, with_left: bool = True,
            record_history: bool = False, min_value: float | None = None,
            stop_above: float | None = None, stop_below: float | None = None, min_passes: int = 1,
            extra_random: int = 0, tol_floor: float | None = None,
            check_every: int | None = None) -> SpectralResult:
    """Top-``k`` singular triples by thick-restart block Lanczos on ``A^T A``.

    The basis ``V`` (m x n, orthonormal rows) and ``W = V A^T A`` are kept together in
    preallocated buffers, so the projected matrix ``H = V W^T`` needs no extra passes.
    Each step computes the Ritz pairs ``(theta_i, y_i)`` of ``H``, stops when every one
    of the top ``k`` residuals ``||A^T A y_i - theta_i y_i||`` is below ``tol * theta_1``
    (which bounds the relative error of ``sigma_i^2``, hence of ``sigma_i`` by
    ``tol / 2``), and otherwise extends the basis with the orthogonalised residuals of
    the top ``block`` Ritz pairs (one pass on ``block`` vectors). When the basis reaches
    ``max_basis`` it restarts from the best Ritz vectors (thick restart: their ``W``
    rows are kept by linearity, so restarting costs nothing).

    Args:
        k: number of singular triples.
        X: optional warm start, (b, *input_shape).
        block: vectors added per pass (default k, at least 1).
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
            4 on a GPU, where each read waits for the stream). The rule is evaluated
            on the device at every pass and the result is that of the first pass
            where it held (``passes`` counts up to it), so this changes only how
            often the host waits and how many passes past the stop the operator
            computes (at most ``check_every - 1``, in ``op.passes``).

    Host syncs: one read per check (and one more for a step off the common path:
    a numerically dependent direction, fewer than ``block`` residuals left above the
    tolerance), none per pass; ``r.top`` is sigma_1 as a host float, read with the
    rule.

    Example::

        >>> op = AffineOperator(nn.Conv2d(16, 16, 3, padding=1), (16, 32, 32))
        >>> r = lanczos(op, k=3)
        >>> r.values, r.passes
    """
    n = op.n
    if k < 1 or k > n:
        raise ValueError(f"k must be between 1 and the operator's dimension {n}, got k={k}")
    block = max(1, block or k)
    if tol is None:
        tol = 1e-6 if op.dtype == torch.float64 else 1e-5
    max_passes = 1000 if max_passes is None else max_passes
    max_basis = min(n, max_basis or max(40, 4 * (k + block)))
    keep = min(max(k + block, max_basis // 2), max_basis - block) if max_basis > k + block else k
    dev = op.device
    # The basis lives in the operator's precision (float32 at least): building it costs
    # more memory traffic than the layer passes on big inputs, and a float32 basis
    # holds the residuals of float32 products to the float32 default tolerance. The
    # small projected problem is solved in float64 either way.
    bdt = torch.float64 if op.dtype == torch.float64 else torch.float32
    tiny = torch.finfo(bdt).tiny
    eps = 1e-10 if bdt == torch.float64 else 1e-5  # numerically dependent direction

    def apply(Q: torch.Tensor) -> torch.Tensor:
        # Q: (b, n) orthonormal rows -> (A^T A Q^T)^T
        G = op.gram(Q.reshape(Q.shape[0], *op.input_shape).to(op.dtype))
        return G.reshape(Q.shape[0], -1).to(bdt)

    def orthogonalize(Y: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        # Classical Gram-Schmidt against the rows of V, repeated when it cancelled most
        # of a vector (Kahan's "twice is enough"; a Ritz residual is orthogonal to V
        # already, so one pass usually does), then QR within the block; drops
        # directions that are (numerically) already in the span.
        norms0 = Y.norm(dim=1).clamp_min(tiny)
        keep_rows = torch.ones_like(norms0, dtype=torch.bool)
        if V.shape[0]:
            Y = Y - (Y @ V.T) @ V
            norms1 = Y.norm(dim=1)
            again = norms1 < 0.7 * norms0
            if bool(again.any()):
                Y = Y - (Y @ V.T) @ V
                # a second pass that cancels most again: the vector is in the span to
                # working precision (e.g. the rounding-level residual of a converged
                # pair); normalising what is left would break orthogonality
                keep_rows = ~again | (Y.norm(dim=1) >= 0.7 * norms1)
        keep_rows &= Y.norm(dim=1) > eps * norms0
        Y = Y[keep_rows]
        if Y.shape[0] == 0:
            return Y
        Q, R = torch.linalg.qr(Y.T)
        d = torch.diagonal(R).abs()
        good = d > eps * norms0[keep_rows].max()
        Q = Q.T[good]
        if V.shape[0] and bool((d[good] < 0.7 * Y[good].norm(dim=1)).any()):
            # the QR cancelled most of a vector against the others of the block: what is
            # left is rescaled, and with it its rounding-level components along V
            Q = Q - (Q @ V.T) @ V
            Q, R = torch.linalg.qr(Q.T)
            Q = Q.T[torch.diagonal(R).abs() > 0.5]
        return Q

    if X is None:
        X = _random_block(op, max(block, k), generator)
    check_every = default_check_every(dev) if check_every is None else max(1, int(check_every))
    lazy = check_every > 1  # else every step is the exact one, read back at every pass
    sa2 = None if stop_above is None else float(stop_above) ** 2
    sb2 = None if stop_below is None else float(stop_below) ** 2
    floor2 = max(float(tol_floor or 0.0) ** 2, tiny)
    mv2 = None if min_value is None else float(min_value) ** 2

    def gram_schmidt_masks(Y: torch.Tensor, V: torch.Tensor):
        # ``orthogonalize``'s Gram-Schmidt passes and row mask on the device (the second
        # pass is computed whether it is needed or not; the result is the same)
        norms0 = Y.norm(dim=1).clamp_min(tiny)
        if not V.shape[0]:
            return Y, Y.norm(dim=1) > eps * norms0, norms0
        Y1 = Y - (Y @ V.T) @ V
        norms1 = Y1.norm(dim=1)
        again = norms1 < 0.7 * norms0
        Y2 = Y1 - (Y1 @ V.T) @ V
        n2 = Y2.norm(dim=1)
        any_again = again.any()
        keep = torch.where(any_again, ~again | (n2 >= 0.7 * norms1), torch.ones_like(again))
        keep = keep & (torch.where(any_again, n2, norms1) > eps * norms0)
        return torch.where(any_again, Y2, Y1), keep, norms0

    def orthogonalize_few_reads(Y: torch.Tensor, V: torch.Tensor, masks=None, keep_host=None) -> torch.Tensor:
        # ``orthogonalize`` with its masks read back in two or three transfers instead of
        # one read per branch and mask; ``masks``/``keep_host``: gram_schmidt_masks(Y, V)
        # and its row mask, already read
        Yc, keep, norms0 = masks if masks is not None else gram_schmidt_masks(Y, V)
        keep_host = to_host(keep) if keep_host is None else keep_host
        idx = [i for i, kp in enumerate(keep_host) if kp]
        Y = Yc[idx]
        if Y.shape[0] == 0:
            return Y
        Q, R = torch.linalg.qr(Y.T)
        d = torch.diagonal(R).abs()
        good = d > eps * norms0[idx].max()
        cancel = (good & (d < 0.7 * Y.norm(dim=1))).any() if V.shape[0] else good[:1] & False
        flags = to_host(torch.cat([good, cancel.reshape(1)]))
        Q = Q.T[[i for i, g in enumerate(flags[:-1]) if g]]
        if flags[-1]:
            Q = Q - (Q @ V.T) @ V
            Q, R = torch.linalg.qr(Q.T)
            Q = Q.T[[i for i, g in enumerate(to_host(torch.diagonal(R).abs() > 0.5)) if g]]
        return Q

    def lazy_orthogonalize(Y: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # ``orthogonalize`` without its data-dependent branches: the same operations as
        # its common case (one Gram-Schmidt pass, nothing dropped, one QR), and a device
        # flag that is True when it is *not* that case (then the caller redoes the step
        # with ``orthogonalize``). No host sync.
        norms0 = Y.norm(dim=1).clamp_min(tiny)
        if V.shape[0]:
            Y = Y - (Y @ V.T) @ V
            norms1 = Y.norm(dim=1)
            bad = (norms1 < 0.7 * norms0).any()
        else:
            norms1 = Y.norm(dim=1)
            bad = torch.zeros((), dtype=torch.bool, device=Y.device)
        bad = bad | (norms1 <= eps * norms0).any()
        Q, R = torch.linalg.qr(Y.T)
        d = torch.diagonal(R).abs()
        bad = bad | (d <= eps * norms0.max()).any()
        Q = Q.T
        if V.shape[0]:
            # orthogonalize's second pass, taken when the QR cancelled most of a vector
            # (common: the residuals of a block's Ritz pairs are nearly dependent),
            # computed always and selected on the device; a dropped direction is off
            # the common path
            cancel = (d < 0.7 * norms1).any()
            Q2 = Q - (Q @ V.T) @ V
            Q2, R2 = torch.linalg.qr(Q2.T)
            bad = bad | (cancel & (torch.diagonal(R2).abs() <= 0.5).any())
            Q = torch.where(cancel, Q2.T, Q)
        return Q, bad

    with torch.no_grad():
        # Preallocated basis, image and projected-matrix buffers: growing them by
        # concatenation copies the whole basis at every pass, which costs more than the
        # layer passes on big inputs; and a prefix of them is the state of any earlier
        # pass, which the lazy stopping rule below rolls back to.
        cap = min(n, max_basis + max(block, k))
        Vbuf = torch.empty((cap, n), dtype=bdt, device=dev)
        Wbuf = torch.empty((cap, n), dtype=bdt, device=dev)
        Hbuf = torch.zeros((cap, cap), dtype=torch.float64, device=dev)
        Y0 = X.detach().reshape(X.shape[0], -1).to(device=dev, dtype=bdt)
        if extra_random:
            Y0 = torch.cat([Y0, _random_block(op, extra_random, generator).reshape(extra_random, -1).to(bdt)])
        Y0 = Y0[:cap]

        def start(exact: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            if not exact and Y0.shape[0] >= k:
                return lazy_orthogonalize(Y0, Vbuf[:0])
            Q = orthogonalize(Y0, Vbuf[:0])
            if Q.shape[0] < k:  # warm start too small or degenerate: pad with random directions
                extra = _random_block(op, k - Q.shape[0] + block, generator).reshape(-1, n).to(bdt)
                Q = torch.cat([Q, orthogonalize(extra, Q)])
            return Q, None

        def push(Q: torch.Tensor, m: int) -> int:
            # Q -> rows m.. of the basis, its images, and the new blocks of H (H is
            # symmetric: the new row block is C^T; the diagonal block is symmetrised
            # with the rest at the next Rayleigh-Ritz step)
            b = Q.shape[0]
            WQ = apply(Q)
            Vbuf[m:m + b] = Q
            Wbuf[m:m + b] = WQ
            if m:
                C = (Vbuf[:m] @ WQ.T).double()
                Hbuf[:m, m:m + b] = C
                Hbuf[m:m + b, :m] = C.T
            Hbuf[m:m + b, m:m + b] = (Q @ WQ.T).double()
            return m + b

        def run(exact_start: bool):
            # The stopping rule, and whether each expansion took the common path, are
            # evaluated on the device at every pass and read back to the host
            # (:func:`fastclip.syncs.to_host`, one transfer) every ``check_every``
            # passes, before a restart (which overwrites the basis) and at the last
            # pass. The result is that of the first pass where the rule held, from the
            # basis of that pass (a prefix of the buffers): what a check at every pass
            # returns. A step off the common path is redone from its pass, exactly.
            Q, start_bad = start(exact_start or not lazy)
            m = push(Q, 0)
            passes = 1
            history: list[float] = []
            pending: list[dict] = []  # passes not read back yet
            zero = torch.zeros((), dtype=torch.float64, device=dev)

            def read():
                """Read the pending passes back (one transfer); returns the first event:
                ("converged" | "stop" | "bad", record, row), ("restart", None, None) when
                the lazy start was off the common path, or (None, None, None)."""
                nonlocal start_bad
                vecs = [torch.stack([r["conv"], r["above"], r["bad"], r["count"], r["theta"][0]]) for r in pending]
                if start_bad is not None:
                    vecs.append(start_bad.to(torch.float64).expand(5))
                rows = to_host(torch.stack(vecs))
                if start_bad is not None:
                    if rows.pop()[0]:
                        return "restart", None, None
                    start_bad = None
                for r, row in zip(pending, rows):
                    if r["p"] > len(history):
                        history.append(math.sqrt(max(row[4], 0.0)))
                    if row[0] or r["forced"]:
                        return "converged", r, row
                    if r["p"] >= max_passes or row[1]:
                        return "stop", r, row
                    if row[2]:
                        return "bad", r, row
                return None, None, None

            while True:
                V, W = Vbuf[:m], Wbuf[:m]
                H = Hbuf[:m, :m]
                theta, S = torch.linalg.eigh(0.5 * (H + H.T))
                theta, S = theta.flip(0), S.flip(1)
                Sl = S.to(bdt)  # the Ritz coefficients, to combine basis rows with
                # Residuals of the top k + block Ritz pairs: the expansion takes the highest
                # ones not yet converged, so a converged (e.g. warm-started) top pair does not
                # stall the growth of the basis toward a larger singular value.
                nb = min(k + block, Sl.shape[1])
                Sb = Sl[:, :nb]
                R = Sb.T @ W - theta[:nb, None].to(bdt) * (Sb.T @ V)
                res = R.norm(dim=1)
                thr = tol * theta[0].clamp_min(floor2)  # tol * max(sigma_1^2, tol_floor^2)
                can_stop = passes >= min_passes
                rec = {"p": passes, "m": m, "theta": theta, "Sl": Sl, "forced": m >= n, "bad": zero,
                       "conv": (res[:k] <= thr).all().to(torch.float64) if can_stop else zero,
                       "above": zero,
                       "count": (theta >= mv2).sum().to(torch.float64) if mv2 is not None else zero}
                if stop_above is not None and can_stop:
                    above = theta[0] >= sa2
                    if sb2 is not None:
                        above = above & (theta[0] < sb2)
                    rec["above"] = above.to(torch.float64)
                restart = m + block > max_basis
                exact_step = False
                if rec["forced"] or passes >= max_passes or restart:
                    # read now: a stop here ends the run, and a restart overwrites the
                    # basis that earlier passes would roll back to
                    pending.append(rec)
                    what, got, row = read()
                    pending.clear()
                    if what == "restart":
                        return None
                    if what in ("converged", "stop"):
                        return what, got, row, history
                    if what == "bad":  # an earlier expansion left the common path: redo it
                        rec, exact_step = got, True
                        m, passes, restart = rec["m1"], rec["p"], False
                        theta, Sl, R, res, thr = rec["theta"], rec["Sl"], rec["R"], rec["res"], rec["thr"]
                        V, W = Vbuf[:m], Wbuf[:m]
                if restart:
                    # Thick restart: keep the best Ritz vectors and their images.
                    Sk = Sl[:, :keep]
                    Vbuf[:keep] = Sk.T @ V
                    Wbuf[:keep] = Sk.T @ W
                    m = keep
                    V, W = Vbuf[:m], Wbuf[:m]
                    Hbuf[:keep, :keep] = torch.diag(theta[:keep])
                    R = W[:nb] - theta[:nb, None].to(bdt) * V[:nb]
                if not exact_step:
                    rec.update(m1=m, R=R, res=res, thr=thr)  # the state the expansion starts from
                    if lazy:
                        # Expand with the residuals of the highest Ritz pairs not yet converged
                        # (those of converged ones are rounding noise). The common case: at
                        # least ``block`` of them, none numerically dependent on the basis.
                        todo = res > thr
                        ar = torch.arange(nb, device=dev)
                        order = torch.where(todo, ar, ar + nb).argsort()[:block]
                        Q, bad = lazy_orthogonalize(R.index_select(0, order), V)
                        rec["bad"] = (bad | (todo.sum() < min(block, nb))).to(torch.float64)
                    pending.append(rec)  # (after a restart its stop flags are read again: unchanged)
                    if not lazy or (can_stop and (passes - min_passes) % check_every == 0):
                        what, got, row = read()
                        pending.clear()
                        if what == "restart":
                            return None
                        if what in ("converged", "stop"):
                            return what, got, row, history
                        if what == "bad":
                            rec, exact_step = got, True
                            m, passes = rec["m1"], rec["p"]
                            theta, Sl, R, res, thr = rec["theta"], rec["Sl"], rec["R"], rec["res"], rec["thr"]
                            V, W = Vbuf[:m], Wbuf[:m]
                    exact_step = exact_step or not lazy
                if exact_step:
                    # the original step, with its data-dependent shapes (host syncs)
                    if lazy:
                        # the rows the common path would take (the first ``block`` not
                        # converged, when there are that many), their masks read with the
                        # convergence mask in one transfer
                        todo_d, nr = res > thr, res.shape[0]
                        ar = torch.arange(nr, device=dev)
                        guess = torch.where(todo_d, ar, ar + nr).argsort()[:block]
                        # (for every count c of them: the masks of the first c rows of guess)
                        Yg = R.index_select(0, guess)
                        ng = Yg.shape[0]
                        norms0 = Yg.norm(dim=1).clamp_min(tiny)
                        Y1 = Yg - (Yg @ V.T) @ V
                        norms1 = Y1.norm(dim=1)
                        again = norms1 < 0.7 * norms0
                        Y2 = Y1 - (Y1 @ V.T) @ V
                        n2 = Y2.norm(dim=1)
                        any_c = again.cummax(0).values  # any_again of the first c + 1 rows
                        anym = any_c[:, None]
                        keepm = torch.where(anym, (~again | (n2 >= 0.7 * norms1))[None, :], True) & \
                            (torch.where(anym, n2[None, :], norms1[None, :]) > eps * norms0[None, :])
                        got = to_host(torch.cat([todo_d, keepm.flatten()]))
                        todo = [i for i, t in enumerate(got[:nr]) if t][:block]
                        c = len(todo)
                        if c:  # then todo is guess[:c]
                            row = got[nr + (c - 1) * ng: nr + (c - 1) * ng + c]
                            Yc = torch.where(any_c[c - 1], Y2[:c], Y1[:c])
                            Q = orthogonalize_few_reads(None, V, (Yc, None, norms0[:c]), row)
                        else:
                            Q = orthogonalize_few_reads(R[todo], V)
                    else:
                        order = torch.nonzero(res > thr).flatten()[:block]
                        Q = orthogonalize(R[order], V)
                    if Q.shape[0] == 0:
                        if m >= n:
                            return "converged", rec, None, history
                        Q = (orthogonalize_few_reads if lazy else orthogonalize)(
                            _random_block(op, block, generator).reshape(block, -1).to(bdt), V)
                        if Q.shape[0] == 0:
                            return "converged", rec, None, history
                m = push(Q, m)
                passes += 1

        out = run(False)
        if out is None:  # the warm start was off the common path: start again, exactly
            out = run(True)
        what, rec, row, history = out
        converged = what == "converged"
        # the state of the stopping pass, before any restart of that pass
        passes, m, theta, Sl = rec["p"], rec["m"], rec["theta"], rec["Sl"]
        V = Vbuf[:m]
        if row is None:  # stopped on the exact path: read its values now
            got = to_host(torch.stack([theta[0], (theta >= mv2).sum().to(theta.dtype) if mv2 is not None
                                       else theta[0] * 0]))
            row = [1.0, 0.0, 0.0, got[1], got[0]]
            if record_history and len(history) < passes:
                history.append(math.sqrt(max(got[0], 0.0)))
        if min_value is not None:
            # Ritz values are sorted: count those above min_value**2, never fewer than k.
            k = max(k, int(row[3]))
        values = torch.sqrt(theta[:k].clamp_min(0))
        Vk = (Sl[:, :k].T @ V).reshape(k, *op.input_shape)
        left = _left_vectors(op, Vk, values) if with_left else None
    return SpectralResult(values=values.to(op.dtype), right=Vk.to(op.dtype), left=left, passes=passes,
                          converged=converged, history=history if record_history else [],
                          top=_round_to(math.sqrt(max(row[4], 0.0)), op.dtype))


def singular_values(module: nn.Module, input_shape: Sequence[int], k: int = 1, *, method: str = "auto",
                    tol: float | None = None, max_iter: int | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, check_affine: bool = True,
                    generator: torch.Generator | None = None) -> torch.Tensor:
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

        >>> conv = nn.Conv2d(3, 16, 3, padding=1)
        >>> fastclip.singular_values(conv, (3, 32, 32), k=3)
        tensor([...])
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    inner = unwrap(module)
    if method in ("explicit", "svds", "fft"):
        if method == "explicit":
            return exact.exact_singular_values(module, input_shape, k=k)
        if method == "svds":
            return exact.svds_singular_values(module, input_shape, k=k)
        return exact.fft_singular_values(inner, input_shape, k=k)
    if method == "auto" and isinstance(inner, nn.modules.batchnorm._BatchNorm) and inner.running_var is not None:
        s = bn_singular_values(inner, k=k, input_shape=tuple(input_shape))
        return s.to(dtype or s.dtype)
    if method == "auto" and isinstance(inner, nn.Linear) and input_shape and int(input_shape[-1]) == inner.in_features:
        # Linear on (..., in_features) applies W to each row: W's singular values, repeated.
        AffineOperator(module, input_shape)  # validates the shape
        W = inner.weight.detach().to(device=device or inner.weight.device, dtype=dtype or inner.weight.dtype)
        s = torch.linalg.svdvals(W)
        reps = math.prod(int(d) for d in input_shape[:-1])
        s = torch.sort(s.repeat(reps), descending=True).values
        if k > s.numel():
            raise ValueError(f"k={k} is larger than the operator's dimension {s.numel()} at input_shape "
                             f"{tuple(input_shape)}")
        return s[:k]
    op = AffineOperator(module, input_shape, dtype=dtype, device=device, check_affine=check_affine)
    if k > min(op.n, op.m):
        raise ValueError(f"k={k} is larger than the operator's dimension min({op.n}, {op.m}) "
                         f"= {min(op.n, op.m)} at input_shape {op.input_shape}")
    if method in ("auto", "lanczos"):
        return lanczos(op, k=k, tol=tol, max_passes=max_iter, generator=generator, with_left=False).values
    if method == "powerqr":
        return power_qr(op, k=k, n_iter=max_iter or 2000, generator=generator).values
    if k != 1:
        raise ValueError(f"method 'power' gives sigma_1 only, got k={k}; use 'lanczos' or 'powerqr'")
    sigma, _ = power_iteration(op, n_iter=max_iter or 2000, generator=generator)
    return sigma.reshape(1)
