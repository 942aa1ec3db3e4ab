"""Block Lanczos on many operators at once, in lockstep: one pass of all of them is a
fixed handful of large ops, whatever their number.

The operators' vectors live side by side in one flat row of ``N = sum_i n_i`` columns
(operator ``i`` owns columns ``[o_i, o_i + n_i)``), so a block of ``b`` vectors of every
operator is one ``(b, N)`` tensor and the basis one ``(rows, N)`` tensor. Every product
with the basis is *segmented*: ``V_i G_i^T`` for each operator ``i`` at once. With a
chunk size ``ch`` dividing every ``n_i``, the columns split into ``C = N / ch`` chunks
that each belong to one operator; a batched matmul over the chunks and one product with
the ``(n_ops, C)`` chunk-to-operator indicator ``E`` give every operator's coefficients
(and ``E^T`` spreads them back to the chunks). A pass is then:

* the caller's ``gram`` on the pending block (all operators: e.g. one grouped
  convolution per layer signature, :mod:`fastclip.batched`);
* two classical Gram-Schmidt passes against the whole basis (full
  reorthogonalisation, unconditionally: no host decision);
* the block's orthonormalisation by the eigen-decomposition of its small Gram matrix
  (``Z_i Z_i^T = U diag(lambda) U^T``, ``Q_i = diag(lambda)^{-1/2} U^T Z_i``), with
  numerically dependent directions (``lambda`` at rounding level) set to zero rows
  instead of being replaced on the host: a zero row adds nothing to the Krylov space
  and a zero row and column to the projected matrix, whose eigenvalue 0 stays at the
  bottom;
* at a check, the projected problems of all operators as one batched ``eigh`` and the
  stopping rule of :class:`fastclip.krylov.StopRule` evaluated per operator on the
  device; an operator that stops keeps (on the device) the Ritz pairs of the pass
  where it stopped, while the others go on.

The host reads one flag every ``check_every`` passes and the results once at the end.
The basis holds every pass (no restart): ``max_passes`` blocks. The residual of a Ritz
pair is read off the projected problem as in :mod:`fastclip.krylov` (``||R s_last||``,
``R = diag(lambda)^{1/2} U^T`` the new block's share of the last image).

Example::

    >>> ops = [AffineOperator(nn.Conv2d(8, 8, 3, padding=1), (8, 6, 6)), AffineOperator(nn.Linear(20, 5), (20,))]
    >>> layout = FlatLayout([op.n for op in ops])
    >>> def gram(P, live):  # (b, N) -> (b, N): each operator's A^T A on its columns
    ...     return torch.cat([op.gram(p.reshape(-1, *op.input_shape)).reshape(p.shape[0], -1)
    ...                       for op, p in zip(ops, layout.split(P))], dim=1)
    >>> r = lanczos_many(gram, torch.randn(4, layout.N), layout, tol=1e-5, max_passes=30)
    >>> r.top  # sigma_1 of each operator
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastclip.syncs import to_host

__all__ = ["FlatLayout", "ManyResult", "lanczos_many"]

#: The smallest chunk worth batching over: below it, the chunked products would hold
#: ``N / ch`` tiny matrices (callers then iterate operator by operator).
MIN_CHUNK = 32


class FlatLayout:
    """Columns of operators of sizes ``sizes`` side by side, split in chunks of ``ch``
    columns (the greatest common divisor of the sizes): ``E`` is the ``(n_ops, C)``
    indicator of which operator each chunk belongs to."""

    def __init__(self, sizes: Sequence[int], device: torch.device | str = "cpu") -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"expected one or more positive operator sizes, got {list(sizes)}")
        self.sizes = [int(s) for s in sizes]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.N = self.offsets[-1]
        self.ch = math.gcd(*self.sizes)
        self.C = self.N // self.ch
        chunks = torch.tensor([s // self.ch for s in self.sizes], device=device)
        owner = torch.repeat_interleave(torch.arange(len(self.sizes), device=device), chunks)
        self.E = F.one_hot(owner, len(self.sizes)).T.contiguous()  # (n_ops, C), integer

    @property
    def n_ops(self) -> int:
        return len(self.sizes)

    def usable(self) -> bool:
        """Whether the chunks are large enough to batch over (:data:`MIN_CHUNK`)."""
        return self.ch >= MIN_CHUNK

    def split(self, X: torch.Tensor) -> list[torch.Tensor]:
        """Each operator's columns of ``X`` (``(..., N)``), as views."""
        return [X[..., a:b] for a, b in zip(self.offsets, self.offsets[1:])]

    # -- the chunked layout: (C, rows, ch), chunk c of every row together -----------
    def to_chunks(self, X: torch.Tensor) -> torch.Tensor:
        """``(rows, N)`` -> ``(C, rows, ch)`` (a view)."""
        return X.view(X.shape[0], self.C, self.ch).transpose(0, 1)

    def from_chunks(self, Xc: torch.Tensor) -> torch.Tensor:
        """``(C, rows, ch)`` -> ``(rows, N)`` (a copy)."""
        return Xc.transpose(0, 1).reshape(Xc.shape[1], self.N)

    def dots(self, Ac: torch.Tensor, Bc: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
        """``(n_ops, a, b)``: every operator's ``A_i B_i^T`` (chunked ``(C, a, ch)``, ``(C, b, ch)``)."""
        per_chunk = torch.bmm(Ac, Bc.transpose(1, 2))  # (C, a, b)
        return torch.mm(E, per_chunk.view(self.C, -1)).view(E.shape[0], Ac.shape[1], Bc.shape[1])

    def combine(self, K: torch.Tensor, Bc: torch.Tensor, ET: torch.Tensor) -> torch.Tensor:
        """``(C, a, ch)``: every operator's ``K_i B_i`` (``K`` ``(n_ops, a, b)``, chunked ``(C, b, ch)``)."""
        Kc = torch.mm(ET, K.reshape(K.shape[0], -1)).view(self.C, K.shape[1], K.shape[2])
        return torch.bmm(Kc, Bc)


@dataclass
class ManyResult:
    """Per operator: ``values`` ``(n_ops, K)`` (sigma, descending; the top ``K`` Ritz values
    of the pass where it stopped), ``vectors`` ``(K, N)`` (the matching right vectors in
    the flat layout), and on the host ``top`` (sigma_1), ``passes``, ``converged`` and
    ``count`` (Ritz values at least ``min_value``; 0 without it)."""

    values: torch.Tensor
    vectors: torch.Tensor
    top: list[float]
    passes: list[int]
    converged: list[bool]
    count: list[int]


def _per_op(
    x: float | Sequence[float] | torch.Tensor | None, n: int, like: torch.Tensor, fill: float
) -> torch.Tensor:
    if x is None:
        return torch.full((n,), fill, dtype=like.dtype, device=like.device)
    if isinstance(x, torch.Tensor):
        return x.to(dtype=like.dtype, device=like.device)
    if isinstance(x, (int, float)):
        return torch.full((n,), float(x), dtype=like.dtype, device=like.device)
    return torch.tensor([fill if v is None else float(v) for v in x], dtype=like.dtype, device=like.device)


@torch.no_grad()
def lanczos_many(
    gram: Callable[[torch.Tensor, list[bool]], torch.Tensor],
    start: torch.Tensor,
    layout: FlatLayout,
    *,
    k: int = 1,
    tol: float = 1e-5,
    max_passes: int = 30,
    min_passes: int = 1,
    floor: float | Sequence[float] | None = None,
    above: float | Sequence[float | None] | None = None,
    below: float | Sequence[float | None] | None = None,
    min_value: float | Sequence[float] | None = None,
    active: Sequence[bool] | None = None,
    check_every: int = 1,
) -> ManyResult:
    """Block Lanczos on every operator's ``A_i^T A_i`` at once (see the module docstring).

    Args:
        gram: ``(P, live) -> G``, ``(b, N) -> (b, N)``: each operator's ``A_i^T A_i``
            applied to its columns; ``live`` (host booleans) says which operators still
            need theirs (the others have stopped: their columns may be any finite
            values, e.g. zeros, which the basis then ignores).
        start: ``(b, N)`` the start block of every operator (warm starts and random
            rows; orthonormalised here per operator).
        layout: the operators' columns (:class:`FlatLayout`; ``layout.usable()``).
        k: Ritz pairs the stopping rule looks at.
        tol, max_passes, min_passes, floor, above, below: :class:`fastclip.krylov.StopRule`'s
            rule, per operator (a number, or one value per operator; ``None``: no
            ``floor`` / ``above`` / ``below``).
        min_value: also return every Ritz pair of an operator whose value is at least
            this (``count``).
        active: operators whose result is wanted (default all): the others ride along
            (the lockstep computes them anyway) and never hold the run.
        check_every: passes between host reads of the stop flags.
    """
    n_ops = layout.n_ops
    b, N = start.shape
    if N != layout.N:
        raise ValueError(f"start has {N} columns, the layout {layout.N}")
    if not layout.usable():
        raise ValueError(
            f"the operators' sizes {layout.sizes} share chunks of {layout.ch} < {MIN_CHUNK} columns"
        )
    dev, dt = start.device, start.dtype
    f64 = torch.zeros((), dtype=torch.float64, device=dev)
    E, E64 = layout.E.to(dt), layout.E.to(torch.float64)
    ET = E.T.contiguous()
    eps = 1e-10 if dt == torch.float64 else 1e-5
    tiny = torch.finfo(torch.float64).tiny
    floor_t = _per_op(floor, n_ops, f64, 0.0).square()
    above_t = _per_op(above, n_ops, f64, math.inf).square()
    below_t = _per_op(below, n_ops, f64, math.inf).square()
    minv_t = _per_op(min_value, n_ops, f64, math.inf).square()
    has_above = above is not None
    done = ~torch.tensor(list(active) if active is not None else [True] * n_ops, device=dev)
    cap = (max_passes + 1) * b
    V = torch.zeros((layout.C, cap, layout.ch), dtype=dt, device=dev)  # the basis, chunked
    H = torch.zeros((n_ops, cap, cap), dtype=torch.float64, device=dev)
    checks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (theta, S) of every check
    check_passes: list[int] = []
    stop_at = torch.full((n_ops,), -1, dtype=torch.long, device=dev)  # the check where each stopped
    conv_at = torch.zeros(n_ops, dtype=torch.bool, device=dev)

    def orthonormal(
        Zc: torch.Tensor, scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        """Each operator's rows of ``Zc`` (chunked) orthonormalised, dependent ones (norm
        at most ``eps * scale``; default scale: the largest row's) zero, and a function
        giving ``R`` with ``Z_i = R_i^T Q_i`` on the kept directions (what only a check
        reads)."""
        Zd = Zc.double()
        lam, U = torch.linalg.eigh(layout.dots(Zd, Zd, E64))  # (n_ops, b) ascending, (n_ops, b, b)
        if scale is None:
            scale = lam[:, -1].clamp_min(0).sqrt()
        keep = lam > (eps * scale).square().unsqueeze(1)
        Ut = U.transpose(1, 2)
        K = (keep * lam.clamp_min(tiny).rsqrt()).unsqueeze(2) * Ut
        return layout.combine(K.to(dt), Zc, ET), lambda: (keep * lam.clamp_min(0)).sqrt().unsqueeze(2) * Ut

    V[:, :b] = orthonormal(layout.to_chunks(start), None)[0]
    passes = 0
    rows = 0
    live = [True] * n_ops
    while True:
        m, rows = passes * b, (passes + 1) * b
        G = gram(layout.from_chunks(V[:, m:rows]), live)
        passes += 1
        Gc, Vc = layout.to_chunks(G), V[:, :rows]
        c1 = layout.dots(Gc, Vc, E)  # (n_ops, b, rows): the image's coefficients on the basis
        Z = Gc - layout.combine(c1, Vc, ET)
        c2 = layout.dots(Z, Vc, E)  # what rounding left (Gram-Schmidt, twice)
        Z = Z - layout.combine(c2, Vc, ET)
        H[:, :rows, m:rows] = (c1 + c2).transpose(1, 2)  # the upper triangle is what eigh reads
        # a direction is dependent when what is left of it is rounding noise of the image
        Q, R = orthonormal(Z, c1.abs().amax(dim=(1, 2)))
        V[:, rows : rows + b] = Q
        last = passes >= max_passes
        if not (last or (passes >= min_passes and (passes - min_passes) % check_every == 0)):
            continue
        theta, S = torch.linalg.eigh(H[:, :rows, :rows], UPLO="U")
        theta, S = theta.flip(1), S.flip(2)  # descending
        res = torch.linalg.vector_norm(torch.bmm(R(), S[:, m:rows, :k]), dim=1)  # (n_ops, k)
        top = theta[:, 0]
        conv = (res <= (tol * torch.maximum(top, floor_t)).unsqueeze(1)).all(dim=1)
        stop = conv | last if last else conv
        if has_above:
            stop = stop | ((top >= above_t) & (top < below_t))
        new = stop & ~done
        stop_at = torch.where(new, len(checks), stop_at)
        conv_at = torch.where(new, conv, conv_at)
        checks.append((theta, S))
        check_passes.append(passes)
        done = done | stop
        finished = to_host(done)
        if last or all(finished):
            break
        live = [not f for f in finished]
    # each operator's Ritz pairs at the check where it stopped (inactive ones: the last)
    stop_at = torch.where(stop_at < 0, len(checks) - 1, stop_at)
    thetas = torch.stack([F.pad(t, (0, rows - t.shape[1])) for t, _ in checks])  # (checks, n_ops, rows)
    Ss = torch.stack([F.pad(S_, (0, rows - S_.shape[2], 0, rows - S_.shape[1])) for _, S_ in checks])
    ar = torch.arange(n_ops, device=dev)
    theta_rec, S_rec = thetas[stop_at, ar], Ss[stop_at, ar]  # (n_ops, rows), (n_ops, rows, rows)
    count = (theta_rec >= minv_t.unsqueeze(1)).sum(dim=1)
    summary = [theta_rec[:, 0].clamp_min(0).sqrt(), stop_at.double(), conv_at.double(), count.double()]
    top, at, c, cnt = to_host(torch.stack(summary))
    K = max(k, int(max(cnt))) if min_value is not None else k
    K = min(K, rows)
    coef = S_rec[:, :, :K].transpose(1, 2).to(dt)  # (n_ops, K, rows)
    vectors = layout.from_chunks(layout.combine(coef, V[:, :rows], ET))
    return ManyResult(
        values=theta_rec[:, :K].clamp_min(0).sqrt(),
        vectors=vectors,
        top=[float(x) for x in top],
        passes=[check_passes[int(a)] for a in at],
        converged=[bool(x) for x in c],
        count=[int(x) for x in cnt] if min_value is not None else [0] * n_ops,
    )
