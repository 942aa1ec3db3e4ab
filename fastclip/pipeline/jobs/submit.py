"""The submit scripts' flags and the grids of runs they describe."""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fastclip.pipeline import attack_options, attacks, results, training
from fastclip.pipeline.cli import OneLineErrorParser, int_at_least, int_seed
from fastclip.pipeline.jobs.grid import BACKENDS, DEFAULT_SEEDS, Grid, GridError, Run, expand
from fastclip.pipeline.methods import MODES, available
from fastclip.pipeline.models import available as available_models


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


def passthrough_argv(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    skip: Iterable[str] = (),
    owners: Sequence[str] = (),
) -> dict[str | None, list[str]]:
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


_seed = int_seed


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
            f"expected a SLURM time (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]), got {s!r}"
        )
    days, a, b, c = m.groups()
    if days is not None:
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:
        seconds = int(a) * 60 + int(b)
    else:
        seconds = int(a) * 60
    if seconds <= 0 or seconds > _MAX_TIME_DAYS * 86400:
        raise argparse.ArgumentTypeError(
            f"expected a positive time limit of at most {_MAX_TIME_DAYS} days, got {s!r}"
        )
    return math.ceil(seconds / 60)


#: No array task is meant to run longer than a year (SLURM's own limits are far below).
_MAX_TIME_DAYS = 365
parse_slurm_time.valid_range = f"1 minute..{_MAX_TIME_DAYS} days"  # type: ignore[attr-defined]


def _add_dispatch_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dispatch")
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="slurm: one job array; local: worker processes here (default: slurm if sbatch is on PATH)",
    )
    g.add_argument(
        "--workers",
        type=int_at_least(1, maximum=4096),
        default=None,
        help="local: runs at a time (default: one per GPU, else one per CPU core)",
    )
    g.add_argument("--dry-run", action="store_true", help="print what would be submitted and stop")
    g.add_argument("--status", action="store_true", help="print the grid's status table and stop")
    g = parser.add_argument_group("SLURM (sbatch options of every array task)")
    g.add_argument("--partition", default=None)
    g.add_argument(
        "--time",
        type=parse_slurm_time,
        # Absent unless given, not 24:00:00: the local backend must tell a --time given from
        # one left out (SlurmOptions supplies the 24 hours).
        default=argparse.SUPPRESS,
        help="time limit per run (minutes or [D-]HH:MM:SS); the run is signalled "
        "90 s before, checkpoints and is requeued (default 24:00:00)",
    )
    g.add_argument(
        "--mem", default=None, help="memory per run, e.g. 16G (default: the cluster's DefMemPerCPU)"
    )
    g.add_argument("--cpus-per-task", type=int_at_least(1, maximum=4096), default=None)
    g.add_argument("--gres", default=None, help="e.g. gpu:1")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)


#: Dests of the grid axes: expanded by the dispatcher, never passed through as they are.
_TRAIN_GRID_DESTS = {"dataset", "model", "method", "mode", "seed", "logdir", "data_dir"}
_ATTACK_GRID_DESTS = {"dataset", "model_prefix", "method", "mode", "seed", "attack", "data_dir"}
_DISPATCH_DESTS = {
    "nodes",
    "tasks_per_node",
    "nproc_per_node",
    "backend",
    "workers",
    "dry_run",
    "status",
    "partition",
    "time",
    "mem",
    "cpus_per_task",
    "gres",
    "account",
    "qos",
}


