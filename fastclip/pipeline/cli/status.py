"""Status table of a grid of runs: done / running / queued / failed / missing, with the
epoch reached and the last error line of failed runs (see fastclip.pipeline.jobs).

Examples (``fastclip-status``, or ``python status.py`` from experiments/)::

    python status.py --method all --model ResNet18 --mode all      # the grid batch_job_submit.py got
    python status.py --manifest logs/grids/train-1a2b3c4d5e/manifest.json
    python status.py --logdir logs --all                            # every grid dispatched under logs/
    python status.py --logdir logs --all --verify                   # and check every checkpoint's SHA-256
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fastclip.pipeline import jobs
from fastclip.pipeline.cli import parse_args, path_arg, script_path


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """batch_job_submit.py's flags (to name a training grid) plus --manifest and --all."""
    parser = jobs.OneLineErrorParser(
        prog="status.py",
        parents=[jobs.train_submit_parser(add_help=False)],
        add_help=add_help,
        description="Print the status table of a grid of runs.",
    )
    g = parser.add_argument_group("which grid")
    g.add_argument(
        "--manifest",
        nargs="+",
        type=path_arg,
        default=None,
        metavar="PATH",
        help="manifest(s) written by batch_job_submit.py / batch_attack_submit.py "
        "(instead of the grid flags)",
    )
    g.add_argument("--all", action="store_true", help="every grid dispatched under --logdir")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check the SHA-256 of every finished run's checkpoints (reads them all; "
        "without it only their zip structure is looked at)",
    )
    return parser


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """Print the status table(s); exit code 0."""
    parser = get_args_parser()
    args = parse_args(parser, argv)
    logdir = Path(args.logdir)
    if not args.manifest and logdir.exists() and not logdir.is_dir():
        parser.error(f"--logdir {str(logdir)!r} exists and is not a directory")
    try:
        if args.all:
            paths = sorted((Path(args.logdir) / "grids").glob("*/manifest.json"))
            if not paths:
                parser.error(f"no grid manifests under {Path(args.logdir) / 'grids'}")
            grids = [jobs.Grid.from_manifest(p) for p in paths]
        elif args.manifest:
            grids = [jobs.Grid.from_manifest(p) for p in args.manifest]
        else:
            grids = [jobs.train_grid(args, script=script_path("train", "train"))]
    except jobs.GridError as e:
        parser.error(str(e))
    for i, grid in enumerate(grids):
        if len(grids) > 1:
            print(("\n" if i else "") + f"# {grid.manifest_path}")
        print(jobs.format_status(jobs.grid_status(grid, verify=args.verify)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
