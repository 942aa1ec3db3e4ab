"""The paper's SimpleConv comparison by the project's own commands (make reproduce).

The command ``fastclip-reproduce``: see fastclip/pipeline/cli/reproduce.py (``--help`` lists every flag)."""

import sys

from fastclip.pipeline.cli.reproduce import *  # noqa: F401,F403 - get_args_parser, main and the helpers tests use
from fastclip.pipeline.cli.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
