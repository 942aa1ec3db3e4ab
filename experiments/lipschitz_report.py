"""Layer norms and Lipschitz bound of a trained run or a torchvision classifier. The command ``fastclip-lipschitz``: see
fastclip/pipeline/cli/lipschitz_report.py (``--help`` lists every flag)."""

import sys

from fastclip.pipeline.cli.lipschitz_report import *  # noqa: F401,F403 - get_args_parser, main and the helpers tests use
from fastclip.pipeline.cli.lipschitz_report import main

if __name__ == "__main__":
    sys.exit(main())
