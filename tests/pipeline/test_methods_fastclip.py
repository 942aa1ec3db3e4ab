"""The fastclip method: how it wraps a model in each mode, what it logs, and that the
exact sigma_1 (explicit matrix, float64, eval mode) is at most 1.05 c right after a
clip step while a loss keeps pushing the weights up."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastclip.pipeline.methods as methods
from fastclip.exact import exact_singular_values
from fastclip.linalg.operator import AffineOperator
from fastclip.pipeline.methods.fastclip import original_named_modules
from fastclip.pipeline.models.layers import ConvBN
from fastclip.spectral import power_qr
from fastclip.wrapper import SpectralNorm


class TwoLayer(nn.Module):
    """A Conv+BN pair (padding 1, stride 2) and a linear layer."""

    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        self.block = ConvBN(2, 4, 3, stride=2, padding=1, bn=bn)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.block(x)).flatten(1))


SHAPE = (2, 6, 6)


def sigma(module: nn.Module, shape: tuple[int, ...]) -> float:
    return float(exact_singular_values(module, shape, k=1)[0])


def push_up(
    model: nn.Module,
    method: methods.Method,
    steps: int,
    lr: float = 1.0,
    seed: int = 0,
    final_forward: bool = True,
) -> torch.Tensor:
    """SGD on ``-mean(model(x) * y)`` for fixed x, y (a constant push on the weights), then
    (``final_forward``) one more training-mode forward without an update, so the last
    step is that forward (the wrapper clips inside the forward pass). Returns x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, *SHAPE, generator=g)
    model.eval()  # a training-mode forward is a step of the wrappers' schedule
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        loss = -(model(x) * y).mean() + method.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(model, step)
    if final_forward:
        with torch.no_grad():
            model(x)
    return x


def wrappers(model: nn.Module) -> dict[str, SpectralNorm]:
    return {m.identifier: m for m in model.modules() if isinstance(m, SpectralNorm)}


def test_wBN_wraps_conv_bn_and_their_composition_by_name():
    m = methods.get("fastclip", mode="wBN", clip=0.7)
    model = m.prepare(TwoLayer(), SHAPE)
    w = wrappers(model)
    assert set(w) == {"block", "block.conv", "block.bn", "fc"}
    assert w["block"].kind == "composition" and w["block"].clip_flag and w["block"].clip_opt_stepsize == 0.01
    assert (
        w["block.conv"].kind == "conv"
        and w["block.conv"].clip_flag
        and w["block.conv"].clip_opt_stepsize == 0.35
    )
    assert w["block.bn"].kind == "bn" and not w["block.bn"].clip_flag
    assert w["fc"].kind == "linear" and w["fc"].clip_flag
    assert all(
        x.clip == 0.7 and x.clip_steps == 50 and x.init_delay == 0 and x.clip_opt_iter == 5 and not x.exact
        for x in w.values()
    )
    # the same modules, now inside wrappers: block -> SpectralNorm(ConvBN(conv=SN, bn=SN))
    assert isinstance(model.block, SpectralNorm) and isinstance(model.block.module.conv, SpectralNorm)
    names = dict(original_named_modules(model))
    assert isinstance(names["block.conv"], (SpectralNorm, nn.Conv2d))
    with pytest.raises(ValueError, match="already contains SpectralNorm wrappers"):
        m.prepare(model, SHAPE)


def test_noBN_and_clipBN_wrap_layers_only():
    m = methods.get("fastclip", mode="noBN")
    w = wrappers(m.prepare(TwoLayer(bn=False), SHAPE))
    assert set(w) == {"block.conv", "fc"}
    assert all(x.clip_steps == 100 and x.clip_opt_iter == 1 for x in w.values())
    m = methods.get("fastclip", mode="clipBN")
    w = wrappers(m.prepare(TwoLayer(), SHAPE))
    assert set(w) == {"block.conv", "block.bn", "fc"}
    assert not w["block.bn"].clip_flag and w["block.conv"].clip_steps == 100
    m = methods.get("fastclip", mode="wBN", composition=False)
    assert set(wrappers(m.prepare(TwoLayer(), SHAPE))) == {"block.conv", "block.bn", "fc"}


def test_a_bare_layer_model_is_wrapped_itself():
    m = methods.get("fastclip")
    model = m.prepare(nn.Conv2d(2, 3, 3, padding=1), SHAPE)
    assert isinstance(model, SpectralNorm) and model.identifier == "Conv2d"  # the wrapper's default
    assert set(m.layer_norms(model)) == {"Conv2d"}


class FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))


