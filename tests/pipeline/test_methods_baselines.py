"""The comparison methods keep their promises, checked against exact references.

Each promise test trains a one-conv model with a loss that keeps pushing its weights up
(``-<model(x), y>`` for fixed x, y: a constant gradient, so without clipping sigma_1
grows linearly), calls ``after_step`` after every SGD step, and measures the model's
sigma_1 at the end from its explicit matrix in float64 (``fastclip.exact``) or the
Fourier formula for circular convs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastclip.pipeline.methods as methods
from fastclip.exact import exact_singular_values
from fastclip.linalg.fourier import circular_singular_values
from fastclip.pipeline.methods.lip4conv import conv_bound, gram_iteration_bound
from fastclip.pipeline.methods.miyato import reshaped_norm
from fastclip.pipeline.methods.nsedghi import circular_sigma, clamp_circular_kernel, polyphase_kernel


def push_up(
    model: nn.Module,
    method: methods.Method,
    shape: tuple[int, ...],
    steps: int,
    lr: float = 1.0,
    seed: int = 0,
) -> list[float]:
    """SGD on ``-mean(model(x) * y) + penalty`` (fixed x, y) with ``after_step`` after each
    step; returns the losses. Unclipped, sigma_1 grows by roughly ``0.2 lr`` per step on
    the small convs used here."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, *shape, generator=g)
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = -(model(x) * y).mean() + method.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(model, step)
        losses.append(loss.item())
    return losses


def sigma_exact(model: nn.Module, shape: tuple[int, ...]) -> float:
    return float(exact_singular_values(model, shape, k=1)[0])


def one_conv(seed: int = 0, **kw) -> nn.Sequential:
    torch.manual_seed(seed)
    args = dict(in_channels=2, out_channels=4, kernel_size=3, padding=1)
    args.update(kw)
    return nn.Sequential(nn.Conv2d(**args))


# -- orig -------------------------------------------------------------------------------------


def test_orig_leaves_the_map_unchanged():
    shape = (2, 6, 6)
    model = one_conv()
    m = methods.get("orig")
    ref = copy.deepcopy(model)
    assert m.prepare(model, shape) is model
    for step in range(3):
        m.after_step(model, step)
    assert float(m.penalty(model)) == 0.0
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    # and unclipped training does grow sigma_1 far beyond 1 under this loss
    push_up(model, m, shape, steps=100)
    assert sigma_exact(model, shape) > 3.0


# -- gouk -------------------------------------------------------------------------------------


def test_gouk_bounds_the_true_operator_norm_strided_zero_padded():
    shape = (2, 8, 8)
    model = one_conv(in_channels=2, out_channels=4, stride=2)
    m = methods.get("gouk", clip=1.0)
    m.prepare(model, shape)
    push_up(model, m, shape, steps=300)
    s = sigma_exact(model, shape)
    assert 0.95 <= s <= 1.05, s
    # the same training without the projection ends far above c
    free = one_conv(in_channels=2, out_channels=4, stride=2)
    push_up(free, methods.get("orig"), shape, steps=300)
    assert sigma_exact(free, shape) > 5.0


def test_gouk_estimate_matches_exact_within_one_percent():
    shape = (3, 7, 7)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(5 * 4 * 4, 6))
    m = methods.get("gouk", clip=100.0)  # no projection: only the estimate
    m.prepare(model, shape)
    for _ in range(40):
        m.project(model)
    conv, lin = model[0], model[2]
    assert abs(m.sigmas["0"] / sigma_exact(conv, shape) - 1) < 0.01
    assert abs(m.sigmas["2"] / sigma_exact(lin, (80,)) - 1) < 0.01
    # the estimate is a lower bound (||A v|| for a unit v)
    assert m.sigmas["0"] <= sigma_exact(conv, shape) * (1 + 1e-6)


def test_gouk_state_round_trip_restores_warm_start():
    shape = (2, 6, 6)
    model = one_conv()
    m = methods.get("gouk")
    m.prepare(model, shape)
    m.after_step(model, 0)
    state = m.state_dict()
    assert set(state["vectors"]) == {"0"} and state["vectors"]["0"].shape == (1, *shape)
    m2 = methods.get("gouk")
    m2.prepare(model, shape)
    m2.load_state_dict(state)
    assert torch.equal(m2.vectors["0"], m.vectors["0"])


