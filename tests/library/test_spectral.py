"""singular_values / lanczos / power_qr against exact references."""

import pytest
import torch
from torch import nn

import fastclip
from fastclip.exact import (
    exact_singular_values,
    exact_top,
    explicit_matrix,
    fft_singular_values,
    gram_singular_values,
    svds_singular_values,
)
from fastclip.linalg.operator import AffineOperator, gram_many
from fastclip.pipeline.models.layers import ConvBN
from fastclip.spectral import lanczos, power_iteration, power_qr, power_qr_many


def _bn(c: int, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.1)
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn


def _cases():
    torch.manual_seed(0)
    return {
        "conv3to16": (nn.Conv2d(3, 16, 3, padding=1), (3, 12, 12)),
        "conv_stride2": (nn.Conv2d(8, 8, 3, stride=2, padding=1), (8, 9, 9)),
        "conv_dil2_groups2": (nn.Conv2d(4, 6, 3, dilation=2, groups=2, padding=2), (4, 10, 10)),
        "conv_circular": (nn.Conv2d(4, 5, 3, padding=1, padding_mode="circular"), (4, 8, 8)),
        "conv_reflect": (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 7, 7)),
        "conv_replicate": (nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate"), (3, 7, 7)),
        "conv1d": (nn.Conv1d(3, 5, 5, padding=2), (3, 20)),
        "conv3d": (nn.Conv3d(2, 3, 3, padding=1), (2, 4, 4, 4)),
        "linear": (nn.Linear(50, 20), (50,)),
        "batchnorm2d": (_bn(6), (6, 4, 4)),
        "conv_bn": (nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _bn(6, 1)), (3, 8, 8)),
        "conv_transpose2d": (nn.ConvTranspose2d(4, 3, 3, stride=2), (4, 5, 5)),
    }


CASES = _cases()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CASES))
def test_top3_matches_explicit_svd(name, dtype):
    module, shape = CASES[name]
    module = module.to(dtype)
    exact = exact_singular_values(module, shape, k=3)
    got = fastclip.singular_values(module, shape, k=3)
    assert got.shape == (3,)
    assert got.dtype == dtype
    assert torch.all(got[:-1] >= got[1:])
    rel = ((got.double() - exact).abs() / exact[0]).max().item()
    assert rel <= 1e-4, (name, got, exact)


def test_circular_conv_equals_fft_formula():
    module, shape = CASES["conv_circular"]
    module = module.double()
    exact = exact_singular_values(module, shape)
    fft = fft_singular_values(module, shape)
    assert torch.allclose(exact, fft, rtol=1e-10, atol=1e-10)
    assert torch.allclose(fastclip.singular_values(module, shape, k=4, method="fft"), exact[:4])
    assert torch.allclose(fastclip.singular_values(module, shape, k=4), exact[:4], rtol=1e-6)


def test_batchnorm_closed_form_agrees_with_generic_path():
    bn = _bn(5, 3).double()
    closed = fastclip.singular_values(bn, (5, 3, 3), k=12)  # auto: closed form
    generic = fastclip.singular_values(bn, (5, 3, 3), k=12, method="lanczos")
    exact = exact_singular_values(bn, (5, 3, 3), k=12)
    assert torch.allclose(closed, exact, rtol=1e-12)
    assert torch.allclose(generic, exact, rtol=1e-7)


def test_module_left_exactly_as_it_was():
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _bn(4)).train()
    module[1].eval()  # a mixed flag pattern must be restored as is
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fastclip.singular_values(module, (3, 6, 6), k=2)
    fastclip.singular_values(module, (3, 6, 6), k=2, dtype=torch.float64)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert module.training and module[0].training and not module[1].training
    assert all(p.grad is None for p in module.parameters())
    assert module[0].weight.dtype == torch.float32


def test_powerqr_and_power_converge_to_exact():
    torch.manual_seed(0)  # a layer whose top singular values are not clustered
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    shape = (2, 6, 6)
    exact = exact_singular_values(conv, shape, k=2)
    op = AffineOperator(conv, shape)
    r = power_qr(op, k=2, n_iter=3000)
    assert torch.allclose(r.values, exact, rtol=1e-6)
    # warm start: one more iteration from converged vectors stays converged
    r2 = power_qr(op, X=r.right, n_iter=1)
    assert torch.allclose(r2.values, exact, rtol=1e-6)
    sigma, v = power_iteration(op, n_iter=3000)
    assert abs(sigma.item() - exact[0].item()) / exact[0].item() < 1e-6
    assert v.shape == (1, *shape)
    assert torch.allclose(
        fastclip.singular_values(conv, shape, k=2, method="powerqr", max_iter=3000), exact, rtol=1e-6
    )


