"""Layer-wise sigma_1 of trained models (fastclip.pipeline.results.measure_layer_norms and
experiments/compute_trained_SVs.py) against explicit-matrix exact values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from scriptload import load_script
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from fastclip.exact import exact_singular_values
from fastclip.pipeline.models import get_model
from fastclip.pipeline.results import measure_layer_norms
from fastclip.wrapper import SpectralNorm

ROOT = Path(__file__).resolve().parents[2]
REL = 1e-4


def randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.3, 3.0)
            m.running_mean.uniform_(-1, 1)
            m.weight.data.uniform_(-2, 2)
            m.bias.data.uniform_(-1, 1)


def test_measured_norms_equal_exact_values_through_wrappers_and_parametrisations():
    """conv1 (Conv+BN) wrapped in SpectralNorm, its conv wrapped too, fc1 parametrised
    by torch's spectral_norm (Miyato): each is measured on the map the model computes."""
    torch.manual_seed(0)
    model = get_model("SimpleConv", in_channels=1, input_size=8)
    randomize_bn(model)
    model.conv1.conv = SpectralNorm(model.conv1.conv, clip_flag=False)
    model.conv1 = SpectralNorm(model.conv1, clip_flag=False)
    model.fc1 = spectral_norm(model.fc1)
    model.train()
    model(torch.rand(4, 1, 8, 8))  # one training forward: the parametrisation's power iteration moves
    model.eval()

    rows = measure_layer_norms(model, (1, 8, 8), progress=False)
    assert [(r["layer"], r["kind"], r["input_shape"]) for r in rows] == [
        ("conv1", "conv+bn", "1x8x8"),
        ("conv1.conv", "conv", "1x8x8"),
        ("fc1", "linear", "4096"),
    ]
    exact = {
        "conv1": exact_singular_values(model.conv1, (1, 8, 8), k=1),
        "conv1.conv": exact_singular_values(model.conv1.module.conv, (1, 8, 8), k=1),
        "fc1": exact_singular_values(model.fc1, (4096,), k=1),
    }
    for r in rows:
        assert r["sigma1"] == pytest.approx(float(exact[r["layer"]][0]), rel=REL), r["layer"]
    # the parametrised weight is what counts, not the raw one
    raw = torch.linalg.svdvals(model.fc1.parametrizations.weight.original.detach().double())[0]
    assert abs(rows[2]["sigma1"] - float(raw)) > 0.1 * float(raw)
    assert rows[2]["sigma1"] == pytest.approx(1.0, abs=0.05)
    # the BN composition differs from the bare conv, so both are really measured
    assert abs(rows[0]["sigma1"] - rows[1]["sigma1"]) > 1e-2 * rows[1]["sigma1"]
    assert not model.training


def test_nobn_conv_is_listed_once():
    torch.manual_seed(1)
    model = get_model("SimpleConv", in_channels=1, input_size=6, bn=False)
    rows = measure_layer_norms(model, (1, 6, 6), progress=False)
    assert [r["layer"] for r in rows] == ["conv1.conv", "fc1"]
    assert rows[0]["sigma1"] == pytest.approx(
        float(exact_singular_values(model.conv1.conv, (1, 6, 6), k=1)[0]), rel=REL
    )


def test_merge_replaces_the_remeasured_runs_only(tmp_path):
    script = load_script("compute_trained_SVs")
    base = {
        "model": "SimpleConv",
        "dataset": "mnist",
        "mode": "wBN",
        "layer": "fc1",
        "kind": "linear",
        "input_shape": "10",
        "clip": 1.0,
    }
    old = pd.DataFrame(
        [
            {**base, "method": "gouk", "seed": 1, "sigma1": 1.0},
            {**base, "method": "orig", "seed": 1, "sigma1": 2.0},
            {**base, "method": "orig", "seed": 2, "sigma1": 3.0},
        ]
    )
    new = pd.DataFrame([{**base, "method": "orig", "seed": 1, "sigma1": 5.0}])
    path = tmp_path / "layer_norms_runs.csv"
    old.to_csv(path, index=False)
    merged = script._merge(path, new)
    got = sorted(zip(merged.method, merged.seed, merged.sigma1))
    assert got == [("gouk", 1, 1.0), ("orig", 1, 5.0), ("orig", 2, 3.0)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_mnist):
    """A SimpleConv trained by the real train.py (gouk, 2 epochs) on generated MNIST."""
    return Path(train_mnist(tmp_path_factory.mktemp("svs"), "gouk", 256)).parent


@pytest.mark.slow
def test_compute_trained_svs_equals_explicit_matrix_values(trained):
    from fastclip.pipeline.training import load_model

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "compute_trained_SVs.py"),
            "mnist",
            "all",
            f"{trained}/method_",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = pd.read_csv(trained / "layer_norms.csv")
    per_seed = pd.read_csv(trained / "layer_norms_runs.csv")
    assert summary.layer.tolist() == ["conv1", "conv1.conv", "fc1"]
    assert (
        (summary.n_seeds == 1).all() and (summary.method == "gouk").all() and (summary["clip"] == 1.0).all()
    )
    assert per_seed.sigma1.tolist() == pytest.approx(summary.sigma1_mean.tolist(), rel=1e-12)

    model, cfg = load_model(trained / "method_gouk_wBN_1", which="best")
    exact = {
        "conv1": float(exact_singular_values(model.conv1, (1, 28, 28), k=1)[0]),
        "conv1.conv": float(exact_singular_values(model.conv1.conv, (1, 28, 28), k=1)[0]),
        # fc1 has 50176 inputs: its explicit matrix is its weight
        "fc1": float(torch.linalg.svdvals(model.fc1.weight.detach().double())[0]),
    }
    for layer, sigma in zip(summary.layer, summary.sigma1_mean):
        assert sigma == pytest.approx(exact[layer], rel=REL), layer
    assert "| conv1.conv" in proc.stdout

    with Image.open(trained / "layer_norms.png") as im:
        im.verify()
    with Image.open(trained / "layer_norms.png") as im:
        assert im.format == "PNG" and min(im.size) > 200


@pytest.mark.slow
def test_bad_input_is_a_one_line_error_with_exit_2(trained, capsys):
    script = load_script("compute_trained_SVs")
    cases = [
        (["mnist", "all", f"{trained}/nothing_"], "no run matches"),
        (["mnist", "miyato", f"{trained}/method_"], "methods gouk"),
        (["cifar", "all", f"{trained}/method_"], "trained on dataset 'mnist', not 'cifar'"),
        (["mnist", "all", f"{trained}/method_", "--model", "ResNet18"], "model 'SimpleConv', not 'ResNet18'"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            script.main(script.get_args_parser().parse_args(argv))
        assert e.value.code == 2
        assert expected in capsys.readouterr().err.strip().splitlines()[-1]
