"""fastclip.pipeline.attacks against an independent PGD written here, and its invariants."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scriptload import load_script
from torch import nn

import fastclip.pipeline.attacks as attacks
from fastclip.pipeline._advertorch_compat import import_advertorch_attacks, zero_gradients
from fastclip.pipeline.attack_options import BATCH_SIZES, batch_size_for


def reference_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    n_steps: int,
    step: float,
    delta0: torch.Tensor | None = None,
) -> torch.Tensor:
    """Textbook L-inf PGD: sign-gradient ascent on the cross-entropy, projected on the
    eps-box around x and on [0, 1] after every step."""
    x_adv = x.clone() if delta0 is None else (x + delta0).clamp(0, 1)
    for _ in range(n_steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step * g.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def model_and_data():
    """A small random conv net, 300 random 1x10x10 images, and labels that are the
    net's own predictions except for 30 flipped ones (clean accuracy 90%)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(800, 10))
    x = torch.rand(300, 1, 10, 10)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:30] = (y[:30] + 1) % 10
    model.eval()
    return model, x, y


def test_compat_restores_zero_gradients_on_the_module_not_the_function():
    import_advertorch_attacks()
    gradcheck_module = importlib.import_module("torch.autograd.gradcheck")
    assert gradcheck_module.zero_gradients is zero_gradients
    t = torch.ones(3, requires_grad=True)
    (2 * t).sum().backward()
    zero_gradients([t])
    assert torch.equal(t.grad, torch.zeros(3))


@pytest.mark.parametrize("eps", [0.01, 0.03])
def test_pgd_agrees_with_reference_without_random_start(model_and_data, eps):
    model, x, y = model_and_data
    clean = accuracy(model, x, y)
    ref_adv = accuracy(model, reference_pgd(model, x, y, eps, 20, eps / 10), y)
    r = attacks.pgd_attack(model, (x, y), eps=eps, n_steps=20, rand_init=False, batch_size=100)
    assert r.n_examples == 300
    assert r.clean_acc == pytest.approx(clean) and clean == pytest.approx(90.0)
    # the attack really bites at these eps, so agreement is not trivial
    assert r.adv_acc < clean - 10
    assert abs(r.adv_acc - ref_adv) <= 1.0
    assert r.adv_acc <= r.clean_acc
    assert r.max_linf <= eps + 1e-6


def test_pgd_agrees_with_reference_with_the_same_random_start(model_and_data):
    model, x, y = model_and_data
    eps = 0.02
    torch.manual_seed(123)
    # advertorch draws the start as uniform(-1, 1) * eps on a tensor shaped like the batch
    delta0 = torch.empty_like(x).uniform_(-1, 1) * eps
    ref_adv = accuracy(model, reference_pgd(model, x, y, eps, 10, eps / 10, delta0), y)
    r = attacks.pgd_attack(model, (x, y), eps=eps, n_steps=10, rand_init=True, batch_size=300, seed=123)
    assert abs(r.adv_acc - ref_adv) <= 1.0
    assert r.adv_acc < r.clean_acc


def test_pgd_with_eps_zero_changes_nothing(model_and_data):
    model, x, y = model_and_data
    r = attacks.pgd_attack(model, (x, y), eps=0.0, n_steps=5)
    assert r.adv_correct == r.clean_correct
    assert r.max_linf == 0.0


def test_pgd_n_examples_loader_and_model_state_restored(model_and_data):
    model, x, y = model_and_data
    model.train()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    r = attacks.pgd_attack(model, loader, eps=0.02, n_steps=3, n_examples=100)
    assert r.n_examples == 100
    assert r.clean_acc == pytest.approx(accuracy(model, x[:100], y[:100]))
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    model.eval()


def test_pgd_seed_is_reproducible_and_leaves_global_rng_alone(model_and_data):
    model, x, y = model_and_data
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a = attacks.pgd_attack(model, (x, y), eps=0.03, n_steps=2, seed=5)
    b = attacks.pgd_attack(model, (x, y), eps=0.03, n_steps=2, seed=5)
    assert torch.rand(1) == before
    assert (a.adv_correct, a.mean_l2) == (b.adv_correct, b.mean_l2)