# -- miyato ------------------------------------------------------------------------------------


def settle(model: nn.Module, shape: tuple[int, ...], n: int = 50) -> None:
    # One persistent power iteration per forward lags behind weights that move every step
    # (under push_up sigma(W_eff) is ~1.4 c right after training); forwards without
    # updates let it converge, after which the reshaped matrix has norm c.
    model.train()
    with torch.no_grad():
        for _ in range(n):
            model(torch.zeros(1, *shape))


def test_miyato_normalises_the_reshaped_matrix_not_the_operator():
    shape = (2, 6, 6)
    model = one_conv()
    m = methods.get("miyato", clip=1.0)
    m.prepare(model, shape)
    push_up(model, m, shape, steps=300)
    settle(model, shape)
    model.eval()
    w = model[0].weight
    assert abs(reshaped_norm(w) - 1.0) < 1e-3
    assert abs(m.layer_norms(model)["0"] - 1.0) < 1e-3
    true = sigma_exact(model, shape)
    # the true operator norm of a 3x3 conv is not the reshaped matrix's norm
    assert abs(true - 1.0) > 0.05, true


def test_miyato_scales_to_clip():
    shape = (2, 6, 6)
    model = one_conv()
    m = methods.get("miyato", clip=2.5)
    m.prepare(model, shape)
    push_up(model, m, shape, steps=50)
    settle(model, shape)
    assert abs(reshaped_norm(model[0].weight) - 2.5) < 2.5e-3


# -- nsedghi -----------------------------------------------------------------------------------


def test_nsedghi_clamp_matches_fft_formula_on_full_support():
    # With a kernel as large as the input, keeping the k x k support loses nothing, so the
    # clamp must give exactly min(sigma_i, c) for every singular value of the circular conv.
    torch.manual_seed(0)
    w = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    before = circular_singular_values(w, (5, 5))
    new, b = clamp_circular_kernel(w, (5, 5), 1.5)
    after = circular_singular_values(new, (5, 5))
    assert b == pytest.approx(float(before[0]), rel=1e-12)
    assert float(before[0]) > 5
    torch.testing.assert_close(after, before.clamp(max=1.5), rtol=0, atol=1e-10)


def test_nsedghi_polyphase_sigma_matches_exact_strided_circular_conv():
    torch.manual_seed(0)
    for stride, dilation, k, H in [(1, 1, 3, 6), (2, 1, 3, 8), (2, 2, 3, 8), (3, 1, 3, 9), (2, 1, 4, 8)]:
        conv = nn.Conv2d(
            3,
            5,
            k,
            stride=stride,
            dilation=dilation,
            padding=dilation * (k - 1) // 2,
            padding_mode="circular",
            bias=False,
        )
        shape = (3, H, H)
        assert circular_sigma(conv, shape, torch.float64) == pytest.approx(sigma_exact(conv, shape), rel=1e-9)
    assert polyphase_kernel(torch.randn(8, 4, 3, 3), stride=2).shape == (8, 16, 2, 2)


def test_nsedghi_bounds_a_circular_conv():
    # Projection every step, weights pushed up by ~0.002 c per step: the clamp is exact and
    # cutting back to the 3x3 support re-adds only a little (measured: sigma_1 <= 1.007 c
    # over 200 steps). The overshoot grows with the push between projections (about
    # 1.13 c at a 0.2 c push per step), see the next test.
    shape = (2, 8, 8)
    model = one_conv(padding_mode="circular")
    m = methods.get("nsedghi", clip=1.0, clip_steps=1)
    m.prepare(model, shape)
    push_up(model, m, shape, steps=200, lr=0.01)
    s = sigma_exact(model, shape)
    assert 0.95 <= s <= 1.01, s
    assert m.layer_norms(model)["0"] == pytest.approx(s, rel=1e-5)


def test_nsedghi_support_cut_overshoot_grows_with_the_push():
    shape = (2, 8, 8)
    finals = []
    for lr in (0.01, 1.0):
        model = one_conv(padding_mode="circular")
        m = methods.get("nsedghi", clip=1.0, clip_steps=1)
        m.prepare(model, shape)
        push_up(model, m, shape, steps=100, lr=lr)
        finals.append(sigma_exact(model, shape))
    free = one_conv(padding_mode="circular")
    push_up(free, methods.get("orig"), shape, steps=100, lr=1.0)
    assert finals[0] < finals[1] < 1.3 < sigma_exact(free, shape) / 10, finals


