"""The method registry, its generated command-line flags, the batch-norm modes, and
every method on every model of the registry."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from torch import nn

import fastclip.pipeline.methods as methods
from fastclip.linalg.batchnorm import bn_singular_values
from fastclip.pipeline.models import get_model
from fastclip.pipeline.models.layers import ConvBN

NAMES = ["orig", "fastclip", "gouk", "miyato", "nsedghi", "lip4conv"]


# -- registry ------------------------------------------------------------------------------


def test_available_and_get():
    assert methods.available() == NAMES
    assert list(methods.METHODS) == NAMES
    assert methods.MODES == ("wBN", "noBN", "clipBN")
    for name in NAMES:
        m = methods.get(name, clip=0.5, mode="clipBN")
        assert m.name == name and m.mode == "clipBN" and m.config.clip == 0.5
        assert isinstance(m.config, methods.MethodConfig)


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(
        ValueError, match=r"unknown method 'fastclp'.*orig, fastclip, gouk, miyato, nsedghi, lip4conv"
    ):
        methods.get("fastclp")
    with pytest.raises(ValueError, match=r"unknown mode 'nobn'.*wBN, noBN, clipBN"):
        methods.get("gouk", mode="nobn")
    with pytest.raises(
        ValueError, match=r"unknown hyper-parameter\(s\) clip_step for method 'fastclip'.*clip_steps"
    ):
        methods.get("fastclip", clip_step=3)
    with pytest.raises(ValueError, match="clip must be > 0"):
        methods.get("gouk", clip=0.0)


def test_every_hyper_parameter_has_help_and_published_defaults():
    for name in NAMES:
        for f in dataclasses.fields(methods.get_class(name).Config):
            assert f.metadata.get("help"), (name, f.name)
    fc = methods.get("fastclip", mode="wBN").config
    assert (fc.clip_steps, fc.clip_opt_iter, fc.clip_opt_stepsize, fc.composition_stepsize) == (
        50,
        5,
        0.35,
        0.01,
    )
    assert (fc.k, fc.pqr_iter, fc.init_pqr_iter, fc.deflate_iter, fc.init_delay) == (1, 1, 100, 1, 0)
    fc = methods.get("fastclip", mode="noBN").config
    assert (fc.clip_steps, fc.clip_opt_iter) == (100, 1)
    assert methods.get("fastclip", mode="clipBN").config.clip_steps == 100
    # an explicit value wins over the per-mode default
    assert methods.get("fastclip", mode="noBN", clip_steps=7).config.clip_steps == 7
    assert methods.get("gouk").config.n_iter == 5
    assert methods.get("nsedghi").config.clip_steps == 100
    lc = methods.get("lip4conv").config
    assert (lc.weight, lc.n_iter) == (0.1, 6)
    assert methods.get("miyato").config.n_power_iterations == 1
    assert methods.get("orig").config.bn_count == 50


def test_generated_flags_round_trip():
    p = methods.add_method_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--fastclip-clip-steps", "10", "--no-fastclip-line-search", "--bn-count", "7"])
    over = methods.method_overrides(args, "fastclip")
    assert over == {"clip_steps": 10, "line_search": False, "bn_count": 7}
    m = methods.get("fastclip", clip=2.0, mode="noBN", **over)
    assert (m.config.clip_steps, m.config.line_search, m.config.bn_count, m.config.clip_opt_iter) == (
        10,
        False,
        7,
        1,
    )
    args = p.parse_args(["--lip4conv-weight", "0.5", "--lip4conv-polyphase", "--gouk-n-iter", "3"])
    with pytest.raises(ValueError, match=r"--gouk-n-iter is a hyper-parameter of method 'gouk'.*'lip4conv'"):
        methods.method_overrides(args, "lip4conv")
    args = p.parse_args(["--lip4conv-weight", "0.5", "--lip4conv-polyphase"])
    assert methods.method_overrides(args, "lip4conv") == {"weight": 0.5, "polyphase": True}
    assert methods.method_overrides(p.parse_args([]), "gouk") == {}
    # every field but clip has exactly one flag, named by the scheme
    flags = {s for a in p._actions for s in a.option_strings}
    for name in NAMES:
        for f in dataclasses.fields(methods.get_class(name).Config):
            if f.name != "clip":
                assert methods.flag_name(name, f.name) in flags
    assert "--clip" not in flags
    assert methods.flag_name("fastclip", "clip_steps") == "--fastclip-clip-steps"


def test_bad_flag_value_is_a_one_line_usage_error(capsys):
    p = methods.add_method_arguments(argparse.ArgumentParser(prog="train"))
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--gouk-n-iter", "five"])
    assert e.value.code == 2
    assert "--gouk-n-iter: expected an integer, got 'five'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the field's range, as Method itself checks it
        p.parse_args(["--miyato-n-power-iterations", "0"])
    assert "--miyato-n-power-iterations: expected a positive integer, got '0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"n_power_iterations must be a positive integer, got 0"):
        methods.get("miyato", n_power_iterations=0)


# -- modes ---------------------------------------------------------------------------------


class TinyResNet(nn.Module):
    """A ResNet-like block: ConvBN stem, a residual pair with a strided ConvBN shortcut."""

    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        self.stem = ConvBN(3, 4, 3, padding=1, bn=bn)
        self.conv1 = ConvBN(4, 6, 3, stride=2, padding=1, bn=bn)
        self.conv2 = ConvBN(6, 6, 3, padding=1, bn=bn)
        self.shortcut = ConvBN(4, 6, 1, stride=2, bn=bn)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x))
        return self.fc(x.flatten(1))


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", NAMES)
def test_clipBN_clamps_every_bn_on_schedule(name):
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():
        for i, bn in enumerate(_bns(model)):
            bn.weight.mul_(3.0 + i)
            bn.running_var.fill_(0.5)
    m = methods.get(name, clip=1.0, mode="clipBN", bn_count=50)
    model = m.prepare(model, (3, 8, 8))
    before = [float(bn_singular_values(bn, k=1)[0]) for bn in _bns(model)]
    assert min(before) > 3.0
    m.after_step(model, 49)  # not a BN step (nsedghi/gouk may touch convs, never BN)
    assert [float(bn_singular_values(bn, k=1)[0]) for bn in _bns(model)] == before
    m.after_step(model, 50)
    after = [float(bn_singular_values(bn, k=1)[0]) for bn in _bns(model)]
    assert len(after) == 4 and max(after) <= 1.0 + 1e-6 and min(after) >= 1.0 - 1e-6
    norms = m.layer_norms(model)
    for bn_name in ("stem.bn", "conv1.bn", "conv2.bn", "shortcut.bn"):
        assert norms[bn_name] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_noBN_refuses_a_model_with_bn_and_wBN_keeps_bn(name):
    with pytest.raises(
        ValueError, match=r"mode 'noBN' expects a model built without batch norm.*4 BN layers"
    ):
        methods.get(name, mode="noBN").prepare(TinyResNet(bn=True), (3, 8, 8))
    model = methods.get(name, mode="noBN").prepare(TinyResNet(bn=False), (3, 8, 8))
    assert not _bns(model)
    model = TinyResNet(bn=True)
    gammas = [bn.weight.detach().clone() * 5 for bn in _bns(model)]
    with torch.no_grad():
        for bn, g in zip(_bns(model), gammas):
            bn.weight.copy_(g)
    m = methods.get(name, mode="wBN")
    model = m.prepare(model, (3, 8, 8))
    m.after_step(model, 0)
    assert all(torch.equal(bn.weight, g) for bn, g in zip(_bns(model), gammas))


@pytest.mark.parametrize("model_name", ["SimpleConv", "ResNet18", "DLA"])
def test_models_have_no_bn_in_noBN(model_name):
    assert not _bns(get_model(model_name, bn=False))


# -- every method on every model --------------------------------------------------------------

# On ResNet18/DLA the checks below keep costs to seconds with cheap settings (CHEAP):
# fastclip's first clip of a freshly initialised ResNet18 (init_pqr_iter 100 plus clip
# rounds on 40 layers) takes minutes on this CPU; nsedghi's projection and lip4conv's
# penalty cost tens of seconds per call there (FFT blocks of 512 x 512 channels), so
# those two run on the big models only with -m slow, and in the default run are checked
# for wiring (prepare, forward, backward, no-op step). The costs are measured by
# benchmarks/methods.py; the clipping itself is tested on small layers
# (test_methods_fastclip.py, test_methods_baselines.py).
CHEAP = {
    "fastclip": {"init_pqr_iter": 2, "init_delay": 10**6},
    "lip4conv": {"n_iter": 1},
    "nsedghi": {},
    "gouk": {"n_iter": 1, "init_iter": 1},
    "miyato": {},
    "orig": {},
}
HEAVY = ("nsedghi", "lip4conv")
CASES = [
    (name, mode, model)
    for model in ("SimpleConv", "ResNet18", "DLA")
    for name in NAMES
    for mode in (("wBN", "noBN") if model == "SimpleConv" or name == "fastclip" else ("wBN",))
]


def _case(name, mode, model):
    marks = [pytest.mark.slow] if name in HEAVY and model != "SimpleConv" else []
    return pytest.param(name, mode, model, marks=marks, id=f"{name}-{mode}-{model}")


def _layer_count(model: nn.Module, name: str) -> int:
    kinds = (nn.Conv2d,) if name in HEAVY else (nn.Conv2d, nn.Linear)
    return sum(isinstance(m, kinds) for m in model.modules())


@pytest.mark.parametrize("name,mode,model_name", [_case(*c) for c in CASES])
def test_every_method_prepares_every_model(name, mode, model_name):
    torch.manual_seed(0)
    model = get_model(model_name, bn=(mode == "wBN"), input_size=32)
    n_layers = _layer_count(model, name)
    m = methods.get(name, mode=mode, **CHEAP[name])
    model = m.prepare(model, (3, 32, 32))
    model.train()
    x = torch.rand(2, 3, 32, 32)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 2])) + m.penalty(model)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    m.after_step(model, 0)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    norms = m.layer_norms(model)
    assert all(v == v and v >= 0 for v in norms.values())
    if name != "orig":
        tracked = [k for k in norms if not k.endswith(".bn")]
        assert len(tracked) >= n_layers, (len(tracked), n_layers)


@pytest.mark.parametrize("model_name", ["ResNet18", "DLA"])
@pytest.mark.parametrize("name", HEAVY)
def test_heavy_methods_are_wired_on_big_models(name, model_name):
    torch.manual_seed(0)
    model = get_model(model_name, input_size=32)
    m = methods.get(name)
    model = m.prepare(model, (3, 32, 32))  # checks every conv's geometry (strides, sizes)
    assert len(m.input_shapes) > 0
    x = torch.rand(2, 3, 32, 32)
    nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    m.after_step(model, 1)  # nsedghi: not a projection step


@pytest.mark.parametrize("name", NAMES)
def test_method_state_survives_a_weights_only_checkpoint(name, tmp_path):
    torch.manual_seed(0)
    m = methods.get(name)
    model = m.prepare(TinyResNet(), (3, 8, 8))
    model.train()
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    m.after_step(model, 0)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "method": m.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    m2 = methods.get(name)
    model2 = m2.prepare(TinyResNet(), (3, 8, 8))
    model2.load_state_dict(ckpt["model"], strict=True)
    m2.load_state_dict(ckpt["method"])
    assert m2.layer_norms(model2) == pytest.approx(m.layer_norms(model), rel=1e-6)
    x = torch.rand(3, 3, 8, 8)
    model.eval(), model2.eval()
    with torch.no_grad():
        torch.testing.assert_close(model2(x), model(x))
