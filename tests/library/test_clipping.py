"""clip_spectral_norm_ lands sigma_1 in [0.95 c, 1.01 c], checked with the exact reference."""

import copy

import pytest
import torch
from torch import nn

import fastclip.clipping as clipping
from fastclip import clip_spectral_norm_
from fastclip.exact import exact_singular_values
from fastclip.linalg.batchnorm import bn_singular_values, clamp_bn_


def _scale_to(module: nn.Module, shape, sigma: float) -> nn.Module:
    first = next(p for n, p in module.named_parameters() if n.endswith("weight"))
    with torch.no_grad():
        first.mul_(sigma / exact_singular_values(module, shape, k=1)[0].item())
    return module


def _conv_bn():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6))
    with torch.no_grad():
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].running_mean.normal_()
        m[1].weight.uniform_(0.5, 1.5)
    return m


CASES = {
    "conv_stride1": lambda: (nn.Conv2d(6, 6, 3, padding=1), (6, 8, 8)),
    "conv_stride2": lambda: (nn.Conv2d(8, 8, 3, stride=2, padding=1), (8, 9, 9)),
    "linear": lambda: (nn.Linear(50, 20), (50,)),
    "conv_bn": lambda: (_conv_bn(), (4, 8, 8)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_lands_in_band(name):
    torch.manual_seed(0)
    module, shape = CASES[name]()
    _scale_to(module, shape, 2.0)
    before_exact = exact_singular_values(module, shape)
    before, after = clip_spectral_norm_(module, shape, 1.0)
    exact = exact_singular_values(module, shape)
    assert before == pytest.approx(2.0, rel=1e-3)
    assert 0.95 <= exact[0].item() <= 1.01, exact[:5]
    assert after == pytest.approx(exact[0].item(), rel=1e-3)
    # the bottom of the spectrum is barely moved: clipping, not rescaling (which
    # would halve it)
    q = len(exact) // 4
    ratio = (exact[-q:].sum() / before_exact[-q:].sum()).item()
    assert 0.6 < ratio < 1.5, ratio


def test_linear_is_exact_clamp():
    torch.manual_seed(0)
    lin = nn.Linear(30, 12)
    with torch.no_grad():
        lin.weight.mul_(3)
    s0 = torch.linalg.svdvals(lin.weight.double())
    clip_spectral_norm_(lin, (30,), 1.0)
    s1 = torch.linalg.svdvals(lin.weight.double())
    assert torch.allclose(s1, s0.clamp(max=1.0), atol=1e-5)


def test_conv_bn_updates_both_weights():
    module, shape = _conv_bn(), (4, 8, 8)
    _scale_to(module, shape, 3.0)
    w0, g0 = module[0].weight.clone(), module[1].weight.clone()
    clip_spectral_norm_(module, shape, 1.0)
    assert not torch.equal(module[0].weight, w0)
    assert not torch.equal(module[1].weight, g0)
    assert exact_singular_values(module, shape, k=1)[0] <= 1.01


@pytest.mark.parametrize("name", list(CASES))
def test_below_max_norm_is_unchanged(name):
    module, shape = CASES[name]()
    _scale_to(module, shape, 0.8)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    before, after = clip_spectral_norm_(module, shape, 1.0)
    assert before == after == pytest.approx(0.8, rel=1e-3)
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())


def test_batchnorm_clamp_closed_form():
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.25, 1.0, 4.0, 0.5, 2.0]))
        bn.weight.copy_(torch.tensor([1.0, -3.0, 1.0, 0.2, 0.5]))
    s = bn_singular_values(bn)
    assert torch.allclose(
        s,
        torch.tensor(
            [3.0, 1.0 / (0.25 + 1e-5) ** 0.5, 0.5, 0.2 / (0.5 + 1e-5) ** 0.5, 0.5 / (2 + 1e-5) ** 0.5]
        )
        .sort(descending=True)
        .values,
        rtol=1e-5,
    )
    before, after = clip_spectral_norm_(bn, (5, 3, 3), 1.0)
    assert before == pytest.approx(3.0, rel=1e-5) and after == pytest.approx(1.0, rel=1e-6)
    exact = exact_singular_values(bn.eval(), (5, 3, 3))
    assert exact[0].item() == pytest.approx(1.0, rel=1e-6)
    # channels already below c untouched
    assert bn.weight[3].item() == pytest.approx(0.2) and bn.weight[4].item() == pytest.approx(0.5)
    assert clamp_bn_(bn, 2.0) == pytest.approx((1.0, 1.0), rel=1e-6)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_bad_max_norm(bad):
    with pytest.raises(ValueError, match="max_norm must be a positive number"):
        clip_spectral_norm_(nn.Conv2d(2, 2, 3), (2, 5, 5), bad)


def test_not_affine_and_wrong_shape():
    with pytest.raises(ValueError, match="not affine"):
        clip_spectral_norm_(nn.Sequential(nn.Conv2d(2, 2, 3), nn.Tanh()), (2, 5, 5), 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        clip_spectral_norm_(nn.Conv2d(2, 2, 3), (3, 5, 5), 1.0)


def test_enters_linearly():
    m = _conv_bn()
    assert clipping._enters_linearly(nn.Conv2d(2, 2, 3), ["weight"])
    assert clipping._enters_linearly(m, ["1.weight"])
    assert clipping._enters_linearly(m, ["0.weight"])
    assert not clipping._enters_linearly(m, ["0.weight", "1.weight"])  # bilinear
    assert not clipping._enters_linearly(m, ["1.bias"])
    assert not clipping._enters_linearly(nn.PReLU(), ["weight"])


@pytest.mark.parametrize("which", ["conv", "gamma"])
def test_fit_linear_shortcut_equals_forward_mode(which, monkeypatch):
    """The J p = A(p) shortcut (weights entering linearly) gives the same CGLS iterates
    as forward-mode jvp."""
    torch.manual_seed(6)
    module, shape = _conv_bn(), (4, 8, 8)
    module = module.double()
    name = "0.weight" if which == "conv" else "1.weight"
    V = torch.randn(3, *shape, dtype=torch.float64)
    T = torch.randn(3, 6, 8, 8, dtype=torch.float64)
    results = []
    for linear in (True, False):
        m = copy.deepcopy(module)
        monkeypatch.setattr(clipping, "_enters_linearly", lambda *a, linear=linear: linear)
        params = {name: dict(m.named_parameters())[name]}
        loss = clipping.fit_directions_(m, V, T, n_iter=4, params=params)
        results.append((loss, params[name].detach().clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-10)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)
    # and the fit did move the weights toward the targets
    with torch.no_grad():
        before = float(((clipping._linear_part(module, dict(module.named_parameters()), V) - T) ** 2).sum())
    assert results[0][0] < before
