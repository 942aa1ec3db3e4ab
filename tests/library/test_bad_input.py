"""Library calls on weights, dtypes and modules they cannot take: one clear error naming the
layer and what was expected (non-finite weights, a module that is not implicitly linear, a
parametrization applied twice, a bad k), or the work done in float32 for half precision
and the result checked against a float64 reference."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import fastclip
from fastclip.exact import explicit_matrix
from fastclip.spectral import power_qr


def exact_sigma(module: nn.Module, shape: tuple[int, ...]) -> float:
    m = copy.deepcopy(module).double().eval()
    return float(torch.linalg.matrix_norm(explicit_matrix(m, shape), ord=2))


@pytest.mark.parametrize(
    "value, counts", [(float("nan"), "(1 NaN, 0 inf)"), (float("inf"), "(0 NaN, 1 inf)")]
)
@pytest.mark.parametrize("make", ["conv", "linear"])
def test_non_finite_weights_are_named(value, counts, make):
    layer, shape = (nn.Conv2d(2, 3, 3), (2, 6, 6)) if make == "conv" else (nn.Linear(4, 3), (4,))
    with torch.no_grad():
        layer.weight.view(-1)[1] = value
    expected = re.escape(f"{type(layer).__name__} has non-finite values: weight {counts}")
    with pytest.raises(ValueError, match=expected):
        fastclip.singular_values(layer, shape)
    with pytest.raises(ValueError, match=expected):
        fastclip.clip_spectral_norm_(layer, shape, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        fastclip.lipschitz_report(nn.Sequential(layer), shape)


def test_a_wrapper_whose_layer_diverged_says_so_at_its_clip():
    torch.manual_seed(0)
    w = fastclip.SpectralNorm(nn.Conv2d(2, 3, 3), clip=1.0, clip_steps=2, init_delay=0, identifier="conv1")
    w(torch.randn(2, 2, 6, 6))
    with torch.no_grad():
        w.module.weight.fill_(float("nan"))
    with pytest.raises(
        ValueError, match=r"SpectralNorm\(conv1\) \(Conv2d\) has non-finite values: weight \(54 NaN"
    ):
        w.clip_()


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU()), (2, 6, 6)),
        (nn.LayerNorm(6), (6,)),
    ],
    ids=["conv+relu", "layernorm"],
)
def test_the_wrapper_refuses_a_module_that_is_not_implicitly_linear(module, shape):
    if isinstance(module, nn.LayerNorm):
        with torch.no_grad():
            module.weight.fill_(5.0)
    torch.manual_seed(0)
    w = fastclip.SpectralNorm(module, clip=1.0, identifier="block")
    with pytest.raises(ValueError, match=r"SpectralNorm\(block\): .* is not affine"):
        w(torch.randn(4, *shape))
    with pytest.raises(ValueError, match="is not affine"):  # as singular_values does
        fastclip.singular_values(module, shape)


def test_the_parametrization_applied_twice_says_already_parametrized():
    lin = fastclip.parametrizations.spectral_norm(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"Linear.weight is already parametrized \(OperatorSpectralNorm\)"):
        fastclip.parametrizations.spectral_norm(lin)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_power_qr_refuses_a_bad_k(k):
    op = fastclip.AffineOperator(nn.Linear(4, 3), (4,))
    with pytest.raises(
        ValueError, match=rf"k must be an integer in 1\.\.3 \(the operator's dimension\), got {k!r}"
    ):
        power_qr(op, k=k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_are_measured_and_clipped_in_float32(dtype, caplog):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(4)
    half = copy.deepcopy(conv).to(dtype)
    shape = (3, 6, 6)
    with caplog.at_level("INFO", logger="fastclip"):
        s = fastclip.singular_values(half, shape)
    assert s.dtype == torch.float32 and "computed in float32" in caplog.text
    assert float(s[0]) == pytest.approx(exact_sigma(half, shape), rel=1e-4)
    lin = nn.Linear(6, 5).to(dtype)
    assert float(fastclip.singular_values(lin, (6,))[0]) == pytest.approx(exact_sigma(lin, (6,)), rel=1e-4)
    bn = nn.BatchNorm2d(3).to(dtype).eval()
    assert float(fastclip.singular_values(bn, shape)[0]) == pytest.approx(exact_sigma(bn, shape), rel=1e-3)
    before, after = fastclip.clip_spectral_norm_(half, shape, 1.0)
    assert before == pytest.approx(exact_sigma(conv.to(dtype), shape), rel=1e-3)
    assert half.weight.dtype == dtype
    assert after == pytest.approx(exact_sigma(half, shape), rel=1e-3) and after <= 1.02


def test_the_parametrization_names_non_finite_weights():
    conv = nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="spectral_norm on Conv2d: the weight has 1 NaN and 0 inf entries"):
        fastclip.parametrizations.spectral_norm(conv, input_shape=(2, 6, 6))