def test_lanczos_singular_vectors():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    shape = (3, 7, 7)
    op = AffineOperator(conv, shape)
    r = lanczos(op, k=3)
    assert r.converged
    # A v_i = sigma_i u_i with unit, orthonormal v and u
    AV = op.matvec(r.right)
    assert torch.allclose(AV, r.left * r.values.view(-1, 1, 1, 1), atol=1e-8)
    Vm = r.right.reshape(3, -1)
    assert torch.allclose(Vm @ Vm.T, torch.eye(3, dtype=torch.float64), atol=1e-8)
    Um = r.left.reshape(3, -1)
    assert torch.allclose(Um @ Um.T, torch.eye(3, dtype=torch.float64), atol=1e-6)
    # A^T u_1 = sigma_1 v_1
    assert torch.allclose(op.rmatvec(r.left[:1]), r.values[0] * r.right[:1], atol=1e-6)


def test_lanczos_uses_far_fewer_passes_than_powerqr_on_clustered_spectrum():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False).double()
    shape = (8, 16, 16)
    exact = svds_singular_values(conv, shape, k=1)[0].item()
    op = AffineOperator(conv, shape)
    r = lanczos(op, k=1, tol=1e-9)
    assert abs(r.values[0].item() - exact) / exact < 1e-6
    q = power_qr(op, k=1, n_iter=r.passes)
    # same budget of layer passes: PowerQR is still far from 1e-6
    assert abs(q.values[0].item() - exact) / exact > 1e-5


def test_lanczos_thick_restart_keeps_converging():
    # A basis capped at 12 vectors on a 300-dimensional operator must restart several
    # times (keeping the best Ritz vectors and their images in the preallocated buffers)
    # and still reach the top-3 of the dense SVD.
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    shape = (3, 10, 10)
    exact = exact_singular_values(conv, shape, k=3)
    op = AffineOperator(conv, shape)
    r = lanczos(op, k=3, block=3, max_basis=12, tol=1e-10, record_history=True)
    assert r.converged and r.passes > 12 // 3  # more passes than one basis holds
    torch.testing.assert_close(r.values, exact, rtol=1e-8, atol=0)
    Vm = r.right.reshape(3, -1)
    torch.testing.assert_close(Vm @ Vm.T, torch.eye(3, dtype=torch.float64), atol=1e-8, rtol=0)


def test_lanczos_min_value_returns_every_ritz_pair_above_it():
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    op = AffineOperator(conv, (3, 4, 4))  # n = 48: a full basis is reached
    exact = exact_singular_values(conv, (3, 4, 4), k=48)
    threshold = float(exact[6] + exact[7]) / 2  # 7 singular values above it
    r = lanczos(op, k=1, block=4, tol=1e-12, min_value=threshold)
    assert r.values.shape == (7,) and r.right.shape == (7, 3, 4, 4) and r.left.shape[0] == 7
    torch.testing.assert_close(r.values, exact[:7], rtol=1e-8, atol=0)
    # never fewer than k, even when nothing is above the threshold
    r = lanczos(op, k=2, tol=1e-12, min_value=10 * float(exact[0]))
    assert r.values.shape == (2,)
    torch.testing.assert_close(r.values, exact[:2], rtol=1e-8, atol=0)


def test_lanczos_stop_above_stops_early_with_a_proven_lower_bound():
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 8, 3, padding=1).double()
    op = AffineOperator(conv, (8, 10, 10))
    exact = float(exact_singular_values(conv, (8, 10, 10), k=1)[0])
    full = lanczos(op, k=1, block=4, tol=1e-10, max_passes=60)
    # a threshold well below sigma_1 is passed early: stop at min_passes, not converged,
    # and the value returned is between the threshold and the true sigma_1
    r = lanczos(op, k=1, block=4, tol=1e-10, max_passes=60, stop_above=0.5 * exact, min_passes=3)
    assert r.passes == 3 and not r.converged
    assert 0.5 * exact <= float(r.values[0]) <= exact * (1 + 1e-12)
    # a threshold above sigma_1 is never reached: the run is the ordinary one
    r = lanczos(op, k=1, block=4, tol=1e-10, max_passes=60, stop_above=1.1 * exact, min_passes=3)
    assert r.converged and r.passes == full.passes
    assert abs(float(r.values[0]) - exact) <= 1e-9 * exact
    # stop_below under sigma_1: no early stop, the value converges (what the clip step's
    # rescale uses); above sigma_1 it leaves the early stop as it was
    r = lanczos(
        op,
        k=1,
        block=4,
        tol=1e-10,
        max_passes=60,
        stop_above=0.5 * exact,
        stop_below=0.9 * exact,
        min_passes=3,
    )
    assert r.converged and r.passes == full.passes
    assert abs(float(r.values[0]) - exact) <= 1e-9 * exact
    r = lanczos(
        op,
        k=1,
        block=4,
        tol=1e-10,
        max_passes=60,
        stop_above=0.5 * exact,
        stop_below=1.1 * exact,
        min_passes=3,
    )
    assert r.passes == 3 and not r.converged


