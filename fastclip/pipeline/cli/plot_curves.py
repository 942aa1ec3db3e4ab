"""Training curves of runs as a PNG, from their TensorBoard event files.

One row per run: train/test accuracy (left) and the per-layer sigma_1 curves
``train/lsv_<layer>`` (right, log scale, the run's clip value as a dashed line), read
with tensorboard's EventAccumulator - for a look without starting a TensorBoard server.

Example::

    python experiments/plot_curves.py logs/mnist/SimpleConv_models/method_fastclip_wBN_1 \\
        logs/mnist/SimpleConv_models/method_orig_wBN_1 --out curves.png
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fastclip.pipeline.cli import (
    OneLineErrorParser,
    one_line_os_errors,
    output_file_problem,
    parse_args,
    path_arg,
)
from fastclip.pipeline.plots import plot_curves
from fastclip.pipeline.results import read_config, read_event_scalars

logger = logging.getLogger("plot_curves")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="plot_curves.py",
        description=__doc__.split("\n\n")[0],
        add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "run_dirs", nargs="+", type=path_arg, help="run directories holding events.out.tfevents.* files"
    )
    p.add_argument(
        "--out",
        type=path_arg,
        default=None,
        help="PNG to write (default: curves.png in the first run directory's parent)",
    )
    p.add_argument("--tags", nargs="+", default=["train/acc", "test/acc"], help="scalars for the left panel")
    return p


@one_line_os_errors
def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = get_args_parser()
    args = parse_args(parser, argv)
    out = args.out or str(Path(args.run_dirs[0]).resolve().parent / "curves.png")
    if not out.lower().endswith(".png"):
        parser.error(f"--out must be a .png file, got {out}")
    problem = output_file_problem(out, "--out")
    if problem:
        parser.error(problem)
    runs, clips = {}, {}
    for d in map(Path, args.run_dirs):
        if d.exists() and not d.is_dir():
            parser.error(
                f"{d} is a file, not a run directory (expected a directory holding events.out.tfevents.*)"
            )
        if not d.is_dir():
            parser.error(f"run directory {d} does not exist")
        if not any(d.glob("events.out.tfevents.*")):
            parser.error(f"no TensorBoard event files (events.out.tfevents.*) in {d}")
        scalars = read_event_scalars(d)
        if not scalars:
            parser.error(f"the event files in {d} hold no scalars")
        missing = [t for t in args.tags if t not in scalars]
        if missing:
            parser.error(f"{d} has no scalar {missing[0]!r} (--tags); it has {', '.join(sorted(scalars))}")
        label = d.name if d.name not in runs else str(d)
        runs[label] = scalars
        cfg = read_config(d)
        clips[label] = cfg.get("clip") if cfg.get("method", "orig") != "orig" else None
        logger.info("%s: %d scalar tags", d, len(scalars))
    plot_curves(runs, out, clip=clips, acc_tags=args.tags)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
