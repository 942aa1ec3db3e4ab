"""The usual GPU idioms on the CPU: torch.autocast (bf16), channels_last models and
torch.compile(model). The spectral iterations keep the layers' float32 inside autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastclip
import fastclip.pipeline.methods as methods
from fastclip.linalg.operator import AffineOperator
from fastclip.pipeline.models.layers import ConvBN
from fastclip.spectral import lanczos, power_qr


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = ConvBN(3, 6, 3, padding=1)
        self.b = ConvBN(6, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).flatten(1))


SHAPE = (3, 8, 8)
FAST = {"clip_steps": 2, "init_pqr_iter": 20}


def _train(model, method, steps, autocast=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    outs = []
    for step in range(steps):
        x = torch.rand(4, *SHAPE, generator=g)
        y = torch.randint(0, 4, (4,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
            loss = nn.functional.cross_entropy(out.float(), y) + method.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(model, step)
        outs.append(out.detach().float())
    return outs


def _wrappers(model):
    return [m for m in model.modules() if isinstance(m, fastclip.SpectralNorm)]


@pytest.mark.parametrize("name", ["fastclip", "gouk", "miyato"])
def test_methods_inside_autocast_iterate_in_float32(name):
    torch.manual_seed(0)
    m = methods.get(name, **(FAST if name == "fastclip" else {}))
    model = m.prepare(Small(), SHAPE)
    m_ref = copy.deepcopy(m)
    ref = copy.deepcopy(model)
    # one step each: the method's work on the same float32 weights, with and without autocast
    torch.manual_seed(1)  # the wrappers' random starts
    _train(model, m, 1, autocast=True)
    torch.manual_seed(1)
    _train(ref, m_ref, 1, autocast=False)
    if name == "fastclip":
        for w, w_ref in zip(_wrappers(model), _wrappers(ref)):
            if w.kind != "bn":
                assert w.vectors.dtype == torch.float32
                torch.testing.assert_close(w.vectors, w_ref.vectors, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(w.sigma, w_ref.sigma, rtol=1e-4, atol=1e-6)
    if name == "gouk":
        for key in m.vectors:
            assert m.vectors[key].dtype == torch.float32
    # every layer ends bounded as the method says, with or without autocast
    norms, norms_ref = m.layer_norms(model), m_ref.layer_norms(ref)
    assert norms.keys() == norms_ref.keys()
    for key in norms:
        assert norms[key] == pytest.approx(norms_ref[key], rel=0.05, abs=1e-3), key
    if name == "miyato":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.train()
            assert model.a.conv.weight.dtype == torch.float32  # the parametrisation's output


def test_measurement_functions_inside_autocast():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    op = AffineOperator(conv, (4, 8, 8))
    exact = fastclip.singular_values(conv, (4, 8, 8), k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fastclip.singular_values(conv, (4, 8, 8), k=2)
        r = lanczos(op, k=2, generator=torch.Generator().manual_seed(0))
        q = power_qr(op, k=1, n_iter=300, generator=torch.Generator().manual_seed(0))
        before, after = fastclip.clip_spectral_norm_(copy.deepcopy(conv), (4, 8, 8), 0.5)
    assert got.dtype == torch.float32 and r.values.dtype == torch.float32
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=0)
    torch.testing.assert_close(r.values, exact, rtol=1e-5, atol=0)
    assert float(q.values[0]) == pytest.approx(float(exact[0]), rel=1e-3)
    assert before == pytest.approx(float(exact[0]), rel=1e-5) and 0.95 * 0.5 <= after <= 1.01 * 0.5


def test_channels_last_model_trains_and_clips_like_a_contiguous_one():
    torch.manual_seed(0)
    track = {**FAST, "init_delay": 10**6}  # tracking only while training, then one clip of every layer
    m, m2 = methods.get("fastclip", **track), methods.get("fastclip", **track)
    base = Small()
    model = m.prepare(copy.deepcopy(base), SHAPE)
    cl = m2.prepare(copy.deepcopy(base).to(memory_format=torch.channels_last), SHAPE)
    torch.manual_seed(1)
    outs = _train(model, m, 3)
    torch.manual_seed(1)
    outs_cl = _train(cl, m2, 3)
    assert cl.a.module.conv.module.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(outs, outs_cl):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for key, v in m.layer_norms(model).items():
        assert m2.layer_norms(cl)[key] == pytest.approx(v, rel=1e-4, abs=1e-6)
    for w in _wrappers(model) + _wrappers(cl):
        w.init_delay = 0
    m.finish_epoch(model)
    m2.finish_epoch(cl)
    for mm, mod in ((m, model), (m2, cl)):
        norms = mm.layer_norms(mod)
        assert max(v for k, v in norms.items() if not k.endswith("bn")) <= 1.01 + 1e-6, norms


@pytest.mark.slow
def test_compiled_model_matches_eager():
    # torch.compile with backend="aot_eager" (inductor's C++ compile takes minutes on
    # this 2-core CPU): graph breaks at the wrappers' host logic are expected
    torch._dynamo.reset()
    torch.manual_seed(0)
    m, m2 = methods.get("fastclip", **FAST), methods.get("fastclip", **FAST)
    base = Small()
    eager = m.prepare(copy.deepcopy(base), SHAPE)
    compiled = m2.prepare(copy.deepcopy(base), SHAPE)
    compiled_fn = torch.compile(compiled, backend="aot_eager")
    torch.manual_seed(1)
    outs = _train(eager, m, 4)
    torch.manual_seed(1)
    outs_c = _train(compiled_fn, m2, 4)
    for a, b in zip(outs, outs_c):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for key, v in m.layer_norms(eager).items():
        assert m2.layer_norms(compiled)[key] == pytest.approx(v, rel=1e-4, abs=1e-6)
