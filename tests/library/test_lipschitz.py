"""fastclip.lipschitz_report: every layer's sigma_1 against the explicit-matrix value, the
network bound against a brute-force lower bound, the rules' edge cases, and the CLI."""

from __future__ import annotations

import doctest
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision.models as tvm
from scriptload import load_script
from torch import nn

import fastclip
import fastclip.lipschitz as lip
from fastclip.exact import exact_singular_values
from fastclip.pipeline.models import get_model
from fastclip.pipeline.models.layers import ConvBN, Normalize
from fastclip.pipeline.models.resnet import BasicBlock

ROOT = Path(__file__).resolve().parents[2]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_var.copy_(0.2 + 2 * torch.rand(n, generator=g))
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


def module_of(model: nn.Module, row: lip.LayerNorm) -> nn.Module:
    if row.kind == "conv+bn":
        conv, bn = row.layer.split("+")
        return nn.Sequential(model.get_submodule(conv), model.get_submodule(bn))
    return model.get_submodule(row.layer)


def assert_rows_exact(model: nn.Module, report: lip.LipschitzReport, max_inputs: int = 4096) -> int:
    """Every measured row (conv, linear, bn, conv+bn, normalize, avgpool) within 1e-6 of the
    explicit float64 matrix's sigma_1 (rows with more than ``max_inputs`` inputs skipped);
    returns how many were checked."""
    checked = 0
    for r in report.rows:
        if r.kind in ("maxpool", "activation") or math.prod(r.input_shape) > max_inputs:
            continue
        exact = float(exact_singular_values(module_of(model, r), r.input_shape, k=1)[0])
        assert r.sigma1 == pytest.approx(exact, rel=1e-6), (r.layer, r.kind, r.sigma1, exact)
        checked += 1
    return checked


def brute_force_lower_bound(
    model: nn.Module, shape, steps: int = 300, pairs: int = 8, seed: int = 0
) -> float:
    """max ||f(x) - f(y)|| / ||x - y|| found by Adam ascent on (x, y) from random pairs
    (float64, eval mode): a lower bound on the Lipschitz constant."""
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((pairs, *shape), generator=g, dtype=torch.float64).requires_grad_(True)
    d = (1e-2 * torch.randn((pairs, *shape), generator=g, dtype=torch.float64)).requires_grad_(True)
    opt = torch.optim.Adam([x, d], lr=1e-2)
    best = 0.0
    for _ in range(steps):
        num = (model(x + d) - model(x)).flatten(1).norm(dim=1)
        ratio = num / d.flatten(1).norm(dim=1)
        best = max(best, float(ratio.detach().max()))
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


def test_doctests():
    assert doctest.testmod(lip).failed == 0
    assert fastclip.lipschitz_report is lip.lipschitz_report


def test_simpleconv_rows_are_exact_and_the_bound_is_their_product():
    torch.manual_seed(0)
    model = randomize_bn(get_model("SimpleConv", in_channels=1, input_size=6, mean=(0.286,), std=(0.353,)))
    rep = fastclip.lipschitz_report(model, (1, 6, 6))
    assert [(r.layer, r.kind, r.bound) for r in rep.rows] == [
        ("normalize", "normalize", "product"),
        ("conv1.conv", "conv", "in conv1.conv+conv1.bn"),
        ("conv1.bn", "bn", "in conv1.conv+conv1.bn"),
        ("conv1.conv+conv1.bn", "conv+bn", "product"),
        ("fc1", "linear", "product"),
    ]
    assert [r.input_shape for r in rep.rows] == [(1, 6, 6), (1, 6, 6), (64, 6, 6), (1, 6, 6), (2304,)]
    assert assert_rows_exact(model, rep) == 5
    s = {r.layer: r.sigma1 for r in rep.rows}
    assert s["normalize"] == pytest.approx(1 / 0.353, rel=1e-6)
    assert rep.bound == pytest.approx(s["normalize"] * s["conv1.conv+conv1.bn"] * s["fc1"], rel=1e-12)
    # the composition is tighter than the product of its factors
    assert s["conv1.conv+conv1.bn"] < s["conv1.conv"] * s["conv1.bn"]
    assert rep.formula == "sigma(normalize) * sigma(conv1.conv+conv1.bn) * sigma(fc1)"
    lower = brute_force_lower_bound(model, (1, 6, 6))
    assert 0 < lower <= rep.bound * (1 + 1e-9)


