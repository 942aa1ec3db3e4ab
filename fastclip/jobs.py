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
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import datetime as _dt
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import submitit

from fastclip.cli import OneLineErrorParser, int_at_least, output_dir_problem
from fastclip.io import atomic_write_json, clean_stale_temps

__all__ = [
    "DEFAULT_SEEDS", "BACKENDS", "STATES", "GridError", "SubmissionError", "Run", "Grid", "Plan", "RunStatus",
    "SlurmOptions", "RunTask", "expand", "passthrough_argv", "train_submit_parser", "attack_submit_parser",
    "train_grid", "attack_grid", "default_backend", "check_backend", "plan", "submit_slurm", "run_local",
    "grid_status", "format_status", "slurm_job_states", "last_error_line", "parse_slurm_time",
    "default_workers", "load_manifest", "dispatch", "OneLineErrorParser",
]

logger = logging.getLogger(__name__)

#: The paper's seeds, used when no ``--seed`` is given.
DEFAULT_SEEDS: list[int] = [10**i for i in range(10)]
BACKENDS = ("slurm", "local")
#: Run states of :func:`grid_status`, in table order.
STATES = ("done", "running", "queued", "failed", "missing")

# SLURM job states (squeue/sacct names) that mean "still going".
_SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "CONFIGURING",
                 "SPECIAL_EXIT"}
_SLURM_RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED", "RESIZING"}
_MANIFEST_VERSION = 1


class GridError(ValueError):
    """A grid that cannot be dispatched (unknown name, bad flag, nothing to attack...).
    Raised before anything is submitted; the command lines turn it into exit code 2."""


class SubmissionError(RuntimeError):
    """The scheduler refused or could not be asked (sbatch / squeue failed)."""


