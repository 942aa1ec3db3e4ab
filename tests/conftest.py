"""Shared test setup."""
import os

# Tests run many tiny ops and subprocesses on a 2-core machine: one thread each avoids
# oversubscription (set before torch starts its pools; inherited by subprocesses).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