def test_sequential_with_groups_stride_dilation_and_pooling():
    """Grouped, strided, dilated, transposed convs, overlapping max pooling and average
    pools (one that upsamples: norm 2, not <= 1), each measured exactly."""
    torch.manual_seed(1)
    net = randomize_bn(
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.LeakyReLU(0.1),
            nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2),
            nn.ReLU6(),
            nn.MaxPool2d(3, stride=1, padding=1),
            nn.ConvTranspose2d(4, 3, 2, stride=2),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.AdaptiveAvgPool2d((8, 8)),
            nn.Hardswish(),
            nn.Flatten(),
            nn.Linear(3 * 64, 5),
        )
    )
    rep = lip.lipschitz_report(net, (2, 8, 8))
    kinds = [(r.layer, r.kind) for r in rep.rows]
    assert kinds == [
        ("0", "conv"),
        ("1", "bn"),
        ("0+1", "conv+bn"),
        ("3", "conv"),
        ("5", "maxpool"),
        ("6", "conv"),
        ("8", "avgpool"),
        ("9", "avgpool"),
        ("10", "activation"),
        ("12", "linear"),
    ]
    assert assert_rows_exact(net, rep) == 8
    s = {r.layer: r.sigma1 for r in rep.rows}
    assert s["5"] == 3.0  # a pixel in 9 windows of the 3x3 stride-1 pool
    assert s["8"] == pytest.approx(0.5, rel=1e-9) and s["9"] == pytest.approx(
        2.0, rel=1e-9
    )  # 4x4 -> 8x8 replicates
    assert s["10"] == 1.5
    expected = s["0+1"] * s["3"] * 3.0 * s["6"] * 0.5 * 2.0 * 1.5 * s["12"]
    assert rep.bound == pytest.approx(expected, rel=1e-9)
    # the max pool's sqrt(9): a pixel that is the maximum of its 9 windows moves 9 outputs
    pool = nn.MaxPool2d(3, stride=1, padding=1)
    x = torch.zeros(1, 1, 5, 5)
    y = x.clone()
    y[0, 0, 2, 2] = 1.0
    assert float((pool(y) - pool(x)).norm()) == pytest.approx(3.0)
    assert lip.max_pool_overlap(nn.MaxPool2d(3, stride=2, padding=1), (64, 8, 8)) == 4
    assert lip.max_pool_overlap(nn.MaxPool2d(2, ceil_mode=True), (1, 5, 5)) == 1
    assert lip.max_pool_overlap(nn.AdaptiveMaxPool2d(2), (1, 5, 5)) == 4  # windows [0,3) and [2,5)
    assert brute_force_lower_bound(net, (2, 8, 8), steps=200) <= rep.bound


def test_linear_chain_bound_is_nearly_attained():
    """Without activations the network is one linear map: the brute-force ratio finds
    its norm, which the product bounds from above."""
    torch.manual_seed(2)
    net = randomize_bn(
        nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 4)
        )
    )
    rep = lip.lipschitz_report(net, (1, 4, 4))
    true = float(exact_singular_values(net, (1, 4, 4), k=1)[0])
    lower = brute_force_lower_bound(net, (1, 4, 4), steps=300)
    assert lower == pytest.approx(true, rel=1e-3)
    assert true <= rep.bound * (1 + 1e-9)


def residual_net(halve: bool) -> nn.Module:
    return randomize_bn(
        nn.Sequential(
            Normalize((0.5,), (0.25,)),
            ConvBN(1, 4, 3, padding=1),
            nn.ReLU(),
            BasicBlock(4, 4),
            BasicBlock(4, 6, stride=2, halve_shortcut=halve),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 3),
        ),
        seed=3,
    )


