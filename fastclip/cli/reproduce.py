"""``make reproduce``: the paper's SimpleConv comparison, run end to end by the project's own commands.

The chain (each step one real command of experiments/, printed before it runs):

1. ``train``:   batch_job_submit.py  - the grid methods x modes x seeds of SimpleConv runs, local backend;
2. ``attack``:  batch_attack_submit.py - PGD L-inf (``--eps``), CW and the certified L2 accuracy from the
   model's measured Lipschitz bound (``--l2-eps``; also PGD L2 with ``--attacks pgdl2``) on the first
   ``--n-examples`` test images;
3. ``collect``: collect_attack_results.py - per-run and mean +- std attack tables;
4. ``norms``:   compute_trained_SVs.py - exact-grade sigma_1 of every layer, CSV + bar chart;
5. ``curves``:  plot_curves.py - accuracy and sigma_1 training curves of the first seed, one PNG
   per mode of every method (``curves_<mode>.png``) and of the fastclip run (``sigma_fastclip_<mode>.png``);
6. ``plots``:   ``clean_vs_certified_<mode>.png`` - clean against certified L2 accuracy per method, and
   ``robustness_<mode>.png`` - accuracy under PGD L-inf and PGD L2 against the radius;
7. ``report``:  ``reproduction_report.md`` beside the runs - the command that made it and the date, one
   table per mode (a row per method: clean accuracy, every attack and radius, certified accuracy,
   the network Lipschitz bound L, sigma_1 of every layer; mean +- std over seeds, a cell with fewer
   seeds than the grid says so, an unmeasured one reads ``missing``), wall time per method, figures;
8. ``publish``: with ``--publish DIR`` only - the report as ``DIR/<name>.md`` and the figures it shows
   as ``DIR/img/<name>_<figure>.png``, its links rewritten to them (``--publish-name``, default
   ``reproduce_<dataset>``); text between ``<!-- paper-comparison -->`` and
   ``<!-- /paper-comparison -->`` in an earlier ``DIR/<name>.md`` is kept.

Resumable: steps 1-2 skip finished work themselves (runs with DONE, attacks whose CSV exists), and
steps 3-8 run only when an output is missing or older than the files it is made from, so rerunning a
finished reproduction does nothing and an interrupted one continues where it stopped.

Sizes: ``--size full`` (default) is the paper's grid on Fashion-MNIST (6 methods x 3 modes x 3 seeds);
``--size tiny`` is a smoke test of the whole chain in a couple of minutes (2 methods, 1 mode, 1 seed,
small subsets, 1 epoch). Every preset value can be overridden by its flag. Outputs go to
``<logdir>/<dataset>/SimpleConv_models/``.

Examples::

    python experiments/reproduce.py --epochs 6                 # what `make reproduce EPOCHS=6` runs
    python experiments/reproduce.py --size tiny --dataset mnist --data-dir /tmp/data --logdir /tmp/logs
    python experiments/reproduce.py --dry-run                  # print the commands only
    python experiments/reproduce.py --dataset mnist --epochs 5 --steps collect norms curves plots \
        report publish --publish docs                          # remake the report, copy it to docs/
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastclip.attacks import CERTIFY_EPS
from fastclip.cli import (
    OneLineErrorParser,
    int_at_least,
    int_seed,
    output_dir_problem,
    parse_args,
    path_arg,
    positive_float,
    script_path,
)
from fastclip.io import atomic_write_text
from fastclip.jobs import GridError, expand
from fastclip.methods import MODES, available
from fastclip.report import (
    BOUND,
    NOT_APPLICABLE,
    ROBUSTNESS_ATTACKS,
    mode_tables,
    plot_clean_vs_certified,
    plot_robustness,
    publish,
    publish_targets,
    report_values,
)
from fastclip.results import find_runs, method_order
from fastclip.training.config import INT_RANGES
from fastclip.training.metrics import MetricsError, read_metrics

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger("reproduce")

MODEL = "SimpleConv"
STEPS = ("train", "attack", "collect", "norms", "curves", "plots", "report", "publish")
#: Attacks run at the L-inf radii ``--eps`` (CW takes none) and at the L2 radii ``--l2-eps``.
LINF_ATTACKS = ("pgd", "cw")
L2_ATTACKS = ("pgdl2", "certify")
REPORT = "reproduction_report.md"
#: Certified radii the clean-vs-certified figure shows (those of them the grid measured; all of
#: the grid's L2 radii when it measured none of them): the paper's 36/255 and 0.1.
PLOT_EPS = (36 / 255, 0.1)
#: The fastclip run of the first seed gets a figure of its own per mode (sigma_fastclip_<mode>.png).
SIGMA_METHOD = "fastclip"
#: Markers of the hand-written part of a published report, kept when it is published again.
KEEP_START, KEEP_END = "<!-- paper-comparison -->", "<!-- /paper-comparison -->"

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


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="reproduce.py",
        description=__doc__.split("\n\n")[0],
        add_help=add_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--size",
        choices=sorted(PRESETS),
        default=os.environ.get("FASTCLIP_REPRODUCE_SIZE", "full"),
        help="preset: full (the paper's grid) or tiny (smoke test); env FASTCLIP_REPRODUCE_SIZE",
    )
    p.add_argument("--dataset", choices=("fashion-mnist", "mnist", "cifar"), default="fashion-mnist")
    p.add_argument(
        "--data-dir", type=path_arg, default=None, help="dataset root (default: the data module's default)"
    )
    p.add_argument(
        "--augment",
        choices=("paper", "none"),
        default=None,
        help="training augmentation (default: paper, the authors' pipeline, for mnist and cifar; none "
        "for fashion-mnist, which the authors did not train on)",
    )
    p.add_argument(
        "--logdir",
        type=path_arg,
        default="logs/reproduce",
        help="runs go to <logdir>/<dataset>/SimpleConv_models/",
    )
    # The types of the flags the dispatched scripts take (train.py, attack.py), so a bad
    # value stops here, before any step runs.
    p.add_argument(
        "--workers",
        type=int_at_least(1, maximum=4096),
        default=None,
        help="parallel local runs (default: one per CPU core)",
    )
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="run only these steps")
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    p.add_argument(
        "--publish",
        type=path_arg,
        default=None,
        metavar="DIR",
        help="copy the report and its figures into DIR (e.g. docs; default: do not publish)",
    )
    p.add_argument(
        "--publish-name",
        default=None,
        metavar="NAME",
        help="DIR/NAME.md and DIR/img/NAME_<figure>.png (default: reproduce_<dataset>)",
    )
    g = p.add_argument_group("preset overrides (default: the --size preset)")
    g.add_argument("--methods", nargs="+", default=None, metavar="NAME", help="methods, or all")
    g.add_argument("--modes", nargs="+", default=None, metavar="NAME", help="wBN, noBN, clipBN, or all")
    g.add_argument("--seeds", nargs="+", type=int_seed, default=None, metavar="N")
    g.add_argument("--epochs", type=int_at_least(1, maximum=INT_RANGES["epochs"][1]), default=None)
    g.add_argument("--train-subset", type=int_at_least(1), default=None, help="first N training images")
    g.add_argument(
        "--test-subset",
        type=int_at_least(1),
        default=None,
        help="first N test images (training's test accuracy)",
    )
    g.add_argument("--batch-size", type=int_at_least(1), default=None)
    g.add_argument("--n-examples", type=int_at_least(1), default=None, help="attack the first N test images")
    g.add_argument(
        "--eps", type=positive_float, nargs="+", default=None, help="PGD L-inf radii (pixel units)"
    )
    g.add_argument(
        "--l2-eps",
        type=positive_float,
        nargs="+",
        default=None,
        help="L2 radii (pixel units) of certify and pgdl2",
    )
    g.add_argument("--pgd-steps", type=int_at_least(1), default=None)
    g.add_argument("--cw-max-iter", type=int_at_least(1), default=None)
    g.add_argument(
        "--attacks",
        nargs="+",
        choices=(*LINF_ATTACKS, *L2_ATTACKS),
        default=None,
        help="certify: certified L2 accuracy from the measured Lipschitz bound",
    )
    return p


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

        >>> s = settings_from_args(get_args_parser().parse_args(["--size", "tiny", "--epochs", "2"]))
        >>> (s.methods, s.epochs)
        (['fastclip', 'miyato'], 2)
    """
    values = dict(PRESETS[args.size])
    for key in values:
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    return Settings(**values)


