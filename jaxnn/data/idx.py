"""MNIST and Fashion-MNIST from the standard IDX files (raw or gzipped), with validation and download.

IDX format (LeCun et al.): a big-endian magic number ``0x0000TTNN`` (TT the element type, 0x08 = uint8;
NN the number of dimensions), NN big-endian uint32 dimension sizes, then the elements in row-major
order. Images are ``0x00000803`` (n, rows, cols); labels are ``0x00000801`` (n,).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from jaxnn.data import download as download_lib
from jaxnn.data.dataset import CorruptFileError, SourceData, default_data_dir

IDX_ELEMENT_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

# Roles -> file names (each may also be present with a ".gz" suffix).
IDX_FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Download mirrors and the MD5 of each gzipped file (the checksums torchvision and the data sets' authors publish).
IDX_RESOURCES = {
    "mnist": {
        "mirrors": (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        "md5": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        "label_names": [str(digit) for digit in range(10)],
    },
    "fashion_mnist": {
        "mirrors": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        "label_names": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    },
}
IDX_NUM_CLASSES = 10

_GZIP_MAGIC = b"\x1f\x8b"


def _read_file_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is a gzip file (detected by content, checked against the suffix)."""
    raw = path.read_bytes()
    is_gzip = raw[:2] == _GZIP_MAGIC
    if path.suffix == ".gz" and not is_gzip:
        raise CorruptFileError(f"{path}: named .gz but is not a gzip file (first bytes 0x{raw[:4].hex()})")
    if not is_gzip:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise CorruptFileError(f"{path}: corrupt or truncated gzip data ({type(error).__name__}: {error})") from error


def read_idx(path, *, expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (raw or gzipped) into a native-endian numpy array of the declared shape.

    Validates the magic number (two zero bytes, a known element type, ``expected_magic`` if given) and
    that the data size equals the product of the declared dimensions; raises `CorruptFileError`
    naming the file otherwise, and FileNotFoundError when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    raw = _read_file_bytes(path)
    if len(raw) < 4:
        raise CorruptFileError(f"{path}: truncated IDX file: {len(raw)} bytes, shorter than the 4-byte magic number")
    magic = int.from_bytes(raw[:4], "big")
    type_code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or type_code not in IDX_ELEMENT_TYPES:
        raise CorruptFileError(
            f"{path}: bad IDX magic number 0x{magic:08x}: expected 0x0000TTNN with element type TT in "
            f"{[hex(code) for code in IDX_ELEMENT_TYPES]} (0x{IMAGES_MAGIC:08x} for images, "
            f"0x{LABELS_MAGIC:08x} for labels)"
        )
    if expected_magic is not None and magic != expected_magic:
        raise CorruptFileError(f"{path}: bad IDX magic number 0x{magic:08x}: expected 0x{expected_magic:08x}")
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise CorruptFileError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_bytes} header bytes, file has {len(raw)}"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header_bytes])
    dtype = IDX_ELEMENT_TYPES[type_code]
    count = math.prod(shape)
    expected_bytes = count * dtype.itemsize
    actual_bytes = len(raw) - header_bytes
    if actual_bytes != expected_bytes:
        kind = "truncated" if actual_bytes < expected_bytes else "oversized"
        raise CorruptFileError(
            f"{path}: {kind} IDX file: header declares shape {tuple(shape)} of {dtype.name} "
            f"({expected_bytes} data bytes), found {actual_bytes} data bytes"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header_bytes).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _find_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _expected_names_message() -> str:
    return ", ".join(IDX_FILE_NAMES.values()) + " (each raw or .gz)"


def _resolve_directory(name: str, data_dir) -> Path:
    """``data_dir`` itself, or ``data_dir/<name>`` when that holds the files; the default folder if None."""
    if data_dir is None:
        return default_data_dir(name)
    directory = Path(data_dir).expanduser()
    nested = directory / name
    if not any(_find_file(directory, file) for file in IDX_FILE_NAMES.values()) and nested.is_dir():
        return nested
    return directory


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, expected_magic=IMAGES_MAGIC)
    labels = read_idx(labels_path, expected_magic=LABELS_MAGIC)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise CorruptFileError(
            f"{images_path} / {labels_path}: expected uint8 IDX elements; got {images.dtype} and {labels.dtype}"
        )
    if images.shape[0] != labels.shape[0]:
        raise CorruptFileError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels"
        )
    if labels.size and labels.max() >= IDX_NUM_CLASSES:
        raise CorruptFileError(f"{labels_path}: labels must lie in [0, {IDX_NUM_CLASSES}); found {int(labels.max())}")
    return images[..., None], labels.astype(np.int32)


