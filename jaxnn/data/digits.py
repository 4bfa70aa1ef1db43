"""The default data set: scikit-learn's real 8x8 handwritten digits (UCI optdigits test part), no network needed."""

from __future__ import annotations

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
    import sklearn  # imported here: scikit-learn takes seconds to import and only this loader needs it
    import sklearn.datasets

    bunch = sklearn.datasets.load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)[..., None]
    labels = np.asarray(bunch.target, dtype=np.int32)
    info = {
        "source": f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__}; UCI ML optical "
                  f"recognition of handwritten digits)",
        "pixel_range": [0.0, DIGITS_MAX_PIXEL],
        "label_names": [str(digit) for digit in range(DIGITS_NUM_CLASSES)],
    }
    return SourceData(x=images, y=labels, num_classes=DIGITS_NUM_CLASSES, task="classification", info=info,
                      input_divisor=DIGITS_MAX_PIXEL)
