"""fastclip.parametrizations.spectral_norm against explicit float64 matrices, beside torch's."""

from __future__ import annotations

import copy
import io
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrizations as torch_parametrizations
from torch.nn.utils import parametrize

import fastclip
from fastclip.exact import explicit_matrix
from fastclip.parametrizations import OperatorSpectralNorm, spectral_norm

# (id, layer factory, input shape): the layers where the reshaped kernel is not the operator
CASES = [
    ("zero-padded", lambda: nn.Conv2d(4, 6, 3, padding=1), (4, 8, 8)),
    ("strided", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (4, 9, 9)),
    ("dilated", lambda: nn.Conv2d(4, 6, 3, dilation=2, padding=2), (4, 8, 8)),
    ("grouped", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (4, 8, 8)),
    ("transposed", lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (4, 5, 5)),
    ("reflect-1d", lambda: nn.Conv1d(3, 5, 5, padding=2, padding_mode="reflect"), (3, 20)),
    ("circular-3d", lambda: nn.Conv3d(2, 3, 3, padding=1, padding_mode="circular"), (2, 4, 4, 4)),
    (
        "replicate-strided",
        lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="replicate"),
        (3, 8, 8),
    ),
    ("transposed-1d-grouped", lambda: nn.ConvTranspose1d(4, 6, 5, stride=2, padding=2, groups=2), (4, 7)),
]


def operator_norm(layer: nn.Module, make, shape) -> float:
    """sigma_1 of the layer's current (normalised) weight, as an explicit float64 matrix of
    a plain layer from ``make`` holding that weight. (Not a deep copy with the
    parametrization removed: the copy shares the parametrized class, and removing the
    parametrization from it deletes the original's ``weight`` property.)"""
    plain = make()
    with torch.no_grad():
        plain.weight.copy_(layer.weight.detach().to(plain.weight.dtype))
    return float(torch.linalg.matrix_norm(explicit_matrix(plain, shape), 2))


def train_a_little(layer: nn.Module, shape, steps: int, forwards: int) -> None:
    """``steps`` SGD steps (the weight moves, the vectors follow), then ``forwards``
    training forwards at the final weight."""
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(steps):
        x = torch.randn((8, *shape), generator=g)
        loss = -layer(x).square().mean()  # pushes sigma up: the normalisation must hold it
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for _ in range(forwards):
            layer(torch.randn((1, *shape), generator=g))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_normalised_operator_has_norm_one_where_torchs_does_not(case):
    _, make, shape = case
    torch.manual_seed(0)
    ours = spectral_norm(make(), input_shape=shape)
    theirs = make()
    with torch.no_grad():  # the same raw weight and bias
        theirs.weight.copy_(ours.parametrizations.weight.original)
        theirs.bias.copy_(ours.bias)
    theirs = torch_parametrizations.spectral_norm(theirs)
    for layer in (ours, theirs):
        train_a_little(layer, shape, steps=5, forwards=150)
    ours_norm, torch_norm = operator_norm(ours, make, shape), operator_norm(theirs, make, shape)
    assert abs(ours_norm - 1) < 1e-3, ours_norm
    assert abs(torch_norm - 1) > 0.01, torch_norm  # torch normalises the reshaped kernel
    ours.eval()
    assert abs(operator_norm(ours, make, shape) - 1) < 1e-3


@pytest.mark.parametrize("case", CASES[:5], ids=[c[0] for c in CASES[:5]])
def test_power_iterations_converge_from_random_vectors(case):
    # The adjoint is right only if plain power iteration from random vectors finds sigma_1.
    _, make, shape = case
    torch.manual_seed(0)
    layer = spectral_norm(make(), input_shape=shape)
    p = layer.parametrizations.weight[0]
    g = torch.Generator().manual_seed(3)
    p._v.copy_(torch.randn(p._v.shape, generator=g))
    p._u.copy_(torch.randn(p._u.shape, generator=g))
    with torch.no_grad():
        for _ in range(400):
            layer.weight  # noqa: B018 - each read in training mode is one iteration
    raw = copy.deepcopy(layer.parametrizations.weight.original.detach())
    plain = make()
    plain.weight.data = raw.clone()
    exact = float(torch.linalg.matrix_norm(explicit_matrix(plain, shape), 2))
    assert float(p.sigma) == pytest.approx(exact, rel=1e-3)


