"""Exact singular values of every layer of trained runs. The command ``fastclip-trained-svs``: see
fastclip/pipeline/cli/compute_trained_svs.py (``--help`` lists every flag)."""

import sys

from fastclip.pipeline.cli.compute_trained_svs import *  # noqa: F401,F403 - get_args_parser, main and the helpers tests use
from fastclip.pipeline.cli.compute_trained_svs import _merge, main  # noqa: F401 - _merge: tests

if __name__ == "__main__":
    sys.exit(main())