@pytest.mark.parametrize("halve", [False, True])
def test_our_basic_blocks_sum_shortcut_and_branch(halve):
    torch.manual_seed(3)
    net = residual_net(halve)
    rep = lip.lipschitz_report(net, (1, 6, 6))
    assert assert_rows_exact(net, rep) == len([r for r in rep.rows])
    s = {r.layer: r.sigma1 for r in rep.rows}
    c = lambda p: s[f"{p}.conv+{p}.bn"]  # noqa: E731
    b1 = 1.0 + c("3.conv1") * c("3.conv2")
    b2 = (0.5 if halve else 1.0) * (c("4.shortcut") + c("4.conv1") * c("4.conv2"))
    assert s["5"] == pytest.approx(1 / 3, rel=1e-9)  # global average of 3x3
    assert rep.bound == pytest.approx(4.0 * c("1") * b1 * b2 * s["5"] * s["7"], rel=1e-9)
    assert {r.layer: r.bound for r in rep.rows}["4.shortcut.conv+4.shortcut.bn"] == "block 4: shortcut"
    assert {r.layer: r.bound for r in rep.rows}["3.conv1.conv+3.conv1.bn"] == "block 3: branch"
    assert brute_force_lower_bound(net, (1, 6, 6), steps=250) <= rep.bound


@pytest.mark.slow  # a torchvision ResNet against brute force: the second-longest unit test
def test_torchvision_resnet_basicblock_rows_exact_and_bound_above_brute_force():
    torch.manual_seed(4)
    model = randomize_bn(tvm.resnet.ResNet(tvm.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10))
    rep = lip.lipschitz_report(model, (3, 16, 16))
    assert rep.bound is not None and rep.reason is None
    assert sum(r.kind == "conv+bn" for r in rep.rows) == 12 and sum(r.kind == "conv" for r in rep.rows) == 12
    assert {r.layer: r.sigma1 for r in rep.rows}["maxpool"] == 2.0  # 3x3 stride 2: 4 windows per pixel
    assert {r.layer: r.bound for r in rep.rows}[
        "layer2.0.downsample.0+layer2.0.downsample.1"
    ] == "block layer2.0: shortcut"
    assert assert_rows_exact(model, rep, max_inputs=1024) >= 30
    assert brute_force_lower_bound(model, (3, 16, 16), steps=100, pairs=4) <= rep.bound
    # the block's own activation module counts (in the branch and after the sum): not assumed 1-Lipschitz
    model.layer1[0].relu = nn.Hardswish()
    rep2 = lip.lipschitz_report(model, (3, 16, 16))
    s = {r.layer: r.sigma1 for r in rep.rows}
    old = 1 + s["layer1.0.conv1+layer1.0.bn1"] * s["layer1.0.conv2+layer1.0.bn2"]
    new = 1.5 * (1 + s["layer1.0.conv1+layer1.0.bn1"] * 1.5 * s["layer1.0.conv2+layer1.0.bn2"])
    assert rep2.bound == pytest.approx(rep.bound * new / old, rel=1e-9)
    assert [(r.layer, r.kind, r.sigma1) for r in rep2.rows].count(("layer1.0.relu", "activation", 1.5)) == 1


