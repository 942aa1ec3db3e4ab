"""Lockstep block Lanczos over many operators (fastclip.linalg.lockstep): each operator's top
singular values against its explicit matrix's SVD (float64), the per-operator stopping
rule, dependent directions, and what a pass costs in dispatched ops (a budget)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastclip.exact import exact_singular_values
from fastclip.linalg.lockstep import FlatLayout, lanczos_many
from fastclip.linalg.opcount import OpCounter
from fastclip.linalg.operator import AffineOperator


def _ops() -> list[AffineOperator]:
    """Equal and different shapes: two equal convs, a strided circular one, a grouped one,
    a dilated one, a linear."""
    torch.manual_seed(0)
    layers = [
        (nn.Conv2d(8, 8, 3, padding=1), (8, 8, 8)),
        (nn.Conv2d(8, 8, 3, padding=1), (8, 8, 8)),
        (nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode="circular"), (8, 8, 8)),
        (nn.Conv2d(4, 4, 3, padding=1, groups=2), (4, 8, 8)),
        (nn.Conv2d(4, 6, 3, padding=2, dilation=2), (4, 8, 8)),
        (nn.Linear(64, 10), (64,)),
    ]
    return [AffineOperator(m.double(), shape) for m, shape in layers]


def _gram_of(ops: list[AffineOperator], layout: FlatLayout):
    def gram(P: torch.Tensor, live: list[bool], present: list[int]) -> torch.Tensor:
        assert len(live) == len(ops) and any(live[i] for i in present)
        here = [ops[i] for i in present]
        parts = FlatLayout([op.n for op in here], ch=layout.ch).split(P)
        return torch.cat(
            [op.gram(p.reshape(-1, *op.input_shape)).reshape(p.shape[0], -1) for op, p in zip(here, parts)],
            dim=1,
        )

    return gram


@pytest.fixture(scope="module")
def ops_and_truth():
    ops = _ops()
    truth = [exact_singular_values(op.module, op.input_shape).double() for op in ops]
    return ops, truth


def test_layout_chunks_and_segmented_products():
    layout = FlatLayout([64, 128, 192])
    assert (layout.ch, layout.C, layout.N) == (64, 6, 384)
    assert layout.E.sum(1).tolist() == [1, 2, 3]
    A, B = torch.randn(3, 384, dtype=torch.float64), torch.randn(2, 384, dtype=torch.float64)
    E = layout.E.double()
    D = layout.dots(layout.to_chunks(A), layout.to_chunks(B), E)
    for i, (a, b) in enumerate(zip(layout.split(A), layout.split(B))):
        torch.testing.assert_close(D[i], a @ b.T)
    K = torch.randn(3, 4, 2, dtype=torch.float64)
    out = layout.from_chunks(layout.combine(K, layout.to_chunks(B), E.T.contiguous()))
    for i, (o, b) in enumerate(zip(layout.split(out), layout.split(B))):
        torch.testing.assert_close(o, K[i] @ b)
    with pytest.raises(ValueError, match="positive operator sizes"):
        FlatLayout([])
    assert not FlatLayout([64, 65]).usable()


@pytest.mark.parametrize("compact", [0.0, 1.1], ids=["compacted", "never-compacted"])
def test_every_operator_converges_to_its_exact_top_singular_values(ops_and_truth, compact):
    ops, truth = ops_and_truth
    layout = FlatLayout([op.n for op in ops])
    torch.manual_seed(1)
    gram, seen = _gram_of(ops, layout), []

    def recording(P: torch.Tensor, live: list[bool], present: list[int]) -> torch.Tensor:
        seen.append(list(present))
        # the two equal convs form one unit: both present, or neither
        return gram(P, live, [i for u in present for i in ([0, 1] if u == 0 else [u + 1])])

    r = lanczos_many(
        recording,
        torch.randn(5, layout.N, dtype=torch.float64),
        layout,
        k=3,
        tol=1e-10,
        max_passes=60,
        min_value=0.3,
        units=[2, 1, 1, 1, 1],
        compact=compact,
    )
    # compacted: the linear's unit leaves the basis once it has stopped; else every unit stays
    assert (seen[-1] != [0, 1, 2, 3, 4]) == (compact == 0.0)
    assert all(s == [0, 1, 2, 3, 4] for s in seen) == (compact > 1)
    for i, s in enumerate(truth):
        assert r.converged[i], i
        assert r.top[i] == pytest.approx(float(s[0]), rel=1e-8)
        assert r.count[i] == int((s >= 0.3).sum()) or r.count[i] <= int((s >= 0.3).sum())
        torch.testing.assert_close(r.values[i][:3], s[:3], rtol=1e-6, atol=0)
        # the right vectors: unit, and A^T A v = sigma^2 v
        op = ops[i]
        v = r.vectors[i][:3].reshape(3, *op.input_shape)
        torch.testing.assert_close(v.reshape(3, -1).norm(dim=1), torch.ones(3, dtype=torch.float64))
        g = op.gram(v).reshape(3, -1)
        torch.testing.assert_close(g, (s[:3] ** 2).unsqueeze(1) * v.reshape(3, -1), rtol=0, atol=1e-5)
    # operators stop on their own: the linear (64 inputs, rank 10) long before the convs
    assert r.passes[5] < max(r.passes[:5])


def test_float32_basis_reaches_the_clip_step_tolerance(ops_and_truth):
    ops, truth = ops_and_truth
    ops32 = [AffineOperator(op.module.float(), op.input_shape) for op in ops]
    layout = FlatLayout([op.n for op in ops32])
    torch.manual_seed(2)
    r = lanczos_many(_gram_of(ops32, layout), torch.randn(5, layout.N), layout, tol=1e-3, max_passes=15)
    for i, s in enumerate(truth):
        # tol bounds the relative error of sigma^2 by 1e-3 when converged
        assert r.top[i] <= float(s[0]) * (1 + 1e-5)
        if r.converged[i]:
            assert r.top[i] == pytest.approx(float(s[0]), rel=1e-3)
    for op in ops:
        op.module.double()


def test_stop_above_proves_a_lower_bound_and_inactive_operators_never_hold_the_run(ops_and_truth):
    ops, truth = ops_and_truth
    layout = FlatLayout([op.n for op in ops])
    gram = _gram_of(ops, layout)
    start = torch.randn(5, layout.N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    low = [0.5 * float(s[0]) for s in truth]
    r = lanczos_many(gram, start, layout, tol=1e-14, max_passes=40, min_passes=3, above=low)
    for i, s in enumerate(truth):
        assert (
            r.passes[i] == 3
        )  # proven above at the first check (the linear's rank-10 space is exhausted there)
        assert r.converged[i] == (i == 5)
        assert low[i] <= r.top[i] <= float(s[0]) * (1 + 1e-12)
    # below: a value above it must be converged instead
    r = lanczos_many(gram, start, layout, tol=1e-9, max_passes=60, min_passes=3, above=low, below=low)
    assert all(r.converged) and all(p > 3 for p in r.passes[:5])
    # only the linear is wanted: the run stops when it converges, however far the others are
    active = [False] * 5 + [True]
    r = lanczos_many(gram, start, layout, tol=1e-12, max_passes=60, active=active)
    assert r.converged[5] and r.top[5] == pytest.approx(float(truth[5][0]), rel=1e-10)
    assert r.passes[5] < 60


def test_an_exhausted_krylov_space_gives_zero_directions_not_garbage():
    """A rank-2 linear on 64 inputs: after one pass the space is exhausted (the dependent
    directions become zero rows) and the run still returns the exact values."""
    torch.manual_seed(4)
    lin = nn.Linear(64, 2, bias=False).double()
    op = AffineOperator(lin, (64,))
    layout = FlatLayout([64])
    r = lanczos_many(
        _gram_of([op], layout), torch.randn(4, 64, dtype=torch.float64), layout, k=2, max_passes=20
    )
    s = torch.linalg.svdvals(lin.weight)
    assert r.converged[0] and all(math.isfinite(v) for v in r.values[0].tolist())
    assert r.vectors[0].shape == (2, 64)
    torch.testing.assert_close(r.values[0][:2], s, rtol=1e-10, atol=0)


def test_a_pass_costs_the_same_ops_for_two_operators_or_six(ops_and_truth):
    """The point of the lockstep: its per-pass bookkeeping does not grow with the operators
    (only the results, a few views per operator at the end, do)."""
    ops, _ = ops_and_truth

    def count(sel: list[AffineOperator], passes: int) -> int:
        layout = FlatLayout([op.n for op in sel])
        G = torch.randn(5, layout.N, dtype=torch.float64)
        with OpCounter() as c:  # (tol < 0: no operator ever stops before max_passes)
            r = lanczos_many(
                lambda P, live, present: G * 1.0, G, layout, tol=-1.0, max_passes=passes, check_every=4
            )
        assert r.passes == [passes] * len(sel)
        return c.count

    per_pass_two = (count(ops[:2], 13) - count(ops[:2], 5)) / 8
    per_pass_six = (count(ops, 13) - count(ops, 5)) / 8
    assert per_pass_two == per_pass_six
    assert per_pass_six < 75  # the per-layer estimate's bookkeeping costs ~75 ops per pass per layer


def test_past_the_budget_only_operators_below_budget_above_go_on_and_the_basis_grows():
    """Issue 38: the lockstep's budget rule, per operator. Two operators with the same
    clustered top: one is proven above its ``budget_above`` at the budget and stops there
    (unconverged, the value the old ``max_passes`` cut); the other goes on, past the basis
    first allocated, until it converges on the top."""
    top = torch.tensor([1.0, 0.999, 0.998], dtype=torch.float64)
    d = torch.cat([top, torch.linspace(0.99, 0.0, 253, dtype=torch.float64)])
    layout = FlatLayout([256, 256])

    def gram(P: torch.Tensor, live: list[bool], present: list[int]) -> torch.Tensor:
        return P * torch.cat([d] * len(present))

    start = torch.randn(2, 1, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    start = torch.cat([start, start], dim=2).squeeze(1)  # the same start for both
    r = lanczos_many(
        gram, start, layout, tol=1e-6, max_passes=100, budget=4, budget_above=[0.5, 1.01], check_every=4
    )
    assert r.passes[0] == 4 and not r.converged[0] and 0.5 <= r.top[0] < 1.0 - 1e-4
    assert r.converged[1] and r.passes[1] > 4
    assert r.top[1] == pytest.approx(1.0, abs=1e-6)
