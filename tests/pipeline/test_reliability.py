"""Nothing lost, nothing silently wrong (issue 17): checkpoint integrity, the thread count,
output locations checked before any work, values validated before dispatch, a
process-safe grid manifest, and no debris left by killed writes."""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from datagen import tiny_config

import fastclip.pipeline.jobs as jobs
from fastclip.pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastclip.pipeline.io import KILL_HOOK_ENV, atomic_write_text, clean_stale_temps
from fastclip.pipeline.training import (
    ConfigError,
    TrainConfig,
    _save_checkpoint,
    default_threads,
    get_args_parser,
    load_model,
    read_metrics,
    run,
    run_dir_for,
)

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"


def tiny(logdir, root, **changes) -> TrainConfig:
    return tiny_config(logdir, root, **{"threads": 1, **changes})


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_root):
    """An uninterrupted 2-epoch run (1 thread): its run directory."""
    cfg = tiny(tmp_path_factory.mktemp("reference"), mnist_root)
    run(cfg)
    return run_dir_for(cfg)


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def damage_mid_tensor(path: Path, n: int = 28) -> None:
    """Overwrite ``n`` bytes in the middle of the largest tensor record of a checkpoint:
    torch.load still succeeds (zip CRCs are not checked), the values are garbage."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
        header = info.header_offset
    data = bytearray(path.read_bytes())
    # local header: 30 bytes + name + extra, then the stored (uncompressed) record
    name_len = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(data[header + 28 : header + 30], "little")
    start = header + 30 + name_len + extra_len + info.file_size // 2
    data[start : start + n] = os.urandom(n)
    path.write_bytes(bytes(data))


# -- 1. checkpoint integrity -----------------------------------------------------------------------
@pytest.mark.parametrize("both", [False, True])
def test_mid_file_corruption_is_detected_and_fallen_back_from(tmp_path, mnist_root, reference, caplog, both):
    cfg = tiny(tmp_path, mnist_root)
    run(cfg)
    d = run_dir_for(cfg)
    (d / "DONE").unlink()
    damage_mid_tensor(d / "ckpt_last.pth")
    torch.load(d / "ckpt_last.pth", weights_only=True)  # torch alone would train on it
    if both:
        damage_mid_tensor(d / "ckpt_prev.pth")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastclip"):
        run(cfg)
    warnings = warnings_of(caplog)
    assert warnings[0] == "ckpt_last.pth is damaged (SHA-256 mismatch); falling back to ckpt_prev.pth"
    if both:
        assert warnings[1] == "ckpt_prev.pth is damaged (SHA-256 mismatch); falling back to a fresh start"
        assert "resuming" not in caplog.text
    else:
        assert len(warnings) == 1 and "resuming after epoch 1" in caplog.text
    assert not any("weights_only" in w or "\n" in w for w in warnings)
    # The damaged epoch was retrained: the metrics equal the uninterrupted run's.
    assert without_time(read_metrics(d / "metrics.csv")) == without_time(
        read_metrics(reference / "metrics.csv")
    )
    assert load_checkpoint(d / "ckpt_last.pth", require_digest=True)["epoch"] == 2


def test_a_refused_pickle_never_suggests_weights_only_false(tmp_path):
    path = tmp_path / "ckpt_last.pth"
    torch.save({"model": argparse.Namespace(a=1)}, path)  # a global weights_only refuses
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value) == "ckpt_last.pth is unreadable (UnpicklingError)"
    # a damaged best checkpoint is a one-line error of load_model (attack.py, compute_trained_SVs.py)
    save_checkpoint({"epoch": 1, "w": torch.arange(100.0)}, path)
    damage_mid_tensor(path)
    with pytest.raises(CheckpointError, match=r"^ckpt_last.pth is damaged \(SHA-256 mismatch\)$"):
        load_checkpoint(path)


def test_load_model_refuses_a_damaged_best_checkpoint(reference, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(reference, d)
    load_model(d)
    damage_mid_tensor(d / "ckpt_best.pth")
    with pytest.raises(ValueError, match="ckpt_best.pth is damaged"):
        load_model(d)


# -- 2. thread count ---------------------------------------------------------------------------------
def test_thread_count_is_recorded_and_a_resume_under_another_count_warns(
    tmp_path, mnist_root, reference, caplog
):
    meta = json.loads((reference / "config.json").read_text())
    assert meta["threads"] == 1 and meta["settings"]["threads"] == 1
    assert meta["deterministic"]["use_deterministic_algorithms"] is True
    assert meta["torch_version"] == torch.__version__ and meta["device"] == "cpu"
    assert meta["threads_history"] == [{"from_epoch": 1, "threads": 1}]
    assert load_checkpoint(reference / "ckpt_last.pth")["threads"] == 1

    cfg = tiny(tmp_path, mnist_root)
    run(cfg)
    d = run_dir_for(cfg)
    (d / "DONE").unlink()
    (d / "ckpt_last.pth").unlink()  # resume after epoch 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastclip"):
        run(dataclasses.replace(cfg, threads=2))
    warnings = warnings_of(caplog)
    assert warnings == [
        "resuming after epoch 1, which ran with 1 CPU thread(s), with 2: later epochs may differ "
        "in the last bits from an uninterrupted run (--threads 1 matches it)"
    ]
    meta = json.loads((d / "config.json").read_text())
    assert meta["threads"] == 2
    assert meta["threads_history"] == [{"from_epoch": 1, "threads": 1}, {"from_epoch": 2, "threads": 2}]
    assert torch.get_num_threads() == 1  # the caller's count is restored


def test_threads_flag_and_default(monkeypatch):
    assert get_args_parser().parse_args(["--threads", "3"]).threads == 3
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--threads", "0"])
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "5")
    assert default_threads() == 5
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert default_threads() == len(os.sched_getaffinity(0))


FAKE = """\
import sys, pathlib, time
run_dir = pathlib.Path(sys.argv[1])
run_dir.mkdir(parents=True, exist_ok=True)
time.sleep(0.05)
(run_dir / "DONE").write_text(" ".join(sys.argv[2:]))
"""


def fake_grid(tmp_path: Path, n: int, home: Path | None = None, write: bool = True) -> jobs.Grid:
    script = tmp_path / "fake_train.py"
    if write:
        script.write_text(FAKE)
    runs = []
    for i in range(n):
        run_dir = tmp_path / "logs" / f"run_{i}"
        runs.append(
            jobs.Run(
                name=f"run_{i}",
                kind="train",
                run_dir=run_dir,
                argv=(sys.executable, str(script), str(run_dir)),
                done_file=run_dir / "DONE",
                log_name="train",
            )
        )
    return jobs.Grid(kind="train", runs=runs, home=home or tmp_path / "logs" / "grids")


def test_local_backend_passes_an_explicit_thread_count(tmp_path):
    grid = fake_grid(tmp_path, 2)
    assert jobs.run_local(grid, grid.runs, workers=2, progress=False) == []
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    for r in grid.runs:
        assert r.done_file.read_text() == f"--threads {threads}"


# -- 3. output locations, 4. values: one line, exit 2, nothing written ----------------------------------
@pytest.fixture
def readonly_dir(tmp_path):
    """A directory nobody may write into: chmod for a user, a read-only bind mount for root."""
    d = tmp_path / "ro"
    d.mkdir()
    (d / "keep").write_text("keep")
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    mounted = (
        subprocess.run(
            f"mount --bind {d} {d} && mount -o remount,ro,bind {d}", shell=True, capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("root without mount: cannot make a read-only directory")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def run_cli(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """``python experiments/<script>.py argv`` in-process: (exit code, stderr)."""
    import runpy

    mod = runpy.run_path(str(EXPERIMENTS / f"{script}.py"), run_name=f"_{script}")
    capsys.readouterr()
    try:
        code = mod["main"](mod["get_args_parser"]().parse_args(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def output_cases(tmp: Path, ro: Path, run_dir: Path) -> dict[str, tuple[str, list[str], str]]:
    f = tmp / "file"
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
        "--epochs",
        "1",
    ]
    prefix = str(run_dir.parent / "method_")
    return {
        "submit logdir file": (
            "batch_job_submit",
            [*grid, "--logdir", str(f)],
            "exists and is not a directory",
        ),
        "submit logdir read-only": ("batch_job_submit", [*grid, "--logdir", str(ro)], "cannot write into"),
        "train logdir read-only": ("train", ["--dataset", "mnist", "--logdir", str(ro)], "cannot write into"),
        "collect out-dir file": ("collect_attack_results", [prefix, "--out-dir", str(f)], "not a directory"),
        "collect out-dir read-only": (
            "collect_attack_results",
            [prefix, "--out-dir", str(ro)],
            "cannot write into",
        ),
        "SVs out-dir file": (
            "compute_trained_SVs",
            ["mnist", "all", prefix, "--out-dir", str(f / "x")],
            "not a directory",
        ),
        "SVs out-dir read-only": (
            "compute_trained_SVs",
            ["mnist", "all", prefix, "--out-dir", str(ro)],
            "cannot write into",
        ),
        "curves out read-only": (
            "plot_curves",
            [str(run_dir), "--out", str(ro / "c.png")],
            "cannot write into",
        ),
        "curves out under a file": (
            "plot_curves",
            [str(run_dir), "--out", str(f / "c.png")],
            "not a directory",
        ),
        "reproduce logdir file": ("reproduce", ["--logdir", str(f), "--size", "tiny"], "not a directory"),
        "status logdir file": ("status", ["--logdir", str(f)], "exists and is not a directory"),
        "attack eps 0": (
            "batch_attack_submit",
            ["mnist", prefix, "--eps", "0", "--backend", "local"],
            "argument --eps: expected a positive finite number, got 0",
        ),
        "attack eps -0.1": (
            "batch_attack_submit",
            ["mnist", prefix, "--eps", "-0.1", "--backend", "local"],
            "argument --eps: expected a positive finite number, got -0.1",
        ),
        "attack n-examples 0": (
            "batch_attack_submit",
            ["mnist", prefix, "--n-examples", "0", "--backend", "local"],
            "argument --n-examples: expected a positive integer, got '0'",
        ),
        "attack.py eps 0": ("attack", ["mnist", prefix, "--eps", "0"], "expected a positive finite number"),
        "reproduce methods": (
            "reproduce",
            ["--methods", "parseval", "--logdir", str(tmp / "r")],
            "unknown method (--methods) 'parseval'",
        ),
        "reproduce modes": (
            "reproduce",
            ["--modes", "BN", "--logdir", str(tmp / "r")],
            "unknown mode (--modes) 'BN'",
        ),
        "reproduce seeds": (
            "reproduce",
            ["--seeds", "one", "--logdir", str(tmp / "r")],
            "argument --seeds: expected an integer seed",
        ),
        "reproduce epochs": (
            "reproduce",
            ["--epochs", "0", "--logdir", str(tmp / "r")],
            "argument --epochs: expected a positive integer",
        ),
        "curves unknown tag": (
            "plot_curves",
            [str(run_dir), "--tags", "no/such/tag", "--out", str(tmp / "c.png")],
            "has no scalar 'no/such/tag' (--tags)",
        ),
    }


def test_bad_outputs_and_values_are_one_line_exit_2_and_write_nothing(
    tmp_path, reference, readonly_dir, capsys
):
    import shutil

    logs = tmp_path / "logs"
    run_dir = logs / reference.relative_to(reference.parents[2])
    shutil.copytree(reference, run_dir)
    (tmp_path / "file").write_text("keep")
    cases = output_cases(tmp_path, readonly_dir, run_dir)
    before = snapshot(tmp_path)
    failures = []
    for case, (script, argv, needle) in cases.items():
        code, err = run_cli(script, argv, capsys)
        lines = err.strip().splitlines()
        if not (code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err):
            failures.append(f"{case}: exit {code}, {err.strip()[-400:]!r}")
    assert not failures, "\n".join(failures)
    assert snapshot(tmp_path) == before
    assert len(cases) == 20


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_attack_device_cuda_without_cuda_names_the_device(tmp_path, reference, capsys):
    code, err = run_cli("attack", ["mnist", str(reference.parent / "method_"), "--device", "cuda"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "device 'cuda' requested but CUDA is not available" in err and "checkpoint" not in err


def test_attack_cli_errors_are_one_line_without_usage(capsys):
    code, err = run_cli("attack", ["mnist"], capsys)  # a missing positional: argparse's own error
    assert code == 2 and len(err.strip().splitlines()) == 1 and not err.startswith("usage")


# -- 5. process-safe manifest ------------------------------------------------------------------------
def _dispatch_grid(tmp: str, n: int, home: str) -> None:
    grid = fake_grid(Path(tmp), n, home=Path(home), write=False)
    failures = jobs.run_local(grid, grid.runs, workers=3, progress=False)
    sys.exit(1 if failures else 0)


def test_two_processes_updating_one_manifest_leave_every_job_record_complete(tmp_path):
    """Two identical grids launched at once (the same runs, the same manifest): every
    record ends with its own return code, and no two records share a log file."""
    n = 6
    home = tmp_path / "home"
    grid = fake_grid(tmp_path, n, home=home)  # writes the script once, before the two start
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_dispatch_grid, args=(str(tmp_path), n, str(home))) for _ in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    manifest = json.loads(grid.manifest_path.read_text())
    records = [j for e in manifest["runs"].values() for j in e["jobs"]]
    assert len(records) == 2 * n  # no record lost to a concurrent write
    assert all(j["returncode"] == 0 and j.get("ended") for j in records), records
    assert len({j["id"] for j in records}) == 2 * n
    assert len({j["stdout"] for j in records}) == 2 * n and len({j["stderr"] for j in records}) == 2 * n
    assert not list(grid.dir.glob("*.tmp"))


def test_the_run_lock_is_taken_before_the_done_decision(reference):
    """A finished run whose directory another process holds (e.g. a --force rerun
    clearing it) is not reported as finished from a half-cleared directory."""
    with open(reference / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            cfg = json.loads((reference / "config.json").read_text())["settings"]
            with pytest.raises(ConfigError, match="is in use by another process"):
                run(TrainConfig(**cfg))
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- 6. debris ---------------------------------------------------------------------------------------
def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_are_cleaned_only_when_their_writer_is_gone(tmp_path):
    from fastclip.pipeline.io import _host

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f".metrics.csv.{_host()}-{dead_pid()}.abcdefgh.tmp",
            "live": f".metrics.csv.{_host()}-{live.pid}.abcdefgh.tmp",
            "other host": f".metrics.csv.otherhost-{dead_pid()}.abcdefgh.tmp",
            "mine": f".metrics.csv.{_host()}-{os.getpid()}.abcdefgh.tmp",
            "legacy owned": ".ckpt_last.pth.a1b2c3d4.tmp",
            "legacy other": ".attack.csv.a1b2c3d4.tmp",
            "not a temp": "notes.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_text("x")
        removed = clean_stale_temps(tmp_path, owned=["ckpt_last.pth"])
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in removed) == sorted([names["dead"], names["legacy owned"]])
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {names[k] for k in ("live", "other host", "mine", "legacy other", "not a temp")}


def test_rotation_when_prev_and_last_are_one_file(tmp_path):
    """A kill between the rotation and the save leaves ckpt_prev and ckpt_last as two
    links of one file; rename(2) between them does nothing. No .link may stay."""
    save_checkpoint({"epoch": 1}, tmp_path / "ckpt_last.pth")
    os.link(tmp_path / "ckpt_last.pth", tmp_path / "ckpt_prev.pth")
    _save_checkpoint(tmp_path, {"epoch": 2}, best=False)
    assert not (tmp_path / "ckpt_prev.pth.link").exists()
    assert load_checkpoint(tmp_path / "ckpt_prev.pth")["epoch"] == 1
    assert load_checkpoint(tmp_path / "ckpt_last.pth")["epoch"] == 2
    _save_checkpoint(tmp_path, {"epoch": 3}, best=False)
    assert [load_checkpoint(tmp_path / n)["epoch"] for n in ("ckpt_prev.pth", "ckpt_last.pth")] == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_last.pth", "ckpt_prev.pth"]


def test_a_forced_rerun_removes_stale_temps_and_the_link(tmp_path, mnist_root):
    from fastclip.pipeline.io import _host

    cfg = tiny(tmp_path, mnist_root, epochs=1)
    run(cfg)
    d = run_dir_for(cfg)
    debris = [
        d / f".ckpt_last.pth.{_host()}-{dead_pid()}.zz9x8y7w.tmp",
        d / ".metrics.csv.q1w2e3r4.tmp",
        d / "ckpt_prev.pth.link",
    ]
    for p in debris:
        p.write_bytes(b"\0" * 1000)
    run(dataclasses.replace(cfg, force=True))
    assert not any(p.exists() for p in debris)


@pytest.mark.slow
def test_kill_at_a_rename_then_rerun_leaves_no_leftovers_and_equal_metrics(tmp_path, mnist_root, reference):
    argv = [
        sys.executable,
        str(EXPERIMENTS / "train.py"),
        "--dataset",
        "mnist",
        "--model",
        "SimpleConv",
        "--method",
        "orig",
        "--epochs",
        "2",
        "--lr",
        "1e-4",
        "--batch-size",
        "16",
        "--train-subset",
        "64",
        "--test-subset",
        "32",
        "--data-dir",
        str(mnist_root),
        "--logdir",
        str(tmp_path),
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), KILL_HOOK_ENV: "ckpt_last.pth:2"}
    killed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    d = run_dir_for(tiny(tmp_path, mnist_root))
    temps = list(d.glob(".ckpt_last.pth.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # epoch 2's checkpoint, never renamed
    env.pop(KILL_HOOK_ENV)
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming after epoch 1" in again.stderr and "removed 1 temp file(s)" in again.stderr
    assert (
        not list(d.glob("*.tmp")) and not list(d.glob(".*.tmp")) and not (d / "ckpt_prev.pth.link").exists()
    )
    assert without_time(read_metrics(d / "metrics.csv")) == without_time(
        read_metrics(reference / "metrics.csv")
    )


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    def boom(f):
        f.write("half")
        raise RuntimeError("boom")

    from fastclip.pipeline.io import atomic_write

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "x.txt", boom, mode="w")
    atomic_write_text(tmp_path / "y.txt", "ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.txt"]


def test_doctests():
    import doctest

    import fastclip.pipeline.checkpoint
    import fastclip.pipeline.cli

    for module in (fastclip.pipeline.cli, fastclip.pipeline.checkpoint):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_collect_removes_dead_writers_temps_in_its_out_dir(tmp_path, reference, capsys):
    import shutil

    from fastclip.pipeline.io import _host

    run_dir = tmp_path / "logs" / "mnist" / "SimpleConv_models" / reference.name
    shutil.copytree(reference, run_dir)
    out = tmp_path / "out"
    out.mkdir()
    dead = out / f".attack_results_runs.csv.{_host()}-{dead_pid()}.abcdefgh.tmp"
    dead.write_bytes(b"\0" * 100)
    code, err = run_cli(
        "collect_attack_results", [str(run_dir.parent / "method_"), "--out-dir", str(out)], capsys
    )
    assert code == 0, err
    assert not dead.exists() and (out / "attack_results_runs.csv").exists()