def _grid_parser(
    parent: argparse.ArgumentParser,
    prog: str,
    add_help: bool,
    description: str,
) -> tuple[argparse.ArgumentParser, Any]:
    """A submit script's parser over a script's own (``parent``) and its group of grid axes."""
    p = OneLineErrorParser(
        prog=prog,
        parents=[parent],
        conflict_handler="resolve",
        add_help=add_help,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    return p, p.add_argument_group("grid (several values or 'all')")


def _add_axis(group: Any, flag: str, default: list[str], choices: Sequence[str]) -> None:
    group.add_argument(flag, nargs="+", default=default, metavar="NAME", help=f"{', '.join(choices)} or all")


def train_submit_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The flags of ``experiments/batch_job_submit.py``: every flag of ``train.py``
    (``fastclip.pipeline.training.get_args_parser`` as a parent), with ``--dataset --model
    --method --mode --seed`` taking several values or ``all``, plus the dispatch and
    SLURM flags.

    Example::

        python batch_job_submit.py --method fastclip --model ResNet18 --seed 1 --mode wBN
        python batch_job_submit.py --method all --model ResNet18 --mode all   # 6 x 3 x 10 seeds
    """
    train = training.get_args_parser(add_help=False)
    axes = {a.dest: a for a in train._actions}  # noqa: SLF001
    p, g = _grid_parser(
        train,
        "batch_job_submit.py",
        add_help,
        "Train a grid (datasets x models x methods x modes x seeds) of train.py runs as a SLURM "
        "job array or with local worker processes; finished runs are skipped.",
    )
    _add_axis(g, "--dataset", ["cifar"], axes["dataset"].choices)
    for name in ("model", "method", "mode"):
        _add_axis(g, f"--{name}", [axes[name].default], axes[name].choices)
    g.add_argument("--seed", nargs="+", type=_seed, default=None, help="seeds (default: 10**i for i in 0..9)")
    _add_dispatch_arguments(p)
    _add_process_arguments(p)
    return p


def _add_process_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "one run over several processes (torch.distributed; --batch-size is per process)"
    )
    g.add_argument(
        "--nodes", type=int_at_least(1), default=1, help="slurm: nodes per run (one multi-task job per run)"
    )
    g.add_argument(
        "--tasks-per-node",
        type=int_at_least(1),
        default=1,
        help="slurm: tasks (processes) per node, one per GPU; pass --gres gpu:N for the GPUs",
    )
    g.add_argument(
        "--nproc-per-node",
        type=int_at_least(1),
        default=1,
        help="local: run each run under torchrun with this many processes",
    )


def attack_submit_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The arguments of ``experiments/batch_attack_submit.py``: those of ``attack.py``
    (``fastclip.pipeline.attack_options.get_args_parser`` as a parent; positional ``dataset`` and
    ``model_prefix``), with ``--method --mode --seed --attack`` taking several values or
    ``all``, plus the dispatch and SLURM flags.

    Example::

        python batch_attack_submit.py cifar logs/cifar/ResNet18_models/method_ --method fastclip \\
            --mode wBN --attack pgd --model ResNet18 --seed 1
    """
    p, g = _grid_parser(
        attack_options.get_args_parser(add_help=False),
        "batch_attack_submit.py",
        add_help,
        "Attack every trained run of a grid (methods x modes x seeds x attacks) under a model "
        "prefix, one attack.py per run, as a SLURM job array or locally.",
    )
    _add_axis(g, "--method", ["all"], available())
    _add_axis(g, "--mode", ["all"], MODES)
    _add_axis(g, "--attack", ["pgd"], attacks.available(grid=True))
    g.add_argument(
        "--seed",
        nargs="+",
        type=_seed,
        default=None,
        help="seeds (default: every seed trained under the prefix)",
    )
    g.add_argument(
        "--model",
        choices=available_models(),
        default=None,
        help="the model the runs were trained with (checked by attack.py)",
    )
    _add_dispatch_arguments(p)
    return p


def _abspath(path: str) -> str:
    # abspath drops a trailing slash, which a model prefix such as "logs/x/" needs.
    out = os.path.abspath(os.path.expanduser(path))
    return out + os.sep if path.endswith(os.sep) and not out.endswith(os.sep) else out


def train_grid(args: argparse.Namespace, script: str | os.PathLike) -> Grid:
    """The runs of ``script`` (``experiments/train.py``) that ``args`` (parsed by
    :func:`train_submit_parser`) describe. Every point is checked the way train.py
    checks it (``fastclip.pipeline.training.resolve``) and its run directory computed with
    ``fastclip.pipeline.training.run_dir_for``; raises :class:`GridError` on the first bad point."""
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
            raise GridError(
                f"{tokens[0]} is a hyper-parameter of method {owner!r}, which is not in the grid "
                f"({', '.join(methods)})"
            )
    data_dir = ["--data-dir", _abspath(args.data_dir)] if args.data_dir else []
    runs = []
    for dataset, model, method, mode, seed in itertools.product(datasets, models, methods, modes, seeds):
        cli = [
            "--dataset",
            dataset,
            "--model",
            model,
            "--method",
            method,
            "--mode",
            mode,
            "--seed",
            str(seed),
            "--logdir",
            logdir,
            *data_dir,
            *extra[None],
            *extra.get(method, []),
        ]
        try:
            cfg = training.resolve(training.config_from_args(train.parse_args(cli)))
        except training.ConfigError as e:
            raise GridError(f"{dataset}/{model}/{method}/{mode}/seed {seed}: {e}") from None
        run_dir = training.run_dir_for(cfg)
        runs.append(
            Run(
                name=str(run_dir.relative_to(logdir)),
                kind="train",
                run_dir=run_dir,
                argv=(os.path.abspath(sys.executable), str(Path(script).resolve()), *cli),
                done_file=run_dir / training.DONE,
                log_name="train",
            )
        )
    return Grid(kind="train", runs=runs, home=Path(logdir) / "grids")


def attack_grid(args: argparse.Namespace, script: str | os.PathLike) -> Grid:
    """The runs of ``script`` (``experiments/attack.py``) that ``args`` (parsed by
    :func:`attack_submit_parser`) describe: one per (method, mode, seed, attack) whose
    trained run ``<model_prefix><method>_<mode>_<seed>`` exists. Without ``--seed``, the
    seeds found under the prefix. Raises :class:`GridError` when the prefix matches no
    finished training run."""

    methods = expand(args.method, available(), "method")
    modes = expand(args.mode, MODES, "mode")
    names = expand(args.attack, attacks.available(grid=True), "attack")
    prefix = _abspath(args.model_prefix)
    if args.seed:
        seeds = list(dict.fromkeys(args.seed))
    else:
        seeds = sorted({r.seed for r in results.find_runs(prefix) if r.method in methods and r.mode in modes})
    parent_parser = attack_options.get_args_parser(add_help=False)
    try:
        extra = passthrough_argv(parent_parser, args, skip=_ATTACK_GRID_DESTS | _DISPATCH_DESTS)[None]
    except TypeError as e:
        raise GridError(str(e)) from None
    data_dir = ["--data-dir", _abspath(args.data_dir)] if args.data_dir else []
    runs, points = [], {}
    for method, mode, seed, attack in itertools.product(methods, modes, seeds, names):
        run_dir = Path(f"{prefix}{method}_{mode}_{seed}")
        points[run_dir] = results.Run(run_dir, method, mode, seed)
        csv = attack_options.attack_file_name(
            attack,
            attack_options.attack_params(args, attack),
            args.n_examples,
            getattr(args, "checkpoint", "best"),
        )
        cli = [
            args.dataset,
            prefix,
            "--method",
            method,
            "--mode",
            mode,
            "--attack",
            attack,
            "--seed",
            str(seed),
            *data_dir,
            *extra,
        ]
        runs.append(
            Run(
                name=f"{run_dir.name} {attack}",
                kind="attack",
                run_dir=run_dir,
                argv=(os.path.abspath(sys.executable), str(Path(script).resolve()), *cli),
                done_file=run_dir / csv,
                log_name=f"attack_{attack}",
                requires=run_dir / "DONE",
            )
        )
    finished = [run for d, run in points.items() if (d / "DONE").exists()]
    if not finished:
        looked = f"{prefix}<{'|'.join(methods)}>_<{'|'.join(modes)}>_<{'|'.join(map(str, seeds)) or 'seed'}>"
        raise GridError(
            f"model prefix {args.model_prefix!r} matches no finished training run "
            f"(looked for {looked} with a DONE file; {results.describe_runs(prefix)})"
        )
    # A run of another dataset or model would fail in every job: refuse the grid now instead.
    problem = results.check_runs(finished, dataset=args.dataset, model=args.model)
    if problem:
        raise GridError(problem)
    return Grid(kind="attack", runs=runs, home=results.runs_parent(prefix) / "grids")
