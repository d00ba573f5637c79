"""Real data sets shared by the workloads: MNIST and Fashion-MNIST from their official IDX gz files, the data sets
bundled with scikit-learn (``iris``, ``wine``, ``breast_cancer``, ``diabetes``, ``digits``, ...), and CSV / NPZ files.

Folder layout: ``<root>/<name>/<official file name>``, e.g. ``/work/shared/data/mnist/train-images-idx3-ubyte.gz``.
``root`` comes from the caller or from the ``BILEVEL_DATA`` environment variable; nothing here hard-codes a path.
Every file is checked against the official md5 before it is parsed, and every array against the official shape.

Offline users copy the four files into the folder; online users can call :func:`download_idx_dataset`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "IDX_DATASETS",
    "data_root",
    "download_idx_dataset",
    "load_idx_dataset",
    "load_sklearn_dataset",
    "load_table",
    "read_idx",
    "sklearn_loaders",
]

ENV_VAR = "BILEVEL_DATA"

# name -> split -> (file name, md5 of the gz file, expected array shape). The md5 values are the official ones
# (the same that torchvision checks); see SOURCE.md next to the files.
IDX_DATASETS: dict[str, dict[str, dict[str, tuple[str, str, tuple[int, ...]]]]] = {
    "mnist": {
        "train": {
            "images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", (60000, 28, 28)),
            "labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", (60000,)),
        },
        "test": {
            "images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", (10000, 28, 28)),
            "labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", (10000,)),
        },
    },
    "fashion-mnist": {
        "train": {
            "images": ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", (60000, 28, 28)),
            "labels": ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", (60000,)),
        },
        "test": {
            "images": ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", (10000, 28, 28)),
            "labels": ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", (10000,)),
        },
    },
}

# Official download locations, tried in order (yann.lecun.com often refuses automated downloads, hence the mirror
# that torchvision uses first).
URLS = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ],
}

# IDX type codes (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# md5 is paid once per file and process: (path, size, mtime) -> md5.
_MD5_CACHE: dict[tuple[str, int, int], str] = {}


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: ``root`` if given, else the ``BILEVEL_DATA`` environment variable."""
    if root is None:
        root = os.environ.get(ENV_VAR)
        if not root:
            raise FileNotFoundError(
                f"No data folder given: pass root=... or set the {ENV_VAR} environment variable to the folder that "
                f"holds mnist/ and fashion-mnist/ (e.g. export {ENV_VAR}=/path/to/data)."
            )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"Data folder {str(path)!r} does not exist (from root= or {ENV_VAR}).")
    return path


def _check_name_split(name: str, split: str) -> None:
    if name not in IDX_DATASETS:
        raise ValueError(f"Unknown data set {name!r}: choose one of {sorted(IDX_DATASETS)}.")
    if split not in ("train", "test"):
        raise ValueError(f"Unknown split {split!r} for {name}: choose 'train' or 'test'.")


def _md5(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _MD5_CACHE:
        digest = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _MD5_CACHE[key] = digest.hexdigest()
    return _MD5_CACHE[key]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (gzip-compressed if the name ends in ``.gz``) into a numpy array.

    Raises:
        ValueError: the file is not a well-formed IDX file (bad magic number, truncated or oversized payload).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # what gzip raises on damaged files
        raise ValueError(f"read_idx({str(path)!r}): cannot decompress the file ({err}); it is corrupt.") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"read_idx({str(path)!r}): not an IDX file (bad magic number {data[:4].hex()!r}).")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"read_idx({str(path)!r}): header says shape {shape} ({expected} bytes) but the file has "
            f"{len(data)} bytes; it is truncated or corrupt."
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_file(folder: Path, name: str, split: str, kind: str, check_md5: bool) -> np.ndarray:
    file_name, md5, shape = IDX_DATASETS[name][split][kind]
    path = folder / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{name} {split} {kind}: missing file {str(path)!r}. Copy the official {file_name} there, or call "
            f"tasks.data.download_idx_dataset({name!r}, root=...) on a machine with internet access."
        )
    if check_md5 and (got := _md5(path)) != md5:
        raise ValueError(
            f"{name} {split} {kind}: checksum mismatch for {str(path)!r} (md5 {got}, official {md5}). The file is "
            f"corrupt or not the official one: delete it and copy or download it again."
        )
    array = read_idx(path)
    if array.shape != shape:
        raise ValueError(f"{name} {split} {kind}: {str(path)!r} has shape {array.shape}, expected {shape}.")
    return array


