"""Collect the attack CSVs of trained runs into tables. The command ``fastclip-collect``: see
fastclip/pipeline/cli/collect_attack_results.py (``--help`` lists every flag)."""

import sys

from fastclip.pipeline.cli.collect_attack_results import *  # noqa: F401,F403 - get_args_parser, main and the helpers tests use
from fastclip.pipeline.cli.collect_attack_results import main

if __name__ == "__main__":
    sys.exit(main())
