"""Models: shapes, exact parameter counts of the reference architectures, ConvBN structure,
the input normalisation layer, ResNet18's halve_shortcut option and the registry."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastclip.pipeline.methods import get as get_method
from fastclip.pipeline.models import MODELS, available, get_model
from fastclip.pipeline.models.layers import ConvBN, Normalize, make_normalize
from fastclip.pipeline.models.resnet import BasicBlock

NAMES = ["SimpleConv", "ResNet18", "DLA"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- independent parameter counts (arithmetic on the published architectures) --------


def _conv(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout


def _block(cin: int, cout: int, stride: int, bn: int) -> int:
    """kuangliu BasicBlock: two 3x3 convs + BN each, 1x1 conv + BN shortcut on a shape change."""
    n = _conv(3, cin, cout) + _conv(3, cout, cout) + 2 * bn * 2 * cout
    if stride != 1 or cin != cout:
        n += _conv(1, cin, cout) + bn * 2 * cout
    return n


def resnet18_count(c: int, classes: int = 10, bn: int = 1) -> int:
    n = _conv(3, c, 64) + bn * 2 * 64
    cin = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        n += _block(cin, width, stride, bn) + _block(width, width, 1, bn)
        cin = width
    return n + 512 * classes + classes


def _tree(cin: int, cout: int, level: int, stride: int, bn: int) -> int:
    """kuangliu Tree (master): level 1 = root(2*out) + 2 blocks; level L = root((L+2)*out)
    + subtrees of levels L-1..1 + prev_root block + 2 blocks."""
    if level == 1:
        return (
            _conv(1, 2 * cout, cout)
            + bn * 2 * cout
            + _block(cin, cout, stride, bn)
            + _block(cout, cout, 1, bn)
        )
    n = _conv(1, (level + 2) * cout, cout) + bn * 2 * cout
    n += sum(_tree(cin, cout, i, stride, bn) for i in range(1, level))
    return n + _block(cin, cout, stride, bn) + 2 * _block(cout, cout, 1, bn)


def dla_count(c: int, classes: int = 10, bn: int = 1) -> int:
    n = _conv(3, c, 16) + _conv(3, 16, 16) + _conv(3, 16, 32) + bn * 2 * (16 + 16 + 32)
    n += (
        _tree(32, 64, 1, 1, bn)
        + _tree(64, 128, 2, 2, bn)
        + _tree(128, 256, 2, 2, bn)
        + _tree(256, 512, 1, 2, bn)
    )
    return n + 512 * classes + classes


def simpleconv_count(c: int, size: int, classes: int = 10, bn: int = 1) -> int:
    return _conv(3, c, 64) + 64 + bn * 2 * 64 + 64 * size * size * classes + classes


# -- shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("name", NAMES)
def test_output_shape(name, in_channels, size, bn):
    torch.manual_seed(0)
    model = get_model(name, in_channels=in_channels, input_size=size, bn=bn)
    x = torch.rand(2, in_channels, size, size)
    out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    out.sum().backward()  # the graph is connected to every parameter
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["ResNet18", "DLA"])
@pytest.mark.parametrize("size", [16, 40])
def test_adaptive_pooling_any_square_size(name, size):
    model = get_model(name, in_channels=3, num_classes=7, input_size=size).eval()
    assert model(torch.rand(1, 3, size, size)).shape == (1, 7)


def test_simpleconv_rejects_other_sizes():
    model = get_model("SimpleConv", in_channels=1, input_size=28)
    with pytest.raises(ValueError, match="28x28.*got \\(32, 32\\)"):
        model(torch.rand(1, 1, 32, 32))


# -- parameter counts -----------------------------------------------------------------


def test_resnet18_cifar_count_is_the_reference():
    assert resnet18_count(3) == 11_173_962
    assert n_params(get_model("ResNet18")) == 11_173_962


def test_dla_count_is_the_reference():
    assert dla_count(3) == 16_291_386
    assert n_params(get_model("DLA")) == 16_291_386


def test_simpleconv_mnist_count():
    # conv 64*1*9 + conv bias 64 + BN 2*64 + fc 64*28*28*10 + 10
    assert simpleconv_count(1, 28) == 576 + 64 + 128 + 501_760 + 10 == 502_538
    assert n_params(get_model("SimpleConv", in_channels=1, input_size=28)) == 502_538


@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)])
def test_counts_for_every_variant(in_channels, size, bn):
    b = int(bn)
    expected = {
        "SimpleConv": simpleconv_count(in_channels, size, bn=b),
        "ResNet18": resnet18_count(in_channels, bn=b),
        "DLA": dla_count(in_channels, bn=b),
    }
    for name, count in expected.items():
        assert n_params(get_model(name, in_channels=in_channels, input_size=size, bn=bn)) == count, name
    # noBN removes exactly the BN affine parameters: ResNet18 has 4800 BN channels.
    if not bn:
        assert resnet18_count(in_channels, bn=1) - resnet18_count(in_channels, bn=0) == 9600


# -- structure --------------------------------------------------------------------------


@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_every_conv_is_a_convbn(name, bn):
    model = get_model(name, bn=bn)
    convbns = [m for m in model.modules() if isinstance(m, ConvBN)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(convbns) == len(convs) > 0
    assert {id(m.conv) for m in convbns} == {id(c) for c in convs}
    if bn:
        assert {id(m.bn) for m in convbns} == {id(b) for b in bns}
        assert all(
            isinstance(m.bn, nn.BatchNorm2d) and m.bn.num_features == m.conv.out_channels for m in convbns
        )
    else:
        assert bns == []
        assert all(isinstance(m.bn, nn.Identity) for m in convbns)
    # ResNet18: stem + 8 blocks x 2 + 3 shortcuts. DLA: stem 3; a level-1 tree with a
    # shape change = root + 3 + 2 = 6; a level-2 tree = root + level-1 tree 6 +
    # prev_root 3 + 2 + 2 = 14; trees 6 + 14 + 14 + 6.
    expected_convs = {"SimpleConv": 1, "ResNet18": 1 + 16 + 3, "DLA": 3 + 6 + 14 + 14 + 6}
    assert len(convs) == expected_convs[name]


def test_convbn_forward_and_attributes():
    torch.manual_seed(0)
    layer = ConvBN(3, 5, 3, stride=2, padding=1, bias=True).eval()
    layer.bn.running_mean.uniform_(-1, 1)
    layer.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    y = nn.functional.batch_norm(
        nn.functional.conv2d(x, layer.conv.weight, layer.conv.bias, 2, 1),
        layer.bn.running_mean,
        layer.bn.running_var,
        layer.bn.weight,
        layer.bn.bias,
        eps=layer.bn.eps,
    )
    torch.testing.assert_close(layer(x), y)
    plain = ConvBN(3, 5, 1, bn=False)
    assert isinstance(plain.bn, nn.Identity) and plain.conv.bias is None


def test_named_layers_are_stable():
    names = dict(get_model("ResNet18").named_modules())
    for n in ("normalize", "conv1.conv", "conv1.bn", "layer2.0.shortcut.conv", "layer4.1.conv2.bn", "linear"):
        assert n in names, n
    names = dict(get_model("DLA").named_modules())
    for n in (
        "base.0.conv",
        "layer4.level_1.root.conv.bn",
        "layer4.prev_root.conv1.conv",
        "layer6.root.conv.conv",
    ):
        assert n in names, n
    names = dict(get_model("SimpleConv").named_modules())
    assert {"normalize", "conv1.conv", "conv1.bn", "fc1"} <= set(names)


# -- normalisation --------------------------------------------------------------------


def test_normalize_layer_math_and_buffers():
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 2.0, 0.1))
    x = torch.rand(2, 3, 4, 4)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 2.0, x[:, 2] / 0.1], 1)
    torch.testing.assert_close(norm(x), expected)
    assert list(norm.parameters()) == []
    assert set(norm.state_dict()) == {"mean", "std"}
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalize((0.0,), (0.0,))
    with pytest.raises(ValueError, match="one value per input channel \\(3\\)"):
        make_normalize(3, mean=(0.1,))


@pytest.mark.parametrize("name", NAMES)
def test_model_applies_normalize_first(name):
    torch.manual_seed(0)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    model = get_model(name, mean=mean, std=std).eval()
    assert isinstance(model.normalize, Normalize)
    assert next(iter(model.children())) is model.normalize
    x = torch.rand(2, 3, 32, 32)
    rest = copy.deepcopy(model)
    rest.normalize = nn.Identity()
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    first = next(mod for mod in model.modules() if isinstance(mod, ConvBN))
    seen = []
    first.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, rest((x - m) / s))
    # The first conv sees the normalised pixels, not the raw ones.
    torch.testing.assert_close(seen[0], (x - m) / s)


def test_default_normalisation_is_identity():
    model = get_model("SimpleConv", in_channels=1, input_size=28)
    assert model.normalize.mean.flatten().tolist() == [0.0]
    assert model.normalize.std.flatten().tolist() == [1.0]


# -- halve_shortcut -------------------------------------------------------------------


def test_halve_shortcut_block_math():
    torch.manual_seed(0)
    block = BasicBlock(4, 8, stride=2, halve_shortcut=True).eval()
    assert block.has_conv_shortcut
    x = torch.randn(2, 4, 8, 8)
    inner = block.conv2(torch.relu(block.conv1(x)))
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu((inner + block.shortcut(x)) / 2))
        block.halve_shortcut = False
        torch.testing.assert_close(block(x), torch.relu(inner + block.shortcut(x)))
    # An identity shortcut is never halved.
    ident = BasicBlock(8, 8, halve_shortcut=True).eval()
    y = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(ident(y), torch.relu(ident.conv2(torch.relu(ident.conv1(y))) + y))


def test_halve_shortcut_model_option():
    torch.manual_seed(0)
    plain = get_model("ResNet18", in_channels=1, input_size=16)
    halved = get_model("ResNet18", in_channels=1, input_size=16, halve_shortcut=True)
    halved.load_state_dict(plain.state_dict())
    assert plain.halve_shortcut is False and halved.halve_shortcut is True
    blocks = [m for m in halved.modules() if isinstance(m, BasicBlock)]
    assert sum(b.halve_shortcut and b.has_conv_shortcut for b in blocks) == 3  # layer2..4 first blocks
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert (plain.eval()(x) - halved.eval()(x)).abs().max() > 1e-4
    assert n_params(halved) == n_params(plain)


@pytest.mark.parametrize("name", ["SimpleConv", "DLA"])
def test_halve_shortcut_rejected_elsewhere(name):
    with pytest.raises(ValueError, match=f"{name}.*no halve_shortcut.*ResNet18"):
        get_model(name, halve_shortcut=True)
    get_model(name, halve_shortcut=False)  # the default is accepted everywhere


# -- registry -------------------------------------------------------------------------


def test_registry():
    assert available() == NAMES == list(MODELS)
    with pytest.raises(ValueError, match="unknown model 'VGG'; choose one of SimpleConv, ResNet18, DLA"):
        get_model("VGG")
    model = get_model("DLA", in_channels=1, num_classes=3, input_size=28, bn=False)
    assert (model.in_channels, model.num_classes, model.input_size, model.use_bn) == (1, 3, 28, False)


def test_wrapping_the_shortcut_keeps_the_halving():
    # FastClip wraps every ConvBN, the shortcut's too: the prepared model computes the same
    torch.manual_seed(0)
    model = get_model("ResNet18", in_channels=1, input_size=16, halve_shortcut=True).eval()
    x = torch.randn(2, 1, 16, 16)
    expected = model(x)
    prepared = get_method("fastclip", mode="wBN", init_delay=10**6).prepare(copy.deepcopy(model), (1, 16, 16))
    torch.testing.assert_close(prepared.eval()(x), expected, rtol=1e-5, atol=1e-6)