def test_nsedghi_strided_circular_conv_and_schedule():
    shape = (2, 8, 8)
    model = one_conv(padding_mode="circular", stride=2)
    m = methods.get("nsedghi", clip=1.0, clip_steps=1)
    m.prepare(model, shape)
    push_up(model, m, shape, steps=200, lr=0.01)
    assert 0.95 <= sigma_exact(model, shape) <= 1.01
    # with the published schedule only steps 0, 100, ... project
    m2 = methods.get("nsedghi", clip=1.0)
    assert m2.config.clip_steps == 100
    model2 = one_conv(padding_mode="circular")
    m2.prepare(model2, shape)
    w = model2[0].weight.detach().clone() * 10
    with torch.no_grad():
        model2[0].weight.copy_(w)
    m2.after_step(model2, 99)
    assert torch.equal(model2[0].weight, w)
    m2.after_step(model2, 100)
    assert circular_sigma(model2[0], shape) < float(circular_singular_values(w, (8, 8), k=1)[0]) / 3


def test_nsedghi_refuses_what_it_cannot_clamp():
    m = methods.get("nsedghi")
    with pytest.raises(ValueError, match="divisible by the stride"):
        m.prepare(one_conv(stride=2), (2, 7, 7))
    with pytest.raises(ValueError, match="wrap around"):
        m.prepare(one_conv(kernel_size=5, padding=2), (2, 3, 3))
    with pytest.raises(ValueError, match="Conv2d only"):
        m.prepare(nn.Sequential(nn.Conv1d(2, 3, 3, padding=1)), (2, 8))


def test_nsedghi_groups_are_clamped_block_by_block():
    shape = (4, 6, 6)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular", groups=2))
    with torch.no_grad():
        model[0].weight.mul_(20)
    m = methods.get("nsedghi", clip=1.0)
    m.prepare(model, shape)
    m.after_step(model, 0)
    exact = sigma_exact(model, shape)
    assert exact == pytest.approx(circular_sigma(model[0], shape, torch.float64), rel=1e-9)
    assert exact < 2.0  # one clamp from ~20x c lands near c (the support cut adds a little)


# -- lip4conv ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cout,cin,k,H", [(8, 8, 3, 8), (16, 4, 3, 12), (4, 16, 3, 12), (6, 6, 5, 7), (5, 3, 1, 4)]
)
def test_gram_bound_is_an_upper_bound_and_close(cout, cin, k, H):
    torch.manual_seed(cout * 100 + cin)
    for _ in range(3):
        w = torch.randn(cout, cin, k, k, dtype=torch.float64)
        exact = float(circular_singular_values(w, (H, H), k=1)[0])
        bound = float(gram_iteration_bound(w, (H, H), n_iter=6))
        assert bound >= exact * (1 - 1e-12)
        assert bound <= exact * 1.03
        # in float32 (how it trains) as well, up to float32 rounding
        b32 = float(gram_iteration_bound(w.float(), (H, H), n_iter=6))
        assert b32 == pytest.approx(bound, rel=1e-5)


def test_gram_bound_matches_its_fft_formula_at_each_iteration_count():
    # ||G_t||_F^(1/2^t) computed naively (no rescaling) in float64 for small t, max over frequencies.
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    F = torch.fft.fft2(nn.functional.pad(w, (0, 3, 0, 3))).permute(2, 3, 0, 1).reshape(-1, 4, 3)
    for t in range(4):
        G = F.clone()
        for _ in range(t):
            G = G.mH @ G
        naive = float(torch.linalg.matrix_norm(G).max() ** (1 / 2**t))
        assert float(gram_iteration_bound(w, (6, 6), n_iter=t)) == pytest.approx(naive, rel=1e-10)
    # t = 0 is the largest per-frequency Frobenius norm; large t tends to the exact value
    assert float(gram_iteration_bound(w, (6, 6), n_iter=12)) == pytest.approx(
        float(circular_singular_values(w, (6, 6), k=1)[0]), rel=1e-9
    )