def _check(parser: argparse.ArgumentParser, s: Settings, args: argparse.Namespace) -> None:
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


# -- the commands ---------------------------------------------------------------------------------------
def _opt(flag: str, value) -> list[str]:
    if value is None:
        return []
    return [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]


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


def augment_for(args: argparse.Namespace) -> str:
    """``--augment`` if given, else the dataset's default (see the flag's help)."""
    if args.augment is not None:
        return args.augment
    return "none" if args.dataset == "fashion-mnist" else "paper"


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


def _finished_runs(parent: Path, s: Settings) -> list:
    """The grid's finished runs (``fastclip.results.Run``; a method/mode 'all' takes every one found)."""
    return [
        r
        for r in find_runs(f"{parent}/method_")
        if ("all" in s.methods or r.method in s.methods)
        and ("all" in s.modes or r.mode in s.modes)
        and r.seed in s.seeds
        and (r.path / "DONE").exists()
    ]


def _step(
    name: str,
    outputs: list[Path],
    inputs: list[Path],
    cmd: list[str],
    dry_run: bool,
    missing: str = "no finished runs",
) -> int:
    if not inputs:
        print(f"\n[{name}] nothing to do yet: {missing}", flush=True)
        return 0
    if up_to_date(outputs, inputs):
        print(f"\n[{name}] up to date: {', '.join(p.name for p in outputs)}", flush=True)
        return 0
    return _run(cmd, dry_run)


