"""The SLURM backend of batch_job_submit.py on a real one-node cluster (munge + slurmctld
+ slurmd on localhost, started by scripts/slurm-local.sh), with real train.py runs.

One grid (2 methods x 2 modes x 2 seeds, see test_jobs.GRID_AXES) goes through the
whole life of a grid: submitted as one job array with one run poisoned so that it
fails; one task requeued by ``scontrol requeue`` and one signalled with USR2 (what
SLURM sends before a time limit or on preemption) once each has a checkpoint; the
failed run resubmitted alone after the cause is fixed; the finished grid submitted
again (nothing happens). Its outputs must equal the local backend's (test_jobs.py),
so the two preempted runs end with the same metrics as uninterrupted runs.

The cluster is started if it is not running. Without root, slurm-wlm or munge the
tests are skipped with the reason - except on CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_jobs import (
    EXPERIMENTS,
    GRID_AXES,
    GRID_NAMES,
    RUN_FLAGS,
    assert_same_metrics,
    grid_data,
    local_grid_logdir,
    read_metrics,
    run_script,
)

import fastclip.pipeline.jobs as jobs

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
SLURM_LOCAL = REPO / "scripts" / "slurm-local.sh"
SLURM_DIR = Path(os.environ.get("FASTCLIP_SLURM_DIR", "/tmp/fastclip-slurm"))

REQUEUED = "mnist/SimpleConv_models/method_gouk_wBN_1"  # array task 0: scontrol requeue
SIGNALLED = "mnist/SimpleConv_models/method_gouk_wBN_2"  # array task 1: USR2, as before a time limit
POISONED = "mnist/SimpleConv_models/method_orig_noBN_2"  # array task 7: fails on its first submission


def start_local_cluster() -> Path:
    """Start the local cluster with scripts/slurm-local.sh (a no-op when it runs) and
    return its slurm.conf; skip (fail on CI) when it cannot start."""
    reason = ""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        reason = "slurm-wlm is not installed (apt-get install -y slurm-wlm munge)"
    else:
        try:
            proc = subprocess.run(
                ["bash", str(SLURM_LOCAL), "start"], capture_output=True, text=True, timeout=180
            )
            if proc.returncode != 0:
                reason = f"scripts/slurm-local.sh start failed: {proc.stderr.strip().splitlines()[-1:]}"
        except subprocess.TimeoutExpired:
            reason = "scripts/slurm-local.sh start did not finish within 180 s"
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the local SLURM cluster must run on CI: {reason}")
        pytest.skip(f"no local SLURM cluster: {reason}")
    return SLURM_DIR / "slurm.conf"


@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory):
    conf = start_local_cluster()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(conf))  # sbatch, squeue, scontrol and the jobs all read it
        yield conf
        # Cancel what this module submitted and left behind (a failed test), so that no
        # stray task of ours competes with the next run.
        for manifest in tmp_path_factory.getbasetemp().glob("slurm_grid*/logs/grids/*/manifest.json"):
            ids = {
                j["job_id"].split("_")[0]
                for e in json.loads(manifest.read_text())["runs"].values()
                for j in e["jobs"]
                if j["backend"] == "slurm"
            }
            if ids:
                subprocess.run(["scancel", *sorted(ids)], capture_output=True, timeout=60)


def submit(flags: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_script("batch_job_submit", flags)
    return code, out.getvalue()


def wait_until_settled(grid: jobs.Grid, timeout: float = 600) -> dict[str, jobs.RunStatus]:
    """Poll the grid's status until no run is queued or running."""
    deadline = time.monotonic() + timeout
    while True:
        rows = {r.run.name: r for r in jobs.grid_status(grid)}
        if not any(r.state in ("queued", "running") for r in rows.values()):
            return rows
        if time.monotonic() > deadline:
            pytest.fail(f"grid still busy after {timeout} s:\n{jobs.format_status(list(rows.values()))}")
        time.sleep(1)