def test_gram_bound_is_stable_for_large_and_tiny_kernels():
    torch.manual_seed(0)
    w = torch.randn(8, 8, 3, 3)
    for scale in (1e-20, 1e20):
        b = gram_iteration_bound(w * scale, (8, 8), n_iter=6)
        assert torch.isfinite(b)
        assert float(b) / scale == pytest.approx(float(gram_iteration_bound(w, (8, 8), n_iter=6)), rel=1e-4)


def test_gram_bound_is_differentiable():
    torch.manual_seed(0)
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = gram_iteration_bound(w, (6, 6), n_iter=6)
    (g,) = torch.autograd.grad(b, w)
    # the bound is tight, so its gradient is the gradient of sigma_1: <g, w> = sigma_1 (homogeneity)
    assert float((g * w.detach()).sum()) == pytest.approx(float(b.detach()), rel=1e-6)


def test_lip4conv_strided_bound_modes():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="circular", bias=False)
    shape = (3, 8, 8)
    exact = sigma_exact(conv, shape)
    tight = float(conv_bound(conv, shape, polyphase=True))
    loose = float(conv_bound(conv, shape, polyphase=False))
    assert exact * (1 - 1e-6) <= tight <= exact * 1.03
    assert loose >= tight * (1 - 1e-6)


def test_lip4conv_penalty_lowers_sigma():
    shape = (2, 8, 8)
    runs = {}
    for name in ("orig", "lip4conv"):
        model = one_conv(padding_mode="circular")
        m = methods.get(name, clip=1.0)
        m.prepare(model, shape)
        push_up(model, m, shape, steps=150)
        runs[name] = sigma_exact(model, shape)
        if name == "lip4conv":
            assert m.layer_norms(model)["0"] >= runs[name] * (1 - 1e-5)
    assert runs["lip4conv"] < 0.3 * runs["orig"], runs
    # the penalty alone brings a layer from 3 c down to c (and not below)
    model = one_conv(padding_mode="circular")
    with torch.no_grad():
        model[0].weight.mul_(3 / sigma_exact(model, shape))
    m = methods.get("lip4conv", clip=1.0)
    m.prepare(model, shape)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(300):
        opt.zero_grad()
        m.penalty(model).backward()
        opt.step()
    assert 0.97 <= sigma_exact(model, shape) <= 1.01


def test_lip4conv_penalty_value():
    shape = (2, 8, 8)
    model = one_conv(padding_mode="circular")
    with torch.no_grad():
        model[0].weight.mul_(10)
    m = methods.get("lip4conv", clip=1.0)
    m.prepare(model, shape)
    p = m.penalty(model)
    assert p.dim() == 0 and p.requires_grad
    bound = float(gram_iteration_bound(model[0].weight.detach(), (8, 8), 6))
    assert float(p) == pytest.approx(0.1 * (bound - 1.0), rel=1e-5)
    # a layer below c costs nothing
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
    assert float(m.penalty(model)) == 0.0
    for other in ("orig", "gouk", "miyato", "nsedghi"):
        mo = methods.get(other)
        mo.prepare(one_conv(), shape)
        assert float(mo.penalty(model)) == 0.0


def test_finish_epoch_fires_nsedghi_projection_and_the_clipBN_clamp():
    # 50 pushed steps after the last scheduled projection (period 100): finish_epoch
    # projects now, and in clipBN mode also clamps every BN.
    shape = (2, 8, 8)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular", bias=False), nn.BatchNorm2d(4)
    )
    m = methods.get("nsedghi", mode="clipBN", clip=1.0, clip_steps=100, bn_count=100)
    m.prepare(model, shape)
    push_up(model, m, shape, steps=51, lr=0.3)
    bn = model[1]
    assert circular_sigma(model[0], shape, torch.float64) > 1.2
    assert float((bn.weight.abs() / (bn.running_var + bn.eps).sqrt()).max()) > 1.05
    projected = copy.deepcopy(model)
    m.project(projected)
    before = circular_sigma(model[0], shape, torch.float64)
    m.finish_epoch(model)
    after = circular_sigma(model[0], shape, torch.float64)
    # one projection (clamp, then the cut back to 3x3 re-adds some: see above)
    assert after == pytest.approx(circular_sigma(projected[0], shape, torch.float64), rel=1e-9)
    assert after < before - 0.05
    assert float((bn.weight.abs() / (bn.running_var + bn.eps).sqrt()).max()) <= 1.0 + 1e-6
