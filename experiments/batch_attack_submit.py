"""Attack every trained run of a grid as a SLURM job array or locally. The command ``fastclip-submit-attack``: see
fastclip/pipeline/cli/batch_attack_submit.py (``--help`` lists every flag)."""

import sys

from fastclip.pipeline.cli.batch_attack_submit import *  # noqa: F401,F403 - get_args_parser, main and the helpers tests use
from fastclip.pipeline.cli.batch_attack_submit import main

if __name__ == "__main__":
    sys.exit(main())
