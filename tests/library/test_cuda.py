"""The library on a CUDA device (skipped without one; run by benchmarks/device_check.sh
as ``pytest -m cuda``): extraction, clipping, the wrapper in a training loop and every
method's promise, in float32 and inside bf16 autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastclip
import fastclip.pipeline.methods as methods
from fastclip.exact import exact_singular_values
from fastclip.linalg.syncs import SyncCounter
from fastclip.pipeline.methods.miyato import reshaped_norm
from fastclip.pipeline.methods.nsedghi import circular_sigma
from fastclip.pipeline.models.layers import ConvBN

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]
DEV = "cuda"
PRECISIONS = ["float32", "bf16-autocast"]


def _autocast(precision):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-autocast")


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = ConvBN(3, 8, 3, padding=1)
        self.b = ConvBN(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).flatten(1))


SHAPE = (3, 8, 8)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_extraction_on_cuda(precision):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    exact = exact_singular_values(conv, (4, 8, 8), k=3)
    with _autocast(precision):
        got = fastclip.singular_values(conv.to(DEV), (4, 8, 8), k=3)
    assert got.device.type == "cuda" and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), exact, rtol=1e-4, atol=0)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_clipping_on_cuda(precision):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)).eval().to(DEV)
    with _autocast(precision):
        before, after = fastclip.clip_spectral_norm_(block, (4, 8, 8), 0.5)
    exact = float(exact_singular_values(copy.deepcopy(block).cpu(), (4, 8, 8), k=1)[0])
    assert before > 0.5 and 0.95 * 0.5 <= exact <= 1.011 * 0.5


@pytest.mark.parametrize("precision", PRECISIONS)
def test_wrapper_in_a_training_loop_on_cuda(precision):
    torch.manual_seed(0)
    conv = fastclip.SpectralNorm(nn.Conv2d(3, 8, 3, padding=1), clip=1.0, clip_steps=5, init_delay=0).to(DEV)
    head = nn.Linear(8 * 8 * 8, 4).to(DEV)
    opt = torch.optim.SGD(list(conv.parameters()) + list(head.parameters()), lr=0.5)
    for _ in range(11):
        x = torch.rand(8, *SHAPE, device=DEV)
        with _autocast(precision):
            loss = -head(torch.relu(conv(x)).flatten(1)).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    conv.train()
    with torch.no_grad():
        conv(torch.rand(2, *SHAPE, device=DEV))  # step 11 ... the clip ran at step 10
    assert conv.vectors.device.type == "cuda" and conv.vectors.dtype == torch.float32
    s = float(exact_singular_values(copy.deepcopy(conv.module).cpu(), SHAPE, k=1)[0])
    assert s <= 1.5  # pushed up for one step since the clip at step 10


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", ["fastclip", "gouk", "miyato", "nsedghi", "lip4conv", "orig"])
def test_every_method_keeps_its_promise_on_cuda(name, precision):
    torch.manual_seed(0)
    over = {
        "fastclip": {"clip_steps": 3, "init_pqr_iter": 30},
        "nsedghi": {"clip_steps": 3},
        "lip4conv": {"weight": 1.0},
    }.get(name, {})
    m = methods.get(name, clip=1.0, mode="wBN", **over)
    model = m.prepare(Small().to(DEV), SHAPE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    syncs = []
    for step in range(7):
        x = torch.rand(8, *SHAPE, device=DEV)
        y = torch.randint(0, 4, (8,), device=DEV)
        with SyncCounter() as sc, _autocast(precision):
            loss = nn.functional.cross_entropy(model(x).float(), y) + m.penalty(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        m.after_step(model, step)
        syncs.append(sc.count)
    m.finish_epoch(model)
    model.eval()
    assert torch.isfinite(model(torch.rand(2, *SHAPE, device=DEV))).all()
    convs = [(n, mod) for n, mod in model.named_modules() if type(mod) is nn.Conv2d]
    if name == "fastclip":  # exact sigma_1 of each conv and Conv+BN pair after the epoch-end clip
        for n, mod in model.named_modules():
            if (
                isinstance(mod, fastclip.SpectralNorm)
                and mod.clip_flag
                and mod.kind in ("conv", "composition")
            ):
                s = float(exact_singular_values(copy.deepcopy(mod.module).cpu().eval(), mod.shape, k=1)[0])
                assert s <= 1.05, (n, s)
    if name == "gouk":
        for n, mod in convs:
            assert float(exact_singular_values(copy.deepcopy(mod).cpu(), m.input_shapes[n], k=1)[0]) <= 1.05
    if name == "miyato":
        for _, mod in convs:
            assert reshaped_norm(mod.weight) == pytest.approx(1.0, rel=0.05)
    if name == "nsedghi":
        for n, mod in convs:
            assert circular_sigma(mod, m.input_shapes[n]) <= 1.3
    if name in ("orig", "miyato", "lip4conv", "gouk"):  # (nsedghi projects at steps 0, 3, 6)
        assert max(syncs) == 0, syncs


def test_fastclip_clip_steps_run_in_lockstep_on_cuda():
    """On a GPU a clip step makes every due wrapper's estimates together (the default
    there): no layer is estimated alone, and every conv, linear and Conv+BN composition
    ends at most 1.01 c by its explicit matrix."""
    import fastclip.batched as batched_module
    from fastclip.batched import tracker_of
    from fastclip.wrapper import SpectralNorm
    from fastclip.wrapping.clip_step import ClipStep

    assert batched_module.lockstep_clips(DEV)
    torch.manual_seed(0)
    m = methods.get("fastclip", mode="wBN", clip=1.0, init_delay=0, clip_steps=5, init_pqr_iter=20)
    model = m.prepare(Small(), (3, 8, 8)).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.rand(6, 3, 8, 8, device=DEV)
    y = torch.randn(6, 4, device=DEV)
    for _ in range(5):  # steps 0-4, pushing the weights up
        loss = -(model(x) * y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    alone = []
    measure = ClipStep.measure
    ClipStep.measure = lambda self, q: alone.append(self.w.identifier) or measure(self, q)
    try:
        assert tracker_of(model).step()  # step 5: the clip step
    finally:
        ClipStep.measure = measure
    assert not alone
    model.eval()
    for w in model.modules():
        if isinstance(w, SpectralNorm) and w.clip_flag and w.kind in ("conv", "linear", "composition"):
            assert float(exact_singular_values(w, w.shape, k=1)[0]) <= 1.01, w.identifier