def test_cw_finds_misclassified_points_near_x(model_and_data):
    model, x, y = model_and_data
    xs, ys = x[30:90], y[30:90]  # all correctly classified
    r = attacks.cw_attack(model, (xs, ys), c=10.0, max_iter=50, confidence=0.1)
    assert r.clean_acc == 100.0
    assert r.adv_acc <= 10.0
    # L2 distortion well below that of a random image pair (about 4 for 100 pixels)
    assert 0 < r.mean_l2 < 1.0


def test_bad_arguments_and_registry(model_and_data):
    model, x, y = model_and_data
    with pytest.raises(ValueError, match="eps must be >= 0, got -0.1"):
        attacks.pgd_attack(model, (x, y), eps=-0.1)
    with pytest.raises(ValueError, match="pixels in \\[0, 1\\]"):
        attacks.pgd_attack(model, (x * 3 - 1, y), eps=0.1, n_steps=1)
    with pytest.raises(ValueError, match="unknown attack 'fgsm'; choose one of pgd, cw"):
        attacks.get_attack("fgsm")
    assert attacks.get_attack("cw") is attacks.cw_attack


def test_doctests():
    assert doctest.testmod(attacks).failed == 0


# -- end to end: a model trained by the real train.py, attacked by experiments/attack.py ----

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_mnist):
    """SimpleConv trained for 2 epochs (orig, wBN, seed 1) on generated MNIST by train.py;
    returns (model prefix, data dir)."""
    tmp = tmp_path_factory.mktemp("attack")
    return train_mnist(tmp, "orig", 256), tmp / "data"


@pytest.mark.slow
def test_attack_cli_on_a_trained_model_agrees_with_reference_pgd(trained):
    from fastclip.pipeline.data import get_datasets
    from fastclip.pipeline.training import load_model

    prefix, data = trained
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "attack.py"),
        "mnist",
        prefix,
        "--attack",
        "pgd",
        "--model",
        "SimpleConv",
        "--eps",
        "0.15",
        "0.2",
        "--n-steps",
        "10",
        "--no-rand-init",
        "--n-examples",
        "64",
        "--data-dir",
        str(data),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    csv = Path(f"{prefix}orig_wBN_1") / "attack_pgd_eps0.15+0.2_steps10_norand_n64.csv"
    rows = pd.read_csv(csv)
    assert rows.eps.tolist() == [0.15, 0.2]
    assert (rows.n_examples == 64).all() and (rows.attack == "pgd").all() and (rows.seed == 1).all()
    assert (
        (rows.model == "SimpleConv").all() and (rows.method == "orig").all() and (rows["mode"] == "wBN").all()
    )

    model, _ = load_model(f"{prefix}orig_wBN_1", which="best")
    _, test, _ = get_datasets("mnist", data_dir=data, test_subset=64)
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([test[i][1] for i in range(len(test))])
    clean = accuracy(model, x, y)
    assert (rows.clean_acc == clean).all()
    for r in rows.itertuples():
        assert r.adv_acc <= r.clean_acc
        assert r.max_linf <= r.eps + 1e-6
        ref = accuracy(model, reference_pgd(model, x, y, r.eps, 10, r.eps / 10), y)
        assert abs(r.adv_acc - ref) <= 1.0, (r.eps, r.adv_acc, ref)
    # at the larger eps the attack bites, so the agreement is not that of two no-ops
    assert rows.adv_acc.iloc[-1] < clean - 10

    # eps = 0 (allowed in the library, refused by the CLI): nothing changes
    r0 = attacks.pgd_attack(model, (x, y), eps=0.0, n_steps=10)
    assert r0.adv_acc == r0.clean_acc == clean

    # the same command again skips the run (its CSV exists)
    before = csv.stat().st_mtime_ns
    script = load_script("attack")
    assert script.main(script.get_args_parser().parse_args(cmd[2:])) == 0
    assert csv.stat().st_mtime_ns == before


