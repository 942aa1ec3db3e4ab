"""Batched per-step tracking (fastclip.batched): the per-layer PowerQR iteration of every
wrapper, grouped by layer signature, returns the same sigma and vectors; and what it
saves, counted in dispatched aten ops (deterministic: a budget, never a time)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastclip.pipeline.methods as methods
from fastclip.batched import BatchedTracker, attach, tracker_of
from fastclip.linalg.opcount import OpCounter
from fastclip.pipeline.models.layers import ConvBN
from fastclip.pipeline.training import TrainConfig, build_model, make_optimizer, resolve
from fastclip.wrapper import SpectralNorm


class Mixed(nn.Module):
    """Layers of equal and of different signatures: three equal Conv+BN pairs (one
    group of three), a stride-2 pair, a circular-padding conv, a grouped conv, two equal
    linears."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, 8, 3, padding=1)
        self.same = nn.ModuleList([ConvBN(8, 8, 3, padding=1) for _ in range(3)])
        self.down = ConvBN(8, 16, 3, stride=2, padding=1)
        self.circ = nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular", bias=False)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(16 * 4 * 4, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for layer in self.same:
            x = torch.relu(layer(x))
        x = torch.relu(self.grouped(torch.relu(self.circ(torch.relu(self.down(x))))))
        x = nn.functional.avg_pool2d(x, 2).flatten(1)
        return self.fc1(x) + self.fc2(x)


