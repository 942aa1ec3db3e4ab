"""What a submit script does once its grid is built: choose the backend, plan, submit or run."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shlex
import shutil
from collections.abc import Callable

import torch

from fastclip.pipeline.cli import output_dir_problem
from fastclip.pipeline.jobs.grid import BACKENDS, Grid, GridError, SubmissionError
from fastclip.pipeline.jobs.local import Interrupted, run_local
from fastclip.pipeline.jobs.slurm import SlurmOptions, submit_slurm, use_slurm_config
from fastclip.pipeline.jobs.status import format_status, grid_status, plan

logger = logging.getLogger(__name__)


def default_backend() -> str:
    """``slurm`` when ``sbatch`` is on PATH, else ``local``."""
    return "slurm" if shutil.which("sbatch") else "local"


def check_backend(backend: str | None) -> str:
    """The backend to use (``None`` -> :func:`default_backend`); ``slurm`` needs ``sbatch``."""
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise GridError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "slurm" and not shutil.which("sbatch"):
        raise GridError(
            "--backend slurm needs sbatch on PATH, which was not found; use --backend local "
            "(or start a local cluster: scripts/slurm-local.sh start)"
        )
    return backend


#: sbatch options that mean nothing to the local backend (dest, flag); refused there
#: rather than ignored, so that a run never goes without the limit the user asked for.
_SLURM_ONLY = (
    ("partition", "--partition"),
    ("time", "--time"),
    ("mem", "--mem"),
    ("cpus_per_task", "--cpus-per-task"),
    ("gres", "--gres"),
    ("account", "--account"),
    ("qos", "--qos"),
)


def check_processes(args: argparse.Namespace, backend: str) -> None:
    """Refuse (:class:`GridError`) what cannot run as asked: the multi-process flags of the
    other backend, more local processes than CPUs (or GPUs), --sync-bn without CUDA."""
    nodes, tasks = getattr(args, "nodes", 1), getattr(args, "tasks_per_node", 1)
    nproc, workers = getattr(args, "nproc_per_node", 1), args.workers
    if backend == "local":
        given = [flag for dest, flag in _SLURM_ONLY if getattr(args, dest, None) is not None]
        if given:
            raise GridError(
                f"{given[0]} is a SLURM option and needs --backend slurm; the local backend would ignore it"
            )
    if backend == "local" and (nodes > 1 or tasks > 1):
        raise GridError(
            f"--nodes {nodes} --tasks-per-node {tasks} are SLURM options; with --backend local use --nproc-per-node"
        )
    if backend == "slurm" and nproc > 1:
        raise GridError(
            f"--nproc-per-node {nproc} is for --backend local; on SLURM use --tasks-per-node (one task per GPU)"
        )
    gpus = torch.cuda.device_count()
    if backend == "local" and nproc > 1:
        if gpus and nproc > gpus:
            raise GridError(f"--nproc-per-node {nproc} but this machine has {gpus} GPU(s)")
        if gpus and (workers or 1) > 1:
            raise GridError(
                f"--nproc-per-node {nproc} with --workers {workers}: each process takes cuda:<local rank>, "
                "so runs on GPUs go one at a time (--workers 1)"
            )
        cpus = len(os.sched_getaffinity(0))
        if not gpus and nproc * (workers or 1) > cpus:
            raise GridError(
                f"--nproc-per-node {nproc} x --workers {workers or 1} = {nproc * (workers or 1)} processes "
                f"but this machine has {cpus} CPU(s)"
            )
    if getattr(args, "sync_bn", False):
        if getattr(args, "device", "auto") == "cpu":
            raise GridError(
                "--sync-bn needs CUDA (SyncBatchNorm runs on GPU modules only) but --device is cpu"
            )
        if backend == "local" and not gpus:
            raise GridError(
                "--sync-bn needs CUDA (SyncBatchNorm runs on GPU modules only); this machine has no GPU"
            )
        if backend == "slurm" and "gpu" not in (args.gres or ""):
            raise GridError(
                "--sync-bn needs CUDA (SyncBatchNorm runs on GPU modules only): ask SLURM for GPUs (--gres gpu:N)"
            )


# -- manifest ---------------------------------------------------------------------------------------


def submit_main(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    build_grid: Callable[[argparse.Namespace], Grid],
) -> int:
    """The body of a submit script: build the grid ``args`` describe, choose the backend
    and :func:`dispatch`. Bad input (an unknown name, a prefix matching no finished run,
    no scheduler) ends the process through ``parser.error`` (exit code 2) before
    anything is submitted; Ctrl-C (or SIGTERM to a local dispatch) with one line and
    exit code 130 (143), the local runs stopped."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        grid = build_grid(args)
        backend = None if args.status else check_backend(args.backend)
        if backend is not None:
            check_processes(args, backend)
        if not args.status:
            problem = _output_problem(grid)
            if problem:
                raise GridError(problem)
    except GridError as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted before anything was dispatched\n")
    try:
        return dispatch(grid, args, backend, report=functools.partial(print, flush=True))
    except Interrupted as e:  # the children are stopped already
        parser.exit(e.exit_code, f"{parser.prog}: {e.line}\n")
    except KeyboardInterrupt:  # while planning or submitting: nothing runs yet
        parser.exit(130, f"{parser.prog}: interrupted; nothing is left running: rerun the same command\n")


def _output_problem(grid: Grid) -> str | None:
    """Why the grid's manifest or a run's log directory could not be written, or None.
    Checked before anything is dispatched (a run failing on its logs would fail late)."""
    problem = output_dir_problem(grid.dir, "grid directory")
    for run in grid.runs:
        problem = (
            problem
            or output_dir_problem(run.run_dir, "run directory")
            or output_dir_problem(run.run_dir / "logs", "run directory")
        )
    return problem


def dispatch(
    grid: Grid, args: argparse.Namespace, backend: str | None, report: Callable[[str], None] = logger.info
) -> int:
    """What the submit scripts do once the grid is built: with ``args.status`` report the
    status table; otherwise plan (skip done / live runs), report the plan, and unless
    ``args.dry_run`` submit to ``backend``. ``report`` receives the text meant for the
    user (the scripts pass ``print``). Returns the exit code: 0, or 1 if a local run
    failed or SLURM refused."""
    if backend == "slurm":
        report(use_slurm_config())
    if args.status:
        report(format_status(grid_status(grid)))
        return 0
    try:
        todo = plan(grid, force=getattr(args, "force", False))
        report(todo.describe(backend or "?"))
        if args.dry_run or not todo.submit:
            return 0
        if backend == "slurm":
            ids = submit_slurm(grid, todo.submit, SlurmOptions.from_args(args))
            report(
                f"submitted {len(ids)} run(s) as SLURM job {ids[0].split('_')[0]}: {' '.join(ids)}\n"
                f"status: {_status_hint(grid)}"
            )
            return 0
        failures = run_local(
            grid, todo.submit, workers=args.workers, nproc_per_node=getattr(args, "nproc_per_node", 1)
        )
    except SubmissionError as e:
        report(f"error: {e}")
        return 1
    report(
        f"{len(todo.submit) - len(failures)} run(s) finished, {len(failures)} failed"
        + "".join(f"\n  FAILED {r.name}: {why}" for r, why in failures)
    )
    return 1 if failures else 0


def _status_hint(grid: Grid) -> str:
    return f"python experiments/status.py --manifest {shlex.quote(str(grid.manifest_path))}"
