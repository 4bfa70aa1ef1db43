"""The default data set: scikit-learn's real 8x8 handwritten digits (UCI optdigits test part), no network needed."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib

import numpy as np

from jaxnn.data.dataset import SourceData

DIGITS_NUM_CLASSES = 10
DIGITS_MAX_PIXEL = 16.0  # pixels are counts 0..16 of set bits in 4x4 blocks of the original 32x32 bitmaps


def load_digits(*, data_dir=None, seed: int = 0, download: bool = True) -> SourceData:
    """1,797 real 8x8 grey-scale digit images (values 0..16) as (8, 8, 1) NHWC, 10 classes, no official test set.

    Embedded in scikit-learn (``sklearn.datasets.load_digits``), so ``data_dir`` and ``download`` are unused.
    Inputs are scaled by 1/16 to [0, 1] before any standardisation.
    """
    del data_dir, seed, download  # embedded data: nothing to find or fetch; the split seed is applied by load_dataset
    images, labels = _read_embedded_digits()
    info = {
        "source": f"sklearn.datasets.load_digits (scikit-learn {importlib.metadata.version('scikit-learn')}; UCI ML "
                  f"optical recognition of handwritten digits)",
        "pixel_range": [0.0, DIGITS_MAX_PIXEL],
        "label_names": [str(digit) for digit in range(DIGITS_NUM_CLASSES)],
    }
    return SourceData(x=images, y=labels, num_classes=DIGITS_NUM_CLASSES, task="classification", info=info,
                      input_divisor=DIGITS_MAX_PIXEL)


def _read_embedded_digits() -> tuple[np.ndarray, np.ndarray]:
    """Images (1797, 8, 8, 1) float64 and labels (1797,) int32, read from scikit-learn's own data file.

    ``sklearn/datasets/data/digits.csv.gz`` is read the way ``sklearn.datasets.load_digits`` reads it (64 pixel
    columns, then the label), but without importing scikit-learn, which takes a second or more; if the file is not
    where this version keeps it, ``load_digits`` itself is used.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = pathlib.Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8, 1), table[:, -1].astype(np.int32)
    import sklearn.datasets

    bunch = sklearn.datasets.load_digits()
    return np.asarray(bunch.images, dtype=np.float64)[..., None], np.asarray(bunch.target, dtype=np.int32)
