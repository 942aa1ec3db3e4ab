"""Block Lanczos on ``A^T A``: the Krylov basis, the stopping rule and the loop.

The basis ``V`` (orthonormal rows, float32 at least) grows by one block per layer
pass. Each pass applies ``A^T A`` to the *pending* block ``P`` only, projects the image
``G`` on the basis (the coefficients are a column block of ``H = V A^T A V^T``, so the
projected matrix costs no pass), and orthogonalises what is left, ``Z = R^T P'``, into
the next pending block ``P'``. Every settled row's image then lies in
``span(V, P')``, so the residual of a Ritz pair ``(theta, y = V^T s)`` of ``H`` is
``||A^T A y - theta y|| = ||R s_last||``, with ``s_last`` the entries of ``s`` on the
last settled block: the stopping rule is read off the small projected problem, and no
Ritz vector is formed until the end (or a restart).

A thick restart keeps the best Ritz vectors; their images are ``theta y + P'^T R s``, so
the invariant holds and restarting costs no pass.

This is the three-term block Lanczos recurrence with full reorthogonalisation (classical
Gram-Schmidt, a second pass when the first cancelled most of a vector: Kahan's "twice
is enough"), written so that every product with the basis reads it once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastclip.linalg.syncs import to_host

__all__ = ["KrylovBasis", "StopRule", "KrylovResult", "block_lanczos"]


class KrylovBasis:
    """Settled rows ``V[:m]``, pending block ``V[m:m + b]`` and ``H = V A^T A V^T``
    (float64) in preallocated buffers of ``cap`` rows, so that any earlier state of the
    iteration is a prefix of them (what the lazy stopping rule rolls back to)."""

    def __init__(self, n: int, cap: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n, self.cap, self.dtype, self.device = n, cap, dtype, device
        self.V = torch.empty((cap, n), dtype=dtype, device=device)
        self.H = torch.zeros((cap, cap), dtype=torch.float64, device=device)
        self.m = 0  # settled rows (their images are projected)
        self.lo = 0  # first row the next image has a share of in exact arithmetic
        self.b = 0  # pending rows
        self.R: torch.Tensor | None = None  # (b, b_last): the pending block's share of the last image
        self.b_last = 0
        self.eps = 1e-10 if dtype == torch.float64 else 1e-5  # a numerically dependent direction
        self.tiny = torch.finfo(dtype).tiny

    # -- state -------------------------------------------------------------------
    @property
    def pending(self) -> torch.Tensor:
        return self.V[self.m : self.m + self.b]

    def state(self) -> tuple:
        return self.m, self.b, self.R, self.b_last, self.lo

    def restore(self, state: tuple) -> None:
        self.m, self.b, self.R, self.b_last, self.lo = state

    # -- building ----------------------------------------------------------------
    def _project_out(self, Z: torch.Tensor, rows: int) -> torch.Tensor:
        V = self.V[:rows]
        return Z - (Z @ V.T) @ V

    def start(
        self, Y: torch.Tensor, random: Callable[[int], torch.Tensor], exact: bool
    ) -> torch.Tensor | None:
        """The first pending block from the rows of ``Y``; with ``exact``, dependent rows are
        replaced by random ones on the host; otherwise returns a device flag that is True
        when that would have been needed (the caller then starts again exactly)."""
        Q, R = torch.linalg.qr(Y.T)
        d = torch.diagonal(R).abs()
        thr = self.eps * Y.norm(dim=1).max()
        if exact:
            good = to_host(d > thr)
            if not all(good):  # the rows before a dependent one span it: their QR, completed at random
                idx = [i for i, g in enumerate(good) if g]
                Qg = torch.linalg.qr(Y[idx].T)[0].T if idx else Y[:0]
                Q = self._fill(Qg, len(good), random, 0).T
        self.V[: Q.shape[1]] = Q.T
        self.m, self.b, self.R, self.b_last, self.lo = 0, Q.shape[1], None, 0, 0
        return None if exact else (d <= thr).any()

    def _fill(
        self, Q: torch.Tensor, b: int, random: Callable[[int], torch.Tensor], rows: int
    ) -> torch.Tensor:
        # Q (c < b orthonormal rows, orthogonal to V[:rows]) completed to b rows with
        # random directions, as far as the space has room
        room = self.n - rows
        for _ in range(8):  # (a random direction falls in the span with probability 0)
            if Q.shape[0] >= min(b, room):
                break
            Y0 = random(b - Q.shape[0])
            Y = Y0
            for _ in range(2):  # twice is enough
                Y = self._project_out(Y, rows)
                if Q.shape[0]:
                    Y = Y - (Y @ Q.T) @ Q
            q, r = torch.linalg.qr(Y.T)
            # what is left must be a fair part of the random vector: the remainder of one
            # that (numerically) lies in the span is rounding noise, not orthogonal to it
            keep = to_host(torch.diagonal(r).abs() > self.eps * Y0.norm(dim=1))
            Q = torch.cat([Q, q.T[[i for i, g in enumerate(keep) if g]]])
        return Q

    def settle(
        self, G: torch.Tensor, random: Callable[[int], torch.Tensor], exact: bool
    ) -> torch.Tensor | None:
        """Project the pending block's image ``G`` (b, n) on the basis, settle the block and
        make the next one from the remainder. ``exact``: the data-dependent choices (a
        second Gram-Schmidt pass, dependent directions) are made on the host; otherwise
        none is made and a device flag is returned that is True when one was needed
        (the caller redoes the pass exactly)."""
        m, b = self.m, self.b
        rows = m + b
        V = self.V[:rows]
        # In exact arithmetic the image has a share only of the last settled block and the
        # pending one (rows lo..: the three-term recurrence; after a restart, of every
        # kept Ritz vector). That local projection, then one full pass against the basis
        # for what rounding left (a second one when it cancelled most of the vector):
        # two reads of the basis per pass.
        lo = self.lo
        Vl = self.V[lo:rows]
        hl = Vl @ G.T
        Z = torch.addmm(G, hl.T, Vl, alpha=-1)
        zn = Z.norm(dim=1)
        hf = V @ Z.T
        Z = torch.addmm(Z, hf.T, V, alpha=-1)
        hf[lo:] += hl
        self.H[:rows, m:rows] = hf  # the upper triangle is what ritz() reads
        self.lo = m
        self.m, self.b_last = rows, b
        if rows >= self.n:
            self.b, self.R = 0, torch.zeros((0, b), dtype=torch.float64, device=self.device)
            return None if exact else torch.zeros((), dtype=torch.bool, device=self.device)
        nz = Z.norm(dim=1)
        if exact and b == 1:
            # (k = 1, what measurement runs): every decision from one read of three numbers
            nz1, zn1, hmax = to_host(torch.cat([nz, zn, hl.abs().amax().reshape(1)]))
            if nz1 < 0.7 * zn1:
                Z = Z - (Z @ V.T) @ V
                nz1 = float(to_host(Z.norm(dim=1))[0])
            if nz1 > self.eps * hmax:
                self.V[rows] = Z[0] / nz1
                self.b, self.R = 1, torch.full((1, 1), nz1, dtype=torch.float64, device=self.device)
                return None
        again = (nz < 0.7 * zn).any()
        if exact and bool(again):
            Z = Z - (Z @ V.T) @ V
            nz = Z.norm(dim=1)
        if b == 1:  # (k = 1, what training measures): a normalisation
            R = nz.reshape(1, 1)
            Q = Z.T / R.clamp_min(self.tiny)
        else:
            Q, R = torch.linalg.qr(Z.T)
        # a direction is dependent when what is left of it is rounding noise of the image
        # (whose norm is at least that of its share of the last settled block, |hl|)
        thr = self.eps * hl.abs().max()
        d = torch.diagonal(R).abs()
        room = self.n - rows
        if exact:
            if room < b or bool((d <= thr).any()):
                # an invariant subspace (or a block that lost rank): go on in random
                # directions, which the last image has (to rounding) no share of
                # (what is left of a dependent row lies in the span of the rows before it,
                # so the others span the remainder: their QR, completed at random, and
                # the remainder's shares of it)
                idx = [i for i, g in enumerate(to_host(d > thr)) if g][:room]
                Qg = torch.linalg.qr(Z[idx].T)[0].T if idx else Z[:0]
                Q = self._fill(Qg, b, random, rows).T
                R = Q.T @ Z.T
            bad = None
        else:
            bad = (d <= thr).any() | again
            if room < b:
                bad = bad | True
        self.V[rows : rows + Q.shape[1]] = Q.T
        self.b, self.R = Q.shape[1], R.double()
        return bad

    def _R(self) -> torch.Tensor:
        if self.R is None:
            raise RuntimeError(
                "the Krylov basis has no image yet: settle a pass before reading its Ritz pairs"
            )
        return self.R

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ritz values (descending), coefficients (columns) and residual norms."""
        theta, S = torch.linalg.eigh(self.H[: self.m, : self.m], UPLO="U")
        theta, S = theta.flip(0), S.flip(1)
        last = S[self.m - self.b_last : self.m]
        R = self._R()
        res = (R @ last).norm(dim=0) if R.shape[0] else torch.zeros_like(theta)
        return theta, S, res

    def vectors(self, S: torch.Tensor, m: int | None = None) -> torch.Tensor:
        """The rows ``S^T V[:m]`` (Ritz vectors for Ritz coefficients ``S``)."""
        m = self.m if m is None else m
        return S.T.to(self.dtype) @ self.V[:m]

    def restart(self, theta: torch.Tensor, S: torch.Tensor, keep: int) -> None:
        """Thick restart: keep the ``keep`` best Ritz vectors and the pending block."""
        m, b = self.m, self.b
        last = S[m - self.b_last : m, :keep]
        Y = self.vectors(S[:, :keep])
        P = self.V[m : m + b].clone()
        self.V[:keep] = Y
        self.V[keep : keep + b] = P
        self.H[: keep + b, : keep + b] = 0
        self.H[:keep, :keep] = torch.diag(theta[:keep])
        C = self._R() @ last  # (b, keep): the pending block's share of the kept vectors' images
        self.H[:keep, keep : keep + b] = C.T  # (upper triangle)
        self.m, self.lo = keep, 0


