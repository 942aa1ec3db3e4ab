"""fastclip.Clipper: every conv, linear and Conv+BN composition of a model bounded from
outside it, checked against float64 references (explicit matrices, ARPACK).

Torchvision models are pushed above the bound by a few SGD steps of gradient *ascent*,
then ``clip_now()``; the references measure a sample of the clipped operators of at
most 16384 inputs (the first and last conv and composition, the linears, the one the
tracker saw highest, a spread of the rest): float64 references of every operator cost
minutes here. The
hand-written model is measured whole. The model stays the same object with the same
``state_dict`` keys, parameter storage and no hooks.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import fastclip
from fastclip.batched import LOCKSTEP_CLIPS
from fastclip.exact import exact_singular_values, exact_top, svds_singular_values

torchvision = pytest.importorskip("torchvision")

TOL = 1.01  # the clip step's band: sigma_1 <= 1.01 c


def _reference(w: nn.Module, shape: tuple[int, ...]) -> float:
    """sigma_1 in float64: dense SVD up to 2048 inputs, ARPACK beyond."""
    n = 1
    for d in shape:
        n *= d
    if n <= 2048:
        return float(exact_singular_values(w, shape, k=1)[0])
    return float(svds_singular_values(w, shape, k=1)[0])


def _ascend(model: nn.Module, clipper: fastclip.Clipper, shape, steps: int = 3, lr: float = 0.05) -> None:
    """SGD on the negated loss: the weights (and the operators' norms) grow."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        x = torch.randn((4, *shape), generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        (-F.cross_entropy(model(x), y)).backward()
        opt.step()
        clipper.step()


def _grow(model: nn.Module, clipper: fastclip.Clipper, shape, steps: int = 3, lr: float = 0.2) -> None:
    """SGD steps on ``-sum ||W||^2`` (every weight grows by ``1 + 2 lr`` a step), each after a
    train-mode batch that moves batch norm's running statistics with them. (Gradient
    ascent on a loss drives a deep net's BN statistics and biases so far apart that the
    fit's float32 Jacobian products cancel; see the report of issue 40.)"""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        with torch.no_grad():
            model(torch.randn((4, *shape), generator=g))
        opt.zero_grad()
        (-sum(p.square().sum() for p in model.parameters())).backward()
        opt.step()
        clipper.step()


def _snapshot(model: nn.Module) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """The state_dict keys, and each parameter's identity and storage (the groups' passes
    must not make the model's weights views of a stack)."""
    return list(model.state_dict()), {n: (id(p), p.data_ptr()) for n, p in model.named_parameters()}


def _no_hooks(model: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules())


#: Operators with more inputs are left out of the references' sample (ARPACK in float64
#: on a 64x32x32 conv takes minutes here).
MAX_SAMPLED_INPUTS = 16384


def _sample(clipper: fastclip.Clipper, before: dict[str, float], k: int = 6) -> list[str]:
    names = [n for n, w in clipper.wrappers() if math.prod(w.shape) <= MAX_SAMPLED_INPUTS]
    convs = [n for n in names if "+" not in n]
    comps = [n for n in names if "+" in n]
    linears = [n for n, w in clipper.wrappers() if w.kind == "linear"]
    pick = {convs[0], convs[-1], max(names, key=before.get), *linears}
    if comps:
        pick |= {comps[0], comps[-1]}
    pick |= set(names[:: max(1, len(names) // k)])
    return [n for n in names if n in pick]


def _check_model(name: str, shape: tuple[int, ...], sample: int, lr: float = 0.2, **kwargs):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs)
    if name.startswith("vgg"):
        # its 25088 -> 4096 -> 4096 head: one exact SVD of it takes minutes on 2 cores
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10))
    keys, ids = _snapshot(model)
    clipper = fastclip.Clipper(model, shape, clip=1.0, init_delay=10**6, init_pqr_iter=10)
    _grow(model, clipper, shape, lr=lr)
    before = clipper.sigmas()
    assert max(before.values()) > 1.5  # the ascent pushed some operator well above c
    clipper.clip_now()
    model.eval()
    values = {
        n: _reference(w.module, w.shape)
        for n, w in clipper.wrappers()
        if n in _sample(clipper, before, sample)
    }
    assert max(values.values()) <= TOL, values
    assert _snapshot(model) == (keys, ids) and _no_hooks(model)
    return clipper, values


# -- torchvision models -----------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18():
    return _check_model("resnet18", (3, 16, 16), sample=6)


def test_resnet18_bounded_and_unchanged(resnet18):
    clipper, values = resnet18
    # 20 convs and the fc; every conv feeds its BN: 20 compositions, found across siblings
    assert len([n for n in clipper.layers if "+" not in n]) == 21
    comps = [n for n in clipper.layers if "+" in n]
    assert len(comps) == 20 and "layer1.0.conv1+layer1.0.bn1" in comps
    assert "layer2.0.downsample.0+layer2.0.downsample.1" in comps
    assert clipper.skipped == {}
    # one grouped pass per conv signature, a composition as a second row of its conv's
    groups = [(g.kind, g.G, g.rows) for g in clipper.tracker.groups]
    assert sum(G for _, G, _ in groups) == 21 and ("conv", 4, 2) in groups and ("linear", 1, 1) in groups
    assert len(values) >= 8 and max(values.values()) > 0.97  # clipped to c (1 - margin), not below
    # the tracked values after the clip are the references' (the clip's last estimate)
    sig = clipper.sigmas()
    for n, v in values.items():
        assert sig[n] == pytest.approx(v, rel=2e-3), n


def test_mobilenet_v2_depthwise():
    clipper, values = _check_model("mobilenet_v2", (3, 16, 16), sample=6)
    dw = [n for n, w in clipper.wrappers() if w.kind == "conv" and w.module.groups > 1]
    assert len(dw) == 17 and clipper.skipped == {}


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, shape, kwargs, skipped",
    [
        ("resnet50", (3, 16, 16), {}, set()),
        ("vgg11_bn", (3, 32, 32), {}, set()),
        ("efficientnet_b0", (3, 16, 16), {}, set()),
        ("densenet121", (3, 32, 32), {}, {"BatchNorm2d"}),
        ("convnext_tiny", (3, 32, 32), {}, {"LayerNorm2d", "LayerNorm", "CNBlock"}),
    ],
)
def test_more_models(name, shape, kwargs, skipped):
    clipper, _ = _check_model(name, shape, sample=4, **kwargs)
    modules = dict(clipper.model.named_modules())
    assert {type(modules[n]).__name__ for n in clipper.skipped} == skipped, clipper.skipped


