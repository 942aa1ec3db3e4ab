"""Train a grid of runs as a SLURM job array or with local workers. The command ``fastclip-submit-train``: see
fastclip/pipeline/cli/batch_job_submit.py (``--help`` lists every flag)."""

import sys

from fastclip.pipeline.cli.batch_job_submit import *  # noqa: F401,F403 - get_args_parser, main and the helpers tests use
from fastclip.pipeline.cli.batch_job_submit import main

if __name__ == "__main__":
    sys.exit(main())
