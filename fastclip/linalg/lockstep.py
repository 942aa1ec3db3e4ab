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
  stopping rule of :class:`fastclip.linalg.krylov.StopRule` evaluated per operator on the
  device; an operator that stops keeps (on the device) the Ritz pairs of the pass
  where it stopped, while the others go on.

The host reads one flag every ``check_every`` passes and the results once at the end.
The basis holds every pass (no restart): ``max_passes`` blocks at most (allocated for
``budget`` passes, grown past it). The residual of a Ritz pair is read off the projected
problem as in :mod:`fastclip.linalg.krylov` (``||R s_last||``, ``R = diag(lambda)^{1/2} U^T``
the new block's share of the last image).

Example::

    >>> ops = [AffineOperator(nn.Conv2d(8, 8, 3, padding=1), (8, 6, 6)), AffineOperator(nn.Linear(20, 5), (20,))]
    >>> layout = FlatLayout([op.n for op in ops])
    >>> def gram(P, live, present):  # (b, N) -> (b, N): each operator's A^T A on its columns
    ...     here = [ops[i] for i in present]
    ...     parts = FlatLayout([op.n for op in here]).split(P)
    ...     return torch.cat([op.gram(p.reshape(-1, *op.input_shape)).reshape(p.shape[0], -1)
    ...                       for op, p in zip(here, parts)], dim=1)
    >>> r = lanczos_many(gram, torch.randn(4, layout.N), layout, tol=1e-5, max_passes=30)
    >>> r.top  # sigma_1 of each operator
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastclip.linalg.syncs import to_host

__all__ = ["FlatLayout", "ManyResult", "lanczos_many"]

#: The smallest chunk worth batching over: below it, the chunked products would hold
#: ``N / ch`` tiny matrices (callers then iterate operator by operator).
MIN_CHUNK = 32


class FlatLayout:
    """Columns of operators of sizes ``sizes`` side by side, split in chunks of ``ch``
    columns (default: the greatest common divisor of the sizes): ``E`` is the ``(n_ops, C)``
    indicator of which operator each chunk belongs to."""

    def __init__(
        self, sizes: Sequence[int], device: torch.device | str = "cpu", ch: int | None = None
    ) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"expected one or more positive operator sizes, got {list(sizes)}")
        self.sizes = [int(s) for s in sizes]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.N = self.offsets[-1]
        self.ch = math.gcd(*self.sizes) if ch is None else ch
        if any(s_ % self.ch for s_ in self.sizes):
            raise ValueError(f"chunks of {self.ch} columns do not divide the sizes {self.sizes}")
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
    """Per operator (lists in the layout's order): ``values`` (sigma, descending: the top
    ``max(k, count)`` Ritz values of the pass where it stopped), ``vectors`` (the matching
    right vectors, ``(K_i, n_i)``), and ``top`` (sigma_1), ``passes``, ``converged`` and
    ``count`` (Ritz values at least ``min_value``; 0 without it). An inactive operator's
    entries are None, 0.0, 0, False and 0."""

    values: list[torch.Tensor | None]
    vectors: list[torch.Tensor | None]
    top: list[float]
    passes: list[int]
    converged: list[bool]
    count: list[int]