def test_lanczos_tol_floor_measures_the_residual_against_the_threshold():
    # A layer at sigma_1 ~ 0.1 checked against a threshold of 1: the residual tolerance
    # relative to the threshold stops sooner, and the value is still a lower bound
    # within tol * floor^2 / sigma_1 of sigma_1 (the eigenvalue error of A^T A is at
    # most the residual).
    torch.manual_seed(5)
    conv = nn.Conv2d(8, 8, 3, padding=1).double()
    shape = (8, 10, 10)
    exact = float(exact_singular_values(conv, shape, k=1)[0])
    with torch.no_grad():
        conv.weight.mul_(0.1 / exact)
    op = AffineOperator(conv, shape)
    tight = lanczos(op, k=1, block=2, tol=1e-6, max_passes=200)
    loose = lanczos(op, k=1, block=2, tol=1e-6, max_passes=200, tol_floor=1.0)
    assert tight.converged and loose.converged and loose.passes < tight.passes, (loose.passes, tight.passes)
    assert 0.1 - 1e-6 / 0.1 <= float(loose.values[0]) <= 0.1 * (1 + 1e-9)


@pytest.mark.slow  # a ResNet18-size layer: the longest unit test (make test-fast stays under 2 min)
def test_lanczos_float32_basis_on_a_resnet18_size_layer():
    # float32 operators keep their Krylov basis in float32 (half the memory traffic);
    # the default float32 tolerance is still met against scipy's svds in float64
    torch.manual_seed(1)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    shape = (64, 32, 32)
    ref = svds_singular_values(conv.double(), shape, k=3, tol=1e-8)
    r = lanczos(AffineOperator(conv.float(), shape), k=3, block=4)
    assert r.converged and r.values.dtype == torch.float32
    torch.testing.assert_close(r.values.double(), ref, rtol=2e-5, atol=0)


def test_lanczos_grows_past_a_converged_warm_start():
    # Warm-started on exact singular vectors of lower values plus one random vector: the
    # top Ritz pairs are converged from the first pass, so the basis must grow from the
    # unconverged pairs' residuals, and keep its orthogonality while their residuals
    # shrink (a within-block QR that cancels most of a vector rescales its rounding-level
    # components along the basis: without re-orthogonalising, the Ritz value here
    # climbed to 9.5 sigma_1).
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    shape = (3, 6, 6)
    A = torch.func.jacrev(lambda x: conv(x.reshape(1, *shape)).flatten() - conv.bias.repeat_interleave(36))(
        torch.zeros(108, dtype=torch.float64)
    )
    _, S, Vh = torch.linalg.svd(A)
    X = torch.cat([Vh[5:9], torch.randn(1, 108, dtype=torch.float64)]).reshape(5, *shape)
    r = lanczos(AffineOperator(conv, shape), k=1, X=X, block=4, tol=1e-8, min_passes=4, max_passes=200)
    assert abs(float(r.values[0]) - float(S[0])) <= 1e-7 * float(S[0]), (r.values, S[:6])


def test_lanczos_extra_random_escapes_an_invariant_warm_start():
    torch.manual_seed(8)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    shape = (3, 6, 6)
    exact = exact_singular_values(conv, shape, k=108)
    A = torch.func.jacrev(lambda x: conv(x.reshape(1, *shape)).flatten())(
        torch.zeros(108, dtype=torch.float64)
    )
    v = torch.linalg.svd(A)[2][10].reshape(1, *shape)  # an exact singular vector, not the top
    op = AffineOperator(conv, shape)
    stuck = lanczos(op, k=1, X=v, tol=1e-8)
    assert stuck.passes == 1 and abs(float(stuck.values[0]) - float(exact[10])) < 1e-8  # the trap
    r = lanczos(op, k=1, X=v, tol=1e-8, extra_random=1, min_passes=5, max_passes=300)
    assert abs(float(r.values[0]) - float(exact[0])) <= 1e-7 * float(exact[0]), (r.values, exact[:3])