# -- grids ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One grid point: the command that computes it and where its results go.

    ``argv`` is the whole command (``argv[0]`` the Python interpreter); ``done_file``
    exists once the run finished; the script's logs go to ``run_dir/logs/<log_name>_*``.
    """

    name: str
    kind: str
    run_dir: Path
    argv: tuple[str, ...]
    done_file: Path
    log_name: str
    #: A file that must exist before the run can start (an attack needs a finished training run).
    requires: Path | None = None

    @property
    def uid(self) -> str:
        """Identifies the run across grids: two grids sharing a run share its jobs."""
        return str(self.done_file)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "run_dir": str(self.run_dir), "argv": list(self.argv),
                "done_file": str(self.done_file), "log_name": self.log_name,
                "requires": None if self.requires is None else str(self.requires)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Run":
        return cls(name=d["name"], kind=d["kind"], run_dir=Path(d["run_dir"]), argv=tuple(d["argv"]),
                   done_file=Path(d["done_file"]), log_name=d["log_name"],
                   requires=None if d.get("requires") is None else Path(d["requires"]))


@dataclass
class Grid:
    """The runs of one grid and ``home``, the directory holding the manifests of all
    grids over the same runs (``<logdir>/grids``)."""

    kind: str
    runs: list[Run]
    home: Path

    @property
    def name(self) -> str:
        """``<kind>-<10 hex digits of the runs' identity>``: the same runs give the same
        name whatever other flags (epochs, subsets) were passed."""
        digest = hashlib.sha1("\n".join(sorted(r.uid for r in self.runs)).encode()).hexdigest()[:10]
        return f"{self.kind}-{digest}"

    @property
    def dir(self) -> Path:
        return self.home / self.name

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    @classmethod
    def from_manifest(cls, path: str | os.PathLike) -> "Grid":
        """The grid recorded in a manifest written by a dispatch."""
        path = Path(path)
        m = load_manifest(path)
        if not m["runs"]:
            raise GridError(f"{path} records no runs; expected a manifest written by batch_job_submit.py "
                            f"or batch_attack_submit.py")
        return cls(kind=m["kind"], runs=[Run.from_json(e["run"]) for e in m["runs"].values()],
                   home=path.parent.parent)


def expand(values: Sequence[str] | str | None, choices: Sequence[str], what: str) -> list[str]:
    """``values`` with ``all`` replaced by every choice, duplicates dropped, order kept.

    Example::

        >>> expand(["all"], ["wBN", "noBN", "clipBN"], "mode")
        ['wBN', 'noBN', 'clipBN']
        >>> expand(["fastclip", "gouk"], ["orig", "fastclip", "gouk"], "method")
        ['fastclip', 'gouk']
        >>> expand(["fast"], ["orig", "fastclip"], "method")
        Traceback (most recent call last):
        ...
        fastclip.jobs.GridError: unknown method 'fast'; choose from orig, fastclip, all
    """
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for v in values:
        if v == "all":
            new = list(choices)
        elif v in choices:
            new = [v]
        else:
            raise GridError(f"unknown {what} {v!r}; choose from {', '.join([*choices, 'all'])}")
        out += [n for n in new if n not in out]
    return out


def _flag_of(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return (longs or action.option_strings)[0]


def _tokens(action: argparse.Action, value: Any) -> list[str]:
    """The command-line tokens that make ``action`` parse to ``value``."""
    flag = _flag_of(action)
    if isinstance(action, argparse.BooleanOptionalAction):
        no = [s for s in action.option_strings if s.startswith("--no-")]
        return [flag] if value else no[:1]
    if action.nargs == 0:  # store_true / store_false / store_const: presence is the value
        if isinstance(action, (argparse._CountAction, argparse._AppendConstAction)):  # noqa: SLF001
            raise TypeError(f"cannot pass {flag} ({type(action).__name__}) through to a run")
        return [flag]
    if isinstance(action, argparse._AppendAction):  # noqa: SLF001
        raise TypeError(f"cannot pass {flag} (append action) through to a run")
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def passthrough_argv(parser: argparse.ArgumentParser, args: argparse.Namespace, skip: Iterable[str] = (),
                     owners: Sequence[str] = ()) -> dict[str | None, list[str]]:
    """The flags of ``parser`` (a script's own parser) whose values in ``args`` differ from
    their defaults, as command-line tokens that reproduce them, so every flag given to
    a submit script reaches each run. Flags named ``--<owner>-...`` for an owner in
    ``owners`` (method-specific hyper-parameters) are returned under that owner's key,
    the others under ``None``. Positional arguments and the dests in ``skip`` are left out.

    Example::

        >>> p = argparse.ArgumentParser()
        >>> _ = p.add_argument("--epochs", type=int, default=None)
        >>> _ = p.add_argument("--force", action="store_true")
        >>> _ = p.add_argument("--gouk-n-iter", type=int, default=None)
        >>> passthrough_argv(p, p.parse_args(["--epochs", "2", "--force", "--gouk-n-iter", "3"]), owners=["gouk"])
        {None: ['--epochs', '2', '--force'], 'gouk': ['--gouk-n-iter', '3']}
    """
    skip = set(skip) | {"help"}
    out: dict[str | None, list[str]] = {None: []}
    for action in parser._actions:  # noqa: SLF001 - argparse has no public action list
        if not action.option_strings or action.dest in skip or action.dest is argparse.SUPPRESS:
            continue
        if not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = _flag_of(action)
        owner = next((o for o in owners if flag.startswith(f"--{o}-")), None)
        out.setdefault(owner, []).extend(_tokens(action, value))
    return out


_seed = int_at_least(0, "an integer seed")


def parse_slurm_time(text: str | int) -> int:
    """A SLURM time limit (``minutes``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``) in whole minutes, rounded up (submitit counts in minutes).

    Example::

        >>> parse_slurm_time("90"), parse_slurm_time("1:30:00"), parse_slurm_time("2-00"), parse_slurm_time("0:30")
        (90, 90, 2880, 1)
    """
    s = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise argparse.ArgumentTypeError(
            f"expected a SLURM time (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]), got {s!r}")
    days, a, b, c = m.groups()
    if days is not None:
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:
        seconds = int(a) * 60 + int(b)
    else:
        seconds = int(a) * 60
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive time limit, got {s!r}")
    return math.ceil(seconds / 60)


def _add_dispatch_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dispatch")
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="slurm: one job array; local: worker processes here (default: slurm if sbatch is on PATH)")
    g.add_argument("--workers", type=int_at_least(1), default=None,
                   help="local: runs at a time (default: one per GPU, else one per CPU core)")
    g.add_argument("--dry-run", action="store_true", help="print what would be submitted and stop")
    g.add_argument("--status", action="store_true", help="print the grid's status table and stop")
    g = parser.add_argument_group("SLURM (sbatch options of every array task)")
    g.add_argument("--partition", default=None)
    g.add_argument("--time", type=parse_slurm_time, default=parse_slurm_time("24:00:00"),
                   help="time limit per run (minutes or [D-]HH:MM:SS); the run is signalled "
                        "90 s before, checkpoints and is requeued (default 24:00:00)")
    g.add_argument("--mem", default=None, help="memory per run, e.g. 16G (default: the cluster's DefMemPerCPU)")
    g.add_argument("--cpus-per-task", type=int_at_least(1), default=None)
    g.add_argument("--gres", default=None, help="e.g. gpu:1")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)


#: Dests of the grid axes: expanded by the dispatcher, never passed through as they are.
_TRAIN_GRID_DESTS = {"dataset", "model", "method", "mode", "seed", "logdir", "data_dir"}
_ATTACK_GRID_DESTS = {"dataset", "model_prefix", "method", "mode", "seed", "attack", "data_dir"}
_DISPATCH_DESTS = {"backend", "workers", "dry_run", "status", "partition", "time", "mem", "cpus_per_task",
                   "gres", "account", "qos"}


def train_submit_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The flags of ``experiments/batch_job_submit.py``: every flag of ``train.py``
    (``fastclip.training.get_args_parser`` as a parent), with ``--dataset --model
    --method --mode --seed`` taking several values or ``all``, plus the dispatch and
    SLURM flags.

    Example::

        python batch_job_submit.py --method fastclip --model ResNet18 --seed 1 --mode wBN
        python batch_job_submit.py --method all --model ResNet18 --mode all   # 6 x 3 x 10 seeds
    """
    from fastclip import training

    train = training.get_args_parser(add_help=False)
    axes = {a.dest: a for a in train._actions}  # noqa: SLF001
    p = OneLineErrorParser(
        prog="batch_job_submit.py", parents=[train], conflict_handler="resolve", add_help=add_help,
        description="Train a grid (datasets x models x methods x modes x seeds) of train.py runs "
                    "as a SLURM job array or with local worker processes; finished runs are skipped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("grid (several values or 'all')")
    g.add_argument("--dataset", nargs="+", default=["cifar"], metavar="NAME",
                   help=f"{', '.join(axes['dataset'].choices)} or all")
    g.add_argument("--model", nargs="+", default=[axes["model"].default], metavar="NAME",
                   help=f"{', '.join(axes['model'].choices)} or all")
    g.add_argument("--method", nargs="+", default=[axes["method"].default], metavar="NAME",
                   help=f"{', '.join(axes['method'].choices)} or all")
    g.add_argument("--mode", nargs="+", default=[axes["mode"].default], metavar="NAME",
                   help=f"{', '.join(axes['mode'].choices)} or all")
    g.add_argument("--seed", nargs="+", type=_seed, default=None,
                   help="seeds (default: 10**i for i in 0..9)")
    _add_dispatch_arguments(p)
    return p


def attack_submit_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The arguments of ``experiments/batch_attack_submit.py``: those of ``attack.py``
    (``fastclip.attacks.get_args_parser`` as a parent; positional ``dataset`` and
    ``model_prefix``), with ``--method --mode --seed --attack`` taking several values or
    ``all``, plus the dispatch and SLURM flags.

    Example::

        python batch_attack_submit.py cifar logs/cifar/ResNet18_models/method_ --method fastclip \\
            --mode wBN --attack pgd --model ResNet18 --seed 1
    """
    from fastclip import attacks
    from fastclip.methods import MODES, available
    from fastclip.models import available as available_models

    parent = attacks.get_args_parser(add_help=False)
    p = OneLineErrorParser(
        prog="batch_attack_submit.py", parents=[parent], conflict_handler="resolve", add_help=add_help,
        description="Attack every trained run of a grid (methods x modes x seeds x attacks) under a "
                    "model prefix, one attack.py per run, as a SLURM job array or locally.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("grid (several values or 'all')")
    g.add_argument("--method", nargs="+", default=["all"], metavar="NAME", help=f"{', '.join(available())} or all")
    g.add_argument("--mode", nargs="+", default=["all"], metavar="NAME", help=f"{', '.join(MODES)} or all")
    g.add_argument("--attack", nargs="+", default=["pgd"], metavar="NAME",
                   help=f"{', '.join(attacks.available())} or all")
    g.add_argument("--seed", nargs="+", type=_seed, default=None,
                   help="seeds (default: every seed trained under the prefix)")
    g.add_argument("--model", choices=available_models(), default=None,
                   help="the model the runs were trained with (checked by attack.py)")
    _add_dispatch_arguments(p)
    return p


def _abspath(path: str) -> str:
    # abspath drops a trailing slash, which a model prefix such as "logs/x/" needs.
    out = os.path.abspath(os.path.expanduser(path))
    return out + os.sep if path.endswith(os.sep) and not out.endswith(os.sep) else out


def train_grid(args: argparse.Namespace, script: str | os.PathLike) -> Grid:
    """The runs of ``script`` (``experiments/train.py``) that ``args`` (parsed by
    :func:`train_submit_parser`) describe. Every point is checked the way train.py
    checks it (``fastclip.training.resolve``) and its run directory computed with
    ``fastclip.training.run_dir_for``; raises :class:`GridError` on the first bad point."""
    from fastclip import training
    from fastclip.methods import available

    train = training.get_args_parser(add_help=False)
    axes = {a.dest: a for a in train._actions}  # noqa: SLF001
    datasets = expand(args.dataset, axes["dataset"].choices, "dataset")
    models = expand(args.model, axes["model"].choices, "model")
    methods = expand(args.method, axes["method"].choices, "method")
    modes = expand(args.mode, axes["mode"].choices, "mode")
    seeds = list(dict.fromkeys(args.seed)) if args.seed else list(DEFAULT_SEEDS)
    logdir = _abspath(args.logdir)
    try:
        extra = passthrough_argv(train, args, skip=_TRAIN_GRID_DESTS | _DISPATCH_DESTS, owners=available())
    except TypeError as e:
        raise GridError(str(e)) from None
    for owner, tokens in extra.items():
        if owner is not None and owner not in methods:
            raise GridError(f"{tokens[0]} is a hyper-parameter of method {owner!r}, which is not in the grid "
                            f"({', '.join(methods)})")
    data_dir = ["--data-dir", _abspath(args.data_dir)] if args.data_dir else []
    runs = []
    for dataset, model, method, mode, seed in itertools.product(datasets, models, methods, modes, seeds):
        cli = ["--dataset", dataset, "--model", model, "--method", method, "--mode", mode, "--seed", str(seed),
               "--logdir", logdir, *data_dir, *extra[None], *extra.get(method, [])]
        try:
            cfg = training.resolve(training.config_from_args(train.parse_args(cli)))
        except training.ConfigError as e:
            raise GridError(f"{dataset}/{model}/{method}/{mode}/seed {seed}: {e}") from None
        run_dir = training.run_dir_for(cfg)
        runs.append(Run(name=str(run_dir.relative_to(logdir)), kind="train", run_dir=run_dir,
                        argv=(os.path.abspath(sys.executable), str(Path(script).resolve()), *cli),
                        done_file=run_dir / training.DONE, log_name="train"))
    return Grid(kind="train", runs=runs, home=Path(logdir) / "grids")


def _attack_params(args: argparse.Namespace, attack: str) -> dict[str, Any]:
    # The parameters attack.py names its CSV after (fastclip.attacks.attack_file_name).
    if attack == "pgd":
        return {"eps": list(args.eps), "n_steps": args.n_steps, "step_size": args.step_size,
                "rand_init": args.rand_init}
    return {"c": args.cw_c, "confidence": args.cw_confidence, "max_iter": args.cw_max_iter,
            "binary_search_steps": args.cw_binary_search_steps, "learning_rate": args.cw_lr}


def attack_grid(args: argparse.Namespace, script: str | os.PathLike) -> Grid:
    """The runs of ``script`` (``experiments/attack.py``) that ``args`` (parsed by
    :func:`attack_submit_parser`) describe: one per (method, mode, seed, attack) whose
    trained run ``<model_prefix><method>_<mode>_<seed>`` exists. Without ``--seed``, the
    seeds found under the prefix. Raises :class:`GridError` when the prefix matches no
    finished training run."""
    from fastclip import attacks, results
    from fastclip.methods import MODES, available

    methods = expand(args.method, available(), "method")
    modes = expand(args.mode, MODES, "mode")
    names = expand(args.attack, attacks.available(), "attack")
    prefix = _abspath(args.model_prefix)
    if args.seed:
        seeds = list(dict.fromkeys(args.seed))
    else:
        seeds = sorted({r.seed for r in results.find_runs(prefix) if r.method in methods and r.mode in modes})
    parent_parser = attacks.get_args_parser(add_help=False)
    try:
        extra = passthrough_argv(parent_parser, args, skip=_ATTACK_GRID_DESTS | _DISPATCH_DESTS)[None]
    except TypeError as e:
        raise GridError(str(e)) from None
    data_dir = ["--data-dir", _abspath(args.data_dir)] if args.data_dir else []
    runs, points = [], {}
    for method, mode, seed, attack in itertools.product(methods, modes, seeds, names):
        run_dir = Path(f"{prefix}{method}_{mode}_{seed}")
        points[run_dir] = results.Run(run_dir, method, mode, seed)
        csv = attacks.attack_file_name(attack, _attack_params(args, attack), args.n_examples)
        cli = [args.dataset, prefix, "--method", method, "--mode", mode, "--attack", attack, "--seed", str(seed),
               *data_dir, *extra]
        runs.append(Run(name=f"{run_dir.name} {attack}", kind="attack", run_dir=run_dir,
                        argv=(os.path.abspath(sys.executable), str(Path(script).resolve()), *cli),
                        done_file=run_dir / csv, log_name=f"attack_{attack}", requires=run_dir / "DONE"))
    finished = [run for d, run in points.items() if (d / "DONE").exists()]
    if not finished:
        looked = f"{prefix}<{'|'.join(methods)}>_<{'|'.join(modes)}>_<{'|'.join(map(str, seeds)) or 'seed'}>"
        raise GridError(f"model prefix {args.model_prefix!r} matches no finished training run "
                        f"(looked for {looked} with a DONE file; {results.describe_runs(prefix)})")
    # A run of another dataset or model would fail in every job: refuse the grid now instead.
    problem = results.check_runs(finished, dataset=args.dataset, model=args.model)
    if problem:
        raise GridError(problem)
    return Grid(kind="attack", runs=runs, home=results.runs_parent(prefix) / "grids")


def default_backend() -> str:
    """``slurm`` when ``sbatch`` is on PATH, else ``local``."""
    return "slurm" if shutil.which("sbatch") else "local"


def check_backend(backend: str | None) -> str:
    """The backend to use (``None`` -> :func:`default_backend`); ``slurm`` needs ``sbatch``."""
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise GridError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "slurm" and not shutil.which("sbatch"):
        raise GridError("--backend slurm needs sbatch on PATH, which was not found; use --backend local "
                        "(or start a local cluster: scripts/slurm-local.sh start)")
    return backend


# -- manifest ---------------------------------------------------------------------------------------
# Threads of one process share the lock below; processes (two grids over the same runs
# launched at once, a status call) share the flock of the grid's lock file. An flock is
# held by an open file description, so threads would exclude each other too, but the
# threading lock keeps a process's own writers from queueing on the kernel.
_manifest_lock = threading.Lock()


@contextlib.contextmanager
def _locked_manifest(grid: Grid) -> Iterator[None]:
    """Exclusive access to the grid's manifest for one read-modify-write."""
    grid.dir.mkdir(parents=True, exist_ok=True)
    with _manifest_lock, open(grid.dir / "manifest.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """A grid manifest (``{"kind", "runs": {uid: {"run": Run.to_json(), "jobs": [...]}}}``);
    an empty one if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return {"version": _MANIFEST_VERSION, "kind": None, "runs": {}}
    try:
        m = json.loads(path.read_text())
        if not isinstance(m.get("runs"), dict):
            raise ValueError("no 'runs' mapping")
    except (ValueError, OSError) as e:
        raise GridError(f"{path} is not a grid manifest ({e})") from None
    return m


def _record_jobs(grid: Grid, records: dict[str, dict[str, Any]]) -> None:
    """Add one job record per run uid to the grid's manifest (and every run of the grid).
    A record without an ``id`` gets one (:func:`_update_job` finds a record by it)."""
    with _locked_manifest(grid):
        # Temps of manifest writes killed part-way (their writer is gone).
        clean_stale_temps(grid.dir)
        m = load_manifest(grid.manifest_path)
        m["kind"] = grid.kind
        m.setdefault("created", _now())
        for run in grid.runs:
            entry = m["runs"].setdefault(run.uid, {"jobs": []})
            entry["run"] = run.to_json()
            if run.uid in records:
                records[run.uid].setdefault("id", uuid.uuid4().hex)
                entry["jobs"].append(records[run.uid])
        atomic_write_json(grid.manifest_path, m)


def _update_job(grid: Grid, uid: str, record_id: str, **changes: Any) -> None:
    """Update the job record ``record_id`` of run ``uid``: by id, not position, since
    another process may have appended its own record since this one was written."""
    with _locked_manifest(grid):
        m = load_manifest(grid.manifest_path)
        jobs = m["runs"].get(uid, {}).get("jobs", [])
        job = next((j for j in jobs if j.get("id") == record_id), None)
        if job is None:
            logger.warning("%s: no job record %s of %s to update", grid.manifest_path, record_id, uid)
            return
        job.update(changes)
        atomic_write_json(grid.manifest_path, m)


def _latest_jobs(grid: Grid) -> dict[str, dict[str, Any]]:
    """The most recent job of each run of the grid, over every manifest in its home
    (a run dispatched by another, overlapping grid counts)."""
    wanted = {r.uid for r in grid.runs}
    latest: dict[str, dict[str, Any]] = {}
    paths = sorted(grid.home.glob("*/manifest.json")) if grid.home.is_dir() else []
    for path in paths:
        try:
            m = load_manifest(path)
        except GridError as e:
            logger.warning("ignoring %s", e)
            continue
        for uid, entry in m["runs"].items():
            if uid in wanted and entry.get("jobs"):
                job = entry["jobs"][-1]
                if uid not in latest or job.get("submitted", "") >= latest[uid].get("submitted", ""):
                    latest[uid] = job
    return latest


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


# -- logs -------------------------------------------------------------------------------------------
_ERROR_RE = re.compile(r"(Error|Exception|error:|Traceback|Killed|CANCELLED|TIME LIMIT|OOM|out of memory)")


def last_error_line(path: str | os.PathLike | None, max_bytes: int = 256_000) -> str:
    """The last line of a log that reads like an error (``...Error: ...``, ``train.py:
    error: ...``, SLURM's ``CANCELLED``/``TIME LIMIT``), else its last non-empty line; ""
    for a missing or empty file. Progress-bar redraws (``\\r``) count as line breaks."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    for ln in reversed(lines):
        if _ERROR_RE.search(ln) and not ln.startswith("Traceback"):
            return ln
    return lines[-1] if lines else ""


def _log_paths(run_dir: Path, log_name: str, tag: str) -> tuple[Path, Path, Path]:
    base = run_dir / "logs" / f"{log_name}_{tag}"
    return base.with_suffix(".out"), base.with_suffix(".err"), base.with_suffix(".json")


def _metrics_rows(run_dir: Path) -> int | None:
    path = run_dir / "metrics.csv"
    try:
        with open(path) as f:
            return max(0, sum(1 for line in f if line.strip()) - 1)
    except OSError:
        return None


# -- the task a SLURM array element runs ------------------------------------------------------------
def _child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    # Several runs share a node: one BLAS/OpenMP pool per core they were given, not per core
    # of the node. The user's own OMP_NUM_THREADS wins.
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _stop_child(pid: int, timeout: float = 60.0) -> None:
    """SIGTERM a child, reap it, SIGKILL it after ``timeout`` s. Called from submitit's
    signal handler while ``Popen.wait`` holds the Popen's lock in the interrupted frame,
    so this uses os.kill/os.waitpid rather than Popen methods (which would block on it)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


class RunTask(submitit.helpers.Checkpointable):
    """What a SLURM array task runs: ``argv`` as a subprocess, its stdout/stderr appended
    to ``<run_dir>/logs/<log_name>_<job id>.{out,err}``, and one entry per attempt in
    ``<log_name>_<job id>.json`` (raw SLURM job id, start, end, return code).

    Plain strings only, so the pickle stays small and readable by any later version.
    On preemption or timeout submitit calls :meth:`checkpoint`, which stops the script
    (it writes atomically, so at worst the current epoch is lost) and resubmits the same
    command; the script resumes from its checkpoint. ``--force`` is honoured on the first
    attempt only, so a requeued forced run resumes instead of starting over.
    """

    def __init__(self, argv: Sequence[str], run_dir: str, log_name: str) -> None:
        self.argv = [str(a) for a in argv]
        self.run_dir = str(run_dir)
        self.log_name = str(log_name)

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        out, err, rec_path = _log_paths(Path(self.run_dir), self.log_name, env.job_id)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            record = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            record = {"job_id": env.job_id, "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "attempts": []}
        argv = self.argv if not record["attempts"] else [a for a in self.argv if a != "--force"]
        cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE")
        # The task's CPU count as an explicit thread count (recorded in config.json), so a
        # requeued attempt on another node computes with the same count.
        if self.log_name == "train" and cpus and "--threads" not in argv:
            argv = [*argv, "--threads", cpus]
        attempt = {"started": _now(), "host": socket.gethostname(),
                   "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "argv": argv}
        record["attempts"].append(attempt)
        atomic_write_json(rec_path, record)
        with open(out, "a") as fo, open(err, "a") as fe:
            fo.write(f"== {_now()} job {env.job_id} attempt {len(record['attempts'])} on {attempt['host']}: "
                     f"{shlex.join(argv)}\n")
            fo.flush()
            self._proc = subprocess.Popen(argv, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                          env=_child_env(int(cpus) if cpus else None))
            rc = self._proc.wait()
        attempt.update(ended=_now(), returncode=rc)
        atomic_write_json(rec_path, record)
        if rc != 0:
            raise RuntimeError(f"{Path(argv[1]).name} exited with code {rc}: {last_error_line(err)}")
        return rc

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        proc = getattr(self, "_proc", None)
        if proc is not None:
            _stop_child(proc.pid)
        return submitit.helpers.DelayedSubmission(RunTask(self.argv, self.run_dir, self.log_name))

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}


# -- planning and dispatch --------------------------------------------------------------------------
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


def _local_alive(job: dict[str, Any]) -> bool:
    if job.get("returncode") is not None or job.get("host") != socket.gethostname() or not job.get("pid"):
        return False
    try:
        cmdline = Path(f"/proc/{job['pid']}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return job["argv"][1].encode() in cmdline  # the pid was not reused by another program


def grid_status(grid: Grid) -> list[RunStatus]:
    """The state of every run of the grid: ``running``/``queued`` (a live job in any
    manifest of the grid home, asked of SLURM or of /proc), ``done`` (its done file
    exists), ``failed`` (a job ended without finishing it, or it stopped part-way with
    no job recorded; ``detail`` is the last error line of its log), or ``missing``."""
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
        elif run.requires is not None and not run.requires.exists():
            row.state, row.detail = "missing", f"waiting for {run.requires}"
        elif job:
            row.state = "failed"
            s = states.get(job["job_id"], "") if job["backend"] == "slurm" else ""
            why = (last_error_line(job.get("stderr")) or last_error_line(job.get("submitit_stderr"))
                   or last_error_line(run.run_dir / "train.log" if run.kind == "train" else None))
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
    table = [header] + [(r.run.name, r.state, "" if r.epoch is None else str(r.epoch), r.job, r.detail)
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = []
    for row in table:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
                 row[3].ljust(widths[3]), row[4]]
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
    """Split the grid into runs to submit and runs to skip: ``done`` (unless ``force``),
    ``running``/``queued`` (never submitted twice), or an attack whose training run is
    not finished."""
    out = Plan()
    for row in grid_status(grid):
        if row.state in ("running", "queued"):
            out.skipped.append((row.run, f"{row.state} ({row.job})"))
        elif row.state == "done" and not force:
            out.skipped.append((row.run, "done"))
        elif row.run.requires is not None and not row.run.requires.exists():
            out.skipped.append((row.run, f"no finished training run ({row.run.requires} missing)"))
        else:
            if row.detail.startswith("cannot ask SLURM"):
                raise SubmissionError(f"{row.detail}; not submitting {row.run.name} (it may be queued already)")
            out.submit.append(row.run)
    return out


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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SlurmOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: getattr(args, k) for k in names if getattr(args, k, None) is not None})

    def executor_parameters(self, job_name: str) -> dict[str, Any]:
        params: dict[str, Any] = {"job_name": job_name, "time": self.time, "signal_delay_s": self.signal_delay_s,
                                  "additional_parameters": {"requeue": True}}
        for key in ("partition", "mem", "cpus_per_task", "gres", "account", "qos"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        return params


def submit_slurm(grid: Grid, runs: Sequence[Run], options: SlurmOptions | None = None) -> list[str]:
    """Submit ``runs`` as one SLURM job array (a plain job for a single run) with
    submitit, record the job ids in the grid's manifest, and return them."""
    if not runs:
        return []
    options = options or SlurmOptions()
    executor = submitit.SlurmExecutor(folder=grid.dir / "submitit", max_num_timeout=options.max_timeouts)
    executor.update_parameters(**options.executor_parameters(f"fastclip-{grid.kind}"))
    for run in runs:
        (run.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    try:
        with executor.batch():
            jobs = [executor.submit(RunTask(run.argv, str(run.run_dir), run.log_name)) for run in runs]
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as e:
        hint = ("" if os.environ.get("SLURM_CONF")
                else " (for scripts/slurm-local.sh's cluster: export SLURM_CONF=/tmp/fastclip-slurm/slurm.conf)")
        raise SubmissionError(f"sbatch failed: {str(e).strip() or type(e).__name__}{hint}") from None
    records = {}
    for run, job in zip(runs, jobs):
        out, err, rec = _log_paths(run.run_dir, run.log_name, job.job_id)
        records[run.uid] = {"backend": "slurm", "job_id": job.job_id, "submitted": _now(), "argv": list(run.argv),
                            "stdout": str(out), "stderr": str(err), "record": str(rec),
                            "submitit_stdout": str(job.paths.stdout), "submitit_stderr": str(job.paths.stderr)}
    _record_jobs(grid, records)
    logger.debug("submitted %d run(s) as SLURM job %s; manifest %s", len(jobs), jobs[0].job_id.split("_")[0],
                grid.manifest_path)
    return [j.job_id for j in jobs]


def default_workers() -> int:
    """One local worker per GPU, else one per CPU core this process may use."""
    import torch

    return torch.cuda.device_count() or len(os.sched_getaffinity(0))


def run_local(grid: Grid, runs: Sequence[Run], workers: int | None = None,
              progress: bool = True) -> list[tuple[Run, str]]:
    """Run ``runs`` here, ``workers`` subprocesses at a time (each with ``cpus // workers``
    threads; with GPUs, worker ``i`` gets ``--device cuda:i`` unless the command sets a
    device), a tqdm bar over runs. A failed run is logged with the last error line of
    its stderr and the others go on. Returns ``[(run, error line)]`` of the failures."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    if not runs:
        return []
    workers = workers or default_workers()
    import torch

    n_gpus = torch.cuda.device_count()
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    slots = list(range(workers))
    slot_lock = threading.Lock()
    # The pid makes the log names of two dispatches started in the same second differ.
    stamp = f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"

    def one(run: Run) -> tuple[Run, int, str]:
        with slot_lock:
            slot = slots.pop()
        try:
            argv = list(run.argv)
            if n_gpus and "--device" not in argv:
                argv += ["--device", f"cuda:{slot % n_gpus}"]
            # An explicit thread count (recorded in config.json), the same for every run
            # of a dispatch: cpus // workers unless the user passed --threads.
            if run.kind == "train" and "--threads" not in argv:
                argv += ["--threads", str(threads)]
            out, err, _ = _log_paths(run.run_dir, run.log_name, f"local-{stamp}")
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as fo, open(err, "a") as fe:
                fo.write(f"== {_now()} local run on {socket.gethostname()}: {shlex.join(argv)}\n")
                fo.flush()
                proc = subprocess.Popen(argv, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                        env=_child_env(threads))
                record_id = uuid.uuid4().hex
                _record_jobs(grid, {run.uid: {"id": record_id, "backend": "local", "pid": proc.pid,
                                              "host": socket.gethostname(), "submitted": _now(), "argv": argv,
                                              "returncode": None, "stdout": str(out), "stderr": str(err)}})
                rc = proc.wait()
            _update_job(grid, run.uid, record_id, returncode=rc, ended=_now())
            return run, rc, "" if rc == 0 else last_error_line(err)
        finally:
            with slot_lock:
                slots.append(slot)

    failures = []
    with logging_redirect_tqdm(), ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(runs), desc=f"{grid.kind} runs", unit="run", disable=not progress) as bar:
        for fut in as_completed([pool.submit(one, r) for r in runs]):
            run, rc, why = fut.result()
            if rc != 0:
                failures.append((run, why))
                logger.error("FAILED %s (exit %d): %s", run.name, rc, why)
            bar.update(1)
            bar.set_postfix(failed=len(failures))
    return failures


def submit_main(args: argparse.Namespace, parser: argparse.ArgumentParser,
                build_grid: Callable[[argparse.Namespace], Grid]) -> int:
    """The body of a submit script: build the grid ``args`` describe, choose the backend
    and :func:`dispatch`. Bad input (an unknown name, a prefix matching no finished run,
    no scheduler) ends the process through ``parser.error`` (exit code 2) before
    anything is submitted."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        grid = build_grid(args)
        backend = None if args.status else check_backend(args.backend)
        if not args.status:
            problem = _output_problem(grid)
            if problem:
                raise GridError(problem)
    except GridError as e:
        parser.error(str(e))
    return dispatch(grid, args, backend, report=functools.partial(print, flush=True))


def _output_problem(grid: Grid) -> str | None:
    """Why the grid's manifest or a run's log directory could not be written, or None.
    Checked before anything is dispatched (a run failing on its logs would fail late)."""
    problem = output_dir_problem(grid.dir, "grid directory")
    for run in grid.runs:
        problem = (problem or output_dir_problem(run.run_dir, "run directory")
                   or output_dir_problem(run.run_dir / "logs", "run directory"))
    return problem


def dispatch(grid: Grid, args: argparse.Namespace, backend: str | None,
             report: Callable[[str], None] = logger.info) -> int:
    """What the submit scripts do once the grid is built: with ``args.status`` report the
    status table; otherwise plan (skip done / live runs), report the plan, and unless
    ``args.dry_run`` submit to ``backend``. ``report`` receives the text meant for the
    user (the scripts pass ``print``). Returns the exit code: 0, or 1 if a local run
    failed or SLURM refused."""
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
            report(f"submitted {len(ids)} run(s) as SLURM job {ids[0].split('_')[0]}: {' '.join(ids)}\n"
                   f"status: {_status_hint(grid)}")
            return 0
        failures = run_local(grid, todo.submit, workers=args.workers)
    except SubmissionError as e:
        report(f"error: {e}")
        return 1
    report(f"{len(todo.submit) - len(failures)} run(s) finished, {len(failures)} failed"
           + "".join(f"\n  FAILED {r.name}: {why}" for r, why in failures))
    return 1 if failures else 0


def _status_hint(grid: Grid) -> str:
    return f"python experiments/status.py --manifest {shlex.quote(str(grid.manifest_path))}"