def _download_missing(name: str, directory: Path, found: dict, progress: bool) -> list[str]:
    resources = IDX_RESOURCES[name]
    fetched = []
    for role, file_name in IDX_FILE_NAMES.items():
        if found[role] is not None:
            continue
        gz_name = f"{file_name}.gz"
        urls = [mirror + gz_name for mirror in resources["mirrors"]]
        try:
            found[role] = download_lib.download_verified(urls, directory / gz_name, resources["md5"].get(gz_name),
                                                         progress=progress)
        except OSError as error:  # stop at the first failure: without a network every file would time out
            raise FileNotFoundError(
                f"{name}: IDX files missing in {directory.absolute()}; expected {_expected_names_message()}; "
                f"download failed: {error}"
            ) from error
        fetched.append(gz_name)
    return fetched


def load_idx_source(name: str, *, data_dir=None, download_missing: bool = True, progress: bool = True) -> SourceData:
    """Read MNIST-layout IDX files of data set ``name`` ("mnist" or "fashion_mnist") from a directory.

    Uses the four-file layout (train + t10k; official test = t10k) when present; when only the t10k pair
    is present it is the whole pool (split later into train/val/test, recorded in ``info["layout"]``);
    likewise a train pair alone. Missing files are downloaded when no complete pair exists and
    ``download_missing``; otherwise FileNotFoundError names the directory and the expected files.
    """
    if name not in IDX_RESOURCES:
        raise ValueError(f"IDX data set name must be one of {sorted(IDX_RESOURCES)}; got {name!r}")
    directory = _resolve_directory(name, data_dir)
    if not directory.is_dir() and not download_missing:
        raise FileNotFoundError(
            f"{name}: data directory {directory} does not exist; expected {_expected_names_message()} there "
            f"(pass download=True to fetch them)"
        )
    found = {role: (_find_file(directory, file) if directory.is_dir() else None) for role, file in IDX_FILE_NAMES.items()}
    for split_name in ("train", "test"):
        images, labels = found[f"{split_name}_images"], found[f"{split_name}_labels"]
        if (images is None) != (labels is None):
            present = images or labels
            missing = IDX_FILE_NAMES[f"{split_name}_labels" if labels is None else f"{split_name}_images"]
            raise FileNotFoundError(
                f"{name}: incomplete IDX pair in {directory}: found {present.name} but not {missing} (raw or .gz)"
            )
    have_train = found["train_images"] is not None
    have_test = found["test_images"] is not None
    downloaded: list[str] = []
    if not (have_train or have_test):
        if not download_missing:
            raise FileNotFoundError(
                f"{name}: no IDX files in {directory}; expected {_expected_names_message()} "
                f"(pass download=True to fetch them)"
            )
        downloaded = _download_missing(name, directory, found, progress)
        have_train = have_test = True

    files_info = {}
    for path in found.values():
        if path is not None:
            files_info[path.name] = {"md5": download_lib.file_md5(path), "bytes": path.stat().st_size}
    info = {
        "source": f"{name} IDX files",
        "directory": str(directory),
        "files": files_info,
        "downloaded": downloaded,
        "label_names": list(IDX_RESOURCES[name]["label_names"]),
    }
    if have_train and have_test:
        x_train, y_train = _read_pair(found["train_images"], found["train_labels"])
        x_test, y_test = _read_pair(found["test_images"], found["test_labels"])
        if x_train.shape[1:] != x_test.shape[1:]:
            raise CorruptFileError(
                f"{name}: train images have shape {x_train.shape[1:3]} but t10k images {x_test.shape[1:3]}"
            )
        info["layout"] = "train+t10k: official test set = t10k, val split from train"
        return SourceData(x=x_train, y=y_train, x_test=x_test, y_test=y_test, num_classes=IDX_NUM_CLASSES,
                          task="classification", info=info, input_divisor=255.0)
    role = "test" if have_test else "train"
    x, y = _read_pair(found[f"{role}_images"], found[f"{role}_labels"])
    info["layout"] = (
        f"{'t10k' if role == 'test' else 'train'} pair only: its {x.shape[0]} examples were split "
        f"deterministically (seeded) into train/val/test"
    )
    return SourceData(x=x, y=y, num_classes=IDX_NUM_CLASSES, task="classification", info=info,
                      input_divisor=255.0)


def load_mnist(*, data_dir=None, seed: int = 0, download: bool = True, progress: bool = True) -> SourceData:
    """MNIST (LeCun et al. 1998): 28x28x1 uint8 digit images, 10 classes; 60k train + 10k t10k test."""
    del seed  # the files fix the examples; the split seed is applied by load_dataset
    return load_idx_source("mnist", data_dir=data_dir, download_missing=download, progress=progress)


def load_fashion_mnist(*, data_dir=None, seed: int = 0, download: bool = True, progress: bool = True) -> SourceData:
    """Fashion-MNIST (Xiao et al. 2017): 28x28x1 uint8 clothing images, 10 classes; 60k train + 10k test."""
    del seed
    return load_idx_source("fashion_mnist", data_dir=data_dir, download_missing=download, progress=progress)
