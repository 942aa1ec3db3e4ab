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
   ``<!-- /paper-comparison -->`` in an earlier ``DIR/<name>.md`` is kept; its results tables also go
   into ``DIR/results.md``, between ``<!-- results:<name>:start -->`` and ``<!-- results:<name>:end -->``
   (the rest of that file is kept).

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
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fastclip.pipeline.cli import (
    OneLineErrorParser,
    int_at_least,
    int_seed,
    parse_args,
    path_arg,
    positive_float,
)
from fastclip.pipeline.reproduce.publishing import RESULTS, results_section, write_results
from fastclip.pipeline.reproduce.settings import (
    L2_ATTACKS,
    LINF_ATTACKS,
    MODEL,
    PRESETS,
    STEPS,
    Settings,
    attack_commands,
    augment_for,
    check_settings,
    command_line,
    settings_from_args,
    train_command,
)
from fastclip.pipeline.reproduce.steps import Chain, finished_runs, run_steps, up_to_date
from fastclip.pipeline.reproduce.writer import (
    KEEP_END,
    KEEP_START,
    PLOT_EPS,
    REPORT,
    SIGMA_METHOD,
    report_command,
    write_report,
)
from fastclip.pipeline.training.config import INT_RANGES

# The names experiments/reproduce.py re-exports (``import *``) and the tests use from it.
__all__ = [
    "get_args_parser",
    "main",
    "MODEL",
    "STEPS",
    "LINF_ATTACKS",
    "L2_ATTACKS",
    "PRESETS",
    "REPORT",
    "RESULTS",
    "PLOT_EPS",
    "SIGMA_METHOD",
    "KEEP_START",
    "KEEP_END",
    "Settings",
    "settings_from_args",
    "check_settings",
    "augment_for",
    "train_command",
    "attack_commands",
    "command_line",
    "report_command",
    "up_to_date",
    "finished_runs",
    "write_report",
    "results_section",
    "write_results",
]


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


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """Run the chain; returns 0 when every step succeeded, else 1 (the steps after a failed one
    still run on what finished)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = get_args_parser()
    args = parse_args(parser, argv)
    s = settings_from_args(args)
    check_settings(parser, s, args)
    command = command_line(parser, args)  # before the paths are made absolute: as it was typed
    args.logdir = os.path.abspath(args.logdir)
    parent = Path(args.logdir) / args.dataset / f"{MODEL}_models"
    t0 = time.perf_counter()
    print(f"reproduce ({args.size}): {parent}", flush=True)
    failed = run_steps(Chain(s, args, parent, command))
    status = f"failed steps: {', '.join(failed)}" if failed else "all steps succeeded"
    print(
        f"\nreproduce ({args.size}) finished in {time.perf_counter() - t0:.0f} s; {status}; outputs in {parent}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