def _wrapped(model_seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The same FastClip-wrapped model twice: per-layer (no tracker) and batched."""
    torch.manual_seed(model_seed)
    m = methods.get("fastclip", mode="wBN", init_delay=10**6, init_pqr_iter=5)
    model = m.prepare(Mixed(), (3, 16, 16))
    per_layer = copy.deepcopy(model)
    per_layer._forward_pre_hooks.clear()
    assert tracker_of(model) is not None and tracker_of(per_layer) is None
    return per_layer, model


def _train(model: nn.Module, steps: int) -> None:
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        loss = model(torch.rand(3, 3, 16, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _wrappers(model: nn.Module) -> dict[str, SpectralNorm]:
    return {f"{w.identifier}/{w.kind}": w for w in model.modules() if isinstance(w, SpectralNorm)}


def test_batched_tracking_equals_the_per_layer_iteration():
    per_layer, batched = _wrapped()
    _train(per_layer, 6)
    _train(batched, 6)
    tracker = tracker_of(batched)
    # groups: the three equal pairs in one (conv and composition rows), every other
    # signature alone (stem, down, circular, grouped) and the two linears together
    sizes = sorted((g.kind, g.G, g.rows) for g in tracker.groups)
    assert sizes == sorted(
        [("conv", 1, 2), ("conv", 3, 2), ("conv", 1, 2), ("conv", 1, 1), ("conv", 1, 1), ("linear", 2, 1)]
    )
    a, b = _wrappers(per_layer), _wrappers(batched)
    assert a.keys() == b.keys()
    for name in a:
        sa, sb = float(a[name].sigma), float(b[name].sigma)
        assert sb == pytest.approx(sa, rel=1e-4), name
        assert sa > 0.05, name  # a real value, not an untouched buffer
        if a[name].kind != "bn":
            assert torch.allclose(a[name].vectors, b[name].vectors, atol=1e-4), name
            assert int(b[name].step) == 6 and b[name].schedule.step == 6
    # the batched wrappers' buffers are views of the tracker's (state_dict still works)
    state = batched.state_dict()
    fresh = copy.deepcopy(per_layer)
    fresh.load_state_dict(state)
    for name, w in _wrappers(fresh).items():
        assert float(w.sigma) == float(b[name].sigma)


def test_tracker_rebuilds_when_a_wrapper_restarts_and_attach_is_idempotent():
    _, model = _wrapped()
    tracker = tracker_of(model)
    assert attach(model) is tracker and isinstance(tracker, BatchedTracker)
    _train(model, 2)
    # the three equal convs' weights are views of their group's stack: no copy per step
    group = next(g for g in tracker.groups if g.G == 3)
    convs = [layer.module.conv.module for layer in model.same]
    assert [c.weight.data_ptr() for c in convs] == [group.W[i * 8 : (i + 1) * 8].data_ptr() for i in range(3)]
    w = model.same[1]
    w.vectors = w.vectors.clone()  # e.g. a buffer replaced by hand or by .to()
    convs[2].weight.data = convs[2].weight.data.clone()  # a weight replaced (e.g. load with assign=True)
    before = convs[2].weight.detach().clone()
    _train(model, 2)
    assert tracker._valid([m for m in model.modules() if isinstance(m, SpectralNorm)])
    assert any(v is w.vectors for _, v, _ in tracker._plan["views"])
    group = next(g for g in tracker.groups if g.G == 3)
    assert convs[2].weight.data_ptr() == group.W[16:24].data_ptr()
    assert not torch.equal(convs[2].weight, before)  # the optimiser still trains the weight


def _plain_step_ops(method: str, mode: str) -> int:
    cfg = resolve(
        TrainConfig(
            dataset="cifar",
            model="ResNet18",
            method=method,
            mode=mode,
            batch_size=2,
            lr=0.05,
            momentum=0.9,
            method_args={"init_delay": 10**6, "init_pqr_iter": 2} if method == "fastclip" else {},
        )
    )
    model, m = build_model(cfg, "cpu")
    opt = make_optimizer(cfg, model)
    counts = []
    for i in range(4):  # step 0 starts the wrappers, step 1 builds the tracker's plan
        x, y = torch.rand(2, 3, 32, 32), torch.tensor([1, 2])
        with OpCounter() as ops:
            loss = nn.functional.cross_entropy(model(x), y) + m.penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            m.after_step(model, i)
        counts.append(ops.count)
    assert counts[2] == counts[3]  # deterministic
    return counts[3]


@pytest.mark.parametrize("mode", ["wBN", "noBN"])
def test_fastclip_plain_step_dispatches_at_most_1_2_times_orig_ops(mode):
    # issue 27: per layer, FastClip's plain step dispatched 4x orig's ops (2180 vs 546 on
    # ResNet18 wBN), each a kernel launch on a GPU; batched, about 1.13x
    orig, fast = _plain_step_ops("orig", mode), _plain_step_ops("fastclip", mode)
    assert fast <= 1.2 * orig, (fast, orig)


def test_the_clip_step_of_every_wrapper_runs_in_lockstep_and_bounds_every_layer(monkeypatch):
    """At a clip step (on a GPU, by default) the tracker makes every due wrapper's estimates
    together (convs and linears, then the compositions): no layer is estimated alone, and
    afterwards every conv, linear and Conv+BN composition is at most 1.01 c by its
    explicit matrix."""
    import fastclip.batched as batched_module
    import fastclip.wrapping.lockstep_clip as lockstep_clip
    from fastclip.exact import exact_singular_values
    from fastclip.wrapping.clip_step import ClipStep

    monkeypatch.setitem(batched_module.LOCKSTEP_CLIPS, "cpu", True)  # (a GPU's default)
    torch.manual_seed(0)
    m = methods.get("fastclip", mode="wBN", clip=1.0, init_delay=0, clip_steps=6, init_pqr_iter=20)
    model = m.prepare(Mixed(), (3, 16, 16))
    lockstep_runs, alone = [], []
    run_many = lockstep_clip.lanczos_many  # (the lockstep clip step's, which it reads there)
    monkeypatch.setattr(
        lockstep_clip,
        "lanczos_many",
        lambda *a, **kw: lockstep_runs.append(kw["active"]) or run_many(*a, **kw),
    )
    measure = ClipStep.measure
    monkeypatch.setattr(
        ClipStep, "measure", lambda self, q: alone.append(self.w.identifier) or measure(self, q)
    )
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 16, 16, generator=g)
    y = torch.randn(6, 32, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(6):  # steps 0-5 (a clip at 0), each pushing the weights up
        loss = -(model(x) * y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    clipped = {
        f"{w.identifier}/{w.kind}": w
        for w in model.modules()
        if isinstance(w, SpectralNorm) and w.clip_flag and w.kind in ("conv", "linear", "composition")
    }
    assert len(clipped) == 14  # 7 convs, 5 compositions, 2 linears

    def exact() -> dict[str, float]:
        model.eval()
        out = {n: float(exact_singular_values(w, w.shape, k=1)[0]) for n, w in clipped.items()}
        model.train()
        return out

    before = exact()
    assert sum(s > 1.01 for s in before.values()) >= 5, before
    lockstep_runs.clear()
    alone.clear()  # (step 0 clipped layer by layer: the wrappers start in their first forward)
    # step 6: the clip step, which the forward pre-hook runs (called alone: the forward
    # would then move BN's running statistics, hence the compositions, past the clip)
    assert tracker_of(model).step()
    after = exact()
    assert max(after.values()) <= 1.01, after
    assert not alone
    # the first estimates of a phase hold every due wrapper of their rows
    assert len(lockstep_runs) >= 2 and sum(lockstep_runs[0]) == 9  # 7 convs and 2 linears
    assert any(sum(a) == 5 for a in lockstep_runs)  # the 5 compositions
    # each wrapper's sigma is its clip's estimate, within the tolerance of the exact value
    for n, w in clipped.items():
        assert float(w.sigma) == pytest.approx(after[n], rel=2e-3), n


class ThreeConvs(nn.Module):
    """Three equal small convolutions (one lockstep group) and a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1, bias=False) for _ in range(3)])
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("lockstep", [True, False])
def test_the_sigma_a_clip_records_is_converged_even_past_the_pass_budget(lockstep, monkeypatch):
    """Issue 38: a clip leaves a clustered top of the spectrum, and an estimate cut at
    ``refine_iter`` passes lay below sigma_1 by more than its tolerance (by BLAS path: 4e-3
    on MKL's generic one), yet the wrapper recorded it. With a pass budget of 3 every kept
    estimate needs more: the recorded sigma must still be the explicit matrix's to the
    tolerance (refine_tol = 1e-3 relative to c = 1; it was 0.7 % to 2.4 % off)."""
    import fastclip.batched as batched_module
    import fastclip.wrapping.lockstep_clip as lockstep_clip
    from fastclip.exact import exact_singular_values

    monkeypatch.setitem(batched_module.LOCKSTEP_CLIPS, "cpu", lockstep)
    runs = []
    run_many = lockstep_clip.lanczos_many
    monkeypatch.setattr(
        lockstep_clip, "lanczos_many", lambda *a, **kw: runs.append(kw["budget"]) or run_many(*a, **kw)
    )
    torch.manual_seed(0)
    m = methods.get(
        "fastclip", mode="noBN", clip=1.0, init_delay=0, clip_steps=2, init_pqr_iter=20, refine_iter=3
    )
    model = m.prepare(ThreeConvs(), (4, 6, 6))
    x = torch.rand(2, 4, 6, 6)
    model(x)  # step 0: the wrappers start and clip
    convs = {w.identifier: w for w in model.modules() if isinstance(w, SpectralNorm) and w.kind == "conv"}
    with torch.no_grad():
        for w in convs.values():
            w.module.weight.mul_(1.6)  # far enough above c for fit rounds, below the rescale
    model(x)
    assert tracker_of(model).step()  # step 2: the clip step
    assert bool(runs) == lockstep and set(runs) <= {3}
    for name, w in convs.items():
        exact = float(exact_singular_values(w, w.shape, k=1)[0])
        assert exact <= 1.01, name
        assert float(w.sigma) == pytest.approx(exact, rel=1e-3), name


