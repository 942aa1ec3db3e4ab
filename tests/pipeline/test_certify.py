"""Certified L2 accuracy (attack.py --attack certify) against PGD-L2 on the same images,
from the Lipschitz bound of the trained (FastClip-clipped) weights; its collection."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from scriptload import load_script
from torch import nn

import fastclip
import fastclip.pipeline.attacks as attacks
from fastclip.pipeline._advertorch_compat import import_advertorch_attacks

ROOT = Path(__file__).resolve().parents[2]
EPS = ["0.02", "0.5", "1", "4", "6"]  # the generated digits are far apart: PGD-L2 needs eps > 2


def test_certified_radius_is_below_the_exact_distance_of_a_linear_model():
    """For f(x) = W x + b the distance to the boundary between y and j is exactly
    (f_y - f_j) / ||w_y - w_j||; the certificate uses sqrt(2) ||W|| >= ||w_y - w_j||."""
    torch.manual_seed(0)
    model = nn.Linear(12, 4).double()
    x = torch.rand(200, 12, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    y[:20] = (y[:20] + 1) % 4  # 20 misclassified: radius 0
    L = float(torch.linalg.matrix_norm(model.weight.detach(), ord=2))
    r = attacks.certified_radius(logits, y, L)
    assert (r[:20] == 0).all() and (r[20:] > 0).all()
    W = model.weight.detach()
    for i in range(20, 200):
        exact = min(
            float((logits[i, y[i]] - logits[i, j]) / (W[y[i]] - W[j]).norm()) for j in range(4) if j != y[i]
        )
        assert r[i] <= exact * (1 + 1e-12)
    # the certificate is tight when the two rows are orthogonal and of norm ||W||
    two = nn.Linear(2, 2, bias=False).double()
    two.weight.data = torch.eye(2, dtype=torch.float64)
    with torch.no_grad():
        logits2 = two(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    assert float(attacks.certified_radius(logits2, torch.tensor([0]), 1.0)[0]) == pytest.approx(
        1 / math.sqrt(2), rel=1e-15
    )
    res = attacks.certify(model, (x.clamp(0, 1), y), L, eps=(0.0, 0.05, 10.0))
    assert [q.adv_correct for q in res] == [int((r > e).sum()) for e in (0.0, 0.05, 10.0)]
    assert res[0].clean_correct == 180 and res[-1].adv_correct == 0
    with pytest.raises(ValueError, match="positive finite"):
        attacks.certified_radius(logits, y, 0.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_mnist):
    """SimpleConv trained by train.py with FastClip (wBN, c = 1, clipped at each epoch's
    end) for 2 epochs on 512 generated MNIST images; returns (prefix, data dir)."""
    tmp = tmp_path_factory.mktemp("certify")
    # the generated digits are not mirror-symmetric: no flips, so the margins are wide
    return train_mnist(tmp, "fastclip", 512, "--augment", "none", "--input-norm", "dataset"), tmp / "data"


@pytest.mark.slow
def test_certified_accuracy_never_exceeds_pgd_l2_and_uses_measured_norms(trained):
    from fastclip.pipeline.data import get_datasets
    from fastclip.pipeline.training import load_model

    prefix, data = trained
    script = load_script("attack")
    common = ["mnist", prefix, "--n-examples", "64", "--data-dir", str(data), "--eps", *EPS]
    assert script.main(script.get_args_parser().parse_args([*common, "--attack", "certify"])) == 0
    assert (
        script.main(script.get_args_parser().parse_args([*common, "--attack", "pgdl2", "--n-steps", "20"]))
        == 0
    )
    run = Path(f"{prefix}fastclip_wBN_1")
    cert = pd.read_csv(run / "attack_certify_eps0.02+0.5+1+4+6_n64.csv")
    pgd = pd.read_csv(run / "attack_pgdl2_eps0.02+0.5+1+4+6_steps20_n64.csv")
    assert cert.eps.tolist() == pgd.eps.tolist() == [float(e) for e in EPS]
    assert (cert.clean_acc == pgd.clean_acc).all() and (cert.n_examples == 64).all()
    for c, p in zip(cert.itertuples(), pgd.itertuples()):
        assert c.adv_acc <= p.adv_acc <= c.clean_acc, (c.eps, c.adv_acc, p.adv_acc)
    assert cert.adv_acc.iloc[2] > 50 and cert.adv_acc.iloc[-1] == 0  # not trivial: from most to none
    assert pgd.adv_acc.iloc[-1] < 50

    # L is the report's bound of the trained weights, not the clip target (1/std * c * c)
    model, cfg = load_model(run, which="best")
    rep = fastclip.lipschitz_report(model, (1, 28, 28))
    assert cert.lipschitz.iloc[0] == pytest.approx(rep.bound, rel=1e-9)
    target = 1 / float(model.normalize.std.min()) * cfg.clip * cfg.clip
    assert abs(rep.bound - target) > 0.05 * target
    assert rep.bound == pytest.approx(
        math.prod(r.sigma1 for r in rep.rows if r.bound == "product"), rel=1e-12
    )

    _, test, _ = get_datasets("mnist", data_dir=data, test_subset=64)
    x = torch.stack([test[i][0] for i in range(64)])
    y = torch.tensor([test[i][1] for i in range(64)])
    with torch.no_grad():
        radius = attacks.certified_radius(model(x), y, rep.bound)
    # every image certified at eps resists the attack at eps (per image, not only in the mean)
    adv = import_advertorch_attacks().L2PGDAttack(
        model,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        eps=1.0,
        nb_iter=20,
        eps_iter=0.1,
        rand_init=False,
    )
    model.requires_grad_(False)
    x_adv = adv.perturb(x, y)
    with torch.no_grad():
        broken = model(x_adv).argmax(1) != y
    assert not bool((broken & (radius > 1.0)).any())
    assert int((radius > 1.0).sum()) == round(cert.adv_acc.iloc[2] * 64 / 100)
    # the check would catch a wrong L: a bound 5x too small certifies more than PGD leaves
    wrong = attacks.certify(model, (x, y), rep.bound / 5, eps=[float(e) for e in EPS])
    assert any(w.adv_acc > p for w, p in zip(wrong, pgd.adv_acc)), (
        [w.adv_acc for w in wrong],
        pgd.adv_acc.tolist(),
        cert.adv_acc.tolist(),
    )


@pytest.mark.slow
def test_collection_tabulates_certified_beside_clean_and_pgd(trained, tmp_path, capsys):
    prefix, data = trained
    script = load_script("attack")
    assert (
        script.main(
            script.get_args_parser().parse_args(
                [
                    "mnist",
                    prefix,
                    "--n-examples",
                    "64",
                    "--data-dir",
                    str(data),
                    "--eps",
                    "0.5",
                    "--n-steps",
                    "5",
                ]
            )
        )
        == 0
    )
    collect = load_script("collect_attack_results")
    assert collect.main(collect.get_args_parser().parse_args([prefix, "--out-dir", str(tmp_path)])) == 0
    out = capsys.readouterr().out
    assert "side by side" in out and "certified L2 0.5" in out
    wide = pd.read_csv(tmp_path / "attack_results_wide.csv")
    cols = list(wide.columns)
    assert cols[:6] == ["model", "dataset", "n_examples", "mode", "method", "clean acc (%)"]
    assert cols.index("PGD Linf 0.5") < cols.index("PGD L2 0.02") < cols.index("certified L2 0.02")
    cert = pd.read_csv(Path(f"{prefix}fastclip_wBN_1") / "attack_certify_eps0.02+0.5+1+4+6_n64.csv")
    assert float(wide["certified L2 0.5"].iloc[0]) == pytest.approx(cert.adv_acc.iloc[1], abs=0.005)
    assert len(wide) == 1


@pytest.mark.slow
def test_certify_bad_inputs(trained, monkeypatch, capsys):
    prefix, data = trained
    script = load_script("attack")
    with pytest.raises(SystemExit) as e:
        script.main(
            script.get_args_parser().parse_args(["mnist", prefix, "--attack", "certify", "--eps", "0"])
        )
    assert (
        e.value.code == 2
        and "argument --eps: expected a positive finite number, got 0" in capsys.readouterr().err
    )

    import fastclip.lipschitz as lip

    monkeypatch.setattr(
        lip,
        "lipschitz_report",
        lambda model, shape: lip.LipschitzReport(
            model="DLA", input_shape=tuple(shape), reason="the model is a DLA aggregation tree"
        ),
    )
    with pytest.raises(SystemExit) as e:
        script.main(
            script.get_args_parser().parse_args(
                [
                    "mnist",
                    prefix,
                    "--attack",
                    "certify",
                    "--eps",
                    "0.3",
                    "--n-examples",
                    "8",
                    "--data-dir",
                    str(data),
                ]
            )
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "cannot certify" in err[-1] and "DLA aggregation tree" in err[-1]


@pytest.mark.slow
def test_lipschitz_report_cli_on_a_run_and_its_checkpoint(trained, tmp_path, capsys):
    from fastclip.pipeline.training import load_model

    prefix, _ = trained
    run = Path(f"{prefix}fastclip_wBN_1")
    script = load_script("lipschitz_report")
    assert (
        script.main(script.get_args_parser().parse_args([str(run)])) == 0
    )  # default: into the run directory
    by_dir = pd.read_csv(run / "lipschitz_report.csv")
    argv = [str(run / "ckpt_last.pth"), "--out-dir", str(tmp_path), "--input-shape", "1,28,28"]
    assert script.main(script.get_args_parser().parse_args(argv)) == 0
    by_ckpt = pd.read_csv(tmp_path / "lipschitz_report.csv")
    assert (
        by_dir.layer.tolist()
        == by_ckpt.layer.tolist()
        == ["normalize", "conv1.conv", "conv1.bn", "conv1.conv+conv1.bn", "fc1"]
    )
    assert (by_dir.model == "SimpleConv (fastclip, wBN, seed 1)").all()
    model, _ = load_model(run, which="last")
    rep = __import__("fastclip").lipschitz_report(model, (1, 28, 28))
    assert by_ckpt.sigma1.tolist() == pytest.approx([r.sigma1 for r in rep.rows], rel=1e-9)
    # FastClip clipped every layer to about c = 1 (composition fitted to <= 1.01 c at the epoch's end)
    assert by_ckpt.sigma1.iloc[3] <= 1.01 and by_ckpt.sigma1.iloc[4] <= 1.01
    assert "Lipschitz upper bound (L2)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        script.main(script.get_args_parser().parse_args([str(run), "--input-shape", "3,28,28"]))
    assert e.value.code == 2 and "does not fit SimpleConv" in capsys.readouterr().err