@dataclass(frozen=True)
class StopRule:
    """When block Lanczos stops.

    * converged: after ``min_passes`` passes, every one of the top ``k`` Ritz residuals
      is at most ``tol * max(theta_1, floor^2)`` (``theta = sigma^2``); this bounds the
      relative error of ``sigma_i^2`` by ``tol``, hence of ``sigma_i`` by ``tol / 2``.
    * above: after ``min_passes`` passes, ``theta_1 >= above^2`` (and ``< below^2`` when
      given). Ritz values never exceed the true ones, so this proves
      ``sigma_1 >= above``.
    * over budget: after ``budget`` passes, ``theta_1 >= budget_above^2`` (a proof of
      ``sigma_1 >= budget_above`` too). A caller that acts alike on every value above a
      threshold stops there; an estimate still below it goes on to convergence, since
      its value is the one the caller keeps.
    * ``max_passes`` reached (``converged`` False: a lower bound only).

    With ``predict`` the rule is checked only at the passes :meth:`next_check` names
    (for a caller that wants sigma_1 converged and nothing else).
    """

    k: int
    tol: float
    max_passes: int
    min_passes: int = 1
    floor: float = 0.0
    above: float | None = None
    below: float | None = None
    predict: bool = False  # check only where the residuals' rate predicts a stop (host reads)
    budget: int | None = None
    budget_above: float | None = None

    def next_check(
        self, passes: int, res: torch.Tensor, theta: torch.Tensor, last: tuple[int, float] | None
    ) -> tuple[int, tuple[int, float]]:
        """With ``predict``: the next pass worth checking, and this check's (pass, residual
        ratio) to pass back in as ``last`` at the next one. Lanczos residuals fall about
        geometrically, so the rate between two checks predicts the pass where the
        tolerance is reached; checking at 70 % of the way there (the next pass at least,
        ten passes ahead at most) solves the projected problem a few times instead of at
        every pass, and stops at most a few passes past the first pass where the rule
        held (a result as accurate or more). Reads the residuals back (host)."""
        thr = self.tol * max(float(theta[0]), self.floor**2, 1e-300)
        ratio = float(res[: self.k].max()) / thr
        now = (passes, ratio)
        if last is None or ratio <= 1 or last[1] <= ratio or passes <= last[0]:
            return passes + 1, now
        rate = math.log(last[1] / ratio) / (passes - last[0])  # e-folds per pass
        return passes + min(max(1, int(0.7 * math.log(ratio) / rate)), 10), now

    def flags(self, theta: torch.Tensor, res: torch.Tensor, passes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(converged, above) as float64 device scalars: no host read."""
        zero = theta.new_zeros(())
        if passes < self.min_passes:
            return zero, zero
        thr = self.tol * theta[0].clamp_min(max(self.floor**2, 1e-300))
        conv = (res[: self.k] <= thr).all().to(theta.dtype)
        above = None
        if self.above is not None:
            above = theta[0] >= self.above**2
            if self.below is not None:
                above = above & (theta[0] < self.below**2)
        if self.budget is not None and self.budget_above is not None and passes >= self.budget:
            over = theta[0] >= self.budget_above**2
            above = over if above is None else above | over
        return conv, zero if above is None else above.to(theta.dtype)


@dataclass
class KrylovResult:
    theta: torch.Tensor  # Ritz values of the stopping pass, descending
    vectors: torch.Tensor  # the top ``count`` Ritz vectors, rows
    passes: int
    converged: bool
    top: float  # theta_1 read back to the host
    count: int  # Ritz values at least ``min_value^2`` (0 without min_value)
    history: list[float] = field(default_factory=list)  # sigma_1 after each pass


def block_lanczos(
    gram: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    rule: StopRule,
    *,
    n: int,
    max_basis: int,
    random: Callable[[int], torch.Tensor],
    check_every: int = 1,
    min_value: float | None = None,
    record_history: bool = False,
) -> KrylovResult:
    """Block Lanczos on the symmetric positive semi-definite map ``gram`` (rows in, rows
    out: ``(b, n) -> (b, n)``) from the rows of ``start``, until ``rule`` stops it.

    ``max_basis`` rows trigger a thick restart that keeps half of them. The stopping
    rule is evaluated on the device at every pass and read back every ``check_every``
    passes (and before a restart, which overwrites the basis); the result is that of
    the first pass where it held, from that pass's basis (a prefix of the buffers).
    With ``check_every > 1`` the data-dependent choices of a pass are made on the
    device; a pass that needed the host (a dependent direction) is redone exactly.
    ``random(c)`` gives ``c`` random rows (float, on the device).
    """
    b0 = start.shape[0]
    k = rule.k
    restarts = max_basis < n
    cap = max_basis if restarts else n
    if restarts and max_basis < k + 3 * b0:
        raise ValueError(
            f"max_basis={max_basis} leaves no room for k={k} and blocks of {b0}; "
            f"expected at least {k + 3 * b0}"
        )
    keep = min(max(k + b0, max_basis // 2), max_basis - 2 * b0)
    lazy = check_every > 1
    basis = KrylovBasis(n, cap, start.dtype, start.device)
    mv2 = None if min_value is None else float(min_value) ** 2

    def run(exact_start: bool) -> KrylovResult | None:
        start_bad = basis.start(start, random, exact=exact_start or not lazy)
        passes = 0
        history: list[float] = []
        pending: list[dict[str, Any]] = []
        skip_to, last_check = 0, None
        exact_next = not lazy
        while True:
            before = basis.state()
            G = gram(basis.pending)
            passes += 1
            bad = basis.settle(G, random, exact=exact_next)
            if start_bad is not None:
                bad, start_bad = (start_bad if bad is None else bad | start_bad), None
            exact_pass, exact_next = exact_next, not lazy
            forced = basis.b == 0
            restart = restarts and basis.m + 2 * basis.b > cap
            at_budget = passes == rule.budget and passes >= rule.min_passes  # (where one without it ended)
            if passes < skip_to and not (forced or restart or at_budget or passes >= rule.max_passes):
                continue  # (predicted not to stop here: no Ritz problem solved)
            theta, S, res = basis.ritz()
            if rule.predict and not lazy and passes >= rule.min_passes:
                skip_to, last_check = rule.next_check(passes, res, theta, last_check)
            conv, above = rule.flags(theta, res, passes)
            rec: dict[str, Any] = {
                "p": passes,
                "m": basis.m,
                "theta": theta,
                "S": S,
                "before": before,
                "flags": torch.stack(
                    [
                        conv,
                        above,
                        bad.to(theta.dtype) if bad is not None else theta.new_zeros(()),
                        (theta >= mv2).sum().to(theta.dtype) if mv2 is not None else theta.new_zeros(()),
                        theta[0],
                    ]
                ),
            }
            pending.append(rec)
            due = passes >= rule.min_passes and (passes - rule.min_passes) % check_every == 0
            if not (exact_pass or forced or restart or due or at_budget or passes >= rule.max_passes):
                continue
            rows = to_host(torch.stack([r["flags"] for r in pending]))
            got: tuple[str, dict[str, Any], Any] | None = None
            for r, row in zip(pending, rows):
                if record_history and r["p"] > len(history):
                    history.append(math.sqrt(max(row[4], 0.0)))
                if row[2]:
                    got = ("bad", r, row)
                    break
                if row[0] or row[1] or r["p"] >= rule.max_passes or (r is rec and forced):
                    got = ("stop", r, row)
                    break
            pending.clear()
            if got is not None and got[0] == "bad":
                if got[1]["p"] == 1 and not exact_start:
                    return None  # the lazy start was off the common path: start again, exactly
                basis.restore(got[1]["before"])
                passes, exact_next = got[1]["p"] - 1, True
                del history[passes:]
                continue
            if got is not None:
                _, r, row = got
                count = int(row[3]) if mv2 is not None else 0
                kk = max(k, count)
                return KrylovResult(
                    theta=r["theta"],
                    vectors=basis.vectors(r["S"][:, :kk], r["m"]),
                    passes=r["p"],
                    converged=bool(row[0]) or (r is rec and forced),
                    top=float(row[4]),
                    count=count,
                    history=history,
                )
            if restart:
                basis.restart(theta, S, keep)

    out = run(False)
    if out is None:
        out = run(True)
    if out is None:  # only the lazy start gives up; the exact one always returns
        raise RuntimeError("block Lanczos: the exact start returned no result")
    return out
