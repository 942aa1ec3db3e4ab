"""fastclip.pipeline.jobs and the submit scripts: grid expansion, pass-through of flags, the local
backend (real train.py runs with 2 workers, and a fake script for failures and live
runs), status, idempotence, and bad input. The SLURM backend is in test_slurm.py."""

from __future__ import annotations

import argparse
import doctest
import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from datagen import write_mnist
from scriptload import load_script

import fastclip.pipeline.jobs as jobs
from fastclip.pipeline.jobs import slurm

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
PY = sys.executable

#: The grid both backends run: 2 methods x 2 modes x 2 seeds of tiny train.py runs.
#: 640 examples in batches of 32 make an epoch last about a second, long enough for
#: test_slurm.py to preempt a task between two epochs.
#: gouk carries state across steps (power-iteration vectors), so a resume that lost it
#: would show in the metrics; lr 1e-4 keeps every loss away from 0.
GRID_AXES = [
    "--dataset",
    "mnist",
    "--model",
    "SimpleConv",
    "--method",
    "gouk",
    "orig",
    "--mode",
    "wBN",
    "noBN",
    "--seed",
    "1",
    "2",
]
RUN_FLAGS = [
    "--epochs",
    "4",
    "--batch-size",
    "32",
    "--lr",
    "1e-4",
    "--train-subset",
    "640",
    "--test-subset",
    "64",
]
GRID_NAMES = [
    f"mnist/SimpleConv_models/method_{me}_{mo}_{s}"
    for me in ("gouk", "orig")
    for mo in ("wBN", "noBN")
    for s in (1, 2)
]


def run_script(name: str, argv: list[str]) -> int:
    """``python experiments/<name>.py argv`` in-process: its exit code (SystemExit included)."""
    module = load_script(name)
    try:
        return module.main(module.get_args_parser().parse_args(argv))
    except SystemExit as e:
        return e.code


@functools.cache
def grid_data(root: str) -> str:
    """The tiny MNIST both backends train on (written once per session)."""
    return str(write_mnist(Path(root) / "data", n_train=640, n_test=64, seed=0))


_LOCAL: dict[str, Path] = {}


def local_grid_logdir(tmp_path_factory) -> Path:
    """The logdir of GRID_AXES run by the local backend with 2 workers (run once per
    session; test_slurm.py compares the SLURM backend's outputs with these)."""
    if "logdir" not in _LOCAL:
        root = tmp_path_factory.mktemp("local_grid")
        data = grid_data(str(tmp_path_factory.getbasetemp()))
        logdir = root / "logs"
        t0 = time.perf_counter()
        code = run_script(
            "batch_job_submit",
            [
                *GRID_AXES,
                *RUN_FLAGS,
                "--data-dir",
                data,
                "--logdir",
                str(logdir),
                "--backend",
                "local",
                "--workers",
                "2",
            ],
        )
        _LOCAL.update(logdir=logdir, code=code, seconds=time.perf_counter() - t0)
    return _LOCAL["logdir"]


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    import pandas as pd

    df = pd.read_csv(path)
    return {c: df[c].to_numpy(dtype=float) for c in df.columns if c != "wall_time"}


def assert_same_metrics(a: Path, b: Path) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    assert sorted(ma) == sorted(mb), (a, b)
    for col in ma:
        np.testing.assert_allclose(ma[col], mb[col], rtol=1e-6, atol=1e-9, err_msg=f"{col}: {a} vs {b}")


# -- pure functions ---------------------------------------------------------------------------------
def test_doctests():
    attempted = 0
    for name in ("", *(f".{m}" for m in jobs.SUBMODULES)):
        result = doctest.testmod(
            importlib.import_module(f"fastclip.pipeline.jobs{name}"), optionflags=doctest.ELLIPSIS
        )
        assert result.failed == 0, name
        attempted += result.attempted
    assert attempted >= 5


def test_expand_all_and_duplicates():
    assert jobs.expand(["all"], ["a", "b", "c"], "x") == ["a", "b", "c"]
    assert jobs.expand(["b", "all", "b"], ["a", "b", "c"], "x") == ["b", "a", "c"]
    with pytest.raises(jobs.GridError, match=r"unknown mode 'nBN'; choose from wBN, noBN, all"):
        jobs.expand(["nBN"], ["wBN", "noBN"], "mode")