def test_operator_bias_free_path_is_the_linear_part():
    torch.manual_seed(5)

    class Shifted(nn.Conv2d):  # a subclass with its own forward must go through f(x) - f(0)
        def forward(self, x):
            return super().forward(x) + 3.0

    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for conv in (
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").double(),
        nn.Conv2d(3, 4, 3, stride=2).double(),
        Shifted(3, 4, 3).double(),
    ):
        op = AffineOperator(conv, (3, 6, 6))
        with torch.no_grad():
            ref = conv(x) - conv(torch.zeros_like(x[:1]))
            torch.testing.assert_close(op.matvec(x), ref, rtol=1e-12, atol=1e-12)
            conv.weight.mul_(2.0)  # an in-place update is seen at once
            ref = conv(x) - conv(torch.zeros_like(x[:1]))
            torch.testing.assert_close(op.matvec(x), ref, rtol=1e-12, atol=1e-12)
        y = torch.randn(2, *op.output_shape, dtype=torch.float64)
        torch.testing.assert_close(
            (op.matvec(x) * y).sum(), (x * op.rmatvec(y)).sum(), rtol=1e-12, atol=1e-12
        )
    lin = nn.Linear(5, 3).double()
    op = AffineOperator(lin, (5,))
    v = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), v @ lin.weight.detach().T, rtol=1e-12, atol=1e-12)


def _random_bn_(bn: nn.Module) -> None:
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3)


def test_operator_closed_form_chains_are_the_linear_part():
    torch.manual_seed(6)
    pair = ConvBN(3, 5, 3, stride=2, padding=1, bias=True).double()
    seq = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.Identity()).double()
    dense = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).double()
    relu = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU()).double()
    for m in (pair.bn, seq[1], dense[1]):
        _random_bn_(m)
    cases = [(pair, (3, 7, 7), 2), (seq, (2, 9), 2), (dense, (6,), 2), (pair.bn, (5, 4, 4), 1)]
    for module, shape, n_factors in cases:
        op = AffineOperator(module, shape)
        assert op._factors is not None and len(op._factors) == n_factors
        x = torch.randn(3, *shape, dtype=torch.float64)
        module.eval()
        with torch.no_grad():
            ref = module(x) - module(torch.zeros_like(x[:1]))
            torch.testing.assert_close(op.matvec(x), ref, rtol=1e-12, atol=1e-12)
            pair.bn.weight.mul_(-1.5)  # the scale is read at each product
            dense[1].running_var.mul_(2.0)
            seq[1].weight.mul_(0.5)
            ref = module(x) - module(torch.zeros_like(x[:1]))
            torch.testing.assert_close(op.matvec(x), ref, rtol=1e-12, atol=1e-12)
        module.train()  # the closed form is the eval-mode map whatever the flag
        y = torch.randn(2, *op.output_shape, dtype=torch.float64)
        torch.testing.assert_close(
            (op.matvec(x[:2]) * y).sum(), (x[:2] * op.rmatvec(y)).sum(), rtol=1e-12, atol=1e-12
        )
        assert module.training
    assert AffineOperator(relu, (3, 6, 6))._factors is None  # not linear: the generic path (and its check)
    with pytest.raises(ValueError, match="not affine"):
        AffineOperator(relu, (3, 6, 6), check_affine=True)
    no_stats = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, track_running_stats=False))
    assert AffineOperator(no_stats, (3, 6, 6))._factors is None


