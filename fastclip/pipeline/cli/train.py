"""Train one model with one clipping method (resumable; see fastclip.pipeline.training).

Example::

    fastclip-train --dataset fashion-mnist --model SimpleConv --method fastclip --mode wBN --seed 1 --epochs 5
    python experiments/train.py ...                      # the same command

writes logs/fashion-mnist/SimpleConv_models/method_fastclip_wBN_1/ (config.json, ckpt_last.pth,
ckpt_best.pth, metrics.csv, TensorBoard events, train.log, DONE). Running the same command
again resumes an interrupted run and skips a finished one (--force retrains).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fastclip.pipeline.cli import fail, os_error_line, parse_args
from fastclip.pipeline.training import ConfigError, config_from_args, run
from fastclip.pipeline.training import get_args_parser as _library_parser
from fastclip.pipeline.training.distributed import PeerGone, RankDivergenceError
from fastclip.pipeline.training.validate import Interrupted, RunFailed


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The flags of fastclip.pipeline.training.get_args_parser, as ``train.py``."""
    parser = _library_parser(add_help=add_help)
    parser.prog = "train.py"
    return parser


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """Run (or resume, or skip) the training run that ``argv`` describes; exit code 0. Bad
    settings end the process with a one-line error and exit code 2; a run that diverges
    (FAILED), a write the OS refuses part-way (a full disk), or ranks of one run that came
    to hold different models (naming the tensor) or a rank of several that is gone end with
    one line and exit code 1; Ctrl-C ends it with one line (where it struck) and exit code
    130, every file written before intact, so that the same command resumes."""
    parser = get_args_parser()
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(config_from_args(args))
    except ConfigError as e:
        parser.error(str(e))
    except RunFailed as e:  # diverged: FAILED written, exit 1
        fail(parser, str(e))
    except OSError as e:  # a full disk, an I/O error part-way
        fail(parser, os_error_line(e))
    except (RankDivergenceError, PeerGone) as e:  # one line per rank, not a traceback per rank
        fail(parser, str(e))
    except Interrupted as e:  # Ctrl-C while training: where, and that a rerun resumes
        fail(parser, e.line, 130)
    except KeyboardInterrupt:  # before (or after) the epochs: nothing half-written either
        fail(parser, Interrupted().line, 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
