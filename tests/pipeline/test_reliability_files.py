"""Nothing lost, every failure one line (issue 28): run files beyond the checkpoint
(metrics.csv rebuilt, config.json named, damaged runs in the status table), divergence as
a state (FAILED, exit 1), values no run can use (every numeric flag of every command has a
range; empty strings are never paths), output paths checked before any work, a full disk
part-way (one line, nothing lost, a rerun resumes), and checkpoints of another
architecture (which keys and shapes differ)."""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from datagen import tiny_config

import fastclip.pipeline.jobs as jobs
from fastclip.pipeline.checkpoint import CheckpointError, load_checkpoint
from fastclip.pipeline.cli import output_dir_problem, output_file_problem
from fastclip.pipeline.io import WriteError, atomic_torch_save, atomic_write_text
from fastclip.pipeline.limits import MAX_COUNT
from fastclip.pipeline.training import (
    ConfigError,
    TrainConfig,
    load_model,
    read_metrics,
    resolve,
    run,
    run_dir_for,
)
from fastclip.pipeline.training.engine import train_epoch
from fastclip.pipeline.training.metrics import MetricsError
from fastclip.pipeline.training.validate import (
    Diverged,
    RunFilesError,
    check_finite,
    run_files_problem,
    state_dict_mismatch,
)

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
COMMANDS = (
    "train",
    "attack",
    "batch_job_submit",
    "batch_attack_submit",
    "status",
    "collect_attack_results",
    "compute_trained_svs",
    "lipschitz_report",
    "plot_curves",
    "reproduce",
)


def tiny(logdir, root, **changes) -> TrainConfig:
    return tiny_config(logdir, root, **{"epochs": 3, "threads": 1, **changes})