def test_writer_gets_lsv_scalars_per_layer_name():
    writer = FakeWriter()
    m = methods.get("fastclip", mode="wBN", summary_steps=2)
    assert not m.writes_layer_norms
    model = m.prepare(TwoLayer(), SHAPE, writer=writer)
    assert m.writes_layer_norms
    model.train()
    for _ in range(3):
        model(torch.randn(4, *SHAPE))
    tags = {t for t, _, _ in writer.scalars}
    assert tags == {"train/lsv_block", "train/lsv_block.conv", "train/lsv_block.bn", "train/lsv_fc"}
    assert sorted({s for _, _, s in writer.scalars}) == [0, 2]
    # layer_norms reports the same tracked values under the same names
    norms = m.layer_norms(model)
    assert set(norms) == {"block", "block.conv", "block.bn", "fc"}
    assert norms["block.conv"] == pytest.approx(float(model.block.module.conv.sigma))


@pytest.mark.parametrize("mode", ["wBN", "noBN"])
def test_one_conv_is_clipped_to_c_at_clip_steps(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1))
    m = methods.get("fastclip", mode=mode, clip=1.0)
    model = m.prepare(model, SHAPE)
    steps = 2 * m.config.clip_steps  # the extra forward of push_up is step 2 * clip_steps: a clip step
    push_up(model, m, steps)
    s = sigma(model, SHAPE)
    assert 0.95 <= s <= 1.05, s
    # the tracked value is the exact one, up to the tracking's accuracy
    assert m.layer_norms(model)["0"] == pytest.approx(s, rel=0.02)
    free = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1))
    push_up(free, methods.get("orig"), steps)
    assert sigma(free, SHAPE) > 5


def test_between_clip_steps_the_push_wins():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1))
    m = methods.get("fastclip", mode="wBN", clip=1.0)
    model = m.prepare(model, SHAPE)
    push_up(model, m, 50 + 30)  # last clip at step 50, then 30 pushed steps (+ 1 forward)
    assert sigma(model, SHAPE) > 1.5


def test_wBN_bounds_the_conv_bn_composition_and_the_conv():
    # A lone Conv+BN pair: in training mode BN normalises the conv's output, so the push
    # raises gamma (and the eval-mode composition gamma / sqrt(running_var) * conv), and
    # the conv gets a scale-free push.
    torch.manual_seed(0)
    model = nn.Sequential(ConvBN(2, 4, 3, stride=2, padding=1))
    m = methods.get("fastclip", mode="wBN", clip=1.0)
    model = m.prepare(model, SHAPE)
    x = push_up(model, m, 100, final_forward=False)
    before = copy.deepcopy(model)  # the state before the clip step
    # The clip step: the wrappers clip, then BN's training forward updates running_var
    # from the (now smaller) conv output. With momentum 0 that update is skipped and we
    # see exactly what the clip did; with BN's default momentum 0.1 the composition moves
    # up a little after its clip (measured 1.06 c here).
    results = {}
    for momentum in (0.0, 0.1):
        run = copy.deepcopy(model)
        run[0].module.bn.module.momentum = momentum
        with torch.no_grad():
            run(x)
        run.eval()
        block = run[0].module
        bn = block.bn.module
        results[momentum] = (
            sigma(block, SHAPE),
            sigma(block.conv, SHAPE),
            float((bn.weight.abs() / (bn.running_var + bn.eps).sqrt()).max()),
            m.layer_norms(run),
        )
    composed, conv, bn_sigma, norms = results[0.0]
    assert composed <= 1.05, composed
    assert conv <= 1.05, conv
    assert bn_sigma > 1.0  # BN alone is not clamped: only the composition is bounded
    assert norms["0"] == pytest.approx(composed, rel=0.02)
    assert norms["0.bn"] == pytest.approx(bn_sigma, rel=1e-6)
    assert results[0.1][0] <= 1.1, results[0.1][0]
    before.eval()
    assert sigma(before[0].module, SHAPE) > 5  # 50 pushed steps since the last clip


def test_linear_layers_are_clipped_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(72, 5))
    m = methods.get("fastclip", mode="noBN", clip=1.0)
    model = m.prepare(model, SHAPE)
    push_up(model, m, 100)
    assert sigma(model, SHAPE) == pytest.approx(1.0, abs=1e-5)


def test_checkpoint_round_trip():
    torch.manual_seed(0)
    m = methods.get("fastclip", mode="wBN")
    model = m.prepare(TwoLayer(), SHAPE)
    push_up(model, m, 3)
    state = model.state_dict()
    m2 = methods.get("fastclip", mode="wBN")
    model2 = m2.prepare(TwoLayer(), SHAPE)
    model2.load_state_dict(state, strict=True)
    assert m2.layer_norms(model2) == m.layer_norms(model)
    assert m.state_dict() == {}


