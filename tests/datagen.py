"""Tiny, learnable datasets written in the real on-disk formats, for tests.

- :func:`write_cifar10` writes ``<root>/cifar-10-batches-py/`` (python pickle batches
  ``data_batch_1..5``, ``test_batch``, ``batches.meta``) as torchvision's CIFAR10 reads it.
- :func:`write_mnist` writes the four idx files into ``<root>/MNIST/raw/`` (or
  ``FashionMNIST/raw/``), uncompressed as torchvision reads them, or as ``.gz``.

Both return ``root``, to pass as ``data_dir`` / ``--data-dir``. Each class has a fixed
pattern (a colour for CIFAR, which survives random crops and flips; a binary template
for MNIST) plus pixel noise, so a small model beats chance within a couple of epochs.

torchvision checks the MD5 of every CIFAR-10 file, so generated CIFAR data loads only
inside a test that calls :func:`allow_unofficial_cifar` (in-process). MNIST-style data
has no checksum and also loads in a subprocess (e.g. a real ``experiments/train.py`` run).

Usage::

    from datagen import write_mnist
    root = write_mnist(tmp_path, n_train=200, n_test=100)
    train, test, info = fastclip.pipeline.data.get_datasets("mnist", data_dir=root)
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

from fastclip.pipeline.training import TrainConfig

__all__ = [
    "cifar10_arrays",
    "mnist_arrays",
    "write_cifar10",
    "write_mnist",
    "allow_unofficial_cifar",
    "CIFAR10_CLASSES",
]

NUM_CLASSES = 10
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _labels(rng: np.random.Generator, n: int) -> np.ndarray:
    # Balanced classes in random order, so even tiny subsets contain every class.
    return rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)


def cifar10_arrays(
    n_train: int = 100, n_test: int = 50, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` with images uint8 ``(N, 3, 32, 32)``:
    class colour (uniform in [0.15, 0.85]^3, shared by both splits) + N(0, 0.1) noise."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.15, 0.85, size=(NUM_CLASSES, 3, 1, 1))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = _labels(rng, n)
        x = colours[y] + rng.normal(0.0, 0.1, size=(n, 3, 32, 32))
        return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8), y

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    return x_train, y_train, x_test, y_test


def mnist_arrays(
    n_train: int = 100, n_test: int = 50, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` with images uint8 ``(N, 28, 28)``:
    0.6 x a binary class template (shared by both splits) + 0.4 x uniform noise."""
    rng = np.random.default_rng(seed)
    templates = (rng.random((NUM_CLASSES, 28, 28)) > 0.5).astype(np.float64)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = _labels(rng, n)
        x = 0.6 * templates[y] + 0.4 * rng.random((n, 28, 28))
        return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8), y

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    return x_train, y_train, x_test, y_test


def _pickle(path: Path, obj: dict) -> None:
    # Protocol 2 with str keys, as the official (Python 2) files load under
    # pickle.load(f, encoding="latin1"), which is how torchvision reads them.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: str | os.PathLike, n_train: int = 100, n_test: int = 50, seed: int = 0) -> Path:
    """Write a tiny CIFAR-10 into ``<root>/cifar-10-batches-py/``: the training images are
    split over ``data_batch_1..5`` in order, so the loaded training set is exactly
    ``cifar10_arrays(n_train, n_test, seed)[:2]``. Returns ``root``."""
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = cifar10_arrays(n_train, n_test, seed)
    chunks = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(chunks, start=1):
        _pickle(
            folder / f"data_batch_{i}",
            {
                "batch_label": f"training batch {i} of 5",
                "labels": [int(v) for v in y_train[idx]],
                "data": x_train[idx].reshape(len(idx), 3072),
                "filenames": [f"train_{j:05d}.png" for j in idx],
            },
        )
    _pickle(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": [int(v) for v in y_test],
            "data": x_test.reshape(n_test, 3072),
            "filenames": [f"test_{j:05d}.png" for j in range(n_test)],
        },
    )
    _pickle(
        folder / "batches.meta",
        {"num_cases_per_batch": max(len(c) for c in chunks), "label_names": CIFAR10_CLASSES, "num_vis": 3072},
    )
    return root


def _idx_bytes(array: np.ndarray) -> bytes:
    # idx header: magic 0x00 0x00 <type 0x08 = ubyte> <ndim>, then each dim as big-endian uint32.
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(
    root: str | os.PathLike,
    n_train: int = 100,
    n_test: int = 50,
    seed: int = 0,
    fashion: bool = False,
    compressed: bool = False,
) -> Path:
    """Write a tiny MNIST (or Fashion-MNIST with ``fashion=True``) as idx files
    ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` into ``<root>/MNIST/raw/``
    (``FashionMNIST/raw/``); ``compressed=True`` writes only the ``.gz`` files, as
    distributed. The data equal ``mnist_arrays(n_train, n_test, seed)``. Returns ``root``."""
    root = Path(root)
    raw = root / ("FashionMNIST" if fashion else "MNIST") / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = mnist_arrays(n_train, n_test, seed)
    for name, array in (
        ("train-images-idx3-ubyte", x_train),
        ("train-labels-idx1-ubyte", y_train),
        ("t10k-images-idx3-ubyte", x_test),
        ("t10k-labels-idx1-ubyte", y_test),
    ):
        data = _idx_bytes(array.astype(np.uint8))
        if compressed:
            with gzip.open(raw / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (raw / name).write_bytes(data)
    return root


def allow_unofficial_cifar(monkeypatch) -> None:
    """Inside one test, make torchvision's CIFAR10 accept files that are not the official
    ones: its module-level ``check_integrity`` (MD5 of every batch and of batches.meta)
    becomes an existence check. ``monkeypatch`` is pytest's fixture; undone after the test."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def tiny_config(logdir: str | os.PathLike, root: str | os.PathLike, **changes: Any) -> TrainConfig:
    """A training run of a few seconds: SimpleConv on 64 images of :func:`write_mnist`'s
    data at ``root``, 4 steps per epoch, 2 epochs, into ``logdir``; ``changes`` override any
    setting. lr 1e-4 keeps the loss away from 0, so metrics differ visibly between seeds and
    epochs."""
    settings: dict[str, Any] = dict(
        dataset="mnist",
        model="SimpleConv",
        method="orig",
        mode="wBN",
        seed=1,
        epochs=2,
        lr=1e-4,
        batch_size=16,
        train_subset=64,
        test_subset=32,
        data_dir=str(root),
        logdir=str(logdir),
        device="cpu",
    )
    settings.update(changes)
    return TrainConfig(**settings)
