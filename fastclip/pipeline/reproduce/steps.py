"""The chain's steps, in order, each run only where there is work for it.

Steps 1-2 (train, attack) leave the skipping of finished work to the submit scripts they run
(runs with DONE, attacks whose CSV exists); the others run only when an output is missing or
older than the files it is made from (:func:`up_to_date`, make's rule; for the tables, the runs'
best checkpoints among them: a replaced one makes results stale), or, for the plots and the
report, when the report on disk was made by other settings. Each step prints what it runs
or why it runs nothing, and returns the names of its parts that failed; :func:`run_steps` runs
those of ``--steps`` and collects the failures (a failed step does not stop the next ones).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastclip.pipeline.report import plot_clean_vs_certified, plot_robustness, publish, publish_targets
from fastclip.pipeline.reproduce.publishing import write_results
from fastclip.pipeline.reproduce.settings import (
    MODEL,
    STEPS,
    Settings,
    attack_commands,
    collect_command,
    curves_command,
    norms_command,
    train_command,
)
from fastclip.pipeline.reproduce.writer import (
    KEEP_END,
    KEEP_START,
    REPORT,
    SIGMA_METHOD,
    clean_vs_certified_paths,
    grid_values,
    plot_eps,
    report_command,
    robustness_paths,
    write_report,
)
from fastclip.pipeline.results import find_runs
from fastclip.pipeline.training.metrics import MetricsError

__all__ = ["Chain", "up_to_date", "finished_runs", "run_steps"]


@dataclass
class Chain:
    """What the steps work on: the settings, the parsed flags (``logdir`` absolute), the
    folder of the runs, the command that reproduces this invocation, and the grid's
    finished runs (found after the train step)."""

    settings: Settings
    args: argparse.Namespace
    parent: Path
    command: str
    runs: list = field(default_factory=list)

    @property
    def prefix(self) -> str:
        """The run folders' common prefix, as the submit scripts take it."""
        return f"{self.parent}/method_"


def _run(cmd: list[str], dry_run: bool) -> int:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    if dry_run:
        return 0
    t0 = time.perf_counter()
    code = subprocess.run(cmd, stdin=subprocess.DEVNULL).returncode
    print(f"[exit {code}, {time.perf_counter() - t0:.0f} s]", flush=True)
    return code


def up_to_date(outputs: list[Path], inputs: list[Path]) -> bool:
    """True when every output exists and none is older than the newest input (make's rule).

    Example::

        >>> up_to_date([Path("/nonexistent.csv")], [])
        False
    """
    if not all(p.exists() for p in outputs):
        return False
    newest = max((p.stat().st_mtime_ns for p in inputs), default=0)
    return min(p.stat().st_mtime_ns for p in outputs) >= newest


def finished_runs(parent: Path, s: Settings) -> list:
    """The grid's finished runs (``fastclip.pipeline.results.Run``; a method/mode 'all' takes every one found)."""
    return [
        r
        for r in find_runs(f"{parent}/method_")
        if ("all" in s.methods or r.method in s.methods)
        and ("all" in s.modes or r.mode in s.modes)
        and r.seed in s.seeds
        and (r.path / "DONE").exists()
    ]


def _make(
    name: str,
    outputs: list[Path],
    inputs: list[Path],
    cmd: list[str],
    dry_run: bool,
    missing: str = "no finished runs",
) -> int:
    """Run ``cmd`` unless it has no inputs yet or its outputs are up to date; its exit code (0 if not run)."""
    if not inputs:
        print(f"\n[{name}] nothing to do yet: {missing}", flush=True)
        return 0
    if up_to_date(outputs, inputs):
        print(f"\n[{name}] up to date: {', '.join(p.name for p in outputs)}", flush=True)
        return 0
    return _run(cmd, dry_run)


def train_step(c: Chain) -> list[str]:
    """batch_job_submit.py on the grid."""
    return ["train"] if _run(train_command(c.settings, c.args), c.args.dry_run) else []


