"""The Krylov basis and stopping rule of block Lanczos, against explicit matrices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastclip.linalg.krylov import KrylovBasis, StopRule, block_lanczos
from fastclip.linalg.operator import AffineOperator
from fastclip.spectral import lanczos, singular_values


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return A.T @ A


def _random(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return lambda c: torch.randn(c, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("block,fill", [(1, False), (3, False), (5, True)])
def test_residuals_from_the_projected_problem_are_the_true_ones_through_restarts(block, fill):
    # ||M y - theta y|| of every Ritz pair, computed explicitly, against ||R s_last||;
    # H against V M V^T; with a start of exact eigenvectors (dependent images, filled at
    # random) and restarts every few passes
    n = 90
    M = _spd(n, 0)
    ev, U = torch.linalg.eigh(M)
    if fill:
        X = torch.cat(
            [
                U[:, -9:-5].T,
                torch.randn(1, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
            ]
        )
    else:
        X = torch.randn(block, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rnd = _random(n)
    B = KrylovBasis(n, 30, torch.float64, torch.device("cpu"))
    B.start(X, rnd, exact=True)
    restarts = 0
    for _ in range(50):
        B.settle(B.pending @ M, rnd, exact=True)
        theta, S, res = B.ritz()
        V = B.V[: B.m]
        Vall = B.V[: B.m + B.b]
        torch.testing.assert_close(
            Vall @ Vall.T, torch.eye(Vall.shape[0], dtype=torch.float64), atol=1e-12, rtol=0
        )
        H = V @ M @ V.T
        torch.testing.assert_close(
            torch.triu(B.H[: B.m, : B.m]), torch.triu(H), atol=1e-9 * float(ev[-1]), rtol=0
        )
        Y = S.T @ V
        true = (Y @ M - theta[:, None] * Y).norm(dim=1)
        torch.testing.assert_close(res, true, atol=1e-9 * float(ev[-1]), rtol=1e-6)
        if B.m + 2 * B.b > 30:
            B.restart(theta, S, 12)
            restarts += 1
    assert restarts >= 2
    assert abs(float(theta[0]) - float(ev[-1])) <= 1e-8 * float(ev[-1])


def test_block_lanczos_converges_to_the_top_eigenvalues_and_counts_passes():
    n = 200
    M = _spd(n, 3)
    ev = torch.linalg.eigvalsh(M).flip(0)
    calls = []

    def gram(P):
        calls.append(P.shape[0])
        return P @ M

    rule = StopRule(k=3, tol=1e-10, max_passes=500)
    start = torch.randn(4, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = block_lanczos(gram, start, rule, n=n, max_basis=40, random=_random(n))
    assert out.converged and out.passes == len(calls)
    torch.testing.assert_close(out.theta[:3], ev[:3], rtol=1e-9, atol=0)
    Y = out.vectors
    torch.testing.assert_close((Y @ M).norm(dim=1), ev[:3], rtol=1e-4, atol=0)


def test_max_basis_too_small_for_the_block_is_refused():
    with pytest.raises(
        ValueError, match="max_basis=6 leaves no room for k=1 and blocks of 4; expected at least 13"
    ):
        block_lanczos(
            lambda P: P,
            torch.eye(4, 50, dtype=torch.float64),
            StopRule(k=1, tol=1e-6, max_passes=10),
            n=50,
            max_basis=6,
            random=_random(50),
        )


def test_predicted_checks_stop_within_a_few_passes_of_the_first_pass_that_meets_the_rule():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    op = AffineOperator(conv, (16, 16, 16))
    every = lanczos(op, k=1, with_left=False, generator=torch.Generator().manual_seed(0))
    predicted = lanczos(
        op, k=1, with_left=False, generator=torch.Generator().manual_seed(0), predict_checks=True
    )
    assert every.converged and predicted.converged
    assert every.passes <= predicted.passes <= every.passes + 8
    exact = float(singular_values(conv, (16, 16, 16), method="svds")[0])
    for r in (every, predicted):
        assert abs(float(r.values[0]) - exact) <= 1e-5 * exact


def _clustered(n: int) -> torch.Tensor:
    """A spectrum whose top is a cluster (what a clip leaves): slow to converge."""
    top = torch.tensor([1.0, 0.999, 0.998], dtype=torch.float64)
    return torch.cat([top, torch.linspace(0.99, 0.0, n - 3, dtype=torch.float64)])


def test_past_its_budget_an_estimate_stops_only_above_budget_above_and_else_converges():
    """Issue 38: an estimate cut at its pass budget lies below the top by more than its
    tolerance; with ``budget_above`` it stops there only when it is proven above that
    value, and otherwise goes on until it converges (or ``max_passes``)."""
    n = 400
    d = _clustered(n)
    start = torch.randn(1, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(**kw):
        rule = StopRule(k=1, tol=1e-6, min_passes=1, **kw)
        return block_lanczos(lambda P: P * d, start, rule, n=n, max_basis=40, random=_random(n))

    cut = run(max_passes=6)  # the old rule: a lower bound, off by more than the tolerance
    assert not cut.converged and cut.passes == 6 and cut.top < 1.0 - 1e-3
    kept = run(max_passes=300, budget=6, budget_above=1.01)  # below 1.01: the value is kept
    assert kept.converged and kept.passes > 6
    assert kept.top == pytest.approx(1.0, abs=1e-6)
    above = run(max_passes=300, budget=6, budget_above=0.5)  # proven above 0.5 at the budget
    assert not above.converged and above.passes == 6 and 0.5**2 <= above.top == cut.top