def manifest_jobs(grid: jobs.Grid) -> dict[str, list[dict]]:
    m = json.loads(grid.manifest_path.read_text())
    return {e["run"]["name"]: e["jobs"] for e in m["runs"].values()}


def preempt(cmd: list[str], job_id: str) -> subprocess.Popen:
    """Start ``cmd job_id`` without waiting: slurm 22.05's ``scancel --signal`` on an array
    task delivers the signal but, as submitit requeues the task at the same moment, is
    told "Job can not be altered now, try again later" and keeps retrying; waiting for
    it would let the other target finish unpreempted. The tests check the logs instead."""
    return subprocess.Popen([*cmd, job_id], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def first_pass(slurm_conf, tmp_path_factory):
    """The grid submitted with one run poisoned, two tasks preempted, and waited for."""
    root = tmp_path_factory.mktemp("slurm_grid")
    data = grid_data(str(tmp_path_factory.getbasetemp()))
    logdir = root / "logs"
    flags = [
        *GRID_AXES,
        *RUN_FLAGS,
        "--data-dir",
        data,
        "--logdir",
        str(logdir),
        "--backend",
        "slurm",
        "--cpus-per-task",
        "1",
        "--time",
        "30",
    ]
    # A directory where train.py writes config.json: that run fails (one line: Is a directory).
    (logdir / POISONED / "config.json").mkdir(parents=True)
    t0 = time.perf_counter()
    code, out = submit(flags)
    assert code == 0, out
    grid = jobs.train_grid(jobs.train_submit_parser().parse_args(flags), script=EXPERIMENTS / "train.py")
    job_ids = {name: js[-1]["job_id"] for name, js in manifest_jobs(grid).items()}

    # Preempt each target once it has a checkpoint (epoch 1 of 4 done), so it must resume.
    pending = {REQUEUED: ["scontrol", "requeue"], SIGNALLED: ["scancel", "--signal=USR2"]}
    procs: list[tuple[subprocess.Popen, float]] = []
    deadline = time.monotonic() + 300
    while pending or procs:
        for proc, started in list(procs):  # the requeue / signal is done by then: stop a retrying scancel
            if time.monotonic() - started > 5:
                proc.kill()
                proc.wait()
                procs.remove((proc, started))
        for name, cmd in list(pending.items()):
            run_dir = logdir / name
            if (run_dir / "DONE").exists():
                pytest.fail(f"{name} finished before it could be preempted")
            if (run_dir / "ckpt_last.pth").exists():
                procs.append((preempt(cmd, job_ids[name]), time.monotonic()))
                del pending[name]
        if time.monotonic() > deadline:
            pytest.fail(f"no checkpoint to preempt in {sorted(pending)} after 300 s")
        time.sleep(0.05)
    rows = wait_until_settled(grid)
    return SimpleNamespace(
        grid=grid,
        flags=flags,
        logdir=logdir,
        job_ids=job_ids,
        out=out,
        rows=rows,
        seconds=time.perf_counter() - t0,
    )


def test_grid_is_submitted_as_one_job_array(first_pass):
    ids = first_pass.job_ids
    assert sorted(ids) == sorted(GRID_NAMES)
    arrays = {j.split("_")[0] for j in ids.values()}
    assert len(arrays) == 1 and sorted(int(j.split("_")[1]) for j in ids.values()) == list(range(8))
    assert ids[REQUEUED].endswith("_0") and ids[SIGNALLED].endswith("_1") and ids[POISONED].endswith("_7")
    assert "8 run(s) to submit (slurm), 0 skipped" in first_pass.out
    (array,) = arrays
    sbatch = (first_pass.grid.dir / "submitit" / f"{array}_submission.sh").read_text()
    for line in (
        "--array=0-7%8",
        "--cpus-per-task=1",
        "--time=30",
        "--requeue",
        "--signal=USR2@90",
        "--job-name=fastclip-train",
    ):
        assert f"#SBATCH {line}" in sbatch
    for name, job_id in ids.items():  # each task's stdout/stderr in its run directory
        out = (first_pass.logdir / name / "logs" / f"train_{job_id}.out").read_text()
        assert out.startswith("== ") and f"job {job_id} attempt 1 on " in out
        assert (first_pass.logdir / name / "logs" / f"train_{job_id}.err").exists()


@pytest.mark.parametrize("name, how", [(REQUEUED, "scontrol requeue"), (SIGNALLED, "USR2")])
def test_preempted_task_resumes_from_its_checkpoint(first_pass, name, how):
    run_dir = first_pass.logdir / name
    job_id = first_pass.job_ids[name]
    assert first_pass.rows[name].state == "done"
    record = json.loads((run_dir / "logs" / f"train_{job_id}.json").read_text())
    attempts = record["attempts"]
    assert len(attempts) == 2, attempts
    assert attempts[0].get("returncode") != 0 and attempts[1]["returncode"] == 0
    assert attempts[1]["restart_count"] == 1
    log = (run_dir / "train.log").read_text()
    assert log.count("resuming after epoch") == 1, log
    resumed_after = int(log.split("resuming after epoch ")[1].split()[0])
    assert 1 <= resumed_after < 4
    assert list(read_metrics(run_dir / "metrics.csv")["epoch"]) == [1, 2, 3, 4]
    job = json.loads(first_pass.grid.manifest_path.read_text())["runs"][str(run_dir / "DONE")]["jobs"][-1]
    submitit_log = Path(job["submitit_stdout"]).read_text() + Path(job["submitit_stderr"]).read_text()
    if how == "USR2":  # submitit caught it, called RunTask.checkpoint and requeued the task itself
        assert "Caught signal SIGUSR2" in submitit_log and "Calling checkpoint method" in submitit_log
    else:
        assert "DUE TO JOB REQUEUE" in submitit_log


def test_failed_run_is_reported_with_its_error(first_pass):
    rows = first_pass.rows
    assert {n: r.state for n, r in rows.items()} == {
        n: "failed" if n == POISONED else "done" for n in GRID_NAMES
    }
    failed = rows[POISONED]
    # train.py's own one line (exit 1) for a write the OS refused, naming the file and errno
    assert failed.detail.startswith("FAILED train.py: error: cannot write "), failed.detail
    assert "config.json': Is a directory (errno 21)" in failed.detail, failed.detail
    assert failed.job == f"slurm {first_pass.job_ids[POISONED]}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_script("status", first_pass.flags) == 0
    lines = out.getvalue().splitlines()
    assert lines[-1] == "8 runs: 7 done, 1 failed"
    (line,) = [ln for ln in lines if ln.startswith(POISONED)]
    assert line.split()[1] == "failed" and "Is a directory (errno 21)" in line


@pytest.fixture(scope="module")
def second_pass(first_pass):
    """The cause removed and the same command run again: only the failed run is submitted."""
    (first_pass.logdir / POISONED / "config.json").rmdir()
    before = manifest_jobs(first_pass.grid)
    code, out = submit(first_pass.flags)
    assert code == 0, out
    after = manifest_jobs(first_pass.grid)
    rows = wait_until_settled(first_pass.grid)
    return SimpleNamespace(out=out, before=before, after=after, rows=rows)


def test_resubmission_runs_only_the_failed_run(first_pass, second_pass):
    assert "1 run(s) to submit (slurm), 7 skipped" in second_pass.out
    new = {n: js for n, js in second_pass.after.items() if len(js) > len(second_pass.before[n])}
    assert list(new) == [POISONED] and len(new[POISONED]) == 2
    assert "_" not in new[POISONED][-1]["job_id"]  # one run: a plain job, not an array
    assert {n: r.state for n, r in second_pass.rows.items()} == {n: "done" for n in GRID_NAMES}


def test_finished_grid_submits_nothing(first_pass, second_pass):
    before = first_pass.grid.manifest_path.read_bytes()
    code, out = submit(first_pass.flags)
    assert code == 0 and "0 run(s) to submit (slurm), 8 skipped" in out
    assert first_pass.grid.manifest_path.read_bytes() == before
    queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    assert queue.strip() == ""


def test_slurm_outputs_equal_local_outputs(second_pass, first_pass, tmp_path_factory):
    """Same metrics on both backends, including the two runs that were preempted and resumed."""
    local = local_grid_logdir(tmp_path_factory)
    for name in GRID_NAMES:
        assert_same_metrics(first_pass.logdir / name / "metrics.csv", local / name / "metrics.csv")
        for f in ("ckpt_best.pth", "ckpt_last.pth", "config.json", "DONE"):
            assert (first_pass.logdir / name / f).exists()


def test_attack_grid_on_slurm(first_pass, second_pass, tmp_path_factory):
    """batch_attack_submit.py on the SLURM backend: one array task per trained seed."""
    data = grid_data(str(tmp_path_factory.getbasetemp()))
    prefix = str(first_pass.logdir / "mnist/SimpleConv_models/method_")
    argv = [
        "mnist",
        prefix,
        "--method",
        "orig",
        "--mode",
        "noBN",
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
        "slurm",
        "--cpus-per-task",
        "1",
        "--time",
        "10",
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_script("batch_attack_submit", argv) == 0
    assert "2 run(s) to submit (slurm), 0 skipped" in out.getvalue()
    grid = jobs.attack_grid(jobs.attack_submit_parser().parse_args(argv), script=EXPERIMENTS / "attack.py")
    rows = wait_until_settled(grid, timeout=300)
    assert sorted((n, r.state) for n, r in rows.items()) == [
        ("method_orig_noBN_1 pgd", "done"),
        ("method_orig_noBN_2 pgd", "done"),
    ]
    ids = {n: js[-1]["job_id"] for n, js in manifest_jobs(grid).items()}
    assert len({j.split("_")[0] for j in ids.values()}) == 1  # one array
    import pandas as pd

    for seed in (1, 2):
        run_dir = first_pass.logdir / f"mnist/SimpleConv_models/method_orig_noBN_{seed}"
        (row,) = pd.read_csv(run_dir / "attack_pgd_eps0.02_steps3_n16.csv").to_dict("records")
        assert row["n_examples"] == 16 and 0 <= row["adv_acc"] <= row["clean_acc"] <= 100
        assert (run_dir / "logs" / f"attack_pgd_{ids[f'method_orig_noBN_{seed} pgd']}.out").exists()


def test_job_states_from_squeue_and_the_completion_log(first_pass, second_pass):
    """squeue knows recently finished tasks; after MinJobAge only ``sacct -c`` (the
    job-completion log) does, under the raw job id each task's record keeps."""
    job_id = first_pass.job_ids[POISONED]
    record = json.loads((first_pass.logdir / POISONED / "logs" / f"train_{job_id}.json").read_text())
    assert jobs.slurm_job_states([job_id]) == {job_id: "FAILED"}
    # a task squeue does not know (as after MinJobAge), found through its raw id
    raw = record["slurm_job_id"]
    assert raw.isdigit()
    assert jobs.slurm_job_states(["999999_7"], {"999999_7": raw}) == {"999999_7": "FAILED"}
    requeued = json.loads(
        (first_pass.logdir / REQUEUED / "logs" / f"train_{first_pass.job_ids[REQUEUED]}.json").read_text()
    )["slurm_job_id"]
    # a requeued task has one completion line per attempt: the last one counts
    assert jobs.slurm_job_states(["999999_0"], {"999999_0": requeued}) == {"999999_0": "COMPLETED"}
    assert jobs.slurm_job_states(["999999_1"]) == {}