def test_torchvision_bottleneck_groups_and_mobilenet_depthwise():
    torch.manual_seed(5)
    resnext = randomize_bn(
        tvm.resnet.ResNet(tvm.resnet.Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=8)
    )
    rep = lip.lipschitz_report(resnext, (3, 8, 8))
    assert rep.bound is not None
    grouped = [r for r in rep.rows if r.kind == "conv" and resnext.get_submodule(r.layer).groups == 4]
    assert len(grouped) == 4
    for r in grouped:
        exact = float(exact_singular_values(resnext.get_submodule(r.layer), r.input_shape, k=1)[0])
        assert r.sigma1 == pytest.approx(exact, rel=1e-6)
    assert "block layer1.0: shortcut" in {r.bound for r in rep.rows}

    mnet = randomize_bn(tvm.mobilenet_v2(width_mult=0.25, num_classes=10))
    rep = lip.lipschitz_report(mnet, (3, 8, 8))
    assert rep.bound is not None
    rows = {r.layer: r for r in rep.rows}
    assert rows["(adaptive_avg_pool2d)"].sigma1 == pytest.approx(1.0, rel=1e-9)  # 1x1 features
    depthwise = [r for r in rep.rows if r.kind == "conv" and mnet.get_submodule(r.layer).groups > 1]
    assert len(depthwise) == 17
    for r in depthwise[:4] + depthwise[-2:]:
        exact = float(exact_singular_values(mnet.get_submodule(r.layer), r.input_shape, k=1)[0])
        assert r.sigma1 == pytest.approx(exact, rel=1e-6)
    # inverted residuals with a skip connection enter as 1 + sigma(branch)
    skips = sum(isinstance(m, tvm.mobilenetv2.InvertedResidual) and m.use_res_connect for m in mnet.modules())
    assert skips == 11 and rep.formula.count("(1 + ") == skips


def test_torchvision_vgg_bn():
    torch.manual_seed(6)
    features = tvm.vgg.make_layers([4, "M", 8, "M"], batch_norm=True)
    model = tvm.vgg.VGG(features, num_classes=3)
    model.classifier = nn.Sequential(nn.Linear(8 * 49, 6), nn.ReLU(), nn.Dropout(), nn.Linear(6, 3))
    model = randomize_bn(model)
    rep = lip.lipschitz_report(model, (3, 8, 8))
    s = {r.layer: r.sigma1 for r in rep.rows}
    assert s["avgpool"] == pytest.approx(math.sqrt(49 / 4), rel=1e-9)  # 2x2 -> 7x7 replicates
    expected = (
        s["features.0+features.1"]
        * s["features.4+features.5"]
        * s["avgpool"]
        * s["classifier.0"]
        * s["classifier.3"]
    )
    assert rep.bound == pytest.approx(expected, rel=1e-9)
    assert assert_rows_exact(model, rep) == len(rep.rows) - 2  # the two max pools (1 each) aside
    assert brute_force_lower_bound(model, (3, 8, 8), steps=150) <= rep.bound


def test_our_resnet18_and_wrapped_simpleconv():
    torch.manual_seed(7)
    model = randomize_bn(get_model("ResNet18", in_channels=1, input_size=4))
    rep = lip.lipschitz_report(model, (1, 4, 4))
    assert rep.bound is not None
    assert sum(r.kind == "conv+bn" for r in rep.rows) == 20
    assert sum(r.bound.startswith("block") and r.bound.endswith("shortcut") for r in rep.rows) == 3
    assert sum(r.bound.startswith("block layer") and r.bound.endswith("branch") for r in rep.rows) == 16

    # the clipping methods' wrappers (SpectralNorm, torch parametrizations) change no name or value
    base = randomize_bn(get_model("SimpleConv", in_channels=1, input_size=5))
    ref = lip.lipschitz_report(base, (1, 5, 5))
    for name in ("fastclip", "miyato"):
        m = get_model("SimpleConv", in_channels=1, input_size=5)
        m.load_state_dict(base.state_dict())
        m = fastclip.pipeline.methods.get(name, clip=1.0, mode="wBN").prepare(m, (1, 5, 5)).eval()
        rep = lip.lipschitz_report(m, (1, 5, 5))
        assert [r.layer for r in rep.rows] == [r.layer for r in ref.rows]
        if name == "fastclip":  # the same weights: the same numbers
            assert rep.bound == pytest.approx(ref.bound, rel=1e-6)
        else:  # Miyato divides the weight by its estimate: measured as the model computes it
            conv = m.get_submodule("conv1.conv")
            exact = float(exact_singular_values(conv, (1, 5, 5), k=1)[0])
            assert {r.layer: r.sigma1 for r in rep.rows}["conv1.conv"] == pytest.approx(exact, rel=1e-6)