@pytest.mark.slow
def test_vit_tokens_and_skipped():
    """vit_b_16's layout (12 blocks of width 768) at image 32, patch 8: the MLP linears
    act on token sequences (measured on D); LayerNorm, attention and the class token /
    position embedding are listed as skipped."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        32, 8, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072, num_classes=10
    )
    clipper = fastclip.Clipper(model, (3, 32, 32), init_delay=10**6, init_pqr_iter=10)
    assert clipper.layers == ["conv_proj"] + [
        f"encoder.layers.encoder_layer_{i}.mlp.{j}" for i in range(12) for j in (0, 3)
    ] + ["heads.head"]
    assert set(clipper.skipped) == {"", "encoder", "encoder.ln"} | {
        f"encoder.layers.encoder_layer_{i}.{m}" for i in range(12) for m in ("ln_1", "self_attention", "ln_2")
    }
    assert clipper.skipped["encoder.layers.encoder_layer_0.self_attention"].startswith("attention")
    assert "class_token" in clipper.skipped[""] and "pos_embedding" in clipper.skipped["encoder"]
    _grow(model, clipper, (3, 32, 32), steps=2)
    clipper.clip_now()
    w = dict(clipper.wrappers())
    for n in ("conv_proj", "encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_11.mlp.3"):
        assert float(exact_top(w[n].module, w[n].shape)[0]) <= TOL, n


# -- a hand-written model -----------------------------------------------------------------


class Hand(nn.Module):
    """Siblings (``self.bn(self.conv(x))``), a conv used twice at one size, one used at
    two sizes, a conv whose output feeds a BN and another layer, a dilated depthwise
    stride-2 conv, a transposed conv, a Conv1d, token-wise linears, LayerNorm, a
    parametrized linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_stem = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
        self.branch = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_branch = nn.BatchNorm2d(8)
        self.side = nn.ReLU()
        self.two_sizes = nn.Conv2d(8, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.c1 = nn.Conv1d(4, 4, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.tok = nn.Linear(16, 16)
        self.ortho = parametrizations.orthogonal(nn.Linear(16, 16))
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_stem(self.stem(x)))
        x = self.shared(torch.relu(self.shared(x)))
        y = self.branch(x)
        x = self.two_sizes(self.bn_branch(y) + self.side(y))
        x = self.two_sizes(self.dw(x))
        x = self.c1(self.up(x).flatten(2))
        x = self.ortho(self.tok(self.norm(x.reshape(x.shape[0], 16, 16))))
        return self.head(x.flatten(1))


HAND_LAYERS = ["stem", "shared", "branch", "dw", "up", "c1", "tok", "head", "stem+bn_stem"]
HAND_SKIPPED = {
    "bn_branch": "batch norm",
    "two_sizes": "used at 2",
    "norm": "LayerNorm",
    "ortho": "parametrized",
}


def _hand(**options) -> tuple[Hand, fastclip.Clipper]:
    torch.manual_seed(0)
    model = Hand()
    return model, fastclip.Clipper(model, (3, 8, 8), clip=1.0, init_pqr_iter=30, **options)


def test_hand_written_every_operator_exact(caplog):
    with caplog.at_level(logging.WARNING, logger="fastclip.clipper"):
        model, clipper = _hand(init_delay=10**6)
    assert clipper.layers == HAND_LAYERS
    assert set(clipper.skipped) == set(HAND_SKIPPED)
    for n, start in HAND_SKIPPED.items():
        assert clipper.skipped[n].startswith(start), clipper.skipped[n]
    assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()][0].count(
        "4 modules skipped"
    ) == 1
    w = dict(clipper.wrappers())
    assert w["tok"].shape == (16,) and w["c1"].shape == (4, 64) and w["dw"].shape == (8, 8, 8)
    keys, ids = _snapshot(model)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    _ascend(model, clipper, (3, 8, 8), lr=0.5)
    before = clipper.sigmas()
    assert sum(v > 1.5 for v in before.values()) >= 3
    clipper.clip_now()
    model.eval()
    exact = {n: float(exact_singular_values(m.module, m.shape, k=1)[0]) for n, m in w.items()}
    assert max(exact.values()) <= TOL, exact
    sig = clipper.sigmas()
    for n in HAND_LAYERS:
        assert sig[n] == pytest.approx(exact[n], rel=2e-3), n
    # the model is untouched: same keys, parameters, storage; no hooks; it still runs
    assert _snapshot(model) == (keys, ids) and _no_hooks(model)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 10)
    torch.save(model.state_dict(), "/dev/null")  # plain tensors of the model
    Hand().load_state_dict(model.state_dict())  # the original architecture takes it