def _per_op(
    x: float | Sequence[float | None] | torch.Tensor | None, n: int, like: torch.Tensor, fill: float
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
    gram: Callable[[torch.Tensor, list[bool], list[int]], torch.Tensor],
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
    units: Sequence[int] | None = None,
    compact: float = 0.25,
    budget: int | None = None,
    budget_above: float | Sequence[float | None] | None = None,
) -> ManyResult:
    """Block Lanczos on every operator's ``A_i^T A_i`` at once (see the module docstring).

    Args:
        gram: ``(P, live, present) -> G``: each present operator's ``A_i^T A_i`` applied
            to its columns of ``P`` (``(b, N')``: the columns of the ``units`` listed in
            ``present``, in order); ``live`` (host booleans, one per operator) says
            which still need theirs (the others have stopped: their columns may be any
            finite values, e.g. zeros, which the basis then ignores).
        start: ``(b, N)`` the start block of every operator (warm starts and random
            rows; orthonormalised here per operator).
        layout: the operators' columns (:class:`FlatLayout`; ``layout.usable()``).
        k: Ritz pairs the stopping rule looks at.
        tol, max_passes, min_passes, floor, above, below, budget, budget_above:
            :class:`fastclip.linalg.krylov.StopRule`'s rule, per operator (a number, or one
            value per operator; ``None``: no ``floor`` / ``above`` / ``below`` /
            ``budget_above``). The basis grows past ``budget`` passes only while some
            operator goes on.
        min_value: also return every Ritz pair of an operator whose value is at least
            this (``count``).
        active: operators whose result is wanted (default all): the others ride along
            (the lockstep computes them anyway) and never hold the run.
        check_every: passes between host reads of the stop flags.
        units: runs of consecutive operators that ``gram`` computes together (default:
            each alone). A unit whose operators have all stopped leaves the basis (its
            columns are dropped, the run goes on over fewer columns) once the units
            that could leave hold at least ``compact`` of the columns.
    """
    n_ops = layout.n_ops
    b, N = start.shape
    if N != layout.N:
        raise ValueError(f"start has {N} columns, the layout {layout.N}")
    if not layout.usable():
        raise ValueError(
            f"the operators' sizes {layout.sizes} share chunks of {layout.ch} < {MIN_CHUNK} columns"
        )
    units = list(units) if units is not None else [1] * n_ops
    if sum(units) != n_ops or min(units) < 1:
        raise ValueError(f"units {units} must split the {n_ops} operators in runs of at least one")
    first_of = [sum(units[:u]) for u in range(len(units))]
    dev, dt = start.device, start.dtype
    f64 = torch.zeros((), dtype=torch.float64, device=dev)
    eps = 1e-10 if dt == torch.float64 else 1e-5
    tiny = torch.finfo(torch.float64).tiny
    has_above = above is not None
    has_budget = budget is not None and budget_above is not None
    wanted = list(active) if active is not None else [True] * n_ops
    # the state of the operators still present (``cur``: their indices), compacted when
    # whole units of them have stopped
    cur = list(range(n_ops))
    present = list(range(len(units)))
    lay = layout
    E, E64 = lay.E.to(dt), lay.E.to(torch.float64)
    ET = E.T.contiguous()
    floor_t = _per_op(floor, n_ops, f64, 0.0).square()
    above_t = _per_op(above, n_ops, f64, math.inf).square()
    below_t = _per_op(below, n_ops, f64, math.inf).square()
    minv_t = _per_op(min_value, n_ops, f64, math.inf).square()
    budget_t = _per_op(budget_above, n_ops, f64, math.inf).square() if has_budget else None
    done = ~torch.tensor(wanted, device=dev)
    cap = (max_passes + 1) * b
    # the basis, chunked (rows written before read); past the budget it grows as needed
    V = torch.empty((lay.C, (min(max_passes, budget or max_passes) + 1) * b, lay.ch), dtype=dt, device=dev)
    H = torch.zeros((n_ops, cap, cap), dtype=torch.float64, device=dev)
    theta_rec = torch.zeros((n_ops, cap), dtype=torch.float64, device=dev)  # at each one's stop
    S_rec = torch.zeros((n_ops, cap, cap), dtype=torch.float64, device=dev)
    stop_pass = torch.zeros(n_ops, dtype=torch.float64, device=dev)
    conv_at = torch.zeros(n_ops, dtype=torch.bool, device=dev)
    out = ManyResult([None] * n_ops, [None] * n_ops, [0.0] * n_ops, [0] * n_ops, [False] * n_ops, [0] * n_ops)

    def orthonormal(
        Zc: torch.Tensor, scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        """Each operator's rows of ``Zc`` (chunked) orthonormalised, dependent ones (norm
        at most ``eps * scale``; default scale: the largest row's) zero, and a function
        giving ``R`` with ``Z_i = R_i^T Q_i`` on the kept directions (what only a check
        reads)."""
        Zd = Zc.double()
        lam, U = torch.linalg.eigh(lay.dots(Zd, Zd, E64))  # (n, b) ascending, (n, b, b)
        if scale is None:
            scale = lam[:, -1].clamp_min(0).sqrt()
        keep = lam > (eps * scale).square().unsqueeze(1)
        Ut = U.transpose(1, 2)
        K = (keep * lam.clamp_min(tiny).rsqrt()).unsqueeze(2) * Ut
        return lay.combine(K.to(dt), Zc, ET), lambda: (keep * lam.clamp_min(0)).sqrt().unsqueeze(2) * Ut

    def harvest(positions: list[int], info: list[list[float]], rows: int) -> None:
        """The results of the present operators at ``positions`` (from the host copy
        ``info`` of the records), their vectors formed from the basis."""
        positions = [q for q in positions if wanted[cur[q]]]
        if not positions:
            return
        kk = {q: min(rows, max(k, int(info[4][q])) if min_value is not None else k) for q in positions}
        K = max(kk.values())
        coef = S_rec[:, :rows, :K].transpose(1, 2).to(dt)  # (n, K, rows)
        Y = lay.from_chunks(lay.combine(coef, V[:, :rows], ET))  # (K, N)
        values = theta_rec[:, :K].clamp_min(0).sqrt()
        for q in positions:
            i = cur[q]
            a = lay.offsets[q]
            out.values[i] = values[q, : kk[q]]
            out.vectors[i] = Y[: kk[q], a : a + lay.sizes[q]]
            out.top[i], out.passes[i] = math.sqrt(max(info[1][q], 0.0)), int(info[2][q])
            out.converged[i], out.count[i] = bool(info[3][q]), int(info[4][q]) if min_value is not None else 0

    V[:, :b] = orthonormal(lay.to_chunks(start), None)[0]
    passes = 0
    rows = 0
    live = list(wanted)
    while True:
        m, rows = passes * b, (passes + 1) * b
        if rows + b > V.shape[1]:
            V = torch.cat([V, V.new_empty((V.shape[0], min(V.shape[1], cap - V.shape[1]), lay.ch))], dim=1)
        G = gram(lay.from_chunks(V[:, m:rows]), live, present)
        passes += 1
        Gc, Vc = lay.to_chunks(G), V[:, :rows]
        c1 = lay.dots(Gc, Vc, E)  # (n, b, rows): the image's coefficients on the basis
        Z = Gc - lay.combine(c1, Vc, ET)
        c2 = lay.dots(Z, Vc, E)  # what rounding left (Gram-Schmidt, twice)
        Z = Z - lay.combine(c2, Vc, ET)
        H[:, :rows, m:rows] = (c1 + c2).transpose(1, 2)  # the upper triangle is what eigh reads
        # a direction is dependent when what is left of it is rounding noise of the image
        Q, R = orthonormal(Z, c1.abs().amax(dim=(1, 2)))
        V[:, rows : rows + b] = Q
        last = passes >= max_passes
        at_budget = passes == budget and passes >= min_passes  # (where a run without one ended)
        if not (last or at_budget or (passes >= min_passes and (passes - min_passes) % check_every == 0)):
            continue
        theta, S = torch.linalg.eigh(H[:, :rows, :rows], UPLO="U")
        theta, S = theta.flip(1), S.flip(2)  # descending
        res = torch.linalg.vector_norm(torch.bmm(R(), S[:, m:rows, :k]), dim=1)  # (n, k)
        top = theta[:, 0]
        conv = (res <= (tol * torch.maximum(top, floor_t)).unsqueeze(1)).all(dim=1)
        stop = conv | last if last else conv
        if has_above:
            stop = stop | ((top >= above_t) & (top < below_t))
        if budget is not None and budget_t is not None and passes >= budget:
            stop = stop | (top >= budget_t)
        new = stop & ~done
        theta_rec = torch.where(new.unsqueeze(1), F.pad(theta, (0, cap - rows)), theta_rec)
        S_rec = torch.where(new.view(-1, 1, 1), F.pad(S, (0, cap - rows, 0, cap - rows)), S_rec)
        stop_pass = torch.where(new, passes, stop_pass)
        conv_at = torch.where(new, conv, conv_at)
        done = done | stop
        count = (theta_rec >= minv_t.unsqueeze(1)).sum(dim=1, dtype=torch.float64)
        info = to_host(torch.stack([done.double(), theta_rec[:, 0], stop_pass, conv_at.double(), count]))
        finished = [bool(f) for f in info[0]]
        if last or all(finished):
            harvest(list(range(len(cur))), info, rows)
            return out
        live = [False] * n_ops
        for q, i in enumerate(cur):
            live[i] = not finished[q]
        # units whose operators have all stopped leave the basis once they hold a fair
        # share of its columns (fewer flops per pass; the same ops)
        pos = {i: q for q, i in enumerate(cur)}
        gone = [
            u for u in present if all(finished[pos[i]] for i in range(first_of[u], first_of[u] + units[u]))
        ]
        if sum(lay.sizes[pos[i]] for u in gone for i in range(first_of[u], first_of[u] + units[u])) < (
            compact * lay.N
        ):
            continue
        drop = [pos[i] for u in gone for i in range(first_of[u], first_of[u] + units[u])]
        harvest(drop, info, rows)
        keep = [q for q in range(len(cur)) if q not in set(drop)]
        kept_chunks = [c for q in keep for c in range(lay.offsets[q] // lay.ch, lay.offsets[q + 1] // lay.ch)]
        kq = torch.tensor(keep, device=dev)
        V = V.index_select(0, torch.tensor(kept_chunks, device=dev))
        H, theta_rec, S_rec = H.index_select(0, kq), theta_rec.index_select(0, kq), S_rec.index_select(0, kq)
        stop_pass, conv_at, done = (
            stop_pass.index_select(0, kq),
            conv_at.index_select(0, kq),
            done.index_select(0, kq),
        )
        floor_t, above_t = floor_t.index_select(0, kq), above_t.index_select(0, kq)
        below_t, minv_t = below_t.index_select(0, kq), minv_t.index_select(0, kq)
        budget_t = budget_t.index_select(0, kq) if budget_t is not None else None
        lay = FlatLayout([lay.sizes[q] for q in keep], device=dev, ch=lay.ch)
        E, E64 = lay.E.to(dt), lay.E.to(torch.float64)
        ET = E.T.contiguous()
        cur = [cur[q] for q in keep]
        present = [u for u in present if u not in gone]
