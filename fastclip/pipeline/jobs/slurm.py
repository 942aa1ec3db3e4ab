"""The SLURM backend: one submitit job array per dispatch, :class:`RunTask` per array
task, and the scheduler's view of a job (squeue, then sacct -c)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import socket
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastclip.pipeline.io import atomic_write_json
from fastclip.pipeline.jobs.grid import Grid, Run, SubmissionError
from fastclip.pipeline.jobs.manifest import _now, _record_jobs
from fastclip.pipeline.jobs.process import _child_env, _log_paths, _stop_child, last_error_line

logger = logging.getLogger(__name__)

# SLURM job states (squeue/sacct names) that mean "still going".
_SLURM_QUEUED = {
    "PENDING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESV_DEL_HOLD",
    "CONFIGURING",
    "SPECIAL_EXIT",
}
_SLURM_RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED", "RESIZING"}


# -- which cluster --------------------------------------------------------------------------------
#: The configuration SLURM's client commands read when SLURM_CONF is not set.
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")


def local_cluster_conf() -> Path:
    """Where ``scripts/slurm-local.sh start`` writes its one-node cluster's slurm.conf
    (``$FASTCLIP_SLURM_DIR``, default /tmp/fastclip-slurm)."""
    return Path(os.environ.get("FASTCLIP_SLURM_DIR") or "/tmp/fastclip-slurm") / "slurm.conf"


def use_slurm_config() -> str:
    """Pick the slurm.conf for sbatch, squeue, sacct and the jobs, and say which in one line.

    ``SLURM_CONF`` when set; else the system's /etc/slurm/slurm.conf when it exists; else
    the cluster of ``scripts/slurm-local.sh`` when its configuration exists, which is then
    exported as ``SLURM_CONF`` for this process and its children (the client commands
    submitit runs inherit it), as the script's ``export`` line would.

    Example (after ``scripts/slurm-local.sh start``, nothing exported)::

        use_slurm_config()
        # "SLURM configuration: /tmp/fastclip-slurm/slurm.conf (scripts/slurm-local.sh's cluster; ...)"
    """
    env = os.environ.get("SLURM_CONF")
    if env:
        return f"SLURM configuration: {env} (SLURM_CONF)"
    if SYSTEM_CONF.is_file():
        return f"SLURM configuration: {SYSTEM_CONF} (the system's)"
    local = local_cluster_conf()
    if local.is_file():
        os.environ["SLURM_CONF"] = str(local)
        return f"SLURM configuration: {local} (scripts/slurm-local.sh's cluster; SLURM_CONF was unset)"
    return (
        f"SLURM configuration: none found (SLURM_CONF unset, no {SYSTEM_CONF}, no {local}); "
        "for a one-node cluster here: sudo scripts/slurm-local.sh start"
    )


# -- scheduler state --------------------------------------------------------------------------------
def _run_cmd(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SubmissionError(f"{cmd[0]} failed: {e}") from None
    if proc.returncode != 0:
        raise SubmissionError(f"{shlex.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def slurm_job_states(job_ids: Iterable[str], raw_ids: dict[str, str] | None = None) -> dict[str, str]:
    """SLURM state (``PENDING``, ``RUNNING``, ``COMPLETED``, ``FAILED``...) of each job id
    (``123`` or array task ``123_4``). ``squeue --states=all`` knows live jobs and jobs
    finished within MinJobAge; older ones are looked up with ``sacct -c`` (the
    job-completion log, which works without slurmdbd) under their raw job id from
    ``raw_ids`` (array tasks have their own). Ids found nowhere are left out."""
    ids = set(job_ids)
    if not ids:
        return {}
    logger.debug(use_slurm_config())
    states: dict[str, str] = {}
    for line in _run_cmd(["squeue", "--states=all", "-h", "-r", "-o", "%i|%T"]).splitlines():
        jid, _, state = line.strip().partition("|")
        if jid in ids:
            states[jid] = state
    missing = {raw_ids[j]: j for j in ids - set(states) if raw_ids and raw_ids.get(j)}
    if missing:
        try:
            out = _run_cmd(["sacct", "-c", "-n", "-P", "-o", "JobID,State", "-j", ",".join(sorted(missing))])
        except SubmissionError as e:
            logger.debug("sacct -c: %s", e)
            out = ""
        for line in out.splitlines():  # a requeued job has one line per attempt: the last wins
            raw, _, state = line.strip().partition("|")
            if raw in missing:
                states[missing[raw]] = state.split()[0] if state else "UNKNOWN"
    return states


class RunTask:
    """What a SLURM array task runs: ``argv`` as a subprocess, its stdout/stderr appended
    to ``<run_dir>/logs/<log_name>_<job id>.{out,err}``, and one entry per attempt in
    ``<log_name>_<job id>.json`` (raw SLURM job id, start, end, return code).

    Plain strings only, so the pickle stays small and readable by any later version.
    On preemption or timeout submitit calls :meth:`checkpoint`, which stops the script
    (it writes atomically, so at worst the current epoch is lost) and resubmits the same
    command; the script resumes from its checkpoint. ``--force`` is honoured on the first
    attempt only, so a requeued forced run resumes instead of starting over. (submitit
    recognises a checkpointable task by its ``checkpoint`` method; its ``Checkpointable``
    base adds only a check, and would make importing this module import submitit.)
    """

    def __init__(self, argv: Sequence[str], run_dir: str, log_name: str) -> None:
        self.argv = [str(a) for a in argv]
        self.run_dir = str(run_dir)
        self.log_name = str(log_name)

    def __call__(self) -> int:
        import submitit

        env = submitit.JobEnvironment()
        if env.global_rank > 0:
            return self._other_rank(env)
        out, err, rec_path = _log_paths(Path(self.run_dir), self.log_name, env.job_id)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            record = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            record = {"job_id": env.job_id, "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "attempts": []}
        argv, cpus = self._with_threads(
            self.argv if not record["attempts"] else [a for a in self.argv if a != "--force"]
        )
        attempt = {
            "started": _now(),
            "host": socket.gethostname(),
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            "argv": argv,
        }
        record["attempts"].append(attempt)
        atomic_write_json(rec_path, record)
        rc = self._run_child(
            argv, out, err, cpus, f"job {env.job_id} attempt {len(record['attempts'])} on {attempt['host']}"
        )
        attempt.update(ended=_now(), returncode=rc)
        atomic_write_json(rec_path, record)
        if rc != 0:
            raise RuntimeError(f"{Path(argv[1]).name} exited with code {rc}: {last_error_line(err)}")
        return rc

    def _with_threads(self, argv: list[str]) -> tuple[list[str], str | None]:
        """``argv`` with the task's CPU count as an explicit thread count for a training run
        (recorded in config.json, so a requeued attempt on another node computes with the
        same count), and that count."""
        cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE")
        if self.log_name == "train" and cpus and "--threads" not in argv:
            argv = [*argv, "--threads", cpus]
        return argv, cpus

    def _run_child(self, argv: list[str], out: Path, err: Path, cpus: str | None, header: str) -> int:
        """Run ``argv`` to its end with its output appended to ``out`` / ``err`` after a
        header line; its exit code. The process is kept for :meth:`checkpoint`."""
        with open(out, "a") as fo, open(err, "a") as fe:
            fo.write(f"== {_now()} {header}: {shlex.join(argv)}\n")
            fo.flush()
            self._proc = subprocess.Popen(
                argv,
                stdout=fo,
                stderr=fe,
                stdin=subprocess.DEVNULL,
                env=_child_env(int(cpus) if cpus else None),
            )
            return self._proc.wait()

    def _other_rank(self, env: Any) -> int:
        """A task of a multi-task job other than global rank 0: the same command (it
        joins rank 0's process group and follows rank 0's decisions, ``--force``
        included), its output in logs of its own; rank 0 keeps the attempt record."""
        out, err, _ = _log_paths(Path(self.run_dir), self.log_name, f"{env.job_id}_rank{env.global_rank}")
        out.parent.mkdir(parents=True, exist_ok=True)
        argv, cpus = self._with_threads(list(self.argv))
        rc = self._run_child(
            argv, out, err, cpus, f"job {env.job_id} rank {env.global_rank} on {socket.gethostname()}"
        )
        if rc != 0:
            raise RuntimeError(
                f"{Path(argv[1]).name} (rank {env.global_rank}) exited with code {rc}: {last_error_line(err)}"
            )
        return rc

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        proc = getattr(self, "_proc", None)
        if proc is not None:
            _stop_child(proc.pid)
        return submitit.helpers.DelayedSubmission(RunTask(self.argv, self.run_dir, self.log_name))

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}


@dataclass
class SlurmOptions:
    """sbatch options of every array task (None: the cluster's default)."""

    time: int = 24 * 60
    partition: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    gres: str | None = None
    account: str | None = None
    qos: str | None = None
    #: Seconds before the time limit at which SLURM sends USR2 (checkpoint + requeue).
    signal_delay_s: int = 90
    #: How often a run may be requeued after hitting the time limit (preemptions are unlimited).
    max_timeouts: int = 3
    #: One run over ``nodes`` x ``tasks_per_node`` processes (torch.distributed; the
    #: script reads its rank from submitit's environment).
    nodes: int = 1
    tasks_per_node: int = 1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SlurmOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: getattr(args, k) for k in names if getattr(args, k, None) is not None})

    def executor_parameters(self, job_name: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "job_name": job_name,
            "time": self.time,
            "signal_delay_s": self.signal_delay_s,
            "additional_parameters": {"requeue": True},
        }
        for key in ("partition", "mem", "cpus_per_task", "gres", "account", "qos"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        if self.nodes > 1:
            params["nodes"] = self.nodes
        if self.tasks_per_node > 1:
            params["ntasks_per_node"] = self.tasks_per_node
        return params


def submit_slurm(grid: Grid, runs: Sequence[Run], options: SlurmOptions | None = None) -> list[str]:
    """Submit ``runs`` as one SLURM job array (a plain job for a single run) with
    submitit, record the job ids in the grid's manifest, and return them."""
    if not runs:
        return []
    options = options or SlurmOptions()
    import submitit

    executor = submitit.SlurmExecutor(folder=grid.dir / "submitit", max_num_timeout=options.max_timeouts)
    executor.update_parameters(**options.executor_parameters(f"fastclip-{grid.kind}"))
    for run in runs:
        (run.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    try:
        with executor.batch():
            jobs = [executor.submit(RunTask(run.argv, str(run.run_dir), run.log_name)) for run in runs]
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as e:
        hint = (
            ""
            if os.environ.get("SLURM_CONF")
            else " (no SLURM configuration found; for a one-node cluster here: sudo scripts/slurm-local.sh start)"
        )
        raise SubmissionError(f"sbatch failed: {str(e).strip() or type(e).__name__}{hint}") from None
    records = {}
    for run, job in zip(runs, jobs):
        out, err, rec = _log_paths(run.run_dir, run.log_name, job.job_id)
        records[run.uid] = {
            "backend": "slurm",
            "job_id": job.job_id,
            "submitted": _now(),
            "argv": list(run.argv),
            "stdout": str(out),
            "stderr": str(err),
            "record": str(rec),
            "submitit_stdout": str(job.paths.stdout),
            "submitit_stderr": str(job.paths.stderr),
        }
    _record_jobs(grid, records)
    logger.debug(
        "submitted %d run(s) as SLURM job %s; manifest %s",
        len(jobs),
        jobs[0].job_id.split("_")[0],
        grid.manifest_path,
    )
    return [j.job_id for j in jobs]