def tiny_argv(logdir, root, *extra: str) -> list[str]:
    return [
        *("--dataset", "mnist", "--model", "SimpleConv", "--method", "orig", "--epochs", "3"),
        *("--batch-size", "16", "--train-subset", "64", "--test-subset", "32", "--device", "cpu"),
        *("--threads", "1", "--data-dir", str(root), "--logdir", str(logdir)),
        *extra,
    ]


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tree(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def run_cli(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """``main`` of ``fastclip.pipeline.cli.<script>`` in-process: (exit code, stderr)."""
    mod = importlib.import_module(f"fastclip.pipeline.cli.{script}")
    capsys.readouterr()
    try:
        code = mod.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if "error" in line.lower()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_root):
    """An uninterrupted 3-epoch run: (config, run directory)."""
    cfg = tiny(tmp_path_factory.mktemp("finished"), mnist_root)
    run(cfg)
    return cfg, run_dir_for(cfg)


def copy_run(finished, tmp_path: Path) -> tuple[TrainConfig, Path]:
    cfg, src = finished
    new = tiny(tmp_path / "logs", cfg.data_dir)
    dst = run_dir_for(new)
    shutil.copytree(src, dst)
    return new, dst


def paused_after_epoch_2(finished, tmp_path: Path) -> tuple[TrainConfig, Path]:
    """A copy of the finished run as a run paused after epoch 2 (ckpt_last = epoch 2)."""
    cfg, run_dir = copy_run(finished, tmp_path)
    (run_dir / "DONE").unlink()
    os.replace(run_dir / "ckpt_prev.pth", run_dir / "ckpt_last.pth")
    assert load_checkpoint(run_dir / "ckpt_last.pth")["epoch"] == 2
    return cfg, run_dir


# -- 1. run files: metrics.csv rebuilt, config.json named, damaged runs in the status table -------
HEADER = b"epoch,train_loss,train_acc,test_loss,test_acc,lr,wall_time\n"
METRICS_DAMAGE = {
    "deleted": None,
    "binary garbage": b"\x00\xff\xfe garbage \x80\n",
    "empty file": b"",
    "header only": HEADER,
    "a number garbled": HEADER + b"1,0.5,abc,1,1,1,1\n",
    "a row cut short": HEADER + b"1,0.5,50\n",
    "epochs out of order": HEADER + b"1,1,1,1,1,1,1\n3,1,1,1,1,1,1\n",
    "a column missing": b"epoch,train_loss\n1,0.5\n",
    "only the last row": None,  # filled in below: the silent loss of the issue
}


def damage_metrics(run_dir: Path, how: str) -> None:
    path = run_dir / "metrics.csv"
    if how == "only the last row":
        lines = path.read_text().splitlines()
        path.write_text("\n".join([lines[0], lines[-1]]) + "\n")
    elif METRICS_DAMAGE[how] is None:
        path.unlink()
    else:
        path.write_bytes(METRICS_DAMAGE[how])


@pytest.mark.parametrize("how", list(METRICS_DAMAGE))
def test_damaged_metrics_of_a_paused_run_are_rebuilt_with_one_warning(finished, tmp_path, caplog, how):
    cfg, run_dir = paused_after_epoch_2(finished, tmp_path)
    damage_metrics(run_dir, how)
    with caplog.at_level(logging.WARNING, logger="fastclip"):
        out = run(cfg)
    warned = [w for w in warnings_of(caplog) if "metrics.csv" in w]
    assert len(warned) == 1 and "rebuilt from the checkpoint (2 row(s))" in warned[0], warnings_of(caplog)
    reference = read_metrics(finished[1] / "metrics.csv")
    rows = read_metrics(run_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # epochs 1-2 come from the checkpoint bit for bit (wall time included), epoch 3 reran
    assert rows[:2] == reference[:2]
    assert without_time(rows) == without_time(reference)
    assert out["final"]["test_acc"] == reference[-1]["test_acc"] and not out["skipped"]


@pytest.mark.parametrize("how", ["deleted", "binary garbage", "a number garbled", "header only"])
def test_damaged_metrics_of_a_finished_run_are_rebuilt_and_the_summary_is_right(
    finished, tmp_path, caplog, how
):
    cfg, run_dir = copy_run(finished, tmp_path)
    damage_metrics(run_dir, how)
    with caplog.at_level(logging.WARNING, logger="fastclip"):
        out = run(cfg)
    warned = warnings_of(caplog)
    assert len(warned) == 1 and "rebuilt from ckpt_last.pth (3 row(s))" in warned[0], warned
    reference = read_metrics(finished[1] / "metrics.csv")
    assert out["skipped"] and out["final"] == reference[-1] and out["epochs"] == 3
    assert read_metrics(run_dir / "metrics.csv") == reference
    assert (run_dir / "metrics.csv").read_bytes() == (finished[1] / "metrics.csv").read_bytes()


def test_a_finished_run_without_config_json_is_checked_against_its_checkpoint(finished, tmp_path):
    cfg, run_dir = copy_run(finished, tmp_path)
    (run_dir / "config.json").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as e:  # other settings: never "done" by mistake
        run(tiny(tmp_path / "logs", cfg.data_dir, lr=1e-3))
    assert str(e.value) == (
        f"{run_dir} has no config.json, and its ckpt_last.pth was written by a run with other settings "
        "(lr=0.0001 there vs 0.001 now); use --force to start afresh or another --logdir"
    )
    assert snapshot(tmp_path) == before
    assert run(cfg)["skipped"]  # the same settings: done
    assert run_files_problem(run_dir) == "config.json is missing"


@pytest.mark.parametrize("how", ["garbled", "empty", "a JSON list"])
def test_an_unreadable_done_marker_is_rebuilt_by_a_rerun(finished, tmp_path, caplog, how):
    cfg, run_dir = copy_run(finished, tmp_path)
    good = (run_dir / "DONE").read_text()
    (run_dir / "DONE").write_text({"garbled": "{oops", "empty": "", "a JSON list": "[1]"}[how])
    assert run_files_problem(run_dir).startswith("DONE is damaged")
    with caplog.at_level(logging.WARNING, logger="fastclip"):
        out = run(cfg)
    assert warnings_of(caplog) == ["DONE was unreadable; rebuilt from metrics.csv"]
    assert out["skipped"] and json.loads((run_dir / "DONE").read_text()) == json.loads(good)
    assert run_files_problem(run_dir) is None


def test_read_metrics_names_the_file_line_and_problem(tmp_path):
    path = tmp_path / "metrics.csv"
    for how, needle in [
        ("a number garbled", "metrics.csv line 2: train_acc is 'abc', not a number"),
        ("a row cut short", "metrics.csv line 2 has not as many fields as the header"),
        ("epochs out of order", "metrics.csv line 3: epoch 3 out of order"),
        ("a column missing", "metrics.csv lacks the column(s) train_acc"),
        ("binary garbage", "metrics.csv is not a CSV file (UnicodeDecodeError)"),
    ]:
        path.write_bytes(METRICS_DAMAGE[how])
        with pytest.raises(MetricsError) as e:
            read_metrics(path)
        assert str(e.value).startswith(needle) and "\n" not in str(e.value), (how, str(e.value))


CONFIG_DAMAGE = {
    "not JSON": (b"{not json", "config.json is damaged (not JSON"),
    "truncated": (None, "config.json is damaged (not JSON"),
    "no settings": (b'{"other": 1}', "config.json is damaged (no 'settings' entry)"),
    "settings a list": (b'{"settings": [1, 2]}', "config.json is damaged ('settings' is a list"),
    "binary": (b"\xff\xfe\x00", "config.json is unreadable (UnicodeDecodeError)"),
}


def damage_config(run_dir: Path, how: str) -> None:
    path = run_dir / "config.json"
    data = CONFIG_DAMAGE[how][0]
    path.write_bytes(path.read_bytes()[:40] if data is None else data)


@pytest.mark.parametrize("how", list(CONFIG_DAMAGE))
def test_a_damaged_config_json_is_named_as_such_by_every_reader(finished, tmp_path, capsys, how):
    cfg, run_dir = copy_run(finished, tmp_path)
    damage_config(run_dir, how)
    needle = CONFIG_DAMAGE[how][1]
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as e:  # train: refused before anything is written
        run(cfg)
    assert needle in str(e.value) and "--force" in str(e.value) and "ckpt" not in str(e.value)
    with pytest.raises(RunFilesError) as e:
        load_model(run_dir)
    assert needle in str(e.value)
    for script, argv in [
        ("lipschitz_report", [str(run_dir), "--out-dir", str(tmp_path / "rep")]),
        ("train", tiny_argv(tmp_path / "logs", cfg.data_dir)),
    ]:
        code, err = run_cli(script, argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], (script, err)
        assert "cannot load" not in lines[0] and "ckpt_" not in lines[0], (script, err)
    assert snapshot(tmp_path) == before
    assert run_files_problem(run_dir).startswith(needle)


RUN_DAMAGE = {
    "metrics.csv garbled": (
        lambda d: (d / "metrics.csv").write_bytes(b"\xff\x00"),
        "metrics.csv is not a CSV",
    ),
    "metrics.csv deleted": (lambda d: (d / "metrics.csv").unlink(), "metrics.csv is missing or empty"),
    "metrics.csv short": (
        lambda d: damage_metrics(d, "only the last row"),
        "metrics.csv line 2: epoch 3 out of",
    ),
    "config.json broken": (lambda d: damage_config(d, "not JSON"), "config.json is damaged (not JSON"),
    "config.json deleted": (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    "DONE garbled": (lambda d: (d / "DONE").write_text("{oops"), "DONE is damaged"),
    "ckpt_last truncated": (
        lambda d: (d / "ckpt_last.pth").write_bytes((d / "ckpt_last.pth").read_bytes()[:1000]),
        "ckpt_last.pth is unreadable (BadZipFile)",
    ),
    "ckpt_best deleted": (lambda d: (d / "ckpt_best.pth").unlink(), "ckpt_best.pth is missing"),
    "ckpt_best empty": (lambda d: (d / "ckpt_best.pth").write_bytes(b""), "ckpt_best.pth is unreadable"),
}


def train_runs_grid(tmp_path: Path, names: list[str]) -> jobs.Grid:
    runs = [
        jobs.Run(
            name=name,
            kind="train",
            run_dir=tmp_path / "grid" / name,
            argv=("python", "train.py"),
            done_file=tmp_path / "grid" / name / "DONE",
            log_name="train",
        )
        for name in names
    ]
    return jobs.Grid(kind="train", runs=runs, home=tmp_path / "grid" / "grids")


def test_status_shows_damaged_runs_with_the_file_and_reason_never_done(finished, tmp_path):
    names = ["intact", *RUN_DAMAGE]
    grid = train_runs_grid(tmp_path, names)
    for r in grid.runs:
        shutil.copytree(finished[1], r.run_dir)
        if r.name in RUN_DAMAGE:
            RUN_DAMAGE[r.name][0](r.run_dir)
    rows = {row.run.name: row for row in jobs.grid_status(grid)}
    assert rows["intact"].state == "done" and rows["intact"].detail == ""
    wrong = [
        f"{name}: {rows[name].state} {rows[name].detail!r}"
        for name, (_, needle) in RUN_DAMAGE.items()
        if not (rows[name].state == "damaged" and rows[name].detail.startswith(needle))
    ]
    assert not wrong, "\n".join(wrong)
    table = jobs.format_status(list(rows.values()))
    assert f"{len(names)} runs: 1 done, {len(RUN_DAMAGE)} damaged" in table
    # a flipped byte inside a tensor passes the cheap zip check; deep=True verifies the SHA-256
    from test_reliability import damage_mid_tensor

    damage_mid_tensor(grid.runs[0].run_dir / "ckpt_best.pth")
    assert run_files_problem(grid.runs[0].run_dir) is None
    assert run_files_problem(grid.runs[0].run_dir, deep=True) == "ckpt_best.pth is damaged (SHA-256 mismatch)"


# -- 2. divergence: FAILED, one line, exit 1; --force starts over ---------------------------------------
DIVERGE = ("--optimizer", "sgd", "--lr", "1000")  # SimpleConv's loss is NaN within 2 epochs


def test_divergence_writes_failed_ends_with_one_line_and_exit_1(tmp_path, mnist_root, capsys):
    logs = tmp_path / "logs"
    argv = tiny_argv(logs, mnist_root, *DIVERGE)
    code, err = run_cli("train", argv, capsys)
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "diverged: the cross-entropy loss is nan at step" in lines[0] and "FAILED" in lines[0]
    run_dir = next(logs.rglob("config.json")).parent
    failed = json.loads((run_dir / "FAILED").read_text())
    assert failed["term"] == "the cross-entropy loss" and failed["value"] == "nan"
    assert failed["reason"] in lines[0] and isinstance(failed["step"], int) and failed["epoch"] >= 1
    assert not (run_dir / "DONE").exists()
    # the checkpoint is of the last epoch whose model was finite
    assert load_checkpoint(run_dir / "ckpt_last.pth")["epoch"] == failed["epoch"] - 1
    assert all(torch.isfinite(v).all() for v in load_checkpoint(run_dir / "ckpt_last.pth")["model"].values())

    # the status table and the grid backends report the reason
    grid = train_runs_grid(tmp_path, [])
    grid = jobs.Grid(
        kind="train",
        runs=[
            jobs.Run(
                name="diverged",
                kind="train",
                run_dir=run_dir,
                argv=("python", "train.py"),
                done_file=run_dir / "DONE",
                log_name="train",
            )
        ],
        home=tmp_path / "grids",
    )
    (row,) = jobs.grid_status(grid)
    assert row.state == "failed" and row.detail == failed["reason"]
    assert [r for r, _ in jobs.plan(grid).skipped] == []  # a dispatch submits it again

    # rerun without --force: the same line, exit 1, nothing changed
    before = snapshot(tmp_path)
    code, err = run_cli("train", argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert failed["reason"] in err and "use --force to start over" in err
    assert snapshot(tmp_path) == before

    # --force starts over (here with a learning rate that trains)
    code, err = run_cli("train", [*argv, "--lr", "1e-4", "--force"], capsys)
    assert code == 0, err
    assert not (run_dir / "FAILED").exists() and (run_dir / "DONE").exists()
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.csv")] == [1, 2, 3]


class _NanPenalty:
    name = "nanny"

    def penalty(self, model):
        return torch.tensor(float("nan"))

    def after_step(self, model, step):
        pass

    def layer_norms(self, model):
        return {}


def test_a_non_finite_penalty_or_parameter_is_named(tmp_path):
    model = torch.nn.Linear(4, 3)
    loader = [(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Diverged) as e:
        train_epoch(model, _NanPenalty(), torch.optim.SGD(model.parameters(), lr=0.1), loader, "cpu", step=7)
    assert e.value.reason == "diverged: the nanny penalty is nan at step 7"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step taken
    with torch.no_grad():
        model.bias[1] = float("inf")
    with pytest.raises(Diverged) as e:
        check_finite(model, 12)
    assert e.value.reason == "diverged: parameter bias is inf at step 12"


# -- 3. values no run can use: every numeric flag of every command has a range -----------------------
def parsers() -> dict[str, argparse.ArgumentParser]:
    out = {
        name: importlib.import_module(f"fastclip.pipeline.cli.{name}").get_args_parser() for name in COMMANDS
    }
    out["demo"] = importlib.import_module("fastclip.pipeline.demo").get_args_parser()
    return out


def numeric_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if getattr(a.type, "valid_range", None)]  # noqa: SLF001


PATH_DESTS = {"logdir", "data_dir", "out_dir", "out", "model_prefix", "source", "run_dirs", "manifest"}


def test_every_numeric_flag_of_every_command_has_a_checked_documented_range():
    unchecked, undocumented, unpathed = [], [], []
    for name, parser in parsers().items():
        for a in parser._actions:  # noqa: SLF001
            if a.type in (int, float):
                unchecked.append(f"{name} {a.option_strings or a.dest}")
            if a.dest in PATH_DESTS and getattr(a.type, "__name__", "") != "path":
                unpathed.append(f"{name} {a.option_strings or a.dest}")
        help_text = parser.format_help()
        for a in numeric_actions(parser):
            if a.help and f"[range {a.type.valid_range}]" not in " ".join(help_text.split()):
                undocumented.append(f"{name} {a.option_strings}")
    assert not unchecked, f"numeric flags without a range: {unchecked}"
    assert not undocumented, f"ranges missing from --help: {undocumented}"
    assert not unpathed, f"path flags that take '': {unpathed}"
    assert sum(len(numeric_actions(p)) for p in parsers().values()) > 100


BAD_NUMBERS = ["nan", "inf", "-inf", "1e400", "99999999999999999999999", "-99999999999999999999999", "x"]


def test_every_numeric_flag_refuses_absurd_values_in_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    failures, tried = [], 0
    for name, parser in parsers().items():
        for a in numeric_actions(parser):
            flag = a.option_strings[0] if a.option_strings else None
            if flag is None:
                continue
            for bad in BAD_NUMBERS:
                capsys.readouterr()
                try:
                    parser.parse_args([flag, bad])
                    code = 0
                except SystemExit as e:
                    code = e.code
                err = capsys.readouterr().err
                tried += 1
                lines = err.strip().splitlines()
                if not (code == 2 and len(lines) == 1 and f"argument {flag}" in lines[0]):
                    failures.append(f"{name} {flag} {bad}: exit {code} {err.strip()!r}")
    assert not failures, "\n".join(failures[:20])
    assert tried > 700 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "script, argv, needle",
    [
        (
            "train",
            ["--epochs", "99999999999999999999999"],
            "argument --epochs: expected an integer in 1..100000",
        ),
        ("train", ["--epochs", "100001"], "argument --epochs: expected an integer in 1..100000"),
        (
            "train",
            ["--lip4conv-weight", "nan"],
            "argument --lip4conv-weight: expected a finite number >= 0, got nan",
        ),
        ("train", ["--lr", "inf"], "argument --lr: expected a positive finite number, got inf"),
        ("train", ["--lr", "1e-400"], "argument --lr: expected a positive finite number"),
        (
            "train",
            ["--momentum", "1.5", "--optimizer", "sgd"],
            "argument --momentum: expected a finite number >= 0 <= 1",
        ),
        ("train", ["--clip", "0"], "argument --clip: expected a positive finite number, got 0"),
        ("train", ["--seed", "-1"], "argument --seed: expected an integer seed >= 0"),
        (
            "train",
            ["--seed", str(2**64)],
            "argument --seed: expected an integer seed in 0..9223372036854775807",
        ),
        ("train", ["--threads", "100000"], "argument --threads: expected an integer in 1..4096"),
        ("train", ["--miyato-eps", "0"], "argument --miyato-eps: expected a positive finite number, got 0"),
        (
            "train",
            ["--nsedghi-clip-steps", "0"],
            "argument --nsedghi-clip-steps: expected a positive integer",
        ),
        ("train", ["--kernel-size", "5000"], "argument --kernel-size: expected an integer in 1..1024"),
        ("train", ["--logdir", ""], "argument --logdir: expected a path, got ''"),
        ("train", ["--logdir", "  "], "argument --logdir: expected a path, got '  '"),
        ("train", ["--data-dir", ""], "argument --data-dir: expected a path, got ''"),
        ("attack", ["mnist", "", "--eps", "0.1"], "argument model_prefix: expected a path, got ''"),
        (
            "attack",
            ["mnist", "x", "--cw-confidence", "nan"],
            "argument --cw-confidence: expected a finite number",
        ),
        ("attack", ["mnist", "x", "--attack-seed", "-3"], "argument --attack-seed: expected an integer seed"),
        ("lipschitz_report", ["--torchvision", "resnet18", "--num-classes", "0"], "argument --num-classes"),
        ("lipschitz_report", ["x", "--tol", "2"], "argument --tol: expected a positive finite number <= 1"),
        ("compute_trained_svs", ["mnist", "all", "x", "--tol", "nan"], "argument --tol"),
        ("compute_trained_svs", ["mnist", "all", "x", "--seed", "1.5"], "argument --seed"),
        ("collect_attack_results", ["x", "--seed", "-1"], "argument --seed"),
        ("collect_attack_results", ["x", "--out-dir", ""], "argument --out-dir: expected a path"),
        ("plot_curves", ["x", "--out", ""], "argument --out: expected a path"),
        (
            "batch_job_submit",
            ["--time", "99999999"],
            "argument --time: expected a positive time limit of at most 365",
        ),
        ("batch_job_submit", ["--workers", "0"], "argument --workers: expected a positive integer"),
        ("batch_job_submit", ["--epochs", "1e9"], "argument --epochs"),
        ("reproduce", ["--epochs", "100001"], "argument --epochs: expected an integer in 1..100000"),
        ("reproduce", ["--logdir", ""], "argument --logdir: expected a path"),
        ("status", ["--manifest", ""], "argument --manifest: expected a path"),
    ],
)
def test_values_no_run_can_use_are_one_line_exit_2_and_write_nothing(
    tmp_path, capsys, monkeypatch, script, argv, needle
):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(script, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "changes, needle",
    [
        (
            dict(epochs=10**23),
            "epochs must be a positive integer, got 100000000000000000000000 (valid: 1..100000)",
        ),
        (dict(lr=float("nan")), "lr must be a positive number, got nan"),
        (dict(momentum=2.0, optimizer="sgd"), "momentum must be a finite number, got 2.0 (valid: [0, 1])"),
        (dict(logdir=""), "logdir must be a path, got ''"),
        (dict(data_dir=" "), "data_dir must be a path, got ' '"),
        (
            dict(method="lip4conv", method_args={"weight": float("nan")}),
            "weight must be a finite number, got nan",
        ),
        (
            dict(method="gouk", method_args={"n_iter": 10**10}),
            "n_iter must be an integer >= 0, got 10000000000",
        ),
        (dict(model_args={"kernel_size": 0}), "kernel_size must be a positive integer, got 0"),
        (dict(threads=True), "threads must be a positive integer, got True"),
    ],
)
def test_the_library_checks_the_same_ranges(changes, needle):
    with pytest.raises(ConfigError) as e:
        resolve(TrainConfig(**changes))
    assert needle in str(e.value) and "\n" not in str(e.value)


# -- 4. output paths checked before any work; nothing created --------------------------------------------
def test_output_path_problems_are_named_without_touching_the_disk(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    long = "x" * 300
    cases = {
        str(f / "sub"): "exists and is not a directory",
        "/proc/fastclip-test/run": "is on a proc file system, which takes no files",
        "/sys/fastclip-test": "is on a sysfs file system",
        str(tmp_path / long / "a"): "is 300 bytes long; the file system takes at most 255",
        str(tmp_path / ("é" * 200)): "is 400 bytes long",  # bytes, not characters
        str(tmp_path / "/".join(["abcdefgh"] * 600)): "the file system takes less than 4096",
        "": "is not a path",
    }
    before = tree(tmp_path)
    for path, needle in cases.items():
        problem = output_dir_problem(path, "--out-dir")
        assert problem and needle in problem and "\n" not in problem and len(problem) < 400, (path, problem)
    assert output_dir_problem(tmp_path / "new" / "deeper") is None
    assert "exists and is not a regular file" in output_file_problem("/dev/null", "--out")
    assert "is a directory" in output_file_problem(tmp_path, "--out")
    assert "is 304 bytes long" in output_file_problem(tmp_path / (long + ".png"), "--out")
    assert tree(tmp_path) == before


def output_cases(tmp: Path, run_dir: Path, root: Path) -> dict[str, tuple[str, list[str], str]]:
    f = tmp / "file"
    long = "y" * 300
    prefix = str(run_dir.parent / "method_")
    train = ["--dataset", "mnist", "--data-dir", str(root), "--epochs", "1", "--train-subset", "32"]
    grid = [
        "--dataset",
        "mnist",
        "--model",
        "SimpleConv",
        "--method",
        "orig",
        "--seed",
        "1",
        "--backend",
        "local",
    ]
    return {
        "train logdir under /proc": ("train", [*train, "--logdir", "/proc/fastclip-x"], "proc file system"),
        "train logdir in a file": ("train", [*train, "--logdir", str(f / "logs")], "not a directory"),
        "train logdir too long": ("train", [*train, "--logdir", str(tmp / long / "logs")], "300 bytes long"),
        "train logdir /sys": ("train", [*train, "--logdir", "/sys/fastclip-x"], "sysfs file system"),
        "submit logdir under /proc": ("batch_job_submit", [*grid, "--logdir", "/proc/x"], "proc file system"),
        "submit logdir too long": (
            "batch_job_submit",
            [*grid, "--logdir", str(tmp / long)],
            "300 bytes long",
        ),
        "reproduce logdir too long": (
            "reproduce",
            ["--logdir", str(tmp / long), "--size", "tiny"],
            "300 bytes",
        ),
        "reproduce logdir /proc": (
            "reproduce",
            ["--logdir", "/proc/x", "--size", "tiny"],
            "proc file system",
        ),
        "collect out-dir /proc": (
            "collect_attack_results",
            [prefix, "--out-dir", "/proc/x"],
            "proc file system",
        ),
        "collect out-dir too long": (
            "collect_attack_results",
            [prefix, "--out-dir", str(tmp / long)],
            "300 bytes",
        ),
        "SVs out-dir /proc": (
            "compute_trained_svs",
            ["mnist", "all", prefix, "--out-dir", "/proc/x"],
            "proc",
        ),
        "SVs out-dir too long": (
            "compute_trained_svs",
            ["mnist", "all", prefix, "--out-dir", str(tmp / long / "z")],
            "300 bytes",
        ),
        "lipschitz out-dir in a file": (
            "lipschitz_report",
            [str(run_dir), "--out-dir", str(f / "rep")],
            "not a directory",
        ),
        "lipschitz out-dir /proc": (
            "lipschitz_report",
            [str(run_dir), "--out-dir", "/proc/x"],
            "proc file system",
        ),
        "lipschitz out-dir too long": (
            "lipschitz_report",
            [str(run_dir), "--out-dir", str(tmp / long / "rep")],
            "300 bytes",
        ),
        "curves out a FIFO": (
            "plot_curves",
            [str(run_dir), "--out", str(tmp / "fifo.png")],
            "not a regular file",
        ),
        "curves out too long": (
            "plot_curves",
            [str(run_dir), "--out", str(tmp / (long + ".png"))],
            "304 bytes",
        ),
        "curves out /proc": ("plot_curves", [str(run_dir), "--out", "/proc/c.png"], "proc file system"),
    }


def test_every_output_flag_is_checked_before_work_one_line_exit_2_nothing_created(
    finished, tmp_path, capsys, mnist_root
):
    logs = tmp_path / "logs"
    run_dir = logs / finished[1].relative_to(finished[1].parents[2])
    shutil.copytree(finished[1], run_dir)
    (tmp_path / "file").write_text("keep")
    os.mkfifo(tmp_path / "fifo.png")
    cases = output_cases(tmp_path, run_dir, mnist_root)
    before = snapshot(tmp_path)
    paths_before = tree(tmp_path)
    failures = []
    for case, (script, argv, needle) in cases.items():
        code, err = run_cli(script, argv, capsys)
        lines = err.strip().splitlines()
        if not (code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err):
            failures.append(f"{case}: exit {code}, {err.strip()[-300:]!r}")
    assert not failures, "\n".join(failures)
    assert snapshot(tmp_path) == before and tree(tmp_path) == paths_before


# -- 4b. a failure part-way: one line naming the path and the OS error, nothing lost, a rerun resumes ------
def test_an_os_error_part_way_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    atomic_torch_save({"v": torch.ones(3)}, path)
    old = path.read_bytes()

    def eio(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(WriteError) as e:
        atomic_torch_save({"v": torch.zeros(3)}, path)
    assert str(e.value) == f"cannot write {str(path)!r}: Input/output error (errno 5)"
    assert e.value.errno == errno.EIO and e.value.filename == str(path)
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]
    with pytest.raises(WriteError, match="metrics.csv': Input/output error"):
        atomic_write_text(tmp_path / "metrics.csv", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 15 MiB tmpfs (root only): room for two 6 MB checkpoints of SimpleConv, not three."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=15m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("mount not permitted here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_ends_with_one_line_and_a_rerun_resumes(finished, small_tmpfs, mnist_root, capsys):
    argv = tiny_argv(small_tmpfs, mnist_root, "--lr", "1e-4")
    code, err = run_cli("train", argv, capsys)
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1 and "Traceback" not in err and "Logging error" not in err, err
    run_dir = run_dir_for(tiny(small_tmpfs, mnist_root))
    assert f"cannot write '{run_dir}/ckpt_" in lines[0]
    assert "No space left on device (errno 28)" in lines[0] and "rerun the same command" in lines[0]
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # no temp left
    kept = load_checkpoint(run_dir / "ckpt_last.pth")  # the previous checkpoint, intact
    assert kept["epoch"] >= 1 and not (run_dir / "DONE").exists()
    # fixed: more room; the same command resumes after the kept checkpoint
    assert subprocess.run(["mount", "-o", "remount,size=60m", str(small_tmpfs)]).returncode == 0
    code, err = run_cli("train", argv, capsys)
    assert code == 0, err
    assert f"resuming after epoch {kept['epoch']}" in (run_dir / "train.log").read_text()
    reference = read_metrics(finished[1] / "metrics.csv")
    assert without_time(read_metrics(run_dir / "metrics.csv")) == without_time(reference)


def test_every_writing_command_ends_a_full_disk_with_one_line(
    finished, small_tmpfs, tmp_path, capsys, mnist_root
):
    run_dir = tmp_path / "logs" / finished[1].relative_to(finished[1].parents[2])
    shutil.copytree(finished[1], run_dir)
    (run_dir / "attack_pgd.csv").write_text("eps,clean_acc,adv_acc\n0.1,90.0,50.0\n")
    on_full = small_tmpfs / "logs" / run_dir.relative_to(tmp_path / "logs")
    on_full.mkdir(parents=True)
    for name in ("config.json", "ckpt_best.pth"):  # attack.py writes its CSV beside them
        shutil.copy(run_dir / name, on_full / name)
    subprocess.run(["dd", "if=/dev/zero", f"of={small_tmpfs / 'filler'}", "bs=1M"], capture_output=True)
    full = small_tmpfs / "out"
    full.mkdir()
    prefix = str(run_dir.parent / "method_")
    failures = []
    for script, argv in [
        ("collect_attack_results", [prefix, "--out-dir", str(full)]),
        ("lipschitz_report", [str(run_dir), "--out-dir", str(full / "rep")]),
        ("plot_curves", [str(run_dir), "--out", str(full / "c.png")]),
        ("compute_trained_svs", ["mnist", "orig", prefix, "--out-dir", str(full)]),
        (
            "attack",
            ["mnist", str(on_full.parent / "method_"), "--method", "orig", "--mode", "wBN"]
            + ["--n-examples", "8", "--n-steps", "2", "--data-dir", str(mnist_root), "--device", "cpu"],
        ),
    ]:
        code, err = run_cli(script, argv, capsys)
        lines = err.strip().splitlines()
        if not (
            code == 1
            and len(lines) == 1
            and (f"cannot write '{full}" in lines[0] or f"cannot write '{on_full}" in lines[0])
            and "No space left on device" in lines[0]
        ):
            failures.append(f"{script}: exit {code} {err.strip()[-300:]!r}")
    assert not failures, "\n".join(failures)
    assert not [p for p in full.rglob("*") if p.is_file()]  # no temp, no partial file
    assert sorted(p.name for p in on_full.iterdir()) == ["ckpt_best.pth", "config.json"]


# -- 5. a checkpoint of another architecture: which keys and shapes differ ------------------------------
def test_a_checkpoint_of_another_architecture_names_the_keys_and_shapes(finished, tmp_path, capsys):
    _, run_dir = copy_run(finished, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    config["settings"]["model_args"] = {"kernel_size": 5, "padding": 2}
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load_model(run_dir)
    msg = str(e.value)
    assert msg.startswith("ckpt_best.pth does not fit SimpleConv as config.json describes it: ")
    assert "shape(s) differ, checkpoint vs model: (" in msg and "(3, 3) vs" not in msg
    assert ", 3, 3) vs (" in msg and ", 5, 5)" in msg and "\n" not in msg
    code, err = run_cli("lipschitz_report", [str(run_dir), "--out-dir", str(tmp_path / "rep")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "shape(s) differ" in err, err
    assert not (tmp_path / "rep").exists()


def test_state_dict_mismatch_lists_the_first_few_of_each_kind():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = {f"extra{i}": torch.zeros(1) for i in range(5)}
    state["0.weight"] = torch.zeros(5, 3)
    assert state_dict_mismatch(model, model.state_dict()) is None
    assert state_dict_mismatch(model, state) == (
        "1 shape(s) differ, checkpoint vs model: (0.weight (5, 3) vs (4, 3)); "
        "3 missing key(s) (0.bias, 1.weight, 1.bias); "
        "5 unexpected key(s) (extra0, extra1, extra2 and 2 more)"
    )


def test_limits_are_the_documented_ones():
    assert MAX_COUNT == 10**9
    assert resolve(TrainConfig(epochs=100_000, logdir="x")).epochs == 100_000


def test_a_metrics_csv_that_is_a_directory_is_one_line_exit_1_and_nothing_changes(finished, tmp_path, capsys):
    cfg, run_dir = paused_after_epoch_2(finished, tmp_path)
    (run_dir / "metrics.csv").unlink()
    (run_dir / "metrics.csv").mkdir()
    before = snapshot(tmp_path)
    code, err = run_cli("train", tiny_argv(tmp_path / "logs", cfg.data_dir, "--lr", "1e-4"), capsys)
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert f"cannot write '{run_dir / 'metrics.csv'}': Is a directory (errno 21)" in lines[0]
    after = snapshot(tmp_path)
    # only the run's own log and TensorBoard file grew; every result file is as it was
    changed = {p.name for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed <= {"train.log", "config.json"} | {p.name for p in after if "tfevents" in p.name}, changed
    assert load_checkpoint(run_dir / "ckpt_last.pth")["epoch"] == 2