def test_parse_slurm_time():
    assert [
        jobs.parse_slurm_time(t) for t in ("1", "0:59", "1:00", "02:00:01", "1-0", "1-01:30", "1-00:00:30")
    ] == [1, 1, 1, 121, 1440, 1530, 1441]
    for bad in ("", "1h", "-1", "0", "1:2:3:4"):
        with pytest.raises(argparse.ArgumentTypeError, match="SLURM time|positive"):
            jobs.parse_slurm_time(bad)


def test_last_error_line(tmp_path):
    log = tmp_path / "x.err"
    log.write_text(
        "epoch 1:  10%|#  | 1/10\repoch 1: 100%|###| 10/10\nTraceback (most recent call last):\n"
        "  File \"train.py\", line 3\nIsADirectoryError: [Errno 21] Is a directory: '/r/config.json'\n"
        "epoch 2: 0%|   | 0/10\r\n"
    )
    assert jobs.last_error_line(log) == "IsADirectoryError: [Errno 21] Is a directory: '/r/config.json'"
    log.write_text("first\nlast line\n\n")
    assert jobs.last_error_line(log) == "last line"
    assert jobs.last_error_line(tmp_path / "missing") == ""


def test_default_seeds_and_all_expansion():
    """--method all --mode all without a seed is the paper's 6 x 3 x 10 grid."""
    args = jobs.train_submit_parser().parse_args(["--method", "all", "--mode", "all", "--model", "ResNet18"])
    grid = jobs.train_grid(args, script=EXPERIMENTS / "train.py")
    assert len(grid.runs) == 180
    seeds = sorted({int(r.name.rsplit("_", 1)[1]) for r in grid.runs})
    assert seeds == [10**i for i in range(10)]
    assert {r.name.split("/")[0] for r in grid.runs} == {"cifar"}  # the seed's default dataset
    names = {r.name for r in grid.runs}
    assert "cifar/ResNet18_models/method_lip4conv_clipBN_1000000000" in names


def test_flags_pass_through_to_every_run(tmp_path):
    args = jobs.train_submit_parser().parse_args(
        [
            "--method",
            "gouk",
            "fastclip",
            "--mode",
            "wBN",
            "--seed",
            "3",
            "--dataset",
            "mnist",
            "--model",
            "SimpleConv",
            "--epochs",
            "7",
            "--lr",
            "0.01",
            "--gouk-n-iter",
            "9",
            "--logdir",
            str(tmp_path / "l"),
            "--data-dir",
            "rel/data",
            "--force",
            "--partition",
            "gpu",
            "--time",
            "1:00:00",
        ]
    )
    grid = jobs.train_grid(args, script=EXPERIMENTS / "train.py")
    by_method = {r.name.split("_")[-3]: r for r in grid.runs}
    gouk, fc = list(by_method["gouk"].argv), list(by_method["fastclip"].argv)
    for argv in (gouk, fc):
        assert argv[:2] == [os.path.abspath(sys.executable), str(EXPERIMENTS / "train.py")]
        assert argv[argv.index("--epochs") + 1] == "7" and argv[argv.index("--lr") + 1] == "0.01"
        assert argv[argv.index("--logdir") + 1] == str(tmp_path / "l")
        assert argv[argv.index("--data-dir") + 1] == os.path.abspath("rel/data")
        assert "--force" in argv and "--seed" in argv and argv[argv.index("--seed") + 1] == "3"
        assert "--partition" not in argv and "--time" not in argv  # SLURM flags stay with the dispatcher
    # a method's own hyper-parameter goes to that method's runs only
    assert gouk[gouk.index("--gouk-n-iter") + 1] == "9" and "--gouk-n-iter" not in fc
    # and every run parses back with train.py's own parser to the grid point
    from fastclip.pipeline import training

    ns = training.get_args_parser().parse_args(gouk[2:])
    assert (ns.method, ns.mode, ns.seed, ns.epochs, ns.gouk_n_iter) == ("gouk", "wBN", 3, 7, 9)
    assert by_method["gouk"].run_dir == tmp_path / "l/mnist/SimpleConv_models/method_gouk_wBN_3"