def test_gram_many_shares_the_first_layer_and_equals_separate_grams():
    torch.manual_seed(7)
    pair = ConvBN(3, 5, 3, stride=2, padding=1).double()
    _random_bn_(pair.bn)
    other = nn.Conv2d(3, 5, 3).double()
    shape = (3, 7, 7)
    ops = [
        AffineOperator(pair.conv, shape),
        AffineOperator(pair, shape),
        AffineOperator(other, shape),
        AffineOperator(nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU()).double(), shape),
    ]
    Xs = [torch.randn(b, *shape, dtype=torch.float64) for b in (1, 2, 1, 1)]
    calls = []
    conv_forward = pair.conv._conv_forward
    pair.conv._conv_forward = lambda *a: (calls.append(a[0].shape[0]), conv_forward(*a))[1]
    got = gram_many(ops, Xs)
    assert calls == [3]  # the conv ran once, on the conv's and the pair's vectors together
    assert [op.passes for op in ops] == [1, 1, 1, 1]
    for op, X, g in zip(ops, Xs, got):
        torch.testing.assert_close(g, op.gram(X), rtol=1e-12, atol=1e-12)
    # A^T A of the pair is A_conv^T D^2 A_conv: check against the explicit matrix
    A = explicit_matrix(pair.eval(), shape)  # f(e_i) - f(0), not the closed form
    torch.testing.assert_close(
        got[1].reshape(2, -1), Xs[1].reshape(2, -1) @ (A.T @ A), rtol=1e-10, atol=1e-10
    )
    with pytest.raises(ValueError, match="one batch per operator"):
        gram_many(ops, Xs[:2])
    r_many = power_qr_many(ops[:2], [Xs[0], Xs[1]], n_iter=3)
    for op, X, r in zip(ops[:2], Xs[:2], r_many):
        ref = power_qr(op, X=X, n_iter=3)
        torch.testing.assert_close(r.values, ref.values, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r.right, ref.right, rtol=1e-12, atol=1e-12)


def test_gram_path_agrees_with_explicit_svd_on_a_tall_composition():
    torch.manual_seed(5)
    block = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16))
    with torch.no_grad():
        block[1].weight.uniform_(0.5, 3)
        block[1].running_var.uniform_(0.5, 2)
    block.eval()
    ref = exact_singular_values(block, (1, 9, 9), k=5)  # 1296 x 81
    torch.testing.assert_close(gram_singular_values(block, (1, 9, 9), k=5), ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(exact_top(block, (1, 9, 9), k=5), ref, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="limited to 4096"):
        gram_singular_values(nn.Conv2d(8, 8, 3), (8, 32, 32))


def test_svds_agrees_with_explicit():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1).double()
    shape = (3, 9, 9)
    assert torch.allclose(
        svds_singular_values(conv, shape, k=3), exact_singular_values(conv, shape, k=3), rtol=1e-9
    )


@pytest.mark.timeout(300)
def test_resnet18_size_layer_against_svds():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    shape = (64, 32, 32)
    ref = svds_singular_values(conv, shape, k=1, tol=1e-6)[0].item()
    got = fastclip.singular_values(conv, shape, k=1, dtype=torch.float64)[0].item()
    assert abs(got - ref) / ref < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("name", ["conv3to16", "conv_stride2", "linear", "conv_bn"])
def test_cuda(name):
    module, shape = CASES[name]
    module = module.cuda()
    exact = exact_singular_values(module, shape, k=3)
    got = fastclip.singular_values(module, shape, k=3)
    assert got.device.type == "cuda"
    assert ((got.double().cpu() - exact).abs() / exact[0]).max() <= 1e-4


# -- bad input ---------------------------------------------------------------------
def test_wrong_input_shape():
    with pytest.raises(ValueError, match="does not fit"):
        fastclip.singular_values(nn.Conv2d(3, 4, 3), (5, 8, 8))
    with pytest.raises(ValueError, match="does not fit"):
        fastclip.singular_values(nn.Linear(10, 3), (11,))


def test_k_larger_than_dimension():
    with pytest.raises(ValueError, match="k=7 is larger"):
        fastclip.singular_values(nn.Linear(6, 5), (6,), k=7)


def test_not_affine():
    with pytest.raises(ValueError, match="not affine"):
        fastclip.singular_values(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU()), (2, 6, 6))


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'svd'.*lanczos"):
        fastclip.singular_values(nn.Linear(3, 3), (3,), method="svd")


def test_exact_top_of_an_eval_batch_norm_is_its_closed_form():
    """A BN far above the Gram path's size (16 x 40 x 40 inputs) gets its diagonal's top values,
    equal to the explicit matrix's SVD on a small input."""
    torch.manual_seed(6)
    bn = nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.weight.uniform_(-3, 3)
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    torch.testing.assert_close(
        exact_top(bn, (16, 3, 3), k=12), exact_singular_values(bn, (16, 3, 3), k=12), rtol=1e-6, atol=0
    )
    top = exact_top(bn, (16, 40, 40), k=3)
    expected = (bn.weight.detach().abs().double() / (bn.running_var.double() + bn.eps).sqrt()).max()
    torch.testing.assert_close(top, expected.repeat(3), rtol=1e-6, atol=0)
