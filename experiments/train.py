"""Train one model with one clipping method (resumable). The command ``fastclip-train``: see
fastclip/pipeline/cli/train.py (``--help`` lists every flag)."""

import sys

from fastclip.pipeline.cli.train import *  # noqa: F401,F403 - get_args_parser, main and the helpers tests use
from fastclip.pipeline.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