def load_idx_dataset(
    name: str, split: str, root: str | os.PathLike | None = None, check_md5: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST or Fashion-MNIST from the official IDX gz files.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: folder holding ``<name>/``; defaults to the ``BILEVEL_DATA`` environment variable.
        check_md5: verify the official md5 of each file before parsing it.

    Returns:
        ``(images, labels)``: a uint8 tensor ``[N, 28, 28]`` and an int64 tensor ``[N]`` with values in 0..9.

    Raises:
        ValueError: unknown name or split, checksum mismatch, or a corrupt file.
        FileNotFoundError: the data folder or a file is missing.
    """
    _check_name_split(name, split)
    folder = data_root(root) / name
    images = _idx_file(folder, name, split, "images", check_md5)
    labels = _idx_file(folder, name, split, "labels", check_md5)
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{name} {split} labels: values outside 0..9 in {str(folder)!r}; the file is corrupt.")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def download_idx_dataset(name: str, root: str | os.PathLike | None = None) -> Path:
    """Download the four official IDX gz files of ``name`` into ``<root>/<name>/`` and verify their md5.

    Files already present with the right checksum are kept. Returns the folder.
    """
    _check_name_split(name, "train")
    folder = data_root(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        for file_name, md5, _ in IDX_DATASETS[name][split].values():
            target = folder / file_name
            if target.is_file() and _md5(target) == md5:
                continue
            errors = []
            for base in URLS[name]:
                # Download to a temporary file first so an interrupted download never leaves a partial file behind.
                with tempfile.NamedTemporaryFile(dir=folder, delete=False) as tmp:
                    try:
                        with urllib.request.urlopen(base + file_name, timeout=60) as response:
                            shutil.copyfileobj(response, tmp)
                    except OSError as err:
                        errors.append(f"{base + file_name}: {err}")
                        os.unlink(tmp.name)
                        continue
                if _md5(Path(tmp.name)) != md5:
                    errors.append(f"{base + file_name}: checksum mismatch")
                    os.unlink(tmp.name)
                    continue
                os.replace(tmp.name, target)
                break
            else:
                raise RuntimeError(f"Could not download {name} {file_name}:\n  " + "\n  ".join(errors))
    return folder


def sklearn_loaders() -> list[str]:
    """Names of scikit-learn's bundled tabular data sets: every ``sklearn.datasets.load_<name>`` that returns
    ``(X, y)`` (``breast_cancer``, ``diabetes``, ``digits``, ``iris``, ``linnerud``, ``wine``); none downloads."""
    import inspect

    from sklearn import datasets  # scikit-learn is a task dependency, not a library one

    return sorted(name[len("load_"):] for name in dir(datasets) if name.startswith("load_")
                  and "return_X_y" in inspect.signature(getattr(datasets, name)).parameters)


def load_sklearn_dataset(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A scikit-learn data set by name: ``load_<name>`` (bundled, no download) or ``fetch_<name>`` when its copy is
    already in scikit-learn's cache (``~/scikit_learn_data``; never downloaded here).

    Returns:
        ``(X, y)``: X float64 ``[N, D]``; y as scikit-learn gives it (float64 for a real-valued target, int64 for
        integer labels), ``[N]``.

    Raises:
        ValueError: no such loader, or a target that is not one column (e.g. ``linnerud``'s three).
        FileNotFoundError: a ``fetch_`` data set that is not in the local cache.
    """
    from sklearn import datasets

    if hasattr(datasets, f"load_{name}") and name in sklearn_loaders():
        X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    elif hasattr(datasets, f"fetch_{name}"):
        try:
            X, y = getattr(datasets, f"fetch_{name}")(return_X_y=True, download_if_missing=False)
        except (OSError, TypeError) as err:
            raise FileNotFoundError(
                f"scikit-learn's fetch_{name} needs a download, which is not done here ({err}); run "
                f"sklearn.datasets.fetch_{name}() once on a machine with internet access (it caches the data), or save "
                f"it as a CSV / NPZ file and set data.name to its path.") from None
    else:
        raise ValueError(f"Unknown scikit-learn data set {name!r}: choose one of {sklearn_loaders()}, or a CSV / NPZ "
                         f"file path.")
    X, y = np.asarray(X), np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"scikit-learn data set {name!r} has a target of shape {y.shape[1:]} per example; one "
                         f"target column is needed (save the column you want as a CSV and set data.target).")
    y = y.astype(np.int64) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float64)
    return torch.from_numpy(X.astype(np.float64)), torch.from_numpy(y)


