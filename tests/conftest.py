"""Shared test setup."""

import os

# Tests run many tiny ops and subprocesses on a 2-core machine: one thread each avoids
# oversubscription (set before torch starts its pools; inherited by subprocesses).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from datagen import write_mnist  # noqa: E402
from scriptload import EXPERIMENTS  # noqa: E402


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    """A tiny generated MNIST (96 training, 48 test images) for in-process training runs;
    a module may override it with its own size."""
    return write_mnist(tmp_path_factory.mktemp("mnist"), n_train=96, n_test=48)


@pytest.fixture(scope="session")
def train_mnist():
    """``train_mnist(tmp, method, n_train, *flags)``: SimpleConv trained by the real
    experiments/train.py (wBN, seed 1, 2 epochs) on ``n_train`` generated MNIST images
    (64 test images) written to ``tmp/data``, logging to ``tmp/logs``; returns the model
    prefix ``<tmp>/logs/mnist/SimpleConv_models/method_``. The trained-run fixtures of
    the attack, certify and layer-norm tests build on it."""

    def train(tmp: Path, method: str, n_train: int, *flags: str) -> str:
        write_mnist(tmp / "data", n_train=n_train, n_test=64, seed=0)
        cmd = [
            sys.executable,
            str(EXPERIMENTS / "train.py"),
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp / "data"),
            "--model",
            "SimpleConv",
            "--method",
            method,
            "--epochs",
            "2",
            "--train-subset",
            str(n_train),
            "--test-subset",
            "64",
            "--logdir",
            str(tmp / "logs"),
            *flags,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        prefix = f"{tmp}/logs/mnist/SimpleConv_models/method_"
        assert Path(f"{prefix}{method}_wBN_1/DONE").exists()
        return prefix

    return train
