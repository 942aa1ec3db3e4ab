"""fastclip.pipeline.training in-process: settings, run directory, resume, checkpoints, determinism.

The real command line (subprocesses, kill -9) is tested in test_train_cli.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

import pytest
import torch
from datagen import tiny_config

from fastclip.pipeline.training import (
    CKPT_KEYS,
    DATASET_DEFAULTS,
    ConfigError,
    TrainConfig,
    config_from_args,
    epoch_seeds,
    get_args_parser,
    load_model,
    read_metrics,
    resolve,
    run,
    run_dir_for,
)

pytestmark = pytest.mark.timeout(300)


def tiny(logdir, root, **changes) -> TrainConfig:
    return tiny_config(logdir, root, **changes)


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


# -- settings --------------------------------------------------------------------------------------
def test_resolve_fills_the_papers_defaults_per_dataset():
    cifar = resolve(TrainConfig(dataset="cifar", model="ResNet18", method="orig"))
    assert (cifar.optimizer, cifar.lr, cifar.momentum, cifar.weight_decay, cifar.adam_eps) == (
        "sgd",
        0.1,
        0.9,
        5e-4,
        None,
    )
    assert (cifar.epochs, cifar.batch_size, cifar.lr_step, cifar.lr_gamma) == (200, 128, 40, 0.1)
    for name in ("mnist", "fashion-mnist"):
        c = resolve(TrainConfig(dataset=name, method="orig"))
        assert (c.optimizer, c.lr, c.momentum, c.weight_decay, c.adam_eps) == ("adam", 1e-3, None, 1e-4, 1e-7)
        assert (c.epochs, c.batch_size) == (120, 128)
    # Given values win over the defaults; the input config is not modified.
    cfg = TrainConfig(dataset="cifar", method="orig", lr=0.05, epochs=3)
    out = resolve(cfg)
    assert (out.lr, out.epochs) == (0.05, 3) and cfg.weight_decay is None
    assert set(DATASET_DEFAULTS) == {"cifar", "mnist", "fashion-mnist"}


def test_resolve_expands_the_method_config():
    c = resolve(TrainConfig(method="fastclip", mode="noBN"))
    from fastclip.pipeline.methods import get

    expected = {
        k: v for k, v in dataclasses.asdict(get("fastclip", mode="noBN").config).items() if k != "clip"
    }
    assert c.method_args == expected
    c = resolve(TrainConfig(method="gouk", method_args={"n_iter": 9}, clip=0.5))
    assert c.method_args["n_iter"] == 9 and c.clip == 0.5


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(model="VGG"), "unknown model 'VGG'; choose one of SimpleConv, ResNet18, DLA"),
        (dict(dataset="svhn"), "unknown dataset 'svhn'; choose one of cifar, mnist, fashion-mnist"),
        (dict(method="parseval"), "unknown method 'parseval'; choose one of orig, fastclip"),
        (dict(mode="BN"), "unknown mode 'BN'; choose one of wBN, noBN, clipBN"),
        (dict(epochs=-1), "epochs must be a positive integer, got -1"),
        (dict(optimizer="rmsprop"), "unknown optimizer 'rmsprop'"),
        (dict(dataset="mnist", momentum=0.9), "momentum=0.9 is an SGD setting, but the optimizer is adam"),
        (dict(method="gouk", method_args={"n_itr": 3}), "unknown hyper-parameter(s) n_itr for method 'gouk'"),
        (dict(halve_shortcut=True, model="DLA"), "halve_shortcut applies to ResNet18 only"),
    ],
)
def test_resolve_rejects_bad_settings_naming_the_value(changes, needle):
    with pytest.raises(ConfigError) as e:
        resolve(TrainConfig(**changes))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_run_dir_layout():
    cfg = TrainConfig(
        dataset="cifar", model="ResNet18", method="fastclip", mode="clipBN", seed=100, logdir="/x/logs"
    )
    assert str(run_dir_for(cfg)) == "/x/logs/cifar/ResNet18_models/method_fastclip_clipBN_100"


def test_epoch_seeds_are_distinct_and_reproducible():
    seen = {tuple(epoch_seeds(s, e).values()) for s in (1, 10, 100) for e in range(20)}
    assert len(seen) == 60
    assert epoch_seeds(10, 3) == epoch_seeds(10, 3)
    assert all(0 <= v < 2**64 for v in epoch_seeds(1, 1).values())


def test_parser_composes_as_a_parent_and_reads_method_flags():
    parent = get_args_parser(add_help=False)
    p = argparse.ArgumentParser(parents=[parent])
    p.add_argument("--partition")
    args = p.parse_args(
        [
            "--dataset",
            "cifar",
            "--model",
            "DLA",
            "--method",
            "gouk",
            "--gouk-n-iter",
            "7",
            "--epochs",
            "3",
            "--batch-size",
            "64",
            "--partition",
            "gpu",
            "--halve-shortcut",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.dataset, cfg.model, cfg.method, cfg.epochs, cfg.batch_size) == ("cifar", "DLA", "gouk", 3, 64)
    assert cfg.method_args == {"n_iter": 7} and cfg.halve_shortcut and cfg.lr is None
    # A flag of another method is refused, not ignored.
    args = p.parse_args(["--method", "orig", "--gouk-n-iter", "7"])
    with pytest.raises(ConfigError, match="--gouk-n-iter is a hyper-parameter of method 'gouk'"):
        config_from_args(args)
    # Every TrainConfig field except method_args / model_args has a flag; model options
    # have one each.
    dests = {a.dest for a in parent._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} - {"method_args", "model_args"} <= dests
    assert {"kernel_size", "padding", "stride", "dilation", "padding_mode"} <= dests
    args = p.parse_args(["--kernel-size", "5", "--padding-mode", "circular"])
    assert config_from_args(args).model_args == {"kernel_size": 5, "padding_mode": "circular"}


@pytest.mark.parametrize(
    "argv",
    [
        ["--epochs", "-1"],
        ["--epochs", "0"],
        ["--model", "VGG"],
        ["--seed", "x"],
        ["--clip", "-1"],
        ["--batch-size", "0"],
    ],
)
def test_parser_refuses_bad_flags_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        get_args_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and argv[1] in err and "error:" in err


# -- one run -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_root):
    """One finished 2-epoch run (orig), shared by the read-only tests below."""
    cfg = tiny(tmp_path_factory.mktemp("logs"), mnist_root)
    out = run(cfg)
    return cfg, out


def test_run_writes_every_output(finished):
    cfg, out = finished
    d = run_dir_for(cfg)
    assert out["run_dir"] == str(d) and not out["skipped"] and out["epochs"] == 2
    names = {p.name for p in d.iterdir()}
    assert {
        "config.json",
        "ckpt_last.pth",
        "ckpt_prev.pth",
        "ckpt_best.pth",
        "metrics.csv",
        "train.log",
        "DONE",
    } <= names
    assert any(n.startswith("events.out.tfevents.") for n in names)
    meta = json.loads((d / "config.json").read_text())
    assert meta["settings"]["lr"] == 1e-4 and meta["settings"]["adam_eps"] == 1e-7
    assert meta["device"] == "cpu" and meta["torch_version"] == torch.__version__ and meta["fastclip_version"]
    rows = read_metrics(d / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert list(rows[0])[:7] == [
        "epoch",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "lr",
        "wall_time",
    ]
    # orig in wBN tracks the closed-form BN norm.
    assert "lsv/conv1.bn" in rows[0] and rows[0]["lsv/conv1.bn"] > 0
    for r in rows:
        assert 0 <= r["train_acc"] <= 100 and 0 <= r["test_acc"] <= 100 and r["train_loss"] > 0
    assert out["final"] == rows[-1]
    last = torch.load(d / "ckpt_last.pth", weights_only=True)
    prev = torch.load(d / "ckpt_prev.pth", weights_only=True)
    assert set(CKPT_KEYS) <= set(last) and (last["epoch"], prev["epoch"]) == (2, 1)
    assert last["global_step"] == 8 and last["best_acc"] == max(r["test_acc"] for r in rows)
    assert "epoch 2/2" in (d / "train.log").read_text()


def test_load_model_reproduces_the_test_accuracy(finished, mnist_root):
    from torch.utils.data import DataLoader

    from fastclip.pipeline.data import get_datasets
    from fastclip.pipeline.training import evaluate

    cfg, out = finished
    d = run_dir_for(cfg)
    _, test, _ = get_datasets("mnist", str(mnist_root), test_subset=32)
    rows = read_metrics(d / "metrics.csv")
    model, loaded_cfg = load_model(d, "last")
    assert not model.training and loaded_cfg.epochs == 2 and loaded_cfg.method == "orig"
    loss, acc = evaluate(model, DataLoader(test, batch_size=16), "cpu")
    assert acc == rows[-1]["test_acc"] and loss == pytest.approx(rows[-1]["test_loss"], rel=1e-6)
    best_epoch = max(rows, key=lambda r: r["test_acc"])  # first epoch with the best accuracy
    model, _ = load_model(d, "best")
    loss, acc = evaluate(model, DataLoader(test, batch_size=16), "cpu")
    assert acc == best_epoch["test_acc"] and loss == pytest.approx(best_epoch["test_loss"], rel=1e-6)
    with pytest.raises(ValueError, match="which must be 'best' or 'last'"):
        load_model(d, "final")


def test_a_finished_run_is_skipped(finished, caplog):
    cfg, out = finished
    d = run_dir_for(cfg)
    ckpt_bytes = (d / "ckpt_last.pth").read_bytes()
    with caplog.at_level(logging.INFO, logger="fastclip"):
        again = run(cfg)
    assert again["skipped"] and again["final"] == out["final"]
    assert (d / "ckpt_last.pth").read_bytes() == ckpt_bytes
    assert "finished already" in caplog.text


def test_same_seed_same_metrics_other_seed_other_metrics(tmp_path, mnist_root, finished):
    cfg, out = finished
    rows = read_metrics(run_dir_for(cfg) / "metrics.csv")
    again = run(tiny(tmp_path / "a", mnist_root))
    assert without_time(
        read_metrics(run_dir_for(tiny(tmp_path / "a", mnist_root)) / "metrics.csv")
    ) == without_time(rows)
    other = run(tiny(tmp_path / "b", mnist_root, seed=2))
    assert other["final"]["train_loss"] != again["final"]["train_loss"]


def test_force_retrains_from_scratch_with_equal_metrics(tmp_path, mnist_root):
    cfg = tiny(tmp_path, mnist_root, epochs=1)
    first = run(cfg)
    d = run_dir_for(cfg)
    (d / "metrics.csv").write_text("garbage\n")  # force must not read anything old
    second = run(dataclasses.replace(cfg, force=True))
    assert not second["skipped"]
    assert without_time([second["final"]]) == without_time([first["final"]])
    assert len(list(d.glob("events.out.tfevents.*"))) == 1


# -- resume ------------------------------------------------------------------------------------------
def test_resume_after_a_lost_epoch_drops_its_rows_and_matches(tmp_path, mnist_root, finished, caplog):
    """Simulate a crash after epoch 2's metrics row but before its checkpoint: the rerun
    must redo epoch 2 from epoch 1's checkpoint and end equal to the uninterrupted run."""
    cfg, out = finished
    reference = read_metrics(run_dir_for(cfg) / "metrics.csv")
    mine = tiny(tmp_path, mnist_root)
    run(mine)
    d = run_dir_for(mine)
    (d / "DONE").unlink()
    (d / "ckpt_last.pth").unlink()  # the crash window between rotate and save
    rows = read_metrics(d / "metrics.csv")
    rows[-1]["test_acc"] = -5.0  # a row the rerun must drop, not keep
    from fastclip.pipeline.training import _write_metrics

    _write_metrics(d / "metrics.csv", rows)
    with caplog.at_level(logging.INFO, logger="fastclip"):
        again = run(mine)
    assert "resuming after epoch 1" in caplog.text
    assert without_time(read_metrics(d / "metrics.csv")) == without_time(reference)
    assert not again["skipped"] and (d / "DONE").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "both"])
