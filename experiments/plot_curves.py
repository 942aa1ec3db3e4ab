"""Training curves of runs from their TensorBoard events. The command ``fastclip-plot-curves``: see
fastclip/pipeline/cli/plot_curves.py (``--help`` lists every flag)."""

import sys

from fastclip.pipeline.cli.plot_curves import *  # noqa: F401,F403 - get_args_parser, main and the helpers tests use
from fastclip.pipeline.cli.plot_curves import main

if __name__ == "__main__":
    sys.exit(main())