def test_on_the_cpu_each_wrapper_clips_alone_by_default(monkeypatch):
    """Where an op costs its flops only (the CPU), the per-layer estimates, each stopping at
    its own pass, are cheaper: the tracker leaves the clips to the wrappers."""
    import fastclip.batched as batched_module
    import fastclip.wrapping.lockstep_clip as lockstep_clip
    from fastclip.wrapping.clip_step import ClipStep

    assert not batched_module.lockstep_clips("cpu") and batched_module.lockstep_clips("cuda")
    calls, alone = [], []
    monkeypatch.setattr(lockstep_clip, "lanczos_many", lambda *a, **kw: calls.append(1))
    measure = ClipStep.measure
    monkeypatch.setattr(
        ClipStep, "measure", lambda self, q: alone.append(self.w.identifier) or measure(self, q)
    )
    torch.manual_seed(0)
    m = methods.get("fastclip", mode="wBN", clip=1.0, init_delay=0, clip_steps=2, init_pqr_iter=5)
    model = m.prepare(Mixed(), (3, 16, 16))
    _train(model, 3)  # clips at steps 0 and 2
    assert tracker_of(model)._plan is not None and not calls
    assert {"stem.conv", "fc1", "fc2"} <= set(alone)


def _clip_step_ops(lockstep: bool, monkeypatch) -> int:
    import fastclip.batched as batched_module
    from fastclip import spectral

    monkeypatch.setitem(batched_module.LOCKSTEP_CLIPS, "cpu", lockstep)
    monkeypatch.setitem(spectral.CHECK_EVERY, "cpu", spectral.CHECK_EVERY["default"])  # a GPU's checks
    torch.manual_seed(0)
    m = methods.get("fastclip", mode="wBN", clip=1.0, init_delay=0, clip_steps=4, init_pqr_iter=20)
    model = m.prepare(Mixed(), (3, 16, 16))
    _train(model, 4)  # steps 0-3; step 4 clips
    with OpCounter() as ops:
        assert tracker_of(model).step()
    return ops.count


def test_the_lockstep_clip_step_dispatches_a_fraction_of_the_per_layer_ops(monkeypatch):
    """14 clipped operators (7 convs, 5 compositions, 2 linears): the estimates of the
    per-layer clips cost ~75 ops per pass per layer, the lockstep's ~60 per pass for all.
    (6,378 against 14,008 when written; 7,823 against 15,101 since the estimates whose
    value a wrapper keeps converge past the pass budget, issue 38: the lockstep's passes
    past it serve one or two layers.)"""
    lockstep, per_layer = _clip_step_ops(True, monkeypatch), _clip_step_ops(False, monkeypatch)
    assert lockstep < 0.55 * per_layer, (lockstep, per_layer)