def test_slurm_options_reach_sbatch_parameters():
    args = jobs.train_submit_parser().parse_args(
        [
            "--partition",
            "p",
            "--time",
            "2-00:00:00",
            "--mem",
            "16G",
            "--cpus-per-task",
            "4",
            "--gres",
            "gpu:1",
            "--account",
            "acc",
            "--qos",
            "high",
        ]
    )
    params = jobs.SlurmOptions.from_args(args).executor_parameters("fastclip-train")
    assert params == {
        "job_name": "fastclip-train",
        "time": 2880,
        "signal_delay_s": 90,
        "partition": "p",
        "mem": "16G",
        "cpus_per_task": 4,
        "gres": "gpu:1",
        "account": "acc",
        "qos": "high",
        "additional_parameters": {"requeue": True},
    }
    # and submitit turns them into the sbatch header of the array
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(command="x", folder="/f", map_count=8, **{k: v for k, v in params.items()})
    for line in (
        "--partition=p",
        "--time=2880",
        "--mem=16G",
        "--cpus-per-task=4",
        "--gres=gpu:1",
        "--account=acc",
        "--qos=high",
        "--requeue",
        "--signal=USR2@90",
        "--array=0-7%8",
    ):
        assert f"#SBATCH {line}" in text


# -- bad input: one line, exit 2, nothing submitted -------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "fastclp"], "unknown method 'fastclp'; choose from orig, fastclip, gouk"),
        (["--mode", "BN"], "unknown mode 'BN'; choose from wBN, noBN, clipBN, all"),
        (["--model", "ResNet19"], "unknown model 'ResNet19'"),
        (["--dataset", "svhn"], "unknown dataset 'svhn'"),
        (["--seed", "1", "two"], "argument --seed: expected an integer seed, got 'two'"),
        (
            ["--method", "fastclip", "--gouk-n-iter", "3"],
            "--gouk-n-iter is a hyper-parameter of method 'gouk'",
        ),
        (["--epochs", "0"], "--epochs"),
        (["--time", "soon"], "expected a SLURM time"),
    ],
)
def test_bad_train_grid_input(tmp_path, capsys, argv, message):
    code = run_script("batch_job_submit", [*argv, "--logdir", str(tmp_path / "logs"), "--backend", "local"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "logs").exists()


def test_backend_slurm_without_sbatch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    code = run_script(
        "batch_job_submit", ["--seed", "1", "--logdir", str(tmp_path / "logs"), "--backend", "slurm"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--backend slurm needs sbatch on PATH" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "logs").exists()
    assert jobs.default_backend() == "local"


def test_bad_input_from_the_command_line(tmp_path):
    """The real command line: one line on stderr, exit code 2, no traceback."""
    proc = subprocess.run(
        [
            PY,
            str(EXPERIMENTS / "batch_job_submit.py"),
            "--method",
            "all",
            "--mode",
            "allBN",
            "--logdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=EXPERIMENTS,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "batch_job_submit.py: error: unknown mode 'allBN'; choose from wBN, noBN, clipBN, all (see --help)"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--attack", "fgsm"], "unknown attack 'fgsm'; choose from pgd, cw, pgdl2, certify, all"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--model", "VGG"], "argument --model: invalid choice: 'VGG'"),
        (["--seed", "x"], "expected an integer seed, got 'x'"),
    ],
)
def test_bad_attack_grid_input(tmp_path, capsys, argv, message):
    (tmp_path / "method_fastclip_wBN_1").mkdir()
    (tmp_path / "method_fastclip_wBN_1" / "DONE").write_text("{}")
    code = run_script(
        "batch_attack_submit", ["mnist", str(tmp_path / "method_"), *argv, "--backend", "local"]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "grids").exists()


def test_attack_prefix_matching_no_run(tmp_path, capsys):
    (tmp_path / "method_fastclip_wBN_1").mkdir()  # trained but not finished: no DONE
    code = run_script(
        "batch_attack_submit",
        [
            "mnist",
            str(tmp_path / "method_"),
            "--method",
            "fastclip",
            "--mode",
            "wBN",
            "--seed",
            "1",
            "--backend",
            "local",
        ],
    )
    err = capsys.readouterr().err
    assert code == 2 and "matches no finished training run" in err and len(err.strip().splitlines()) == 1
    code = run_script("batch_attack_submit", ["mnist", str(tmp_path / "nothing_here_"), "--backend", "local"])
    err = capsys.readouterr().err
    assert code == 2 and "model prefix" in err and "matches no finished training run" in err
    assert not (tmp_path / "grids").exists()


# -- the local backend with a fake script: failures, live runs, status --------------------------------
FAKE = """\
import sys, time, pathlib
run_dir = pathlib.Path(sys.argv[1])
flags = sys.argv[2:]
if "--sleep" in flags:
    time.sleep(60)
if "--fail" in flags:
    print("epoch 1: 10%|#   | 1/10", file=sys.stderr)
    raise ValueError("boom in " + run_dir.name)
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "metrics.csv").write_text("epoch,test_acc\\n1,50\\n2,60\\n")
(run_dir / "DONE").write_text("argv " + " ".join(flags))
"""


def fake_grid(tmp_path: Path, flags: dict[int, list[str]] | None = None, n: int = 3) -> jobs.Grid:
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE)
    flags = flags or {}
    runs = []
    for i in range(n):
        run_dir = tmp_path / "logs" / f"run_{i}"
        runs.append(
            jobs.Run(
                name=f"run_{i}",
                kind="train",
                run_dir=run_dir,
                argv=(PY, str(script), str(run_dir), *flags.get(i, [])),
                done_file=run_dir / "DONE",
                log_name="train",
            )
        )
    return jobs.Grid(kind="train", runs=runs, home=tmp_path / "logs" / "grids")


def test_local_failure_is_reported_and_the_others_go_on(tmp_path):
    grid = fake_grid(tmp_path, {1: ["--fail"]})
    failures = jobs.run_local(grid, grid.runs, workers=2, progress=False)
    assert [(r.name, why) for r, why in failures] == [("run_1", "ValueError: boom in run_1")]
    assert (tmp_path / "logs/run_0/DONE").exists() and (tmp_path / "logs/run_2/DONE").exists()
    rows = {r.run.name: r for r in jobs.grid_status(grid)}
    assert [rows[f"run_{i}"].state for i in range(3)] == ["done", "failed", "done"]
    assert rows["run_1"].detail == "ValueError: boom in run_1"
    assert rows["run_0"].epoch == 2 and rows["run_1"].epoch is None
    table = jobs.format_status(list(rows.values()))
    assert "run_1  failed" in table and table.endswith("3 runs: 2 done, 1 failed")
    manifest = json.loads(grid.manifest_path.read_text())
    codes = {e["run"]["name"]: e["jobs"][-1]["returncode"] for e in manifest["runs"].values()}
    assert codes == {"run_0": 0, "run_1": 1, "run_2": 0}
    # a second dispatch submits only the failed run (and it fails again)
    todo = jobs.plan(grid)
    assert [r.name for r in todo.submit] == ["run_1"]
    assert sorted((r.name, why) for r, why in todo.skipped) == [("run_0", "done"), ("run_2", "done")]
    assert [r.name for r in jobs.plan(grid, force=True).submit] == ["run_0", "run_1", "run_2"]


def test_dispatch_exit_code_and_dry_run(tmp_path):
    grid = fake_grid(tmp_path, {0: ["--fail"]}, n=2)
    args = argparse.Namespace(status=False, dry_run=True, force=False, workers=1)
    said: list[str] = []
    assert jobs.dispatch(grid, args, "local", report=said.append) == 0
    assert said[0].splitlines()[0] == "2 run(s) to submit (local), 0 skipped"
    assert said[0].splitlines()[1].startswith(f"  run  run_0: {PY} ")
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing
    args.dry_run = False
    said.clear()
    assert jobs.dispatch(grid, args, "local", report=said.append) == 1
    assert said[-1] == "1 run(s) finished, 1 failed\n  FAILED run_0: ValueError: boom in run_0"
    assert (tmp_path / "logs/run_1/DONE").exists()


def test_running_local_run_is_not_submitted_twice(tmp_path):
    grid = fake_grid(tmp_path, {0: ["--sleep"]}, n=2)
    run = grid.runs[0]
    proc = subprocess.Popen(list(run.argv))
    try:
        jobs._record_jobs(
            grid,
            {
                run.uid: {
                    "backend": "local",
                    "pid": proc.pid,
                    "host": os.uname().nodename,
                    "submitted": jobs._now(),
                    "argv": list(run.argv),
                    "returncode": None,
                }
            },
        )
        rows = {r.run.name: r for r in jobs.grid_status(grid)}
        assert rows["run_0"].state == "running" and rows["run_0"].job == f"local pid {proc.pid}"
        assert rows["run_1"].state == "missing"
        todo = jobs.plan(grid, force=True)
        assert [r.name for r in todo.submit] == ["run_1"]
        # another grid over the same run sees the job in this grid's manifest
        other = jobs.Grid(kind="train", runs=[run], home=grid.home)
        assert other.name != grid.name and jobs.plan(other).submit == []
    finally:
        proc.kill()
        proc.wait()
    rows = {r.run.name: r for r in jobs.grid_status(grid)}
    assert rows["run_0"].state == "failed" and "interrupted" in rows["run_0"].detail


def test_status_script_reads_a_manifest(tmp_path, capsys):
    grid = fake_grid(tmp_path, {2: ["--fail"]})
    jobs.run_local(grid, grid.runs, workers=1, progress=False)
    capsys.readouterr()
    assert run_script("status", ["--manifest", str(grid.manifest_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["run", "state", "epoch", "job", "detail"]
    assert out[3].split()[:2] == ["run_2", "failed"] and out[3].endswith("ValueError: boom in run_2")
    assert out[-1] == "3 runs: 2 done, 1 failed"
    assert run_script("status", ["--logdir", str(tmp_path / "logs"), "--all"]) == 0
    assert f"# {grid.manifest_path}" not in capsys.readouterr().out  # one grid: no per-grid heading


def test_run_task_forces_only_its_first_attempt(tmp_path, monkeypatch):
    """A requeued task must resume, not restart: --force is dropped after attempt 1."""
    script = tmp_path / "echo.py"
    script.write_text("import sys; print(' '.join(sys.argv[1:]))\n")
    for key, value in {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "41",
        "SLURM_ARRAY_JOB_ID": "40",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_CPUS_PER_TASK": "1",
    }.items():
        monkeypatch.setenv(key, value)
    task = jobs.RunTask([PY, str(script), "--seed", "1", "--force"], str(tmp_path / "run"), "train")
    assert task() == 0
    again = task.checkpoint()  # what submitit pickles on preemption: a fresh task, same command
    assert isinstance(again.function, jobs.RunTask) and again.function.argv == task.argv
    assert again.function() == 0
    out = (tmp_path / "run/logs/train_40_1.out").read_text().splitlines()
    # The task's CPUs become an explicit --threads (recorded in the run's config.json).
    assert [ln for ln in out if not ln.startswith("==")] == [
        "--seed 1 --force --threads 1",
        "--seed 1 --threads 1",
    ]
    record = json.loads((tmp_path / "run/logs/train_40_1.json").read_text())
    assert record["slurm_job_id"] == "41" and [a["returncode"] for a in record["attempts"]] == [0, 0]
    failing = jobs.RunTask([PY, "-c", "raise SystemExit('bad config')"], str(tmp_path / "run"), "train")
    with pytest.raises(RuntimeError, match="exited with code 1: bad config"):
        failing()


# -- the real grid on the local backend ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_grid_of_real_runs_with_two_workers(tmp_path_factory, capsys):
    logdir = local_grid_logdir(tmp_path_factory)
    assert _LOCAL["code"] == 0
    for name in GRID_NAMES:
        run_dir = logdir / name
        assert (run_dir / "DONE").exists(), name
        assert len(read_metrics(run_dir / "metrics.csv")["epoch"]) == 4
        logs = sorted(p.name for p in (run_dir / "logs").iterdir())
        assert len(logs) == 2 and logs[0].startswith("train_local-") and logs[0].endswith(".err")
    (manifest,) = (logdir / "grids").glob("*/manifest.json")
    entries = json.loads(manifest.read_text())["runs"].values()
    assert sorted(e["run"]["name"] for e in entries) == sorted(GRID_NAMES)
    assert all(len(e["jobs"]) == 1 and e["jobs"][0]["returncode"] == 0 for e in entries)
    # every point is its own run (seeds, methods and modes all change the first epoch's loss)
    first = {n: read_metrics(logdir / n / "metrics.csv")["train_loss"][0] for n in GRID_NAMES}
    assert len(set(first.values())) == 8 and all(v > 1e-3 for v in first.values())
    # submitting the finished grid again submits nothing
    capsys.readouterr()
    data = grid_data(str(tmp_path_factory.getbasetemp()))
    flags = [*GRID_AXES, *RUN_FLAGS, "--data-dir", data, "--logdir", str(logdir), "--backend", "local"]
    assert run_script("batch_job_submit", flags) == 0
    assert "0 run(s) to submit (local), 8 skipped" in capsys.readouterr().out
    assert all(len(e["jobs"]) == 1 for e in json.loads(manifest.read_text())["runs"].values())
    assert run_script("batch_job_submit", [*flags, "--status"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("8 runs: 8 done")
    line = next(ln for ln in out.splitlines() if ln.startswith("mnist/SimpleConv_models/method_orig_noBN_2 "))
    assert line.split()[1:5] == ["done", "4", "local", "pid"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_attack_grid_on_the_local_backend(tmp_path_factory, capsys):
    """batch_attack_submit.py (the seed's command line) on the trained local grid: one
    attack.py per seed found under the prefix, its CSV in each run, idempotent."""
    logdir = local_grid_logdir(tmp_path_factory)
    data = grid_data(str(tmp_path_factory.getbasetemp()))
    prefix = str(logdir / "mnist/SimpleConv_models/method_")
    argv = [
        "mnist",
        prefix,
        "--method",
        "gouk",
        "--mode",
        "wBN",
        "--attack",
        "pgd",
        "--model",
        "SimpleConv",
        "--n-examples",
        "16",
        "--n-steps",
        "3",
        "--data-dir",
        data,
        "--backend",
        "local",
        "--workers",
        "2",
    ]
    capsys.readouterr()
    assert run_script("batch_attack_submit", argv) == 0
    out = capsys.readouterr().out
    assert "2 run(s) to submit (local), 0 skipped" in out and out.strip().endswith(
        "2 run(s) finished, 0 failed"
    )
    import pandas as pd

    for seed in (1, 2):
        run_dir = logdir / f"mnist/SimpleConv_models/method_gouk_wBN_{seed}"
        (row,) = pd.read_csv(run_dir / "attack_pgd_eps0.02_steps3_n16.csv").to_dict("records")
        assert (row["method"], row["mode"], row["seed"], row["n_examples"]) == ("gouk", "wBN", seed, 16)
        assert 0 <= row["adv_acc"] <= row["clean_acc"] <= 100
        assert (run_dir / "logs").glob("attack_pgd_local-*.err")
    assert run_script("batch_attack_submit", argv) == 0
    assert "0 run(s) to submit (local), 2 skipped" in capsys.readouterr().out
    assert run_script("batch_attack_submit", [*argv, "--status"]) == 0
    out = capsys.readouterr().out
    assert "method_gouk_wBN_1 pgd  done" in out and out.strip().endswith("2 runs: 2 done")
    # runs of another model or dataset are refused before anything is submitted
    for bad, message in (
        (["mnist", prefix, "--model", "ResNet18"], "ResNet18"),
        (["cifar", prefix, "--model", "SimpleConv"], "cifar"),
    ):
        assert run_script("batch_attack_submit", [*bad, "--backend", "local"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_attack_grid_dispatches_certify_and_pgdl2(tmp_path_factory, capsys):
    """The grid runs the certificate and PGD-L2 like the other attacks: one attack.py per
    run and attack, each CSV named as attack.py names it (the attack's own default eps),
    and on the same images no certified accuracy above the L2 attack's at the same eps."""
    import pandas as pd

    logdir = local_grid_logdir(tmp_path_factory)
    data = grid_data(str(tmp_path_factory.getbasetemp()))
    prefix = str(logdir / "mnist/SimpleConv_models/method_")
    argv = [
        "mnist",
        prefix,
        "--method",
        "orig",
        "--mode",
        "noBN",
        "--seed",
        "1",
        "--attack",
        "certify",
        "pgdl2",
        "--model",
        "SimpleConv",
        "--n-examples",
        "16",
        "--n-steps",
        "5",
        "--data-dir",
        data,
        "--backend",
        "local",
        "--workers",
        "1",
    ]
    capsys.readouterr()
    assert run_script("batch_attack_submit", argv) == 0
    out = capsys.readouterr().out
    assert "2 run(s) to submit (local), 0 skipped" in out and out.strip().endswith(
        "2 run(s) finished, 0 failed"
    )
    run_dir = logdir / "mnist/SimpleConv_models/method_orig_noBN_1"
    cert = pd.read_csv(run_dir / "attack_certify_eps0.02+0.05+0.1+0.141176_n16.csv")
    l2 = pd.read_csv(run_dir / "attack_pgdl2_eps0.02+0.05+0.1+0.141176_steps5_n16.csv")
    assert list(cert["eps"]) == list(l2["eps"]) == [0.02, 0.05, 0.1, pytest.approx(36 / 255, abs=1e-6)]
    assert (cert["clean_acc"] == l2["clean_acc"]).all()
    assert (cert["adv_acc"].to_numpy() <= l2["adv_acc"].to_numpy()).all()
    assert (cert["lipschitz"] > 0).all()
    assert run_script("batch_attack_submit", argv) == 0
    assert "0 run(s) to submit (local), 2 skipped" in capsys.readouterr().out


def test_slurm_config_falls_back_to_the_local_cluster_and_says_which(tmp_path, monkeypatch):
    monkeypatch.setattr(slurm, "SYSTEM_CONF", tmp_path / "etc" / "slurm.conf")
    monkeypatch.setenv("FASTCLIP_SLURM_DIR", str(tmp_path / "local"))
    monkeypatch.delenv("SLURM_CONF", raising=False)
    # nothing anywhere: one line saying so and how to start one, nothing exported
    line = slurm.use_slurm_config()
    assert line.startswith("SLURM configuration: none found") and "scripts/slurm-local.sh start" in line
    assert "SLURM_CONF" not in os.environ
    # scripts/slurm-local.sh's cluster: used and exported for sbatch/squeue and the jobs
    local = tmp_path / "local" / "slurm.conf"
    local.parent.mkdir()
    local.write_text("ClusterName=x\n")
    assert slurm.use_slurm_config() == (
        f"SLURM configuration: {local} (scripts/slurm-local.sh's cluster; SLURM_CONF was unset)"
    )
    assert os.environ["SLURM_CONF"] == str(local)
    # an exported SLURM_CONF wins, then the system's file
    monkeypatch.setenv("SLURM_CONF", "/elsewhere/slurm.conf")
    assert slurm.use_slurm_config() == "SLURM configuration: /elsewhere/slurm.conf (SLURM_CONF)"
    monkeypatch.delenv("SLURM_CONF")
    slurm.SYSTEM_CONF.parent.mkdir()
    slurm.SYSTEM_CONF.write_text("ClusterName=y\n")
    assert slurm.use_slurm_config() == f"SLURM configuration: {slurm.SYSTEM_CONF} (the system's)"


def test_dispatch_to_slurm_says_which_configuration_first(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", "/elsewhere/slurm.conf")
    grid = fake_grid(tmp_path, {}, n=1)
    args = argparse.Namespace(status=False, dry_run=True, force=False, workers=1)
    said: list[str] = []
    assert jobs.dispatch(grid, args, "slurm", report=said.append) == 0
    assert said[0] == "SLURM configuration: /elsewhere/slurm.conf (SLURM_CONF)"
    assert said[1].startswith("1 run(s) to submit (slurm)")
    assert slurm.use_slurm_config() == said[0]