def _pushed_pair(composition_params: str):
    torch.manual_seed(0)
    model = nn.Sequential(ConvBN(2, 4, 3, stride=2, padding=1))
    m = methods.get("fastclip", mode="wBN", clip=1.0, composition_params=composition_params)
    model = m.prepare(model, SHAPE)
    push_up(model, m, 30, final_forward=False)  # last clip at step 0: 29 pushed steps since
    return model, m


def test_composition_clip_changes_gamma_only_by_default():
    model, _ = _pushed_pair("bn")
    pair = model[0]
    conv, bn = pair.module.conv.module, pair.module.bn.module
    model.eval()
    assert sigma(pair, SHAPE) > 2
    pair.module.conv.clip_()  # the composition's clip starts with its inner layers' own
    conv_w, gamma = conv.weight.detach().clone(), bn.weight.detach().clone()
    pair.clip_()
    # the conv moves only by its own re-check (it may sit up to 1% above c); gamma does the
    # work (BN's running variance would undo a shrunk conv)
    assert (conv.weight - conv_w).norm() <= 0.02 * conv_w.norm()
    assert (bn.weight - gamma).norm() >= 0.2 * gamma.norm()
    assert sigma(pair, SHAPE) <= 1.02
    # the published update moves both
    model, _ = _pushed_pair("all")
    pair = model[0]
    model.eval()
    pair.module.conv.clip_()
    conv_w = pair.module.conv.module.weight.detach().clone()
    pair.clip_()
    assert (pair.module.conv.module.weight - conv_w).norm() >= 0.1 * conv_w.norm()
    assert sigma(pair, SHAPE) <= 1.02


def test_bad_composition_params():
    with pytest.raises(ValueError, match="composition_params must be one of bn, all; got 'conv'"):
        methods.get("fastclip", mode="wBN", composition_params="conv")


@pytest.mark.parametrize("mode", ["wBN", "noBN", "clipBN"])
def test_finish_epoch_bounds_every_clipped_layer(mode):
    torch.manual_seed(0)
    m = methods.get("fastclip", mode=mode, clip=1.0)
    model = m.prepare(TwoLayer(bn=mode != "noBN"), SHAPE)
    push_up(model, m, 30, lr=0.3, final_forward=False)  # 29 steps past the last clip
    model.eval()
    block = model.block.module if mode == "wBN" else model.block
    assert max(sigma(block.conv, SHAPE), sigma(model.fc, (36,))) > 1.5
    m.finish_epoch(model)
    assert sigma(block.conv, SHAPE) <= 1.05
    assert sigma(model.fc, (36,)) <= 1.0 + 1e-5
    if mode == "wBN":
        assert sigma(model.block, SHAPE) <= 1.05
    if mode == "clipBN":
        bn = block.bn.module
        assert float((bn.weight.abs() / (bn.running_var + bn.eps).sqrt()).max()) <= 1.0 + 1e-6


def test_wBN_tracks_a_conv_and_its_pair_in_one_batched_pass():
    torch.manual_seed(3)
    m = methods.get("fastclip", mode="wBN", clip_steps=1000)  # no clip after step 0
    model = m.prepare(TwoLayer(), SHAPE)
    w = wrappers(model)
    pair, conv = w["block"], w["block.conv"]
    x = torch.randn(8, *SHAPE)
    model.train()
    model(x)  # step 0: cold starts (and the first clip)
    with torch.no_grad():
        model.block.module.bn.module.weight.uniform_(2.0, 3.0)  # a pair unlike its conv
    # what separate PowerQR steps give, on the state the step starts from
    ref_pair = power_qr(AffineOperator(copy.deepcopy(pair.module), SHAPE), X=pair.vectors.clone())
    ref_conv = power_qr(AffineOperator(copy.deepcopy(conv.module), SHAPE), X=conv.vectors.clone())
    passes = pair._op.passes, conv._op.passes
    layer = model.block.module.conv.module
    calls = []
    conv_forward = layer._conv_forward
    layer._conv_forward = lambda *a: (calls.append(a[0].shape[0]), conv_forward(*a))[1]
    model(x)
    assert sorted(calls) == [2, 8]  # the batch of 8, and one tracking pass on both vectors
    assert (pair._op.passes - passes[0], conv._op.passes - passes[1]) == (1, 1)  # one iteration each
    assert pair._op._factors[0][0] is conv._op._factors[0][0]  # ... sharing the conv's pass
    for wr, ref in ((pair, ref_pair), (conv, ref_conv)):
        torch.testing.assert_close(wr.vectors, ref.right, rtol=1e-5, atol=1e-6)
        assert float(wr.sigma) == pytest.approx(float(ref.values[0]), rel=1e-5)
    assert float(pair.sigma) > 1.5 * float(conv.sigma)
