"""The paper's datasets (CIFAR-10, MNIST, Fashion-MNIST) through the real torchvision classes.

Transforms only augment and convert to tensors in [0, 1]; the normalisation constants
live in :class:`DatasetInfo` and go into the model's first layer
(``get_model(..., mean=info.mean, std=info.std)``), so attacks work in pixel space.

Where the files are looked for:

- ``cifar``: ``<data_dir>/cifar-10-batches-py/`` (data_dir defaults to ``./data``).
- ``mnist``: ``<data_dir>/MNIST/raw/`` (default ``./data``).
- ``fashion-mnist``: ``<data_dir>/FashionMNIST/raw/`` when ``data_dir`` is given;
  otherwise Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``), unpacked once into
  ``<cache>/FashionMNIST/raw/`` with ``<cache>`` = ``$FASTCLIP_CACHE`` or
  ``~/.cache/fastclip``.

torchvision reads the MNIST-style idx files uncompressed; ``.gz`` files found in a
``raw/`` folder are unpacked beside them once.
"""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

__all__ = [
    "DATASETS", "DatasetInfo", "DatasetNotFoundError", "DatasetCorruptError", "get_datasets",
    "dataset_info", "ensure_fashion_mnist", "default_cache_dir", "DEBIAN_FASHION_MNIST",
]

logger = logging.getLogger(__name__)

DATASETS = ("cifar", "mnist", "fashion-mnist")
DEFAULT_DATA_DIR = Path("data")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for (and download was off)."""


class DatasetCorruptError(ValueError):
    """The files exist but torchvision rejects them (checksum or format)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: input shape, classes and the
    per-channel normalisation ``(x - mean) / std`` applied by the model's first layer."""

    name: str
    in_channels: int
    input_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-sample shape ``(C, H, W)``."""
        return (self.in_channels, self.input_size, self.input_size)


_INFO = {
    "cifar": DatasetInfo("cifar", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "mnist": DatasetInfo("mnist", 1, 28, 10, (0.1307,), (0.3081,)),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,)),
}


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return name


def dataset_info(name: str) -> DatasetInfo:
    """Shape, class count and normalisation constants of dataset ``name``, without loading it.

    Example::

        >>> dataset_info("mnist").input_shape
        (1, 28, 28)
    """
    return _INFO[_check_name(name)]


def default_cache_dir() -> Path:
    """``$FASTCLIP_CACHE`` if set, else ``~/.cache/fastclip``."""
    env = os.environ.get("FASTCLIP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fastclip"


def _gunzip_atomic(src: Path, dest: Path) -> None:
    # Temp file + rename in the destination folder: a crash or a concurrent reader
    # never sees a half-written idx file.
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, length=1 << 20)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unpack_idx(src_dir: Path, raw_dir: Path) -> bool:
    """Gunzip ``src_dir/<f>.gz`` into ``raw_dir/<f>`` for each idx file still missing.
    True when all four uncompressed files are then present."""
    for f in IDX_FILES:
        if not (raw_dir / f).is_file() and (src_dir / f"{f}.gz").is_file():
            logger.info("unpacking %s into %s", src_dir / f"{f}.gz", raw_dir)
            _gunzip_atomic(src_dir / f"{f}.gz", raw_dir / f)
    return all((raw_dir / f).is_file() for f in IDX_FILES)


def ensure_fashion_mnist(cache_dir: str | os.PathLike | None = None) -> Path:
    """Unpack Debian's Fashion-MNIST (``apt-get install dataset-fashion-mnist``) once into
    ``<cache_dir>/FashionMNIST/raw/`` and return ``cache_dir``, the ``root`` that
    ``torchvision.datasets.FashionMNIST(root, download=False)`` loads.

    Example::

        root = ensure_fashion_mnist()          # ~/.cache/fastclip
        torchvision.datasets.FashionMNIST(root, train=False)   # 10000 images
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    raw = root / "FashionMNIST" / "raw"
    if not _unpack_idx(DEBIAN_FASHION_MNIST, raw):
        missing = [f"{f}.gz" for f in IDX_FILES if not (DEBIAN_FASHION_MNIST / f"{f}.gz").is_file()]
        raise DatasetNotFoundError(
            f"fashion-mnist: expected the Debian files {', '.join(missing)} in {DEBIAN_FASHION_MNIST} "
            f"(apt-get install dataset-fashion-mnist) or unpacked files in {raw}; "
            f"or pass download=True / --download")
    return root


