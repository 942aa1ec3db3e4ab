"""Faults met as a user meets them (issue 38): each ends in one clear line, leaves nothing
half-written, and the same command, rerun, goes on from where it was. Interrupts
(Ctrl-C, SIGTERM, a dead torchrun rank), a grid resubmitted with other settings, two
grids racing for the same runs, damaged checkpoints of finished runs, a test loss that
diverges, damaged dataset files, and two small refusals."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from datagen import tiny_config, write_mnist

import fastclip.pipeline.jobs as jobs
from fastclip.pipeline.checkpoint import load_checkpoint
from fastclip.pipeline.cli import batch_job_submit, plot_curves, status
from fastclip.pipeline.cli import train as train_cli
from fastclip.pipeline.data import DatasetCorruptError, get_datasets
from fastclip.pipeline.training import RunFailed, read_metrics, run, run_dir_for
from fastclip.pipeline.training import session as session_module

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"


def tiny(logdir, root, **changes):
    return tiny_config(logdir, root, **{"threads": 1, **changes})


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def damage_mid_tensor(path: Path, n: int = 28) -> None:
    """Overwrite ``n`` bytes in the middle of the largest tensor record of a checkpoint:
    torch.load still succeeds, the values are garbage (only the SHA-256 tells)."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
        header = info.header_offset
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(data[header + 28 : header + 30], "little")
    start = header + 30 + name_len + extra_len + info.file_size // 2
    data[start : start + n] = bytes(b ^ 0xFF for b in data[start : start + n])
    path.write_bytes(bytes(data))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for every purpose here
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_root):
    """An uninterrupted 2-epoch run (1 thread): its run directory."""
    cfg = tiny(tmp_path_factory.mktemp("reference"), mnist_root)
    run(cfg)
    return run_dir_for(cfg)


def train_flags(tmp: Path, data: Path, *extra: str) -> list[str]:
    common = (
        "--dataset mnist --model SimpleConv --method orig --batch-size 8 --train-subset 600 --test-subset 32"
    )
    return [
        *common.split(),
        "--data-dir",
        str(data),
        "--logdir",
        str(tmp / "logs"),
        *"--device cpu --threads 1".split(),
        *extra,
    ]


def _default_sigint() -> None:
    # A process started in the background by a non-interactive shell (as CI may start the
    # suite) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: the
    # child gets the default disposition, as a program started from a terminal has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# -- 1. interrupts ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_on_train_is_one_line_exit_130_and_a_rerun_resumes(tmp_path):
    data = write_mnist(tmp_path / "data", n_train=600, n_test=32)
    # (an epoch takes about 1 s on an idle machine: enough of them that the signal lands mid-run)
    cmd = [sys.executable, str(EXPERIMENTS / "train.py"), *train_flags(tmp_path, data, "--epochs", "6")]
    run_dir = tmp_path / "logs/mnist/SimpleConv_models/method_orig_wBN_1"
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "ckpt_last.pth").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    # (on a loaded machine the signal may land in the first epoch's checkpoint write or in the
    # second epoch: the line names what is on disk either way)
    m = re.fullmatch(
        r"train\.py: error: interrupted at epoch (\d) step \d+; the checkpoint after epoch (\d) is intact: "
        r"rerun the same command to resume",
        last,
    )
    assert m, last
    kept = load_checkpoint(run_dir / "ckpt_last.pth", require_digest=True)["epoch"]
    assert kept == int(m.group(2)) >= 1 and int(m.group(1)) in (kept, kept + 1) and kept < 6, last
    assert not (run_dir / "DONE").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming after epoch {kept}" in again.stderr
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.csv")] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "DONE").exists()


SLEEPER = """\
import pathlib, sys, time
run_dir = pathlib.Path(sys.argv[1])
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "pid").write_text(str(__import__("os").getpid()))
time.sleep(120)
(run_dir / "DONE").write_text("done")
"""