def _by_mode_and_method(t: pd.DataFrame) -> pd.DataFrame:
    """Rows in the order of the paper's tables: modes as MODES lists them, methods as registered."""
    order = {m: i for i, m in enumerate([*MODES, *method_order(t["method"].unique())])}
    return t.sort_values(["mode", "method"], key=lambda c: c.map(order))


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command that reproduces ``args``: ``--dataset`` and ``--size``, then every flag whose
    value is not its default (``--steps`` and ``--dry-run`` left out: they choose what runs, not
    the numbers).

    Example::

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


def report_command(report: Path) -> str | None:
    """The command a report names on its "Made by" line (:func:`write_report`), or None."""
    for line in report.read_text().splitlines()[:5]:
        m = re.match(r"Made by `(.*)` on ", line)
        if m:
            return m.group(1)
    return None


def _grid_runs_only(df: pd.DataFrame, runs: list) -> pd.DataFrame:
    keep = {(r.method, r.mode, r.seed) for r in runs}
    return df[[k in keep for k in zip(df["method"], df["mode"], df["seed"])]]


def _report_values(parent: Path, runs: list, s: Settings) -> tuple[pd.DataFrame, list[int]]:
    """The report's values of the grid's finished runs (``fastclip.report.report_values``) and
    the other numbers of test images found in attack_results_runs.csv (an earlier run's
    results stay there; the report shows this reproduction's ``--n-examples``)."""
    import pandas as pd

    attacks, other = pd.DataFrame(), []
    runs_csv = parent / "attack_results_runs.csv"
    if runs_csv.exists():
        attacks = _grid_runs_only(pd.read_csv(runs_csv), runs)
        if s.n_examples is not None and (attacks["n_examples"] == s.n_examples).any():
            other = sorted(set(attacks["n_examples"]) - {s.n_examples})
            attacks = attacks[attacks["n_examples"] == s.n_examples]
    norms_csv = parent / "layer_norms_runs.csv"
    norms = _grid_runs_only(pd.read_csv(norms_csv), runs) if norms_csv.exists() else None
    return report_values(attacks, norms), other


def _plot_eps(s: Settings) -> list[float]:
    found = [e for e in PLOT_EPS if any(abs(e - x) < 1e-9 for x in s.l2_eps)]
    return found or list(s.l2_eps)


def _plots(parent: Path, values: pd.DataFrame, s: Settings) -> dict[str, Path]:
    """``clean_vs_certified_<mode>.png`` of every mode with certified accuracy at a radius of
    :func:`_plot_eps`, as ``{mode: path}`` (the plots step's first figures)."""
    eps = _plot_eps(s)
    cert = values[values["attack"] == "certify"]
    return {
        m: parent / f"clean_vs_certified_{m}.png"
        for m in dict.fromkeys(cert["mode"])
        if any(abs(float(e) - x) < 1e-9 for e in cert.loc[cert["mode"] == m, "eps"] for x in eps)
    }


def _robustness_plots(parent: Path, values: pd.DataFrame) -> dict[str, Path]:
    """``robustness_<mode>.png`` of every mode with PGD (L-inf or L2) results, as ``{mode: path}``."""
    attacked = values[values["attack"].isin(ROBUSTNESS_ATTACKS)]
    return {m: parent / f"robustness_{m}.png" for m in dict.fromkeys(attacked["mode"])}


