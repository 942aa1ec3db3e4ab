"""Train a grid of runs (datasets x models x methods x modes x seeds) with train.py, as a
SLURM job array or with worker processes on this machine (see fastclip.pipeline.jobs).

Examples (``fastclip-submit-train``, or ``python batch_job_submit.py`` from experiments/)::

    python batch_job_submit.py --method fastclip --model ResNet18 --seed 1 --mode wBN
    python batch_job_submit.py --method all --model ResNet18 --mode all        # 6 x 3 x 10 seeds
    python batch_job_submit.py --method all --mode all --dataset mnist --model SimpleConv \\
        --epochs 5 --backend local --workers 2
    python batch_job_submit.py --method all --model ResNet18 --mode all --status

Every train.py flag (--epochs, --train-subset, --data-dir, --logdir, method
hyper-parameters, ...) is passed to each run. Finished runs (DONE) are skipped and
queued or running ones are not submitted twice; --dry-run prints the plan, --force
reruns finished runs, --status prints the grid's table (also: status.py).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence

from fastclip.pipeline import jobs
from fastclip.pipeline.cli import parse_args, script_path

#: The script each run executes (experiments/train.py in a source checkout).
TRAIN_SCRIPT = script_path("train", "train")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """train.py's flags (grid axes taking several values or 'all') plus dispatch and SLURM flags."""
    return jobs.train_submit_parser(add_help=add_help)


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """Dispatch the grid ``argv`` describes; returns the exit code (1 if a local run failed
    or the scheduler refused). Bad input ends the process with exit code 2 before anything
    is submitted."""
    parser = get_args_parser()
    return jobs.submit_main(
        parse_args(parser, argv), parser, functools.partial(jobs.train_grid, script=TRAIN_SCRIPT)
    )


if __name__ == "__main__":
    sys.exit(main())