def test_clip_divides_by_max_one_sigma_over_c():
    torch.manual_seed(0)
    shape = (3, 8, 8)

    def make():
        return nn.Conv2d(3, 5, 3, padding=1)

    conv = make()
    with torch.no_grad():
        conv.weight.mul_(10)
    exact = operator_norm(conv, make, shape)
    big = spectral_norm(copy.deepcopy(conv), input_shape=shape, clip=0.5)
    assert operator_norm(big, make, shape) == pytest.approx(0.5, rel=1e-4)
    # a layer already below the clip value keeps its weight
    small = spectral_norm(copy.deepcopy(conv), input_shape=shape, clip=2 * exact)
    torch.testing.assert_close(small.weight, conv.weight)


def test_sigma_is_differentiable_in_the_weight():
    torch.manual_seed(0)
    shape = (2, 6, 6)
    layer = spectral_norm(nn.Conv2d(2, 3, 3, padding=1), input_shape=shape)
    layer.weight.sum().backward()
    grad = layer.parametrizations.weight.original.grad
    # gradient of sum(W / sigma(W)) with sigma = <u, A_W v>: compare with the same formula
    p = layer.parametrizations.weight[0]
    W = layer.parametrizations.weight.original.detach().clone().requires_grad_(True)
    sigma = (p._u * torch.nn.functional.conv2d(p._v, W, padding=1)).sum()
    (W / sigma).sum().backward()
    torch.testing.assert_close(grad, W.grad)
    assert not torch.allclose(grad, torch.full_like(grad, 1 / float(sigma.detach())))  # sigma's term counts


def test_input_shape_from_first_forward_and_state_dict_round_trip():
    torch.manual_seed(0)
    shape = (3, 10, 10)
    layer = spectral_norm(nn.Conv2d(3, 4, 3, stride=2))
    with pytest.raises(RuntimeError, match="input shape is unknown"):
        layer.weight  # noqa: B018
    layer(torch.randn(2, *shape))
    assert layer.parametrizations.weight[0].input_shape == shape
    assert abs(operator_norm(layer, lambda: nn.Conv2d(3, 4, 3, stride=2), shape) - 1) < 1e-3
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    fresh = spectral_norm(nn.Conv2d(3, 4, 3, stride=2))
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    fresh.eval(), layer.eval()
    torch.testing.assert_close(fresh.weight, layer.weight, rtol=0, atol=0)
    assert fresh.parametrizations.weight[0].input_shape == shape


def test_remove_leaves_the_normalised_weight():
    torch.manual_seed(0)
    shape = (3, 8, 8)
    layer = spectral_norm(nn.Conv2d(3, 4, 3, padding=1, dilation=2), input_shape=shape)
    layer(torch.randn(1, *shape))
    layer.eval()
    expected = layer.weight.detach().clone()
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    assert type(layer) is nn.Conv2d
    torch.testing.assert_close(layer.weight.detach(), expected)
    assert operator_norm(layer, lambda: nn.Conv2d(3, 4, 3, padding=1, dilation=2), shape) == pytest.approx(
        1, abs=1e-3
    )


def test_eval_divides_by_the_current_weights_sigma_and_writes_no_buffer():
    # (an eval forward right after an optimizer step: the stored sigma is the old weight's)
    torch.manual_seed(0)
    layer = spectral_norm(nn.Conv2d(3, 4, 3, padding=1), input_shape=(3, 8, 8)).eval()
    p = layer.parametrizations.weight[0]
    u, v, sigma = p._u.clone(), p._v.clone(), p.sigma.clone()
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(2)
    torch.testing.assert_close(layer.weight, layer.parametrizations.weight.original / (2 * sigma))
    assert torch.equal(p._u, u) and torch.equal(p._v, v) and torch.equal(p.sigma, sigma)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_vectors_and_sigma_in_float32(dtype):
    torch.manual_seed(0)
    shape = (3, 8, 8)
    layer = spectral_norm(nn.Conv2d(3, 4, 3, padding=1, stride=2), input_shape=shape)
    with torch.autocast("cpu", dtype=dtype):
        for _ in range(3):
            y = layer(torch.randn(2, *shape))
    assert y.dtype == dtype
    p = layer.parametrizations.weight[0]
    assert p._u.dtype == p._v.dtype == p.sigma.dtype == torch.float32
    assert operator_norm(layer, lambda: nn.Conv2d(3, 4, 3, padding=1, stride=2), shape) == pytest.approx(
        1, abs=1e-3
    )


def test_half_precision_weight():
    torch.manual_seed(0)
    shape = (3, 8, 8)
    layer = spectral_norm(nn.Conv2d(3, 4, 3, padding=1).to(torch.bfloat16), input_shape=shape)
    assert layer.weight.dtype == torch.bfloat16
    assert layer.parametrizations.weight[0]._v.dtype == torch.float32
    assert operator_norm(layer, lambda: nn.Conv2d(3, 4, 3, padding=1), shape) == pytest.approx(
        1, abs=1e-2
    )  # bf16 weight rounding


