"""Grids of training and attack runs, on a SLURM cluster or on this machine.

A *grid* is the product ``datasets x models x methods x modes x seeds`` (for attacks:
``methods x modes x seeds x attacks`` over one trained model prefix). Each grid point
is one :class:`Run`: a command line of ``experiments/train.py`` (or
``experiments/attack.py``) and the run directory it writes to. ``all`` expands to
every registered method / mode / model; no seed means the paper's seeds
``[10**i for i in range(10)]``, so ``--method all --mode all`` is 6 x 3 x 10 = 180 runs.

Backends:

- ``slurm``: one job array per dispatch, through submitit (``SlurmExecutor.batch()``),
  one array task per run. The task is :class:`RunTask`: a plain-values callable
  (argv, run directory) that runs the script as a subprocess, so only strings are
  pickled, never models. ``--requeue`` is set and submitit asks SLURM for a signal
  (USR2) ``signal_delay_s`` before the time limit: on it, :meth:`RunTask.checkpoint`
  stops the script and submitit requeues the task, which then resumes from the run's
  own checkpoint (``train.py`` resumes by itself). A task requeued by the cluster
  (``scontrol requeue``, node failure) reruns the same pickle and resumes the same
  way. The script's stdout/stderr go to ``<run dir>/logs/<train|attack_X>_<job id>.{out,err}``,
  submitit's own logs to ``<grid dir>/submitit/``. Queued tasks import ``fastclip``
  from the environment they were submitted from: install the package (non-editable,
  ``pip install .``) if the source tree may change while jobs wait in the queue.
- ``local``: ``workers`` subprocesses at a time on this machine (default: one per
  GPU, else one per CPU core, each with ``cpus // workers`` threads), a tqdm bar over
  runs; a failed run is reported with the last error line of its log and the others
  go on.

One training run over several processes (:mod:`fastclip.pipeline.training.distributed`):
``--nodes N --tasks-per-node G`` makes each SLURM task a job of N x G tasks (global
rank 0 keeps the attempt record; the others log to ``..._<job id>_rank<r>.*``);
``--nproc-per-node G`` runs each local run under ``torchrun --standalone``.
:func:`~fastclip.pipeline.jobs.launch.check_processes` refuses impossible combinations before
anything is dispatched.

Idempotent and resumable: a run whose ``done_file`` exists (``DONE`` for training,
the attack's CSV for attacks) is skipped, and so is a run with a queued or running
job in any manifest of the same grid home (``<logdir>/grids/``); ``force`` reruns
finished runs (and passes ``--force`` to the script on the first attempt only, so a
requeued attempt resumes instead of starting over). Every dispatch is recorded in
the grid's manifest ``<grid home>/<grid name>/manifest.json`` (atomic writes; each
read-modify-write under an flock of ``manifest.lock`` beside it, so concurrent dispatches
from several processes keep every record; a job record is updated by its ``id``), which
:func:`grid_status` reads back: done / running / queued / failed / missing, the
epoch reached, and the last error line of a failed run.

Example::

    >>> args = train_submit_parser().parse_args(["--method", "all", "--mode", "wBN", "--seed", "1",
    ...                                          "--model", "SimpleConv", "--dataset", "mnist"])
    >>> grid = train_grid(args, script="experiments/train.py")
    >>> len(grid.runs), grid.runs[0].name
    (6, 'mnist/SimpleConv_models/method_orig_wBN_1')
    >>> print(format_status(grid_status(grid)))   # doctest: +SKIP

Modules, in import order: :mod:`~fastclip.pipeline.jobs.grid` (runs, grids, the manifest format),
:mod:`~fastclip.pipeline.jobs.manifest` (its locked writes), :mod:`~fastclip.pipeline.jobs.process` (a run's
child process and logs), :mod:`~fastclip.pipeline.jobs.slurm` (submitit, :class:`RunTask`, squeue /
sacct), :mod:`~fastclip.pipeline.jobs.local` (worker processes), :mod:`~fastclip.pipeline.jobs.status` (the
status table and the plan), :mod:`~fastclip.pipeline.jobs.submit` (the submit scripts' flags and
their grids) and :mod:`~fastclip.pipeline.jobs.launch` (:func:`dispatch`, :func:`submit_main`).
"""

from __future__ import annotations

from fastclip.pipeline.cli import OneLineErrorParser
from fastclip.pipeline.jobs.grid import (
    BACKENDS,
    DEFAULT_SEEDS,
    STATES,
    Grid,
    GridError,
    Run,
    SubmissionError,
    expand,
    load_manifest,
)
from fastclip.pipeline.jobs.launch import check_backend, default_backend, dispatch, submit_main
from fastclip.pipeline.jobs.local import default_workers, run_local
from fastclip.pipeline.jobs.manifest import _now, _record_jobs, _update_job
from fastclip.pipeline.jobs.process import last_error_line
from fastclip.pipeline.jobs.slurm import RunTask, SlurmOptions, slurm_job_states, submit_slurm
from fastclip.pipeline.jobs.status import Plan, RunStatus, format_status, grid_status, plan
from fastclip.pipeline.jobs.submit import (
    attack_grid,
    attack_submit_parser,
    parse_slurm_time,
    passthrough_argv,
    train_grid,
    train_submit_parser,
)

__all__ = [
    "DEFAULT_SEEDS",
    "BACKENDS",
    "STATES",
    "GridError",
    "SubmissionError",
    "Run",
    "Grid",
    "Plan",
    "RunStatus",
    "SlurmOptions",
    "RunTask",
    "expand",
    "passthrough_argv",
    "train_submit_parser",
    "attack_submit_parser",
    "train_grid",
    "attack_grid",
    "default_backend",
    "check_backend",
    "plan",
    "submit_slurm",
    "run_local",
    "grid_status",
    "format_status",
    "slurm_job_states",
    "last_error_line",
    "parse_slurm_time",
    "default_workers",
    "load_manifest",
    "dispatch",
    "OneLineErrorParser",
    "SUBMODULES",
]

#: The modules of the package, in import order (tests run their doctests).
SUBMODULES = ("grid", "manifest", "process", "slurm", "local", "status", "submit", "launch")