def test_schedule_writer_and_free_clamp_modes():
    class Writer:
        def __init__(self) -> None:
            self.tags: list[tuple[str, int]] = []

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.tags.append((tag, step))

    writer = Writer()
    model, clipper = _hand(writer=writer, summary_steps=2, clip_steps=2, init_delay=2)
    _ascend(model, clipper, (3, 8, 8), steps=3, lr=0.5)
    assert ("train/lsv_stem+bn_stem", 2) in writer.tags and ("train/lsv_head", 0) in writer.tags
    model.eval()
    # the clip at step 2 bounded the operators (step 2 is the last ascent step's)
    assert float(exact_singular_values(nn.Sequential(model.stem, model.bn_stem), (3, 8, 8), k=1)[0]) <= TOL
    # free: the composition tracked, not clipped; clamp: BN's gamma clamped, no composition
    model, free = _hand(bn="free", init_delay=10**6)
    assert not dict(free.wrappers())["stem+bn_stem"].clip_flag and "bn_branch" not in free.skipped
    model, clamp = _hand(bn="clamp", init_delay=10**6)
    assert "stem+bn_stem" not in clamp.layers
    model.bn_stem.weight.data.fill_(3.0)
    clamp.clip_now()
    s = model.bn_stem.weight / (model.bn_stem.running_var + model.bn_stem.eps).sqrt()
    assert float(s.detach().abs().max()) == pytest.approx(1.0, rel=1e-6)


def test_resume_bit_identical():
    """Clipper and model state saved at step 3 (clip_steps=2: clips at 0, 2, 4) give the
    same weights and tracked state after 3 more steps as the uninterrupted run."""

    def run(model, clipper, steps, seed):
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
            (-F.cross_entropy(model(x), y)).backward()
            opt.step()
            clipper.step()

    model, clipper = _hand(clip_steps=2)
    run(model, clipper, 3, seed=1)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(clipper.state_dict())
    assert set(saved) == {"step", "layers"} and set(saved["layers"]) == set(HAND_LAYERS)
    assert all(set(v) == {"vectors", "sigma", "step", "input_shape"} for v in saved["layers"].values())
    run(model, clipper, 3, seed=2)
    torch.manual_seed(123)  # the resumed clipper must not depend on the global generator
    model2 = Hand()
    model2.load_state_dict(saved_model)
    clipper2 = fastclip.Clipper(model2, (3, 8, 8), clip=1.0, init_pqr_iter=30, clip_steps=2)
    clipper2.load_state_dict(saved)
    run(model2, clipper2, 3, seed=2)
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert clipper.sigmas() == clipper2.sigmas()
    with pytest.raises(ValueError, match="missing \\['head'\\]"):
        clipper2.load_state_dict(
            {"step": 0, "layers": {k: v for k, v in saved["layers"].items() if k != "head"}}
        )


