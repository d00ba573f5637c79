"""The IDX reader and the data-set loaders: counts, shapes, checksums and the errors for bad files."""

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.data import IDX_DATASETS, load_idx_dataset, load_sklearn_dataset, read_idx

DATA = Path(os.environ.get("BILEVEL_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"no MNIST copy under {DATA}")

MNIST_TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # from mnist/SOURCE.md


def write_idx(path: Path, array: np.ndarray) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


@needs_data
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_test_split_counts_and_shapes(name):
    images, labels = load_idx_dataset(name, "test", root=DATA)
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    counts = torch.bincount(labels, minlength=10).tolist()
    assert counts == (MNIST_TEST_CLASS_COUNTS if name == "mnist" else [1000] * 10)
    assert images.max() == 255 and images.min() == 0


@needs_data
def test_train_split_from_env_var(monkeypatch):
    monkeypatch.setenv("BILEVEL_DATA", str(DATA))
    images, labels = load_idx_dataset("mnist", "train")
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
    assert torch.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_read_idx_roundtrip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4) - 7
    write_idx(tmp_path / "a.idx.gz", array)
    write_idx(tmp_path / "b.idx", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx.gz"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.idx"), array)


def test_read_idx_rejects_truncated_and_non_idx(tmp_path):
    array = np.zeros((5, 4), dtype=np.uint8)
    write_idx(tmp_path / "x.idx", array)
    data = (tmp_path / "x.idx").read_bytes()
    (tmp_path / "short.idx").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "text.idx").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="magic number"):
        read_idx(tmp_path / "text.idx")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="corrupt"):
        read_idx(tmp_path / "bad.gz")


def fake_folder(tmp_path: Path, name: str = "mnist") -> Path:
    """A data folder with correctly named but wrong (tiny) test-split files."""
    folder = tmp_path / name
    folder.mkdir()
    files = IDX_DATASETS[name]["test"]
    write_idx(folder / files["images"][0], np.zeros((3, 28, 28), dtype=np.uint8))
    write_idx(folder / files["labels"][0], np.zeros(3, dtype=np.uint8))
    return folder


def test_checksum_mismatch_names_the_file(tmp_path):
    fake_folder(tmp_path)
    with pytest.raises(ValueError, match=r"checksum mismatch .*t10k-images-idx3-ubyte\.gz"):
        load_idx_dataset("mnist", "test", root=tmp_path)


def test_shape_check_without_checksum(tmp_path):
    fake_folder(tmp_path)
    with pytest.raises(ValueError, match=r"shape \(3, 28, 28\), expected \(10000, 28, 28\)"):
        load_idx_dataset("mnist", "test", root=tmp_path, check_md5=False)


@needs_data
def test_corrupted_copy_of_real_file_is_rejected(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for file_name, _, _ in IDX_DATASETS["mnist"]["test"].values():
        shutil.copy(DATA / "mnist" / file_name, folder / file_name)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(labels.read_bytes())
    data[100] ^= 0xFF
    labels.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_idx_dataset("mnist", "test", root=tmp_path)
    with pytest.raises(ValueError, match="corrupt"):  # a flipped byte also breaks the gzip CRC
        load_idx_dataset("mnist", "test", root=tmp_path, check_md5=False)


def test_missing_file_and_folder(tmp_path, monkeypatch):
    (tmp_path / "fashion-mnist").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing file .*t10k-images-idx3-ubyte\.gz.*download_idx_dataset"):
        load_idx_dataset("fashion-mnist", "test", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_idx_dataset("mnist", "test", root=tmp_path / "nowhere")
    monkeypatch.delenv("BILEVEL_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="BILEVEL_DATA"):
        load_idx_dataset("mnist", "test")


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown data set 'cifar10'.*fashion-mnist"):
        load_idx_dataset("cifar10", "train", root=tmp_path)
    with pytest.raises(ValueError, match=r"Unknown split 'valid'"):
        load_idx_dataset("mnist", "valid", root=tmp_path)
    with pytest.raises(ValueError, match=r"Unknown scikit-learn data set 'cifar10': choose one of \['breast_cancer'"):
        load_sklearn_dataset("cifar10")
    with pytest.raises(ValueError, match=r"'linnerud' has a target of shape \(3,\) per example; one target column"):
        load_sklearn_dataset("linnerud")


def test_sklearn_datasets():
    X, y = load_sklearn_dataset("diabetes")
    assert X.shape == (442, 10) and X.dtype == torch.float64 and y.shape == (442,)
    X, y = load_sklearn_dataset("digits")
    assert X.shape == (1797, 64) and y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    X, y = load_sklearn_dataset("iris")
    assert X.shape == (150, 4) and y.dtype == torch.int64 and set(y.tolist()) == {0, 1, 2}


@needs_data
def test_download_verifies_checksums_and_falls_back(tmp_path, monkeypatch):
    # file:// mirrors keep this offline: the first one serves a corrupt copy, the second the official files.
    import tasks.data as data

    bad = tmp_path / "bad"
    bad.mkdir()
    for split in ("train", "test"):
        for file_name, _, _ in IDX_DATASETS["fashion-mnist"][split].values():
            (bad / file_name).write_bytes(b"corrupt")
    monkeypatch.setitem(data.URLS, "fashion-mnist", [bad.as_uri() + "/", (DATA / "fashion-mnist").as_uri() + "/"])
    root = tmp_path / "root"
    root.mkdir()
    folder = data.download_idx_dataset("fashion-mnist", root=root)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f for split in ("train", "test") for f, _, _ in IDX_DATASETS["fashion-mnist"][split].values())
    images, labels = load_idx_dataset("fashion-mnist", "test", root=root)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    monkeypatch.setitem(data.URLS, "fashion-mnist", [bad.as_uri() + "/"])
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        data.download_idx_dataset("fashion-mnist", root=root)
    assert not any(p.name.startswith("tmp") for p in folder.iterdir())  # no partial files left behind
