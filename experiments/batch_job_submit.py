"""Train a grid of runs (datasets x models x methods x modes x seeds) with train.py, as a
SLURM job array or with worker processes on this machine (see fastclip.jobs).

Examples (from experiments/, as in the published README)::

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
from pathlib import Path

from fastclip import jobs

TRAIN_SCRIPT = Path(__file__).resolve().with_name("train.py")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """train.py's flags (grid axes taking several values or 'all') plus dispatch and SLURM flags."""
    return jobs.train_submit_parser(add_help=add_help)


def main(args: argparse.Namespace) -> int:
    """Dispatch the grid ``args`` describe; returns the exit code (1 if a local run failed
    or the scheduler refused). Bad input ends the process with exit code 2 before anything
    is submitted."""
    return jobs.submit_main(args, get_args_parser(), functools.partial(jobs.train_grid, script=TRAIN_SCRIPT))


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
