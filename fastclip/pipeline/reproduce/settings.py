"""The reproduction's settings and the command lines of experiments/ it runs with them.

:data:`PRESETS` holds the values of every knob per ``--size``; :func:`settings_from_args` applies
the flags given on top of them and :func:`check_settings` refuses, before any step starts, what a
dispatched script would refuse later. :func:`train_command`, :func:`attack_commands` and the
others build the commands of the chain's steps; :func:`command_line` the one command that
reproduces a whole invocation (the report's "Made by" line).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from fastclip.pipeline.attacks import CERTIFY_EPS
from fastclip.pipeline.cli import output_dir_problem, script_path
from fastclip.pipeline.jobs import GridError, expand
from fastclip.pipeline.methods import MODES, available

__all__ = [
    "MODEL",
    "STEPS",
    "LINF_ATTACKS",
    "L2_ATTACKS",
    "PRESETS",
    "Settings",
    "settings_from_args",
    "check_settings",
    "augment_for",
    "train_command",
    "attack_commands",
    "collect_command",
    "norms_command",
    "curves_command",
    "command_line",
]

MODEL = "SimpleConv"
STEPS = ("train", "attack", "collect", "norms", "curves", "plots", "report", "publish")
#: Attacks run at the L-inf radii ``--eps`` (CW takes none) and at the L2 radii ``--l2-eps``.
LINF_ATTACKS = ("pgd", "cw")
L2_ATTACKS = ("pgdl2", "certify")

#: Preset values of every knob; a flag given on the command line wins.
PRESETS: dict[str, dict] = {
    "full": dict(
        methods=["all"],
        modes=["all"],
        seeds=[1, 10, 100],
        epochs=3,
        train_subset=None,
        test_subset=None,
        batch_size=None,
        n_examples=1000,
        eps=[0.02, 0.05, 0.1],
        pgd_steps=50,
        cw_max_iter=100,
        attacks=["pgd", "cw", "certify"],
        l2_eps=list(CERTIFY_EPS),
    ),
    "tiny": dict(
        methods=["fastclip", "miyato"],
        modes=["wBN"],
        seeds=[1],
        epochs=1,
        train_subset=256,
        test_subset=64,
        batch_size=64,
        n_examples=32,
        eps=[0.02, 0.05],
        pgd_steps=3,
        cw_max_iter=5,
        attacks=["pgd", "cw", "certify"],
        l2_eps=[0.05, 0.1],
    ),
}


@dataclass
class Settings:
    """The preset with the command line's overrides applied."""

    methods: list[str]
    modes: list[str]
    seeds: list[int]
    epochs: int
    train_subset: int | None
    test_subset: int | None
    batch_size: int | None
    n_examples: int | None
    eps: list[float]
    pgd_steps: int
    cw_max_iter: int
    attacks: list[str]
    l2_eps: list[float]


def settings_from_args(args: argparse.Namespace) -> Settings:
    """``PRESETS[args.size]`` with every flag that was given replacing its preset value.

    Example::

        >>> s = settings_from_args(argparse.Namespace(size="tiny", epochs=2, seeds=None))
        >>> (s.methods, s.epochs, s.seeds)
        (['fastclip', 'miyato'], 2, [1])
    """
    values = dict(PRESETS[args.size])
    for key in values:
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    return Settings(**values)


def check_settings(parser: argparse.ArgumentParser, s: Settings, args: argparse.Namespace) -> None:
    """``parser.error`` (one line, exit code 2) on a value a dispatched script would refuse."""
    for flag, value in (
        ("--epochs", s.epochs),
        ("--pgd-steps", s.pgd_steps),
        ("--cw-max-iter", s.cw_max_iter),
        ("--workers", args.workers),
        ("--train-subset", s.train_subset),
        ("--test-subset", s.test_subset),
        ("--batch-size", s.batch_size),
        ("--n-examples", s.n_examples),
    ):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    for flag, values in (("--eps", s.eps), ("--l2-eps", s.l2_eps)):
        bad = [e for e in values if not e > 0]
        if bad:
            parser.error(f"{flag} must be > 0, got {bad[0]:g}")
    try:  # the names batch_job_submit.py would refuse, refused before it starts
        expand(s.methods, available(), "method (--methods)")
        expand(s.modes, MODES, "mode (--modes)")
    except GridError as e:
        parser.error(str(e))
    for flag, path in (("--logdir", args.logdir), ("--publish", args.publish)):
        problem = output_dir_problem(path, flag) if path is not None else None
        if problem:
            parser.error(problem)
    if args.publish_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.publish_name):
        parser.error(
            f"--publish-name must be a file name (letters, digits, . _ -), got {args.publish_name!r}"
        )


