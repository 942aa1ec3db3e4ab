"""Attack every trained run of a grid with attack.py, one run per (method, mode, seed,
attack), as a SLURM job array or with worker processes on this machine (see fastclip.pipeline.jobs).

Example (``fastclip-submit-attack``, or ``python batch_attack_submit.py`` from experiments/)::

    python batch_attack_submit.py cifar logs/cifar/ResNet18_models/method_ --method fastclip \\
        --mode wBN --attack pgd --model ResNet18 --seed 1

The first argument is the dataset, the second the common part of the run directories
up to the method name. Without --seed, every seed trained under the prefix. Every
attack.py flag (--eps, --n-steps, --n-examples, ...) is passed to each run; runs whose
CSV exists are skipped (--force recomputes), --dry-run prints the plan and --status
the grid's table.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence

from fastclip.pipeline import jobs
from fastclip.pipeline.cli import parse_args, script_path

#: The script each run executes (experiments/attack.py in a source checkout).
ATTACK_SCRIPT = script_path("attack", "attack")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """attack.py's arguments (grid axes taking several values or 'all') plus dispatch and SLURM flags."""
    return jobs.attack_submit_parser(add_help=add_help)


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """Dispatch the attack grid ``argv`` describes; returns the exit code. Bad input (an
    unknown name, a prefix matching no finished run) ends the process with exit code 2
    before anything is submitted."""
    parser = get_args_parser()
    return jobs.submit_main(
        parse_args(parser, argv), parser, functools.partial(jobs.attack_grid, script=ATTACK_SCRIPT)
    )


if __name__ == "__main__":
    sys.exit(main())