def _transforms(name: str) -> tuple[transforms.Compose, transforms.Compose]:
    # The paper's augmentation for CIFAR-10; MNIST-style data is only converted.
    if name == "cifar":
        train = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor()])
        return train, transforms.Compose([transforms.ToTensor()])
    return transforms.Compose([transforms.ToTensor()]), transforms.Compose([transforms.ToTensor()])


def _not_found(name: str, where: Path, missing: list[str]) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name}: expected {', '.join(missing)} in {where.resolve()}, not found; "
        f"pass download=True / --download to fetch it, or point data_dir / --data-dir at it")


def _locate(name: str, data_dir: str | os.PathLike | None, download: bool) -> Path:
    """The torchvision ``root`` for ``name``; raises DatasetNotFoundError if the files are
    missing and ``download`` is off."""
    if name == "cifar":
        root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
        folder = root / datasets.CIFAR10.base_folder
        missing = [f for f in CIFAR_FILES if not (folder / f).is_file()]
        if missing and not download:
            raise _not_found(name, folder, missing)
        return root
    cls_name = "MNIST" if name == "mnist" else "FashionMNIST"
    if name == "fashion-mnist" and data_dir is None:
        root = default_cache_dir()
        raw = root / cls_name / "raw"
        if _unpack_idx(raw, raw):
            return root
        if DEBIAN_FASHION_MNIST.is_dir():
            return ensure_fashion_mnist(root)
        if download:
            return root
        raise DatasetNotFoundError(
            f"fashion-mnist: expected {DEBIAN_FASHION_MNIST} (apt-get install dataset-fashion-mnist) or the idx "
            f"files in {raw.resolve()}, not found; pass download=True / --download, or --data-dir")
    root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    raw = root / cls_name / "raw"
    if not _unpack_idx(raw, raw) and not download:
        raise _not_found(name, raw, [f for f in IDX_FILES if not (raw / f).is_file()])
    return root


def _first(ds: Dataset, n: int | None, label: str) -> Dataset:
    if n is None:
        return ds
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{label} must be a positive integer or None, got {n!r}")
    if n > len(ds):
        logger.warning("%s=%d exceeds the %d examples available; using all of them", label, n, len(ds))
        n = len(ds)
    return Subset(ds, range(n))


def get_datasets(name: str, data_dir: str | os.PathLike | None = None, download: bool = False,
                 train_subset: int | None = None, test_subset: int | None = None,
                 ) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Train and test sets of ``name`` (one of :data:`DATASETS`) and their :class:`DatasetInfo`.

    Images come out as float tensors in [0, 1] of shape ``info.input_shape``; CIFAR-10's
    training set is augmented with RandomCrop(32, padding=4) and a horizontal flip.
    ``train_subset`` / ``test_subset`` keep the first N examples (deterministic).

    Example::

        train, test, info = get_datasets("fashion-mnist", test_subset=1000)
        model = get_model("SimpleConv", in_channels=info.in_channels, input_size=info.input_size,
                          mean=info.mean, std=info.std)
    """
    _check_name(name)
    info = _INFO[name]
    root = _locate(name, data_dir, download)
    cls = {"cifar": datasets.CIFAR10, "mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[name]
    train_tf, test_tf = _transforms(name)
    try:
        train = cls(str(root), train=True, transform=train_tf, download=download)
        test = cls(str(root), train=False, transform=test_tf, download=download)
    except (RuntimeError, OSError) as e:
        # torchvision reports checksum failures and download errors as multi-line
        # RuntimeErrors (URLError, an OSError, when offline); missing files were
        # ruled out above.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = "could not download into" if download else "torchvision rejected the files under"
        raise DatasetCorruptError(f"{name}: {what} {Path(root).resolve()} ({first}); "
                                  f"delete them and pass download=True / --download") from e
    logger.info("%s: %d train / %d test examples from %s", name, len(train), len(test), root)
    return _first(train, train_subset, "train_subset"), _first(test, test_subset, "test_subset"), info
