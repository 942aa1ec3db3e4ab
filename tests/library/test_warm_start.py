"""The Fourier start for convolutions: exact on circular layers, close on zero-padded ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastclip.linalg.fourier import circular_singular_values, polyphase_kernel
from fastclip.linalg.operator import AffineOperator
from fastclip.linalg.warm_start import conv_start, start_for, supports
from fastclip.spectral import lanczos, singular_values


def _rayleigh(module, shape, x):
    op = AffineOperator(module.double(), shape)
    return float(op.matvec(x.double()).norm() / x.double().norm())


@pytest.mark.parametrize("cin,cout,hw,dilation", [(3, 16, 16, 1), (8, 8, 12, 1), (16, 4, 10, 2)])
def test_on_a_circular_conv_the_start_is_the_top_singular_vector(cin, cout, hw, dilation):
    # its Rayleigh quotient equals the circular sigma_1 computed by FFT
    torch.manual_seed(cin)
    conv = nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, padding_mode="circular", bias=False)
    shape = (cin, hw, hw)
    x = conv_start(conv, shape)
    assert x.shape == (1, *shape) and abs(float(x.norm()) - 1) < 1e-12
    s1 = float(circular_singular_values(conv.weight, (hw, hw), k=1, dilation=dilation)[0])
    assert _rayleigh(conv, shape, x) == pytest.approx(s1, rel=1e-9)


def test_on_a_strided_circular_conv_the_polyphase_start_is_the_top_singular_vector():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode="circular", bias=False)
    shape = (8, 16, 16)
    s1 = float(circular_singular_values(polyphase_kernel(conv.weight, 2), (8, 8), k=1)[0])
    assert _rayleigh(conv, shape, conv_start(conv, shape)) == pytest.approx(s1, rel=1e-9)


def test_conv_bn_start_uses_the_batch_norm_scale():
    torch.manual_seed(2)
    pair = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, padding_mode="circular", bias=False), nn.BatchNorm2d(8)
    ).eval()
    with torch.no_grad():
        pair[1].running_var.uniform_(0.1, 4.0)
        pair[1].weight.uniform_(0.5, 2.0)
    shape = (4, 8, 8)
    bn = pair[1]
    w = pair[0].weight.double() * (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).view(
        -1, 1, 1, 1
    )
    s1 = float(circular_singular_values(w, (8, 8), k=1)[0])
    assert _rayleigh(pair, shape, conv_start(pair, shape)) == pytest.approx(s1, rel=1e-9)


def test_on_a_zero_padded_conv_the_start_is_close_and_lanczos_needs_fewer_passes():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    shape = (3, 32, 32)
    exact = float(singular_values(conv, shape, method="svds")[0])
    assert _rayleigh(conv, shape, conv_start(conv, shape)) >= 0.99 * exact
    op = AffineOperator(conv, shape)
    cold = lanczos(op, k=1, with_left=False, generator=torch.Generator().manual_seed(0))
    warm = lanczos(op, k=1, X=start_for(conv, shape), with_left=False)
    assert warm.passes < 0.8 * cold.passes, (warm.passes, cold.passes)
    assert abs(float(warm.values[0]) - exact) <= 1e-5 * exact


def test_the_random_part_keeps_lanczos_off_an_invariant_start():
    # a circular layer whose top frequency is off the grid the search sees cannot trap
    # the run on the wave of a lower frequency (an exact singular vector)
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", bias=False).double()
    shape = (4, 8, 8)
    exact = float(circular_singular_values(conv.weight, (8, 8), k=1)[0])
    got = float(singular_values(conv, shape)[0])
    assert abs(got - exact) <= 1e-6 * exact


def test_where_it_does_not_pay_or_apply_there_is_no_start():
    assert start_for(nn.Conv2d(256, 256, 3, padding=1), (256, 32, 32)) is None  # wide: the search costs more
    assert start_for(nn.Conv2d(4, 8, 3, groups=2), (4, 8, 8)) is None
    assert not supports(nn.Linear(4, 4), (4,))
    assert not supports(nn.Conv2d(3, 8, 3, stride=2), (3, 7, 7))
    with pytest.raises(ValueError, match="conv_start needs a Conv2d .* got Linear at \\(4,\\)"):
        conv_start(nn.Linear(4, 4), (4,))