def test_damaged_last_checkpoint_falls_back_with_a_warning(tmp_path, mnist_root, finished, caplog, damage):
    cfg, _ = finished
    reference = without_time(read_metrics(run_dir_for(cfg) / "metrics.csv"))
    mine = tiny(tmp_path, mnist_root)
    run(mine)
    d = run_dir_for(mine)
    (d / "DONE").unlink()
    last = d / "ckpt_last.pth"
    if damage == "truncate":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    else:
        last.write_bytes(b"not a checkpoint")
    if damage == "both":
        (d / "ckpt_prev.pth").write_bytes(b"\x00" * 10)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastclip"):
        run(mine)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ckpt_last.pth is unreadable" in w for w in warnings), warnings
    if damage == "both":
        assert any("ckpt_prev.pth is unreadable" in w and "fresh start" in w for w in warnings), warnings
        assert "resuming" not in caplog.text
    else:
        assert "falling back to ckpt_prev.pth" in warnings[0] and "resuming after epoch 1" in caplog.text
    assert all("\n" not in w for w in warnings)
    assert without_time(read_metrics(d / "metrics.csv")) == reference
    assert torch.load(last, weights_only=True)["epoch"] == 2


# -- refusals ------------------------------------------------------------------------------------------
def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_run_dir_with_other_settings_is_refused_untouched(tmp_path, mnist_root):
    cfg = tiny(tmp_path, mnist_root, epochs=1)
    run(cfg)
    d = run_dir_for(cfg)
    (d / "DONE").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as e:
        run(dataclasses.replace(cfg, lr=1e-3))
    msg = str(e.value)
    assert "lr=0.0001 there vs 0.001 now" in msg and str(d) in msg and "--force" in msg and "\n" not in msg
    assert snapshot(tmp_path) == before
    # A checkpoint from another config (config.json gone) is refused too.
    (d / "config.json").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"ckpt_last.pth was written by a run with other settings \(batch_size=16 there vs 32 now",
    ):
        run(dataclasses.replace(cfg, batch_size=32))
    assert snapshot(tmp_path) == before
    # Execution settings may change between attempts.
    out = run(dataclasses.replace(cfg, num_workers=1))
    assert out["epochs"] == 1


def test_a_logdir_that_is_a_file_is_refused(tmp_path, mnist_root):
    f = tmp_path / "logs"
    f.write_text("keep me")
    with pytest.raises(ConfigError, match="logdir path .*logs' exists and is not a directory"):
        run(tiny(f, mnist_root))
    assert f.read_text() == "keep me"


def test_missing_data_is_a_config_error_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"mnist: expected .* in .*nowhere.*--download"):
        run(tiny(tmp_path / "logs", tmp_path / "nowhere"))
    assert not (tmp_path / "logs").exists()