def test_channels_last_and_autocast():
    model, clipper = _hand(clip_steps=1, init_delay=1)
    model.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _ascend(model, clipper, (3, 8, 8), steps=2, lr=0.5)  # the second step clips
    model.eval()
    w = dict(clipper.wrappers())
    assert float(exact_singular_values(w["stem+bn_stem"].module, (3, 8, 8), k=1)[0]) <= TOL
    assert model.stem.weight.is_contiguous(memory_format=torch.channels_last)


def test_lockstep_clip_step(monkeypatch):
    """The clip step a GPU runs (every due operator's estimates in lockstep over the
    groups), here on the CPU: the same bound."""
    monkeypatch.setitem(LOCKSTEP_CLIPS, "cpu", True)
    model, clipper = _hand(clip_steps=2, init_delay=2)
    _ascend(model, clipper, (3, 8, 8), steps=3, lr=0.5)  # the third step clips
    model.eval()
    exact = {n: float(exact_singular_values(w.module, w.shape, k=1)[0]) for n, w in clipper.wrappers()}
    assert max(exact.values()) <= TOL, exact


@pytest.mark.slow
def test_torch_compile_sees_the_clips():
    """The Clipper runs outside the compiled graph (aot_eager: no C++ toolchain needed):
    the compiled model computes with the clipped weights."""
    torch.manual_seed(0)
    model = Hand()
    compiled = torch.compile(model, backend="aot_eager")
    clipper = fastclip.Clipper(compiled, (3, 8, 8), clip=1.0, init_pqr_iter=30, clip_steps=2)
    assert clipper.layers == HAND_LAYERS  # the names of the model inside
    _ascend(compiled, clipper, (3, 8, 8), steps=3, lr=0.5)  # clips at steps 0 and 2
    compiled.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
    assert float(exact_singular_values(model.shared, (8, 8, 8), k=1)[0]) <= TOL


# -- bad input ----------------------------------------------------------------------------


def test_errors():
    model = Hand()
    with pytest.raises(ValueError, match="bn must be one of 'compose', 'clamp', 'free', got 'wBN'"):
        fastclip.Clipper(model, (3, 8, 8), bn="wBN")
    with pytest.raises(ValueError, match="clip must be a number in \\(0, 1e6\\], got -1"):
        fastclip.Clipper(model, (3, 8, 8), clip=-1)
    with pytest.raises(TypeError, match="unknown option\\(s\\) clip_step; expected one of"):
        fastclip.Clipper(model, (3, 8, 8), clip_step=3)
    with pytest.raises(ValueError, match="clip_steps must be >= 1, got 0"):
        fastclip.Clipper(model, (3, 8, 8), clip_steps=0)
    with pytest.raises(ValueError, match="input_shape \\(3, 9, 9\\) does not fit Hand"):
        fastclip.Clipper(model, (3, 9, 9))
    with pytest.raises(
        ValueError, match="Sequential has no conv or linear layer .* \\(1 modules skipped: '0'\\)"
    ):
        fastclip.Clipper(nn.Sequential(nn.LayerNorm(4), nn.ReLU()), (4,))
    model, clipper = _hand(init_delay=10**6)
    with torch.no_grad():
        model.dw.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="Clipper: dw.weight has non-finite values at step 0"):
        clipper.clip_now()


# -- two processes ------------------------------------------------------------------------


def test_ddp_ranks_clip_the_same():
    """Under DDP (gloo, 2 ranks, different batches per rank) the Clipper leaves every
    parameter, buffer and tracked sigma bitwise equal on both ranks after steps that
    clip; without its broadcast of BN's running statistics the ranks' clips differ."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("clipper_dist_worker.py")
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for r in range(2):
            env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"}
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(worker), tmp], env=env, stderr=subprocess.PIPE, text=True
                )
            )
        for r, p in enumerate(procs):
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, f"rank {r}: {err[-2000:]}"
        states = {
            (c, r): torch.load(Path(tmp) / f"{c}_rank{r}.pt") for c in ("sync", "nosync") for r in (0, 1)
        }
    a, b = states["sync", 0], states["sync", 1]
    assert a.keys() == b.keys() and any(k.startswith("sigma.") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert max(float(v) for k, v in a.items() if k.startswith("sigma.")) <= TOL
    a, b = states["nosync", 0], states["nosync", 1]
    assert "model.bn1.weight" in [k for k in a if not torch.equal(a[k], b[k])]