def _opt(flag: str, value) -> list[str]:
    if value is None:
        return []
    return [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]


def augment_for(args: argparse.Namespace) -> str:
    """``--augment`` if given, else the dataset's default (see the flag's help)."""
    if args.augment is not None:
        return args.augment
    return "none" if args.dataset == "fashion-mnist" else "paper"


def train_command(s: Settings, args: argparse.Namespace) -> list[str]:
    """batch_job_submit.py on the local backend for the whole grid."""
    return [
        sys.executable,
        str(script_path("batch_job_submit", "batch_job_submit")),
        "--dataset",
        args.dataset,
        "--model",
        MODEL,
        *_opt("--method", s.methods),
        *_opt("--mode", s.modes),
        *_opt("--seed", s.seeds),
        *_opt("--epochs", s.epochs),
        *_opt("--train-subset", s.train_subset),
        *_opt("--test-subset", s.test_subset),
        *_opt("--batch-size", s.batch_size),
        "--augment",
        augment_for(args),
        *_opt("--data-dir", args.data_dir),
        "--logdir",
        args.logdir,
        "--backend",
        "local",
        *_opt("--workers", args.workers),
    ]


def attack_commands(s: Settings, args: argparse.Namespace, prefix: str) -> list[list[str]]:
    """batch_attack_submit.py on every trained run of the grid, cheapest first: one command for
    the certified accuracy at the L2 radii, one for the attacks at the L-inf radii (PGD, CW), one
    for PGD L2 at the L2 radii; none for a group with no attack asked for."""
    common = [
        "--model",
        MODEL,
        *_opt("--method", s.methods),
        *_opt("--mode", s.modes),
        *_opt("--seed", s.seeds),
    ]
    tail = [
        *_opt("--n-examples", s.n_examples),
        *_opt("--data-dir", args.data_dir),
        "--backend",
        "local",
        *_opt("--workers", args.workers),
    ]
    script = [
        sys.executable,
        str(script_path("batch_attack_submit", "batch_attack_submit")),
        args.dataset,
        prefix,
    ]
    commands = []
    # certify first: one forward pass per image where an attack takes tens of gradient steps,
    # so a grid interrupted in this step already has every certified cell
    for group, eps in ((("certify",), s.l2_eps), (LINF_ATTACKS, s.eps), (("pgdl2",), s.l2_eps)):
        attacks = [a for a in s.attacks if a in group]
        if not attacks:
            continue
        steps = _opt("--n-steps", s.pgd_steps) if any(a.startswith("pgd") for a in attacks) else []
        cw = _opt("--cw-max-iter", s.cw_max_iter) if "cw" in attacks else []
        commands.append([*script, *common, "--attack", *attacks, *_opt("--eps", eps), *steps, *cw, *tail])
    return commands


def collect_command(prefix: str) -> list[str]:
    """collect_attack_results.py on every method and mode under ``prefix``."""
    return [
        sys.executable,
        str(script_path("collect_attack_results", "collect_attack_results")),
        prefix,
        "--method",
        "all",
        "--mode",
        "all",
    ]


def norms_command(dataset: str, prefix: str) -> list[str]:
    """compute_trained_SVs.py on every run under ``prefix``."""
    return [
        sys.executable,
        str(script_path("compute_trained_SVs", "compute_trained_svs")),
        dataset,
        "all",
        prefix,
        "--model",
        MODEL,
    ]


def curves_command(dirs: list[Path], out: Path) -> list[str]:
    """plot_curves.py on the runs ``dirs``, one PNG ``out``."""
    return [
        sys.executable,
        str(script_path("plot_curves", "plot_curves")),
        *map(str, dirs),
        "--out",
        str(out),
    ]


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command that reproduces ``args``: ``--dataset`` and ``--size``, then every flag whose
    value is not its default (``--steps`` and ``--dry-run`` left out: they choose what runs, not
    the numbers).

    Example::

        >>> from fastclip.pipeline.cli.reproduce import get_args_parser
        >>> p = get_args_parser()
        >>> command_line(p, p.parse_args(["--dataset", "mnist", "--size", "full", "--epochs", "5"]))
        'python experiments/reproduce.py --dataset mnist --size full --epochs 5'
    """
    words = ["python", "experiments/reproduce.py", "--dataset", args.dataset, "--size", args.size]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "steps", "dry_run", "dataset", "size"):
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(value, bool):
            words += [flag] if value else []
        else:
            words += [flag, *map(str, value if isinstance(value, list) else [value])]
    return shlex.join(words)