DISPATCH = """\
import sys
from pathlib import Path
from fastclip.pipeline import jobs
from fastclip.pipeline.jobs.launch import submit_main
tmp, n = Path(sys.argv[1]), int(sys.argv[2])
runs = [
    jobs.Run(name=f"run_{i}", kind="train", run_dir=tmp / "logs" / f"run_{i}",
             argv=(sys.executable, str(tmp / "sleeper.py"), str(tmp / "logs" / f"run_{i}")),
             done_file=tmp / "logs" / f"run_{i}" / "DONE", log_name="train")
    for i in range(n)
]
grid = jobs.Grid(kind="train", runs=runs, home=tmp / "logs" / "grids")
parser = jobs.train_submit_parser()
parser.prog = "batch_job_submit.py"
args = parser.parse_args(["--backend", "local", "--workers", "2", "--logdir", str(tmp / "logs")])
sys.exit(submit_main(args, parser, lambda a: grid))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signalled_local_grid_stops_its_children_in_one_line(tmp_path, signum):
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    (tmp_path / "dispatch.py").write_text(DISPATCH)
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "dispatch.py"), str(tmp_path), "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    pid_files = [tmp_path / "logs" / f"run_{i}" / "pid" for i in range(3)]
    deadline = time.monotonic() + 60
    while sum(p.exists() for p in pid_files) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    children = [int(p.read_text()) for p in pid_files if p.exists()]
    assert len(children) == 2 and all(alive(c) for c in children)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("INFO ")]
    name = signal.Signals(signum).name
    assert len(lines) == 1, err
    assert lines[0].startswith(
        f"batch_job_submit.py: interrupted ({name}); stopped 2 running run(s) (run_"
    ), err
    assert lines[0].endswith("rerun the same command to resume")
    time.sleep(0.2)
    assert not any(alive(c) for c in children)  # no orphan trains on
    assert not (tmp_path / "logs" / "run_2" / "pid").exists()  # the queued run never started


def _peer_pids(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of the processes a torchrun started (read from their environment)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = dict(
                kv.split("=", 1) for kv in (d / "environ").read_bytes().decode().split("\0") if "=" in kv
            )
            stat = (d / "stat").read_text()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if "RANK" in env and "TORCHELASTIC_RUN_ID" in env and _descends(ppid, torchrun_pid):
            out[int(env["RANK"])] = int(d.name)
    return out


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            return False
    return False


@pytest.mark.slow
def test_a_dead_torchrun_rank_is_one_line_on_the_survivor(tmp_path):
    data = write_mnist(tmp_path / "data", n_train=600, n_test=32)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(EXPERIMENTS / "train.py"),
        *train_flags(tmp_path, data, "--epochs", "3"),
    ]
    run_dir = tmp_path / "logs/mnist/SimpleConv_models/method_orig_wBN_1"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (run_dir / "ckpt_last.pth").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = _peer_pids(proc.pid)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    lines = [ln for ln in err.splitlines() if "train.py: error: rank 0 of 2: a peer rank is gone" in ln]
    assert len(lines) == 1, err[-4000:]
    assert lines[0].endswith("the checkpoints written before are intact: rerun the same command to resume")
    # gloo's error appears only inside that line, not as a traceback of the collective
    stray = [ln for ln in err.splitlines() if "pair.cc" in ln and "train.py: error:" not in ln]
    assert not stray, err[-4000:]
    assert load_checkpoint(run_dir / "ckpt_last.pth", require_digest=True)["epoch"] >= 1


# -- 2. a grid resubmitted with other settings ---------------------------------------------------------
def test_a_grid_over_runs_done_with_other_settings_names_them_and_force_retrains(
    tmp_path, mnist_root, capsys
):
    cfg = tiny(tmp_path / "logs", mnist_root, epochs=1)
    run(cfg)
    flags = [
        *"--dataset mnist --model SimpleConv --method orig --mode wBN --seed 1 --lr 1e-4 --batch-size 16".split(),
        *"--train-subset 64 --test-subset 32 --device cpu".split(),
        *["--data-dir", str(mnist_root), "--logdir", str(tmp_path / "logs"), "--epochs", "3"],
    ]
    args = jobs.train_submit_parser().parse_args(flags)
    grid = jobs.train_grid(args, script=batch_job_submit.TRAIN_SCRIPT)
    todo = jobs.plan(grid)
    assert todo.submit == []
    assert [why for _, why in todo.skipped] == ["done with other settings: epochs 1 != 3 (--force retrains)"]
    # status.py shows it
    assert status.main(flags) == 0
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("mnist/")]
    assert len(row) == 1 and row[0].split()[1] == "done"
    assert row[0].endswith("other settings: epochs 1 != 3 (--force retrains)")
    # the same settings: plain done
    same = jobs.train_grid(
        jobs.train_submit_parser().parse_args([*flags[:-1], "1"]), script=batch_job_submit.TRAIN_SCRIPT
    )
    assert [why for _, why in jobs.plan(same).skipped] == ["done"]
    # --force submits the run, and train.py gets --force
    forced_args = jobs.train_submit_parser().parse_args([*flags, "--force"])
    forced = jobs.train_grid(forced_args, script=batch_job_submit.TRAIN_SCRIPT)
    todo = jobs.plan(forced, force=forced_args.force)
    assert [r.name for r in todo.submit] == ["mnist/SimpleConv_models/method_orig_wBN_1"]
    assert (
        "--force" in todo.submit[0].argv
        and todo.submit[0].argv[todo.submit[0].argv.index("--epochs") + 1] == "3"
    )


# -- 3. two identical grids at once ------------------------------------------------------------------
LOCKED = """\
import fcntl, os, pathlib, sys, time
run_dir = pathlib.Path(sys.argv[1])
run_dir.mkdir(parents=True, exist_ok=True)
if (run_dir / "DONE").exists():
    sys.exit(0)
