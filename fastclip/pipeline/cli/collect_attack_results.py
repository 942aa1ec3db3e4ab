"""Gather the per-run attack CSVs into two tables and print the summary.

Writes into the parent directory of the runs (e.g. logs/cifar/ResNet18_models/):

* ``attack_results_runs.csv``: every run x attack setting (one row per seed),
* ``attack_results_summary.csv``: mean and sample std (ddof=1) over seeds per
  model x attack setting x mode x method, with the number of seeds,
* ``attack_results_wide.csv``: the same side by side, one row per mode x method:
  clean accuracy, then PGD, CW and certified accuracy (``attack.py --attack certify``)
  per eps,

(with ``_<method>_<mode>`` appended to the names when filtered), prints the summary
as a Markdown table (``--latex``: LaTeX), and lists every run that is missing a
result or whose CSV is malformed (e.g. an accuracy outside [0, 100]). Runs are
labelled by their config.json; a (run, setting) row found twice (the same eps in two
CSVs of a run) is counted once, the newest, with a warning; a cell averaged over fewer
seeds than the grid has is marked ``(2 of 3 seeds)`` in every table.

Only the results of one checkpoint kind are gathered, ``--checkpoint`` (``best``, the
default, or ``last``), named above the printed tables and in the column ``checkpoint`` of
the summaries. A stale CSV - one that measured a checkpoint its run has since replaced
(:func:`fastclip.pipeline.provenance.stale_reason`, e.g. after ``train.py --force``) - is
left out of every table, with one warning line naming the run and the file.

Example::

    python experiments/collect_attack_results.py logs/cifar/ResNet18_models/method_ --method all --mode wBN
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fastclip.pipeline.cli import (
    OneLineErrorParser,
    int_seed,
    one_line_os_errors,
    output_dir_problem,
    parse_args,
    path_arg,
)
from fastclip.pipeline.cli.runs import find_runs_or_exit, warn
from fastclip.pipeline.io import atomic_write_text, clean_stale_temps
from fastclip.pipeline.methods.base import MODES
from fastclip.pipeline.provenance import CHECKPOINTS, describe_kind, of_kind, stale_rows
from fastclip.pipeline.results import (
    collect_attack_results,
    format_summary,
    runs_parent,
    summarize,
    wide_summary,
)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="collect_attack_results.py",
        description=__doc__.split("\n\n")[0],
        add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "model_prefix",
        type=path_arg,
        help="common part of the run directories up to the method name, "
        "e.g. logs/cifar/ResNet18_models/method_",
    )
    p.add_argument("--method", default="all", help="method name, or 'all'")
    p.add_argument("--mode", default="all", choices=(*MODES, "all"), help="batch-norm mode, or 'all'")
    p.add_argument(
        "--seed", type=int_seed, nargs="+", default=None, help="only these seeds (default: all found)"
    )
    p.add_argument(
        "--checkpoint",
        default=CHECKPOINTS[0],
        choices=CHECKPOINTS,
        help="gather the results of this checkpoint of each run: best (ckpt_best.pth) or last",
    )
    p.add_argument(
        "--latex", action="store_true", help="print the summary as a LaTeX table instead of Markdown"
    )
    p.add_argument(
        "--out-dir",
        type=path_arg,
        default=None,
        help="where to write the two CSVs (default: the runs' parent directory)",
    )
    return p


@one_line_os_errors
def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    parser = get_args_parser()
    args = parse_args(parser, argv)
    out_dir = args.out_dir or runs_parent(args.model_prefix)
    problem = output_dir_problem(out_dir, "--out-dir")
    if problem:
        parser.error(problem)
    runs = find_runs_or_exit(parser, args)
    table, found = collect_attack_results(runs)
    for note in (p for p in found if p.note):
        warn(parser, str(note))
    problems = [p for p in found if not p.note]
    collected = len(table)
    table = of_kind(table, args.checkpoint).reset_index(drop=True)
    if len(table) < collected:
        warn(
            parser,
            f"{collected - len(table)} result rows of another checkpoint left out "
            f"(this table: --checkpoint {args.checkpoint})",
        )
    stale, reasons = stale_rows(table, runs)
    for reason in reasons:
        warn(parser, f"stale result: {reason}; left out of the tables (rerun attack.py)")
    table = table[~stale].reset_index(drop=True)
    kind = describe_kind(args.checkpoint, set(table["chosen_by"]))
    # the grid's seeds, those of runs without results included: a cell over fewer is marked
    summary = summarize(table, expected_seeds=len({r.seed for r in runs}))
    summary["checkpoint"] = args.checkpoint  # last: the earlier columns keep their places

    clean_stale_temps(out_dir)  # temps of earlier writes whose writer was killed
    suffix = "".join(f"_{v}" for v in (args.method, args.mode) if v != "all")
    runs_csv = f"{out_dir}/attack_results_runs{suffix}.csv"
    summary_csv = f"{out_dir}/attack_results_summary{suffix}.csv"
    atomic_write_text(runs_csv, table.to_csv(index=False))
    atomic_write_text(summary_csv, summary.to_csv(index=False))
    fmt = "latex" if args.latex else "markdown"
    wide = wide_summary(summary, fmt)
    wide_csv = f"{out_dir}/attack_results_wide{suffix}.csv"
    wide_csv_table = wide_summary(summary, "csv")
    wide_csv_table["checkpoint"] = args.checkpoint
    atomic_write_text(wide_csv, wide_csv_table.to_csv(index=False))

    print(f"Results of each run's {kind}:\n")
    print(format_summary(summary, fmt) if len(summary) else "(no attack results found)")
    if len(summary):
        print("\nClean, attacked and certified accuracy (%) side by side:\n")
        print(
            wide.to_markdown(index=False)
            if fmt == "markdown"
            else wide.to_latex(index=False, escape=False).replace("_", r"\_")
        )
    print(f"\n{len(runs)} runs, {len(table)} result rows -> {runs_csv}, {summary_csv}, {wide_csv}")
    if reasons:
        print(f"\nStale results left out ({len(reasons)}):")
        for reason in reasons:
            print(f"- {reason}")
    if problems:
        print(f"\nMissing or partial results ({len(problems)}):")
        for prob in problems:
            print(f"- {prob}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