def _figure(parent: Path, name: str, alt: str) -> list[str]:
    return [f"![{alt}]({name})", ""] if (parent / name).exists() else []


def write_report(
    parent: Path, runs: list, s: Settings, args: argparse.Namespace, path: Path, command: str
) -> None:
    """The Markdown report: the command that made it and the date, settings, one table per mode
    (clean, adversarial and certified accuracy, the network bound L, sigma_1 of every layer; the
    mode's figures below it), a marked place for the comparison with the paper, wall time per
    method, the remaining figures."""
    import pandas as pd

    modes, methods = expand(s.modes, MODES, "mode"), expand(s.methods, available(), "method")
    seeds = list(s.seeds)
    lines = [
        f"# SimpleConv on {args.dataset}: reproduction report",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        + (
            ""
            if set(args.steps) == set(STEPS)
            else f" (this report written by a run of its steps {' '.join(args.steps)})"
        )
        + ".",
        "",
        f"- grid: methods {' '.join(methods)}, modes {' '.join(modes)}, seeds "
        f"{' '.join(map(str, seeds))}; {len(runs)} of {len(methods) * len(modes) * len(seeds)} runs finished",
        f"- training: {s.epochs} epoch(s), train subset {s.train_subset or 'all'}, "
        f"test subset {s.test_subset or 'all'}, batch size {s.batch_size or 'default'}, "
        f"augmentation {augment_for(args)}",
        f"- attacks: {', '.join(s.attacks)} on the first {s.n_examples or 'all'} test images; PGD L-inf eps "
        f"{', '.join(f'{e:g}' for e in s.eps)} with {s.pgd_steps} steps; CW {s.cw_max_iter} iterations; "
        f"L2 eps (certify, pgdl2) {', '.join(f'{e:.4g}' for e in s.l2_eps)}",
        "",
    ]
    values, other = _report_values(parent, runs, s)
    if other:
        lines += [
            f"(Attack results on {', '.join(map(str, other))} images from earlier runs are in "
            f"attack_results_runs.csv; this report shows the {s.n_examples}-image ones.)",
            "",
        ]
    if not values.empty:
        tables = mode_tables(values, methods, modes, seeds)
        layers = [c for c in tables[modes[0]].columns if c.startswith("sigma_1 ")]
        if len(seeds) > 1:
            head = f"mean ± std over seeds {' '.join(map(str, seeds))}"
            how = (
                "Each cell: mean ± sample std (ddof = 1) over the seeds; a cell holding fewer seeds than "
                f"the grid's {len(seeds)} says how many (e.g. `({len(seeds) - 1} of {len(seeds)} seeds)`)"
            )
        else:
            head, how = f"seed {seeds[0]}", f"Each cell: the value of seed {seeds[0]}"
        lines += [
            f"## Results per mode ({head})",
            "",
            f"{how}; a value not measured reads `missing`. Accuracies in % on the first "
            f"{s.n_examples or 'all'} test images, the same images for every model.",
            "",
        ]
        for mode in modes:
            lines += [f"### {mode}", "", tables[mode].to_markdown(index=False), ""]
            lines += _figure(parent, f"clean_vs_certified_{mode}.png", f"clean vs certified accuracy, {mode}")
            lines += _figure(parent, f"robustness_{mode}.png", f"accuracy under attack, {mode}")
            lines += _figure(parent, f"sigma_fastclip_{mode}.png", f"sigma_1 curves of fastclip, {mode}")
        lines += [
            "Notes:",
            "",
            "- certified L2: the share of the test images whose logit margin exceeds sqrt(2) L eps, "
            "with L the network's Lipschitz bound measured from the trained layers (attack.py "
            "--attack certify).",
            f"- {BOUND}: that bound, the product of the measured norms of the trained model's layers "
            "(fastclip.lipschitz_report, the input normalisation included).",
        ]
        if layers:
            lines.append(
                "- sigma_1 columns: the exact-grade largest singular value of each layer of the trained "
                "model (best checkpoint, eval mode) at its input size, by compute_trained_SVs.py: "
                "(conv) the convolution alone, (Conv+BN) the convolution composed with its batch norm "
                "(running statistics; in clipBN the clipped one), (linear) the dense layer. "
                f"In noBN there is no batch norm: the block is its convolution, whose sigma_1 is the "
                f"(conv) column, so its (Conv+BN) cells read `{NOT_APPLICABLE}`."
            )
        lines.append("")
    lines += [
        "## Comparison with the paper",
        "",
        KEEP_START,
        "(to be written: what the paper reports for SimpleConv beside the tables above)",
        KEEP_END,
        "",
    ]
    rows = []
    for run in runs:
        metrics = pd.DataFrame(read_metrics(run.path / "metrics.csv"))  # MetricsError: one line
        if metrics.empty:
            raise MetricsError(f"{run.path / 'metrics.csv'} is missing or empty (rerun the train step)")
        rows.append(
            {
                "method": run.method,
                "mode": run.mode,
                # the median epoch: a run paused, or sharing the machine with other work for a
                # while, has a few slow epochs that a mean would carry into the table
                "s_per_epoch": metrics["wall_time"].median(),
                "final_test_acc": metrics["test_acc"].iloc[-1],
            }
        )
    if rows:
        t = (
            pd.DataFrame(rows)
            .groupby(["mode", "method"], sort=False)
            .agg(
                s_per_epoch=("s_per_epoch", "mean"),
                final_test_acc=("final_test_acc", "mean"),
                runs=("s_per_epoch", "size"),
            )
            .reset_index()
        )
        t = _by_mode_and_method(t)
        lines += [
            "## Wall time per method (training, seconds per epoch: each run's median epoch, mean over seeds)",
            "",
            "final_test_acc: training's test accuracy after the last epoch (on the test subset "
            f"{s.test_subset or 'all'}), mean over the runs.",
            "",
            t.round(2).to_markdown(index=False),
            "",
        ]
    figures = [p for p in [parent / "layer_norms.png", *sorted(parent.glob("curves_*.png"))] if p.exists()]
    if figures:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    atomic_write_text(path, "\n".join(lines))


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """Run the chain; returns 0 when every step succeeded, else 1 (the steps after a failed one
    still run on what finished)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = get_args_parser()
    args = parse_args(parser, argv)
    s = settings_from_args(args)
    _check(parser, s, args)
    command = command_line(parser, args)  # before the paths are made absolute: as it was typed
    args.logdir = os.path.abspath(args.logdir)
    parent = Path(args.logdir) / args.dataset / f"{MODEL}_models"
    prefix = f"{parent}/method_"
    t0 = time.perf_counter()
    print(f"reproduce ({args.size}): {parent}", flush=True)
    failed = []

    if "train" in args.steps and _run(train_command(s, args), args.dry_run):
        failed.append("train")
    runs = _finished_runs(parent, s)
    if "attack" in args.steps:
        if runs or args.dry_run:
            codes = [
                _run(cmd, args.dry_run) for cmd in attack_commands(s, args, prefix)
            ]  # all run, even after a failure
            if any(codes):
                failed.append("attack")
        else:
            print("\n[attack] nothing to do yet: no finished runs", flush=True)

    attack_csvs = sorted(p for r in runs for p in r.path.glob("attack_*.csv"))
    if "collect" in args.steps:
        cmd = [
            sys.executable,
            str(script_path("collect_attack_results", "collect_attack_results")),
            prefix,
            "--method",
            "all",
            "--mode",
            "all",
        ]
        outs = [
            parent / "attack_results_runs.csv",
            parent / "attack_results_summary.csv",
            parent / "attack_results_wide.csv",
        ]
        if _step("collect", outs, attack_csvs, cmd, args.dry_run, missing="no attack results"):
            failed.append("collect")
    if "norms" in args.steps:
        cmd = [
            sys.executable,
            str(script_path("compute_trained_SVs", "compute_trained_svs")),
            args.dataset,
            "all",
            prefix,
            "--model",
            MODEL,
        ]
        outs = [parent / "layer_norms.csv", parent / "layer_norms_runs.csv", parent / "layer_norms.png"]
        if _step("norms", outs, [r.path / "ckpt_best.pth" for r in runs], cmd, args.dry_run):
            failed.append("norms")
    if "curves" in args.steps:
        by_mode: dict[str, list[Path]] = {}
        for r in runs:
            if r.seed == min(s.seeds):
                by_mode.setdefault(r.mode, []).append(r.path)
        for mode, dirs in by_mode.items():
            out = parent / f"curves_{mode}.png"
            cmd = [
                sys.executable,
                str(script_path("plot_curves", "plot_curves")),
                *map(str, dirs),
                "--out",
                str(out),
            ]
            events = [p for d in dirs for p in d.glob("events.out.tfevents.*")]
            if _step(f"curves {mode}", [out], events, cmd, args.dry_run):
                failed.append(f"curves {mode}")
            for d in dirs:  # the fastclip run alone: its sigma_1 curves at full height
                if d.name == f"method_{SIGMA_METHOD}_{mode}_{min(s.seeds)}":
                    out = parent / f"sigma_{SIGMA_METHOD}_{mode}.png"
                    cmd = [
                        sys.executable,
                        str(script_path("plot_curves", "plot_curves")),
                        str(d),
                        "--out",
                        str(out),
                    ]
                    events = list(d.glob("events.out.tfevents.*"))
                    if _step(f"curves {SIGMA_METHOD} {mode}", [out], events, cmd, args.dry_run):
                        failed.append(f"curves {SIGMA_METHOD} {mode}")
    # A report made by other settings (other seeds, radii, ...) is remade with its figures,
    # even where no file it is made from changed.
    resettled = (parent / REPORT).exists() and report_command(parent / REPORT) != command
    if "plots" in args.steps and not args.dry_run:
        runs_csv = parent / "attack_results_runs.csv"
        if not runs or not runs_csv.exists():
            print("\n[plots] nothing to do yet: no collected attack results", flush=True)
        else:
            try:
                values, _ = _report_values(parent, runs, s)
                pngs, robust = _plots(parent, values, s), _robustness_plots(parent, values)
                outs = [*pngs.values(), *robust.values()]
                title = f"{MODEL} on {args.dataset}"
                if not outs:
                    none = "no certified accuracy at the plotted radii and no PGD results"
                    print(f"\n[plots] nothing to do: {none}", flush=True)
                elif not resettled and up_to_date(outs, [runs_csv]):
                    print(f"\n[plots] up to date: {', '.join(p.name for p in outs)}", flush=True)
                else:
                    for mode, out in pngs.items():
                        plot_clean_vs_certified(values, mode, out, _plot_eps(s), title=title, seeds=s.seeds)
                    for mode, out in robust.items():
                        plot_robustness(values, mode, out, title=title, seeds=s.seeds)
                    print(f"\n[plots] wrote {', '.join(p.name for p in outs)}", flush=True)
            except (OSError, ValueError, KeyError) as e:  # a damaged CSV or a full disk: one line
                print(f"\n[plots] failed: {e}", flush=True)
                failed.append("plots")
    if "report" in args.steps and not args.dry_run:
        report = parent / REPORT
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
                *(r.path / "metrics.csv" for r in runs),
            )
            if p.exists()
        ]
        if not runs:
            print("\n[report] nothing to do yet: no finished runs", flush=True)
        elif not resettled and up_to_date([report], inputs):
            print(f"\n[report] up to date: {report.name}", flush=True)
        else:
            try:
                write_report(parent, runs, s, args, report, command)
                print(f"\n[report] wrote {report}", flush=True)
            except (MetricsError, OSError, ValueError, KeyError) as e:  # a damaged file, a full disk
                print(f"\n[report] failed: {e}", flush=True)
                failed.append("report")
    if "publish" in args.steps and args.publish is None and set(args.steps) != set(STEPS):
        print("\n[publish] nothing to do: no --publish DIR given", flush=True)
    elif "publish" in args.steps and args.publish is not None:
        report, name = parent / REPORT, args.publish_name or f"reproduce_{args.dataset}"
        if args.dry_run:
            print(f"\n[publish] would copy {report.name} and its figures to {args.publish}", flush=True)
        elif not report.exists():
            print(f"\n[publish] nothing to do yet: no {report.name}", flush=True)
        else:
            try:
                targets = publish_targets(report, args.publish, name)
                if up_to_date(list(targets.values()), list(targets)):
                    print(f"\n[publish] up to date: {targets[report]}", flush=True)
                else:
                    written = publish(report, args.publish, name, keep=(KEEP_START, KEEP_END))
                    print(f"\n[publish] wrote {', '.join(map(str, written))}", flush=True)
            except OSError as e:
                print(f"\n[publish] failed: {e}", flush=True)
                failed.append("publish")

    status = f"failed steps: {', '.join(failed)}" if failed else "all steps succeeded"
    print(
        f"\nreproduce ({args.size}) finished in {time.perf_counter() - t0:.0f} s; {status}; outputs in {parent}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
