"""Status table of a grid of runs. The command ``fastclip-status``: see
fastclip/pipeline/cli/status.py (``--help`` lists every flag)."""

import sys

from fastclip.pipeline.cli.status import *  # noqa: F401,F403 - get_args_parser, main and the helpers tests use
from fastclip.pipeline.cli.status import main

if __name__ == "__main__":
    sys.exit(main())