def load_table(path: str | os.PathLike, target: str | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Features and target from a CSV or NPZ file.

    CSV: comma-separated, one example per row; a first row with any non-numeric cell is the header. ``target`` names
    the target column (a header name or a 0-based index); default: the last column. Every other column is a feature
    and must be numeric. The target may be numbers or labels (any text).

    NPZ (``numpy.savez``): the features under key ``X`` (``[N, D]``) and the target under ``target`` (default ``y``).

    Returns:
        ``(X, y)``: X float64 ``[N, D]``; y a numpy array ``[N]`` (numbers, or strings for text labels).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown extension, target or key, a non-numeric feature cell (row and column named), rows of
            different lengths, or an empty table.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} not found.")
    if path.suffix.lower() == ".npz":
        key = target or "y"
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("X", key) if k not in archive.files]
            if missing:
                raise ValueError(f"{path}: no array {missing} in the NPZ file (it holds {archive.files}); save the "
                                 f"features as X and the target as y, or set data.target to the target's key.")
            X, y = archive["X"], archive[key]
        if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
            raise ValueError(f"{path}: X must be [N, D] and {key} [N]; got {X.shape} and {y.shape}.")
        if not np.issubdtype(X.dtype, np.number):
            raise ValueError(f"{path}: X has dtype {X.dtype}; the features must be numbers.")
        return torch.from_numpy(X.astype(np.float64)), y
    if path.suffix.lower() != ".csv":
        raise ValueError(f"data file {str(path)!r}: use a .csv or .npz file.")
    import csv

    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{path}: the CSV file is empty.")

    def number(cell):
        try:
            return float(cell)
        except ValueError:
            return None

    header = rows[0] if any(number(c) is None for c in rows[0]) else None
    body = rows[1:] if header else rows
    width = len(rows[0])
    bad = [i + (2 if header else 1) for i, row in enumerate(body) if len(row) != width]
    if bad or not body or width < 2:
        raise ValueError(f"{path}: need a header (optional) and rows of the same length >= 2 (a feature and the "
                         f"target); " + (f"rows {bad[:5]} have a different length." if bad else "found none."))
    names = [c.strip() for c in header] if header else [str(i) for i in range(width)]
    if target is None:
        column = width - 1
    elif str(target) in names:
        column = names.index(str(target))
    elif str(target).lstrip("-").isdigit() and -width <= int(target) < width:
        column = int(target) % width
    else:
        raise ValueError(f"{path}: no target column {target!r}; columns are {names} (or a 0-based index).")
    features = [j for j in range(width) if j != column]
    X = np.empty((len(body), len(features)))
    for i, row in enumerate(body):
        for out, j in enumerate(features):
            value = number(row[j])
            if value is None:
                raise ValueError(f"{path}: row {i + (2 if header else 1)}, column {names[j]!r} holds {row[j]!r}, not "
                                 f"a number; every column but the target must be numeric.")
            X[i, out] = value
    labels = [row[column].strip() for row in body]
    numbers = [number(v) for v in labels]
    y = np.array(numbers, dtype=np.float64) if all(v is not None for v in numbers) else np.array(labels)
    return torch.from_numpy(X), y