def attack_step(c: Chain) -> list[str]:
    """batch_attack_submit.py per group of attacks (:func:`attack_commands`), every one run
    even after a failure."""
    if not (c.runs or c.args.dry_run):
        print("\n[attack] nothing to do yet: no finished runs", flush=True)
        return []
    codes = [_run(cmd, c.args.dry_run) for cmd in attack_commands(c.settings, c.args, c.prefix)]
    return ["attack"] if any(codes) else []


def collect_step(c: Chain) -> list[str]:
    """collect_attack_results.py when an attack CSV or a best checkpoint is newer than its tables."""
    attack_csvs = sorted(p for r in c.runs for p in r.path.glob("attack_*.csv"))
    outs = [c.parent / f"attack_results_{kind}.csv" for kind in ("runs", "summary", "wide")]
    # a checkpoint replaced since makes its run's results stale: collected again, they are left out
    ckpts = [r.path / "ckpt_best.pth" for r in c.runs if attack_csvs and (r.path / "ckpt_best.pth").exists()]
    code = _make(
        "collect", outs, attack_csvs + ckpts, collect_command(c.prefix), c.args.dry_run, "no attack results"
    )
    return ["collect"] if code else []


def norms_step(c: Chain) -> list[str]:
    """compute_trained_SVs.py when a best checkpoint is newer than the layer norms."""
    outs = [c.parent / "layer_norms.csv", c.parent / "layer_norms_runs.csv", c.parent / "layer_norms.png"]
    ckpts = [r.path / "ckpt_best.pth" for r in c.runs]
    code = _make("norms", outs, ckpts, norms_command(c.args.dataset, c.prefix), c.args.dry_run)
    return ["norms"] if code else []


def curves_step(c: Chain) -> list[str]:
    """plot_curves.py on the first seed's runs of each mode, and on its fastclip run alone."""
    seed = min(c.settings.seeds)
    by_mode: dict[str, list[Path]] = {}
    for r in c.runs:
        if r.seed == seed:
            by_mode.setdefault(r.mode, []).append(r.path)
    failed = []
    for mode, dirs in by_mode.items():
        out = c.parent / f"curves_{mode}.png"
        events = [p for d in dirs for p in d.glob("events.out.tfevents.*")]
        if _make(f"curves {mode}", [out], events, curves_command(dirs, out), c.args.dry_run):
            failed.append(f"curves {mode}")
        for d in dirs:  # the fastclip run alone: its sigma_1 curves at full height
            if d.name == f"method_{SIGMA_METHOD}_{mode}_{seed}":
                out = c.parent / f"sigma_{SIGMA_METHOD}_{mode}.png"
                events = list(d.glob("events.out.tfevents.*"))
                name = f"curves {SIGMA_METHOD} {mode}"
                if _make(name, [out], events, curves_command([d], out), c.args.dry_run):
                    failed.append(name)
    return failed


def _resettled(c: Chain) -> bool:
    # A report made by other settings (other seeds, radii, ...) is remade with its figures,
    # even where no file it is made from changed.
    report = c.parent / REPORT
    return report.exists() and report_command(report) != c.command


def plots_step(c: Chain, resettled: bool) -> list[str]:
    """The clean-vs-certified and robustness figures of every mode, from the collected results."""
    if c.args.dry_run:
        return []
    runs_csv = c.parent / "attack_results_runs.csv"
    if not c.runs or not runs_csv.exists():
        print("\n[plots] nothing to do yet: no collected attack results", flush=True)
        return []
    s = c.settings
    try:
        values = grid_values(c.parent, c.runs, s).values
        pngs, robust = clean_vs_certified_paths(c.parent, values, s), robustness_paths(c.parent, values)
        outs = [*pngs.values(), *robust.values()]
        title = f"{MODEL} on {c.args.dataset}"
        if not outs:
            none = "no certified accuracy at the plotted radii and no PGD results"
            print(f"\n[plots] nothing to do: {none}", flush=True)
        elif not resettled and up_to_date(outs, [runs_csv, *(r.path / "ckpt_best.pth" for r in c.runs)]):
            print(f"\n[plots] up to date: {', '.join(p.name for p in outs)}", flush=True)
        else:
            for mode, out in pngs.items():
                plot_clean_vs_certified(values, mode, out, plot_eps(s), title=title, seeds=s.seeds)
            for mode, out in robust.items():
                plot_robustness(values, mode, out, title=title, seeds=s.seeds)
            print(f"\n[plots] wrote {', '.join(p.name for p in outs)}", flush=True)
    except (OSError, ValueError, KeyError) as e:  # a damaged CSV or a full disk: one line
        print(f"\n[plots] failed: {e}", flush=True)
        return ["plots"]
    return []


