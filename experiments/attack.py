"""Clean and adversarial (or certified) test accuracy of trained runs. The command ``fastclip-attack``: see
fastclip/pipeline/cli/attack.py (``--help`` lists every flag)."""

import sys

from fastclip.pipeline.cli.attack import *  # noqa: F401,F403 - get_args_parser, main and the helpers tests use
from fastclip.pipeline.cli.attack import main

if __name__ == "__main__":
    sys.exit(main())