def test_model_converted_to_bfloat16_after_registration():
    # .to(bfloat16) converts the buffers too; the iterations still run in float32
    torch.manual_seed(0)
    shape = (3, 8, 8)
    layer = spectral_norm(nn.Conv2d(3, 4, 3, padding=1), input_shape=shape).to(torch.bfloat16)
    y = layer(torch.randn(2, *shape, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert operator_norm(layer, lambda: nn.Conv2d(3, 4, 3, padding=1), shape) == pytest.approx(1, abs=1e-2)


def test_linear_matches_the_matrix_norm():
    torch.manual_seed(0)
    layer = spectral_norm(nn.Linear(7, 5))
    assert float(torch.linalg.matrix_norm(layer.weight.detach().double(), 2)) == pytest.approx(1, abs=1e-5)


def test_torch_compile_runs_without_recompiling_between_steps():
    torch._dynamo.reset()
    torch.manual_seed(0)
    shape = (3, 8, 8)
    layer = spectral_norm(nn.Conv2d(3, 4, 3, padding=1, stride=2), input_shape=shape)
    eager = copy.deepcopy(layer)
    counts = []

    def backend(gm, example_inputs):
        counts.append(1)
        return gm.forward

    compiled = torch.compile(layer, backend=backend)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(2, *shape, generator=g)
        torch.testing.assert_close(compiled(x), eager(x))
    assert len(counts) == 1
    torch.testing.assert_close(layer.parametrizations.weight[0]._v, eager.parametrizations.weight[0]._v)
    layer.eval(), eager.eval()
    for _ in range(2):
        torch.testing.assert_close(compiled(x), eager(x))
    assert len(counts) == 2  # eval mode: one more graph, then reused


def test_torch_compile_with_the_input_shape_from_the_first_forward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = spectral_norm(nn.Conv2d(3, 4, 3, padding=1))
    counts = []

    def backend(gm, example_inputs):
        counts.append(1)
        return gm.forward

    compiled = torch.compile(layer, backend=backend)
    for _ in range(3):
        compiled(torch.randn(2, 3, 8, 8))
    assert len(counts) == 1  # the set-up (Lanczos) ran eagerly, the step traced once
    assert layer.parametrizations.weight[0].input_shape == (3, 8, 8)


def test_exported_from_the_package():
    assert fastclip.parametrizations.spectral_norm is spectral_norm
    assert isinstance(spectral_norm(nn.Linear(3, 2)).parametrizations.weight[0], OperatorSpectralNorm)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: spectral_norm(nn.ReLU()), TypeError, "got ReLU"),
        (
            lambda: spectral_norm(nn.Linear(3, 2), "bias2"),
            ValueError,
            r"no parameter 'bias2'; expected one of",
        ),
        (
            lambda: spectral_norm(nn.Conv2d(3, 4, 3), input_shape=(4, 8, 8)),
            ValueError,
            r"\(4, 8, 8\) does not fit Conv2d",
        ),
        (lambda: spectral_norm(nn.Conv2d(3, 4, 3), input_shape=(3, 8)), ValueError, r"\(3, 8\) does not fit"),
        (
            lambda: spectral_norm(nn.Conv2d(3, 4, 5), input_shape=(3, 2, 2)),
            ValueError,
            r"\(3, 2, 2\) does not fit",
        ),
        (lambda: spectral_norm(nn.Conv2d(3, 4, 3), input_shape="abc"), ValueError, "sequence of ints"),
        (
            lambda: spectral_norm(nn.Linear(3, 2), clip=0),
            ValueError,
            "clip must be a positive finite number, got 0",
        ),
        (lambda: spectral_norm(nn.Linear(3, 2), clip=-1.0), ValueError, "got -1.0"),
        (lambda: spectral_norm(nn.Linear(3, 2), n_power_iterations=0), ValueError, "n_power_iterations"),
    ],
)
def test_bad_input_is_one_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        shape = (3, 8, 8)
        model = DistributedDataParallel(
            spectral_norm(nn.Conv2d(3, 4, 3, stride=2, padding=1), input_shape=shape)
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(10 + rank)  # different data per rank
        for _ in range(3):
            loss = model(torch.randn(4, *shape, generator=g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        p = model.module.parametrizations.weight
        torch.save(
            {"u": p[0]._u, "v": p[0]._v, "sigma": p[0].sigma, "w": p.original.detach()}, f"{out}/{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_keep_identical_vectors_and_weights(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0)
    assert 0.1 < float(r0["sigma"]) < 10