def report_step(c: Chain, resettled: bool) -> list[str]:
    """``reproduction_report.md`` when a file it is made from is newer, or the settings changed."""
    if c.args.dry_run:
        return []
    parent, path = c.parent, c.parent / REPORT
    inputs = [
        p
        for p in (
            parent / "attack_results_runs.csv",
            parent / "layer_norms_runs.csv",
            parent / "layer_norms.png",
            *parent.glob("curves_*.png"),
            *parent.glob(f"sigma_{SIGMA_METHOD}_*.png"),
            *parent.glob("clean_vs_certified_*.png"),
            *parent.glob("robustness_*.png"),
            *(r.path / "metrics.csv" for r in c.runs),
            # a replaced checkpoint makes results stale: the report names and leaves them out
            *(r.path / "ckpt_best.pth" for r in c.runs),
        )
        if p.exists()
    ]
    if not c.runs:
        print("\n[report] nothing to do yet: no finished runs", flush=True)
    elif not resettled and up_to_date([path], inputs):
        print(f"\n[report] up to date: {path.name}", flush=True)
    else:
        try:
            stale = write_report(parent, c.runs, c.settings, c.args, path, c.command)
            for reason in stale:
                print(f"[report] warning: stale result: {reason}; left out of the tables", flush=True)
            print(f"\n[report] wrote {path}", flush=True)
        except (MetricsError, OSError, ValueError, KeyError) as e:  # a damaged file, a full disk
            print(f"\n[report] failed: {e}", flush=True)
            return ["report"]
    return []


def publish_step(c: Chain) -> list[str]:
    """With ``--publish DIR``: the report and its figures into DIR, its tables into DIR/results.md."""
    args = c.args
    if args.publish is None:
        if set(args.steps) != set(STEPS):
            print("\n[publish] nothing to do: no --publish DIR given", flush=True)
        return []
    path, name = c.parent / REPORT, args.publish_name or f"reproduce_{args.dataset}"
    if args.dry_run:
        print(f"\n[publish] would copy {path.name} and its figures to {args.publish}", flush=True)
        return []
    if not path.exists():
        print(f"\n[publish] nothing to do yet: no {path.name}", flush=True)
        return []
    try:
        targets = publish_targets(path, args.publish, name)
        written = []
        if not up_to_date(list(targets.values()), list(targets)):
            written = publish(path, args.publish, name, keep=(KEEP_START, KEEP_END))
        # results.md is checked on its own: another report's publish may have rewritten it,
        # and one published before results.md existed gets its section now
        results = write_results(targets[path], args.publish, name)
        written += [results] if results is not None else []
        if written:
            print(f"\n[publish] wrote {', '.join(map(str, written))}", flush=True)
        else:
            print(f"\n[publish] up to date: {targets[path]}", flush=True)
    except OSError as e:
        print(f"\n[publish] failed: {e}", flush=True)
        return ["publish"]
    return []


def run_steps(c: Chain) -> list[str]:
    """Run the steps of ``c.args.steps`` in the chain's order; returns the names of those that failed."""
    steps = c.args.steps
    failed = train_step(c) if "train" in steps else []
    c.runs = finished_runs(c.parent, c.settings)
    later: list[tuple[str, Callable[[Chain], list[str]]]] = [
        ("attack", attack_step),
        ("collect", collect_step),
        ("norms", norms_step),
        ("curves", curves_step),
    ]
    for name, step in later:
        if name in steps:
            failed += step(c)
    resettled = _resettled(c)
    if "plots" in steps:
        failed += plots_step(c, resettled)
    if "report" in steps:
        failed += report_step(c, resettled)
    if "publish" in steps:
        failed += publish_step(c)
    return failed
