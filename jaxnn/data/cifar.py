"""CIFAR-10 from the standard python-pickle batches (``cifar-10-batches-py``), read with a restricted unpickler.

Each batch file is a pickled dict with ``data`` (uint8, shape (n, 3072): per row the 1024 red, then 1024
green, then 1024 blue pixels of a 32x32 image in row-major order) and ``labels`` (n ints in [0, 10)).
Images are returned HWC: ``image[h, w, c] = data[row, c*1024 + h*32 + w]``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from jaxnn.data import download as download_lib
from jaxnn.data.dataset import CorruptFileError, SourceData, default_data_dir

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{index}" for index in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"
CIFAR10_ARCHIVE = {
    "name": "cifar-10-python.tar.gz",
    "urls": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    "md5": "c58f30108f718f92721af3b95e74349a",
}
CIFAR10_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_NUM_CLASSES = 10
_IMAGE_HW = 32
_IMAGE_C = 3
_ROW_LENGTH = _IMAGE_HW * _IMAGE_HW * _IMAGE_C

# The only globals a CIFAR batch needs: numpy array / dtype reconstruction (old and new module paths).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only resolves numpy array reconstruction; any other global is refused."""

    def find_class(self, module, name):
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch file")
        return super().find_class(*target)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            content = _CifarUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            ImportError) as error:
        raise CorruptFileError(f"{path}: not a readable CIFAR pickle batch ({type(error).__name__}: {error})") from error
    if not isinstance(content, dict):
        raise CorruptFileError(f"{path}: expected a pickled dict, got {type(content).__name__}")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}


def read_cifar_batch(path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file -> (images uint8 (n, 32, 32, 3) HWC, labels int32 (n,)), validated."""
    path = Path(path)
    batch = _load_pickle(path)
    missing = [key for key in ("data", "labels") if key not in batch]
    if missing:
        raise CorruptFileError(f"{path}: CIFAR batch lacks the keys {missing}; found {sorted(map(str, batch))}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_LENGTH:
        description = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CorruptFileError(f"{path}: 'data' must be a uint8 array of shape (n, {_ROW_LENGTH}); got {description}")
    try:
        labels = np.asarray(batch["labels"])
    except (ValueError, TypeError) as error:
        raise CorruptFileError(f"{path}: 'labels' is not a list of integers ({error})") from error
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise CorruptFileError(
            f"{path}: 'labels' must be {data.shape[0]} integers (one per row of 'data'); "
            f"got {labels.dtype} array of shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= CIFAR10_NUM_CLASSES):
        raise CorruptFileError(
            f"{path}: labels must lie in [0, {CIFAR10_NUM_CLASSES}); got [{labels.min()}, {labels.max()}]"
        )
    images = data.reshape(-1, _IMAGE_C, _IMAGE_HW, _IMAGE_HW).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _expected_files() -> list[str]:
    return [*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE]


def _missing_files(folder: Path) -> list[str]:
    return [name for name in _expected_files() if not (folder / name).is_file()]


def _resolve_folder(data_dir) -> tuple[Path, Path]:
    """(folder holding the batches, parent used for downloads). ``data_dir`` may be the folder or its parent."""
    root = default_data_dir("cifar10") if data_dir is None else Path(data_dir).expanduser()
    if root.name == CIFAR10_FOLDER or (root / CIFAR10_TRAIN_FILES[0]).is_file():
        return root, root.parent
    return root / CIFAR10_FOLDER, root


def _download_and_extract(parent: Path, progress: bool) -> list[str]:
    archive = parent / CIFAR10_ARCHIVE["name"]
    if not (archive.is_file() and download_lib.file_md5(archive) == CIFAR10_ARCHIVE["md5"]):
        download_lib.download_verified(CIFAR10_ARCHIVE["urls"], archive, CIFAR10_ARCHIVE["md5"], progress=progress)
    import tarfile  # only for an archive to unpack

    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [member for member in tar.getmembers()
                       if member.name.startswith(f"{CIFAR10_FOLDER}/") and member.isfile()]
            tar.extractall(parent, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise CorruptFileError(f"{archive}: cannot extract the CIFAR-10 archive ({error})") from error
    return [archive.name]


def load_cifar10(*, data_dir=None, seed: int = 0, download: bool = True, progress: bool = True) -> SourceData:
    """CIFAR-10 (Krizhevsky 2009): 32x32x3 uint8 images, 10 classes; 50k train (5 batches) + 10k official test.

    ``data_dir`` is the ``cifar-10-batches-py`` folder or its parent. When batches are missing and
    ``download``, the official archive is fetched (MD5-checked) into the parent and extracted; otherwise
    FileNotFoundError names the folder and the missing files.
    """
    del seed  # the files fix the examples; the split seed is applied by load_dataset
    folder, parent = _resolve_folder(data_dir)
    downloaded: list[str] = []
    missing = _missing_files(folder)
    if missing and download:
        try:
            downloaded = _download_and_extract(parent, progress)
        except OSError as error:
            raise FileNotFoundError(
                f"cifar10: missing {missing} in {folder} (expected {_expected_files()}); download failed: {error}"
            ) from error
        missing = _missing_files(folder)
    if missing:
        where = f"{folder} (does not exist)" if not folder.is_dir() else str(folder)
        raise FileNotFoundError(
            f"cifar10: missing batch files {missing} in {where}; expected {_expected_files()} "
            f"(data_dir may be the {CIFAR10_FOLDER} folder or its parent; pass download=True to fetch them)"
        )
    train_parts = [read_cifar_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    x_test, y_test = read_cifar_batch(folder / CIFAR10_TEST_FILE)
    label_names = list(CIFAR10_LABEL_NAMES)
    if (folder / CIFAR10_META_FILE).is_file():
        meta = _load_pickle(folder / CIFAR10_META_FILE)
        names = meta.get("label_names")
        if isinstance(names, list) and len(names) == CIFAR10_NUM_CLASSES:
            label_names = [name.decode() if isinstance(name, bytes) else str(name) for name in names]
    files = [*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE]
    info = {
        "source": "CIFAR-10 python pickle batches",
        "directory": str(folder),
        "files": {name: {"md5": download_lib.file_md5(folder / name), "bytes": (folder / name).stat().st_size}
                  for name in files},
        "downloaded": downloaded,
        "layout": "data_batch_1..5 + test_batch: official test set = test_batch, val split from train",
        "label_names": label_names,
    }
    return SourceData(
        x=np.concatenate([images for images, _ in train_parts]),
        y=np.concatenate([labels for _, labels in train_parts]),
        x_test=x_test, y_test=y_test, num_classes=CIFAR10_NUM_CLASSES, task="classification",
        info=info, input_divisor=255.0,
    )