@pytest.mark.slow
def test_attack_cli_cw_writes_its_csv(trained):
    prefix, data = trained
    script = load_script("attack")  # in-process: the subprocess path is covered by the PGD test
    argv = [
        "mnist",
        prefix,
        "--attack",
        "cw",
        "--cw-max-iter",
        "20",
        "--cw-c",
        "10",
        "--n-examples",
        "16",
        "--seed",
        "1",
        "--data-dir",
        str(data),
    ]
    assert script.main(script.get_args_parser().parse_args(argv)) == 0
    rows = pd.read_csv(Path(f"{prefix}orig_wBN_1") / "attack_cw_c10_conf0.1_iter20_bs1_n16.csv")
    assert len(rows) == 1 and rows.attack.item() == "cw" and rows.n_examples.item() == 16
    assert rows.adv_acc.item() <= rows.clean_acc.item()
    assert "c=10" in rows.params.item() and "max_iter=20" in rows.params.item()


@pytest.mark.slow
def test_attack_cli_bad_input_is_a_one_line_error_with_exit_2(trained, tmp_path, capsys):
    from fastclip.pipeline.models import get_model

    prefix, data = trained
    # a run whose best checkpoint holds another model (SimpleConv without BN)
    other = tmp_path / "logs" / "mnist" / "SimpleConv_models" / "method_orig_wBN_1"
    shutil.copytree(f"{prefix}orig_wBN_1", other, ignore=shutil.ignore_patterns("attack_*.csv"))
    ckpt = torch.load(other / "ckpt_best.pth", weights_only=True)
    ckpt["model"] = get_model("SimpleConv", in_channels=1, input_size=28, bn=False).state_dict()
    torch.save(ckpt, other / "ckpt_best.pth")

    script = load_script("attack")
    cases = [
        (["mnist", prefix, "--eps", "0"], "argument --eps: expected a positive finite number, got 0"),
        (
            ["mnist", prefix, "--eps", "0.02", "-0.1"],
            "argument --eps: expected a positive finite number, got -0.1",
        ),
        (["mnist", prefix, "--attack", "fgsm"], "invalid choice: 'fgsm' (choose from"),
        (["mnist", prefix.replace("method_", "nothing_")], "no run matches"),
        (["mnist", prefix, "--method", "gouk"], "found 1 runs with methods orig"),
        (["cifar", prefix], "trained on dataset 'mnist', not 'cifar'"),
        (["mnist", prefix, "--model", "ResNet18"], "checkpoint of model 'SimpleConv', not 'ResNet18'"),
        (
            ["mnist", f"{other.parent}/method_", "--data-dir", str(data), "--n-examples", "4"],
            f"cannot load the best checkpoint of {other}",
        ),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            script.main(script.get_args_parser().parse_args(argv))
        assert e.value.code == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (argv, lines)  # one line, no usage block
    assert not list(other.glob("attack_*.csv"))


def test_batch_size_changes_the_time_not_the_result(model_and_data):
    # attack.py's CPU default (32) differs from other devices' (128): without PGD's random start
    # and for CW, every image is attacked on its own, so both sizes give the same outcome
    assert (batch_size_for("cpu"), batch_size_for("cuda"), batch_size_for("mps")) == (32, 128, 128)
    assert BATCH_SIZES["default"] == 128
    model, x, y = model_and_data
    x, y = x[:96], y[:96]
    small = attacks.pgd_attack(model, (x, y), eps=0.03, n_steps=10, rand_init=False, batch_size=32)
    large = attacks.pgd_attack(model, (x, y), eps=0.03, n_steps=10, rand_init=False, batch_size=128)
    assert small.adv_acc < small.clean_acc  # the attack bites, so equality is not trivial
    assert (small.clean_acc, small.adv_acc) == (large.clean_acc, large.adv_acc)
    assert small.mean_l2 == pytest.approx(large.mean_l2, rel=1e-5)
    small = attacks.cw_attack(model, (x, y), c=10.0, max_iter=30, batch_size=32)
    large = attacks.cw_attack(model, (x, y), c=10.0, max_iter=30, batch_size=128)
    assert small.adv_acc < small.clean_acc
    assert small.adv_acc == large.adv_acc and small.mean_l2 == pytest.approx(large.mean_l2, rel=1e-4)