with open(run_dir / ".lock", "a") as f:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"train.py: error: run directory {str(run_dir)!r} is in use by another process")
    time.sleep(1.5)
    with open(run_dir / "trained_by", "a") as t:
        t.write(f"{os.getpid()}\\n")
    (run_dir / "DONE").write_text("done")
"""


def _locked_grid(tmp: Path, n: int, home: Path) -> jobs.Grid:
    runs = [
        jobs.Run(
            name=f"run_{i}",
            kind="train",
            run_dir=tmp / "logs" / f"run_{i}",
            argv=(sys.executable, str(tmp / "locked.py"), str(tmp / "logs" / f"run_{i}")),
            done_file=tmp / "logs" / f"run_{i}" / "DONE",
            log_name="train",
        )
        for i in range(n)
    ]
    return jobs.Grid(kind="train", runs=runs, home=home)


def _dispatch_locked(tmp: str, n: int, home: str) -> None:
    grid = _locked_grid(Path(tmp), n, Path(home))
    failures = jobs.run_local(grid, grid.runs, workers=2, progress=False)
    sys.exit(10 + len(failures))


def test_runs_finished_by_a_second_identical_grid_are_done_not_failed(tmp_path):
    n = 2
    (tmp_path / "locked.py").write_text(LOCKED)
    for i in range(n):
        (tmp_path / "logs" / f"run_{i}").mkdir(parents=True)
    home = tmp_path / "home"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_dispatch_locked, args=(str(tmp_path), n, str(home))) for _ in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [10, 10]  # no failure in either grid
    for i in range(n):
        run_dir = tmp_path / "logs" / f"run_{i}"
        assert len((run_dir / "trained_by").read_text().split()) == 1  # trained once
    # and the race did happen: one child of each run was refused the lock
    grid = _locked_grid(tmp_path, n, home)
    records = json.loads(grid.manifest_path.read_text())["runs"]
    codes = sorted(j["returncode"] for e in records.values() for j in e["jobs"])
    assert codes == [0, 0, 1, 1]


# -- 4. damaged checkpoints of finished runs, a test loss that diverges -----------------------------
def test_a_finished_run_with_a_damaged_last_checkpoint_is_retrained_from_the_one_before(
    tmp_path, mnist_root, reference, caplog
):
    cfg = tiny(tmp_path, mnist_root)
    run(cfg)
    d = run_dir_for(cfg)
    damage_mid_tensor(d / "ckpt_last.pth")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastclip"):
        out = run(cfg)
    assert not out["skipped"]
    warnings = warnings_of(caplog)
    assert warnings == [
        f"{d} finished (DONE), but ckpt_last.pth is damaged (SHA-256 mismatch); resuming after epoch 1"
    ]
    assert without_time(read_metrics(d / "metrics.csv")) == without_time(
        read_metrics(reference / "metrics.csv")
    )
    assert load_checkpoint(d / "ckpt_last.pth", require_digest=True)["epoch"] == 2
    assert (d / "DONE").exists()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastclip"):
        assert run(cfg)["skipped"]  # sound again: skipped without a warning
    assert warnings_of(caplog) == []


def test_a_damaged_best_checkpoint_is_restored_or_the_run_retrained(tmp_path, mnist_root, caplog):
    cfg = tiny(tmp_path, mnist_root)
    run(cfg)
    d = run_dir_for(cfg)
    best_epoch = load_checkpoint(d / "ckpt_best.pth")["epoch"]
    damage_mid_tensor(d / "ckpt_best.pth")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastclip"):
        assert run(cfg)["skipped"]
    source = "ckpt_last.pth" if best_epoch == 2 else "ckpt_prev.pth"
    assert warnings_of(caplog) == [
        f"{d} finished (DONE), but ckpt_best.pth is damaged (SHA-256 mismatch); "
        f"restored ckpt_best.pth from {source}, which holds the same epoch"
    ]
    assert load_checkpoint(d / "ckpt_best.pth", require_digest=True)["epoch"] == best_epoch
    # the best epoch in no sound checkpoint: from scratch
    damage_mid_tensor(d / "ckpt_best.pth")
    damage_mid_tensor(d / "ckpt_last.pth")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastclip"):
        assert not run(cfg)["skipped"]
    assert warnings_of(caplog) == [
        f"{d} finished (DONE), but ckpt_last.pth is damaged (SHA-256 mismatch); ckpt_best.pth is damaged "
        "(SHA-256 mismatch), and its best epoch is in no sound checkpoint; retraining from scratch"
    ]
    assert "resuming" not in caplog.text
    assert load_checkpoint(d / "ckpt_best.pth", require_digest=True)["epoch"] == best_epoch


def test_status_verify_and_the_grid_find_a_damaged_checkpoint_that_a_zip_check_misses(
    tmp_path, mnist_root, capsys
):
    cfg = tiny(tmp_path / "logs", mnist_root)
    run(cfg)
    damage_mid_tensor(run_dir_for(cfg) / "ckpt_last.pth")
    flags = [
        *"--dataset mnist --method orig --model SimpleConv --seed 1 --lr 1e-4 --batch-size 16 --epochs 2".split(),
        *"--train-subset 64 --test-subset 32".split(),
        *["--data-dir", str(mnist_root), "--logdir", str(tmp_path / "logs")],
    ]
    assert status.main(flags) == 0
    assert "2 runs" not in (out := capsys.readouterr().out) and out.strip().endswith("1 runs: 1 done")
    assert status.main([*flags, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "damaged" in out and "ckpt_last.pth is damaged (SHA-256 mismatch)" in out
    assert out.strip().endswith("1 runs: 1 damaged")
    grid = jobs.train_grid(jobs.train_submit_parser().parse_args(flags), script=batch_job_submit.TRAIN_SCRIPT)
    assert [r.name for r in jobs.plan(grid).submit] == ["mnist/SimpleConv_models/method_orig_wBN_1"]


def test_a_test_loss_that_diverges_fails_the_run_in_one_line(tmp_path, mnist_root, monkeypatch):
    real = session_module.evaluate
    calls = []

    def nan_in_epoch_2(model, loader, device, replica=None):
        calls.append(1)
        loss, acc = real(model, loader, device, replica=replica)
        return (math.nan if len(calls) == 2 else loss), acc

    monkeypatch.setattr(session_module, "evaluate", nan_in_epoch_2)
    cfg = tiny(tmp_path, mnist_root)
    with pytest.raises(RunFailed) as e:
        run(cfg)
    d = run_dir_for(cfg)
    assert str(e.value) == (
        f"{d}: diverged: the test loss is nan at step 7 (epoch 2); wrote FAILED (rerun with --force to start over)"
    )
    failed = json.loads((d / "FAILED").read_text())
    assert (failed["term"], failed["epoch"], failed["step"]) == ("the test loss", 2, 7)
    assert not (d / "DONE").exists()
    assert load_checkpoint(d / "ckpt_last.pth")["epoch"] == 1  # the diverged epoch is never checkpointed


# -- 5. damaged dataset files ------------------------------------------------------------------------
IMAGES = "train-images-idx3-ubyte"


def _garbage(raw: Path) -> None:
    (raw / IMAGES).write_bytes(bytes(range(256)) * 2)


DAMAGES = {
    "garbage": (
        False,
        _garbage,
        f"{IMAGES}: not an idx file (starts with 00 01 02 03); expected an idx file of images",
    ),
    "empty": (
        False,
        lambda r: (r / IMAGES).write_bytes(b""),
        f"{IMAGES}: the file is empty; expected an idx file",
    ),
    "header only": (
        False,
        lambda r: (r / IMAGES).write_bytes((r / IMAGES).read_bytes()[:16]),
        f"{IMAGES}: holds 0 data bytes, but its header says 20 x 28 x 28 (15680)",
    ),
    "labels garbage": (
        False,
        lambda r: (r / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03" + bytes(40)),
        "t10k-labels-idx1-ubyte: not an idx file (starts with 00 00 08 03); expected an idx file of labels",
    ),
    "truncated gz": (
        True,
        lambda r: (r / f"{IMAGES}.gz").write_bytes((r / f"{IMAGES}.gz").read_bytes()[:200]),
        f"{IMAGES}.gz: expected a complete gzip file of idx data, but it is cut short (truncated)",
    ),
    "garbage gz": (
        True,
        lambda r: (r / f"{IMAGES}.gz").write_bytes(b"not gzip at all" * 20),
        f"{IMAGES}.gz: expected a complete gzip file of idx data, but it is not gzip data",
    ),
    "empty gz": (
        True,
        lambda r: (r / f"{IMAGES}.gz").write_bytes(b""),
        f"{IMAGES}.gz: expected a complete gzip file of idx data, but it is empty",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_dataset_file_is_one_line_naming_it(tmp_path, damage):
    compressed, spoil, expected = DAMAGES[damage]
    root = write_mnist(tmp_path / "data", n_train=20, n_test=10, compressed=compressed)
    raw = root / "MNIST" / "raw"
    spoil(raw)
    with pytest.raises(DatasetCorruptError) as e:
        get_datasets("mnist", root)
    msg = str(e.value)
    assert "\n" not in msg and f"{raw}/{expected}" in msg, msg
    assert not list(raw.glob(".*.tmp"))  # nothing half-unpacked left beside it
    if compressed:
        assert not (raw / IMAGES).exists()


def test_train_on_a_damaged_dataset_exits_2_in_one_line(tmp_path, capsys):
    root = write_mnist(tmp_path / "data", n_train=20, n_test=10, compressed=True)
    gz = root / "MNIST" / "raw" / f"{IMAGES}.gz"
    gz.write_bytes(b"not gzip" * 8)  # garbage in place of the .gz
    with pytest.raises(SystemExit) as e:
        train_cli.main(
            [
                "--dataset",
                "mnist",
                "--data-dir",
                str(root),
                "--logdir",
                str(tmp_path / "logs"),
                "--epochs",
                "1",
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"train.py: error: {gz}: expected a complete gzip file of idx data, but it is not gzip data"
    ), err


# -- 6. small ones ------------------------------------------------------------------------------------
def test_plot_curves_given_a_file_says_it_is_not_a_run_directory(tmp_path, capsys):
    f = tmp_path / "metrics.csv"
    f.write_text("epoch\n")
    with pytest.raises(SystemExit) as e:
        plot_curves.main([str(f), "--out", str(tmp_path / "c.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"plot_curves.py: error: {f} is a file, not a run directory (expected a directory holding "
        "events.out.tfevents.*) (see --help)"
    )


@pytest.mark.parametrize(
    "flag", [["--partition", "gpu"], ["--time", "10"], ["--mem", "4G"], ["--qos", "high"]], ids=lambda f: f[0]
)
def test_the_local_backend_refuses_slurm_flags(tmp_path, capsys, flag):
    argv = ["--dataset", "mnist", "--model", "SimpleConv", "--method", "orig", "--seed", "1"]
    # --dry-run: without the refusal, the test must not train a grid
    argv += ["--logdir", str(tmp_path / "logs"), "--backend", "local", "--dry-run", *flag]
    with pytest.raises(SystemExit) as e:
        batch_job_submit.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"batch_job_submit.py: error: {flag[0]} is a SLURM option and needs --backend slurm; "
        "the local backend would ignore it (see --help)"
    )
    assert not (tmp_path / "logs").exists()


def test_slurm_time_still_defaults_to_24_hours():
    args = jobs.train_submit_parser().parse_args([])
    assert getattr(args, "time", None) is None and jobs.SlurmOptions.from_args(args).time == 24 * 60
    assert (
        jobs.SlurmOptions.from_args(jobs.train_submit_parser().parse_args(["--time", "1:00:00"])).time == 60
    )
