"""The status table of a grid, and the plan of a dispatch (what to submit, what to skip)."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastclip.pipeline import training
from fastclip.pipeline.jobs.grid import STATES, Grid, Run, SubmissionError
from fastclip.pipeline.jobs.local import _local_alive
from fastclip.pipeline.jobs.manifest import _latest_jobs
from fastclip.pipeline.jobs.process import _metrics_rows, last_error_line
from fastclip.pipeline.jobs.slurm import _SLURM_QUEUED, _SLURM_RUNNING, slurm_job_states
from fastclip.pipeline.provenance import stale_result
from fastclip.pipeline.training.validate import RunFilesError, read_failed, read_settings, run_files_problem

#: The status detail of a finished run recorded with settings other than its grid's.
OTHER_SETTINGS = "other settings"


@dataclass
class RunStatus:
    """One row of the status table."""

    run: Run
    state: str
    epoch: int | None = None
    job: str = ""
    detail: str = ""


def _job_label(job: dict[str, Any] | None) -> str:
    if not job:
        return ""
    return f"slurm {job['job_id']}" if job["backend"] == "slurm" else f"local pid {job.get('pid', '?')}"


def other_settings(run: Run) -> str | None:
    """How a training run's recorded settings (config.json) differ from the ones its grid
    asks for, e.g. ``epochs 1 != 5`` (recorded != asked); None when they agree, when the
    run records none, or when the run is not a train.py run this grid could parse."""
    if run.kind != "train" or len(run.argv) < 3 or not run.argv[1].endswith("train.py"):
        return None
    try:
        old = read_settings(run.run_dir)
    except RunFilesError:
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = training.get_args_parser(add_help=False).parse_args(list(run.argv[2:]))
        new = training.resolve(training.config_from_args(args)).identity()
    except (SystemExit, training.ConfigError):
        return None
    keys = sorted((set(old) | set(new)) - training.EXECUTION_FIELDS)
    differ = [
        f"{k} {old.get(k, '<missing>')} != {new.get(k, '<missing>')}"
        for k in keys
        if old.get(k, "<missing>") != new.get(k, "<missing>")
    ]
    return ", ".join(differ) or None


def grid_status(grid: Grid, verify: bool = False) -> list[RunStatus]:
    """The state of every run of the grid: ``running``/``queued`` (a live job in any
    manifest of the grid home, asked of SLURM or of /proc), ``done`` (its done file
    exists), ``damaged`` (a finished training run one of whose files is missing or
    unreadable: ``detail`` names the file and why), ``failed`` (its FAILED marker: the
    run diverged, ``detail`` is the reason), ``failed`` (a job ended without finishing it, or it stopped part-way with
    no job recorded; ``detail`` is the last error line of its log), or ``missing``. A
    finished training run recorded with other settings than the grid's stays ``done``, its
    ``detail`` naming them (``other settings: epochs 1 != 5``). ``verify`` checks the
    SHA-256 of every finished run's checkpoints (reads them all) instead of only their
    zip structure."""
    latest = _latest_jobs(grid)
    slurm_ids = {j["job_id"] for j in latest.values() if j["backend"] == "slurm"}
    raw: dict[str, str] = {}
    for run in grid.runs:
        job = latest.get(run.uid)
        if job and job["backend"] == "slurm":
            try:
                raw[job["job_id"]] = json.loads(Path(job["record"]).read_text()).get("slurm_job_id")
            except (OSError, ValueError, KeyError):
                pass
    sched_error = ""
    try:
        states = slurm_job_states(slurm_ids, raw) if slurm_ids else {}
    except SubmissionError as e:
        states, sched_error = {}, str(e)
    rows = []
    for run in grid.runs:
        job = latest.get(run.uid)
        epoch = _metrics_rows(run.run_dir) if run.kind == "train" else None
        row = RunStatus(run=run, state="missing", epoch=epoch, job=_job_label(job))
        live = ""
        if job and job["backend"] == "slurm":
            s = states.get(job["job_id"], "")
            live = "queued" if s in _SLURM_QUEUED else "running" if s in _SLURM_RUNNING else ""
            if not s and sched_error:
                row.detail = f"cannot ask SLURM: {sched_error}"
        elif job and _local_alive(job):
            live = "running"
        if live:
            row.state = live
            row.detail = states.get(job["job_id"], "") if job["backend"] == "slurm" else ""
        elif run.done_file.exists():
            row.state = "done"
            if run.kind == "train":
                problem = run_files_problem(run.run_dir, deep=verify)
            else:  # a result measured on a checkpoint the run no longer has is recomputed
                problem = stale_result(run.run_dir, run.done_file)
            if problem:
                row.state, row.detail = ("damaged" if run.kind == "train" else "stale"), problem
            else:
                differ = other_settings(run)
                if differ:
                    row.detail = f"{OTHER_SETTINGS}: {differ} (--force retrains)"
        elif run.kind == "train" and read_failed(run.run_dir):
            row.state, row.detail = "failed", str(read_failed(run.run_dir))
        elif run.requires is not None and not run.requires.exists():
            row.state, row.detail = "missing", f"waiting for {run.requires}"
        elif job:
            row.state = "failed"
            s = states.get(job["job_id"], "") if job["backend"] == "slurm" else ""
            why = (
                last_error_line(job.get("stderr"))
                or last_error_line(job.get("submitit_stderr"))
                or last_error_line(run.run_dir / "train.log" if run.kind == "train" else None)
            )
            if job["backend"] == "local" and job.get("returncode") is None:
                why = why or "interrupted (the local worker is gone)"
            row.detail = " ".join(x for x in (s, why) if x) or "ended without finishing"
        elif epoch:
            row.state, row.detail = "failed", f"stopped after epoch {epoch} (no job recorded)"
        rows.append(row)
    return rows


def format_status(rows: Sequence[RunStatus]) -> str:
    """The status table, one line per run, and a count per state.

    Example output::

        run                                      state    epoch  job         detail
        mnist/SimpleConv_models/method_orig_wBN_1  done         2  slurm 12_0
        mnist/SimpleConv_models/method_orig_wBN_2  failed       0  slurm 12_1  FAILED ValueError: ...
        2 runs: 1 done, 1 failed
    """
    header = ("run", "state", "epoch", "job", "detail")
    table = [header] + [
        (r.run.name, r.state, "" if r.epoch is None else str(r.epoch), r.job, r.detail) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = []
    for row in table:
        cells = [
            row[0].ljust(widths[0]),
            row[1].ljust(widths[1]),
            row[2].rjust(widths[2]),
            row[3].ljust(widths[3]),
            row[4],
        ]
        lines.append("  ".join(cells).rstrip())
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    lines.append(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)


@dataclass
class Plan:
    """What a dispatch would do: runs to submit, and those skipped with the reason."""

    submit: list[Run] = field(default_factory=list)
    skipped: list[tuple[Run, str]] = field(default_factory=list)

    def describe(self, backend: str) -> str:
        lines = [f"{len(self.submit)} run(s) to submit ({backend}), {len(self.skipped)} skipped"]
        lines += [f"  skip {r.name}: {why}" for r, why in self.skipped]
        lines += [f"  run  {r.name}: {shlex.join(r.argv)}" for r in self.submit]
        return "\n".join(lines)


def plan(grid: Grid, force: bool = False) -> Plan:
    """Split the grid into runs to submit and runs to skip: ``done`` (unless ``force``;
    the reason names settings recorded other than the grid's), ``running``/``queued``
    (never submitted twice), or an attack whose training run is not finished. Finished
    training runs have their checkpoints' SHA-256 verified: a damaged one is submitted,
    and train.py repairs it."""
    out = Plan()
    for row in grid_status(grid, verify=True):
        if row.state in ("running", "queued"):
            out.skipped.append((row.run, f"{row.state} ({row.job})"))
        elif row.state == "done" and not force:
            out.skipped.append((row.run, f"done with {row.detail}" if row.detail else "done"))
        elif row.run.requires is not None and not row.run.requires.exists():
            out.skipped.append((row.run, f"no finished training run ({row.run.requires} missing)"))
        else:
            if row.detail.startswith("cannot ask SLURM"):
                raise SubmissionError(
                    f"{row.detail}; not submitting {row.run.name} (it may be queued already)"
                )
            out.submit.append(row.run)
    return out