class Square(nn.Module):
    def forward(self, x):
        return x * x


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


@pytest.mark.parametrize(
    "make, shape, reason",
    [
        (lambda: get_model("DLA", in_channels=1, input_size=2), (1, 2, 2), "DLA aggregation tree"),
        (lambda: nn.Sequential(nn.Linear(4, 4), SelfAttention()), (3, 4), "attention layer"),
        (
            lambda: nn.Sequential(nn.Linear(4, 4), Square(), nn.Linear(4, 2)),
            (4,),
            "no bound rule for its forward",
        ),
        (
            lambda: tvm.mobilenet_v3_small(num_classes=3),
            (3, 8, 8),
            "torchvision.models.mobilenetv3.MobileNetV3",
        ),
    ],
)
def test_models_without_a_rule_get_rows_and_a_reason(make, shape, reason):
    torch.manual_seed(8)
    model = make().eval()
    rep = lip.lipschitz_report(model, shape)
    assert rep.bound is None and reason in rep.reason
    assert rep.rows and all(r.bound == "-" for r in rep.rows)
    assert "no network bound" in rep.to_markdown()


def test_bad_input_shape():
    with pytest.raises(ValueError, match="does not fit"):
        lip.lipschitz_report(nn.Linear(4, 2), (5,))
    with pytest.raises(ValueError, match="positive sizes"):
        lip.lipschitz_report(nn.Linear(4, 2), (0,))


# -- the CLI ----------------------------------------------------------------------------


def test_cli_torchvision_writes_csv_markdown_png(tmp_path, capsys):
    script = load_script("lipschitz_report")
    argv = ["--torchvision", "resnet18", "--input-shape", "3,16,16", "--out-dir", str(tmp_path)]
    assert script.main(script.get_args_parser().parse_args(argv)) == 0
    df = pd.read_csv(tmp_path / "lipschitz_report.csv")
    assert list(df.columns) == ["model", "layer", "kind", "input_shape", "sigma1", "bound"]
    assert (df.model == "resnet18").all() and len(
        df
    ) == 20 + 20 + 20 + 3  # conv, bn, conv+bn; fc, maxpool, avgpool
    assert df.input_shape.iloc[0] == "3x16x16"
    assert (tmp_path / "lipschitz_report.png").stat().st_size > 1000
    md = (tmp_path / "lipschitz_report.md").read_text()
    assert "Lipschitz upper bound (L2)" in md and "| layer" in md
    assert "Lipschitz upper bound" in capsys.readouterr().out


def test_cli_bad_inputs_are_one_line_errors_with_exit_2(tmp_path, capsys):
    script = load_script("lipschitz_report")
    (tmp_path / "notarun").mkdir()
    (tmp_path / "model.pth").write_bytes(b"")
    cases = [
        ([], "give a run directory or checkpoint, or --torchvision NAME"),
        ([str(tmp_path / "missing")], "no such run directory or checkpoint"),
        ([str(tmp_path / "notarun")], "has no config.json (not a training run)"),
        ([str(tmp_path / "model.pth")], "is not a run's ckpt_best.pth or ckpt_last.pth"),
        (["--torchvision", "resnet19"], "unknown torchvision classifier 'resnet19'"),
        (["--torchvision", "resnet18", str(tmp_path)], "not both"),
        (
            ["--torchvision", "resnet18", "--input-shape", "3,x,16"],
            "expected positive integers separated by commas",
        ),
        (
            ["--torchvision", "resnet18", "--input-shape", "3,0,16"],
            "expected positive integers separated by commas",
        ),
        (["--torchvision", "resnet18", "--input-shape", "2,16,16"], "does not fit ResNet"),
        (["--torchvision", "resnet18", "--tol", "-1"], "expected a positive finite number"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            script.main(script.get_args_parser().parse_args(argv))
        assert e.value.code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (argv, err)
