"""The in-memory dataset types (`Split`, `Dataset`) and per-feature standardisation fitted on train.

Everything here is host-side numpy: a `Split` holds the examples of one partition, a `Dataset` holds the
three partitions plus what a model and a report need to know (classes, per-example shape, task,
provenance). Moving batches to devices is `jaxnn.data.pipeline`'s job.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

TASKS = ("classification", "regression")
SPLIT_NAMES = ("train", "val", "test")
IGNORE_LABEL = -1
"""In sequence labels (classification targets of shape (n, T)), the label of a padded position: no loss, no score."""

DATA_DIR_ENV = "JAXNN_DATA"
DATA_DIR_ENV_ALIAS = "JAXNN_DATA_DIR"  # the name this variable had first; still read

# Rows per chunk when accumulating statistics in float64 (bounds the temporary memory on large image sets).
_STATISTICS_CHUNK_ROWS = 4096


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One partition of a dataset: inputs ``x`` (leading example axis) and targets ``y`` (same length).

    Both are host numpy arrays. Construction checks that they are arrays with a leading example axis of
    the same length and that floating-point entries are finite; ``len(split)`` is the number of examples.
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self):
        x = np.asarray(self.x)
        y = np.asarray(self.y)
        if x.ndim < 1:
            raise ValueError(f"Split.x must have a leading example axis; got a scalar of shape {x.shape}")
        if y.ndim < 1:
            raise ValueError(f"Split.y must have a leading example axis; got a scalar of shape {y.shape}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"Split.x and Split.y must have the same number of examples (leading axis); "
                f"got x.shape={x.shape} and y.shape={y.shape}"
            )
        for field, array in (("x", x), ("y", y)):
            if array.dtype == object or not (
                np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)
            ):
                raise TypeError(f"Split.{field} must be a numeric array; got dtype {array.dtype}")
            if np.issubdtype(array.dtype, np.inexact):
                finite = np.isfinite(array)
                if not finite.all():
                    bad = int(array.size - np.count_nonzero(finite))
                    first = int(np.argwhere(~finite)[0][0])
                    raise ValueError(
                        f"Split.{field} must be finite; found {bad} NaN/inf entries (first in example {first})"
                    )
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset split into train / val / test, with what models and reports need to know about it.

    Attributes:
      name: registry name (e.g. ``"digits"``).
      train, val, test: the three partitions (val and test may be empty).
      num_classes: number of classes for classification (labels are int32 in ``[0, num_classes)``);
        ``None`` for regression.
      input_shape: per-example input shape, e.g. ``(8, 8, 1)`` for NHWC images or ``(d,)`` for vectors.
      task: ``"classification"`` or ``"regression"``.
      info: JSON-able provenance (source files and checksums, split sizes and seed, standardisation).
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int | None
    input_shape: tuple[int, ...]
    task: str
    info: dict

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"Dataset.task must be one of {list(TASKS)}; got {self.task!r}")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        for split_name in SPLIT_NAMES:
            split = getattr(self, split_name)
            if not isinstance(split, Split):
                raise TypeError(f"Dataset.{split_name} must be a Split; got {type(split).__name__}")
            if split.x.shape[1:] != self.input_shape:
                raise ValueError(
                    f"Dataset.{split_name}.x must have per-example shape input_shape={self.input_shape}; "
                    f"got x.shape={split.x.shape}"
                )
        if self.task == "classification":
            if not isinstance(self.num_classes, (int, np.integer)) or isinstance(self.num_classes, bool):
                raise TypeError(f"Dataset.num_classes must be an int for classification; got {self.num_classes!r}")
            if self.num_classes < 2:
                raise ValueError(f"Dataset.num_classes must be >= 2 for classification; got {self.num_classes}")
            label_shapes = {getattr(self, s).y.shape[1:] for s in SPLIT_NAMES}
            if len(label_shapes) != 1:
                raise ValueError(f"Dataset splits must share one per-example label shape; got {sorted(label_shapes)}")
            for split_name in SPLIT_NAMES:
                y = getattr(self, split_name).y
                if y.ndim not in (1, 2) or y.dtype != np.int32:
                    raise ValueError(
                        f"Dataset.{split_name}.y must be int32 labels of shape (n,), or sequence labels of shape "
                        f"(n, T); got dtype {y.dtype} and shape {y.shape}"
                    )
                low = IGNORE_LABEL if y.ndim == 2 else 0
                if y.size and (y.min() < low or y.max() >= self.num_classes):
                    padding = f" (or {IGNORE_LABEL} for padding)" if y.ndim == 2 else ""
                    raise ValueError(
                        f"Dataset.{split_name}.y must lie in [0, num_classes={self.num_classes}){padding}; "
                        f"got labels in [{y.min()}, {y.max()}]"
                    )
        else:
            if self.num_classes is not None:
                raise ValueError(f"Dataset.num_classes must be None for regression; got {self.num_classes!r}")
            target_shapes = {getattr(self, s).y.shape[1:] for s in SPLIT_NAMES}
            if len(target_shapes) != 1:
                raise ValueError(f"Dataset splits must share one per-example target shape; got {sorted(target_shapes)}")
            for split_name in SPLIT_NAMES:
                y = getattr(self, split_name).y
                if not np.issubdtype(y.dtype, np.floating):
                    raise ValueError(f"Dataset.{split_name}.y must be floating targets for regression; got {y.dtype}")

    @property
    def sequence_labels(self) -> bool:
        """Whether the targets are a label per position, (n, T) with ``IGNORE_LABEL`` at padded positions."""
        return self.task == "classification" and self.train.y.ndim == 2

    @property
    def output_dim(self) -> int:
        """Width of the model output: ``num_classes`` for classification, the target width for regression."""
        if self.task == "classification":
            return int(self.num_classes)
        return int(np.prod(self.train.y.shape[1:], dtype=np.int64))

    def describe(self) -> str:
        """One line: the split sizes and where they come from, e.g. ``mnist: 7000/1000/2000 train/val/test
        examples, all three drawn (seed 0) from mnist IDX files (t10k pair only: no training files in ...)``."""
        sizes = "/".join(str(len(getattr(self, s))) for s in SPLIT_NAMES)
        split = self.info.get("split", {})
        source = self.info.get("source", "the source")
        layout = self.info.get("layout", "")
        if split.get("official_test"):
            origin = f"train/val from {source}'s training files, test its own test files"
        else:
            missing = "training" if layout.startswith("t10k") else "t10k (test)"
            files = f" ({layout.split(':')[0]}: no {missing} files in {self.info.get('directory')})" \
                if "pair only" in layout else ""
            limit = f", at most {split['limit']} examples" if split.get("limit") else ""
            origin = f"all three drawn (seed {self.info.get('seed')}) from {source}{files}{limit}"
        return f"{self.name}: {sizes} train/val/test examples, {origin}"

    def split(self, name: str) -> Split:
        """The partition called ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"split name must be one of {list(SPLIT_NAMES)}; got {name!r}")
        return getattr(self, name)


_LABEL_NOISE_STREAM = 0x6E6F69  # keeps label-noise draws apart from the split/limit streams of the same seed


def noisy_labels(labels, probability: float, num_classes: int, seed: int) -> np.ndarray:
    """``labels`` with each one replaced, with probability ``probability``, by a class drawn uniformly from the
    *other* ``num_classes − 1`` classes (symmetric label noise; the true class keeps frequency 1 − p and every other
    class gets p/(C − 1), so the true class stops being the most frequent label above p = (C − 1)/C). The draw
    depends on ``seed`` and ``len(labels)`` only. Returns int32 labels of the same shape."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"noisy_labels: labels must be a 1-D integer array, got dtype {labels.dtype} and shape "
                         f"{labels.shape}")
    if not 0.0 <= float(probability) <= 1.0:
        raise ValueError(f"noisy_labels: probability must be in [0, 1], got {probability!r}")
    if int(num_classes) < 2 or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"noisy_labels: labels must lie in [0, num_classes={num_classes}) with num_classes >= 2")
    rng = np.random.default_rng([int(seed), _LABEL_NOISE_STREAM])
    flip = rng.random(labels.shape[0]) < float(probability)
    offset = rng.integers(1, int(num_classes), labels.shape[0])
    return np.where(flip, (labels + offset) % int(num_classes), labels).astype(np.int32)


class Standardization(NamedTuple):
    """Per-feature statistics fitted on train: ``mean``, ``scale`` (std, or 1 where ``constant``)."""

    mean: np.ndarray
    scale: np.ndarray
    constant: np.ndarray  # bool: the feature's train std is <= min_std


def fit_standardization(x_train: np.ndarray, *, min_std: float = 1e-6) -> Standardization:
    """Per-feature mean and scale over the train rows: ``mean = x̄``, ``scale = std if std > min_std else 1``.

    A feature is one entry of the per-example shape (one pixel-channel for images). Statistics are
    accumulated in float64 in row chunks (two passes, memory bounded by the chunk). Features whose
    population std (ddof=0) is at most ``min_std`` are constant on train: they are centred and left
    unscaled (scale 1, the scikit-learn StandardScaler convention), so nothing is divided by zero.
    Returns `Standardization` (mean, scale, constant), each with the per-example shape (float64 / bool).
    """
    x_train = np.asarray(x_train)
    if x_train.ndim < 1 or x_train.shape[0] == 0:
        raise ValueError(f"x_train must have at least one example to fit a standardisation; got shape {x_train.shape}")
    if not np.isfinite(min_std) or min_std < 0:
        raise ValueError(f"min_std must be a finite non-negative number; got {min_std}")
    n = x_train.shape[0]
    total = np.zeros(x_train.shape[1:], dtype=np.float64)
    for start in range(0, n, _STATISTICS_CHUNK_ROWS):
        total += x_train[start : start + _STATISTICS_CHUNK_ROWS].sum(axis=0, dtype=np.float64)
    mean = total / n
    squared = np.zeros_like(mean)
    for start in range(0, n, _STATISTICS_CHUNK_ROWS):
        deviation = x_train[start : start + _STATISTICS_CHUNK_ROWS].astype(np.float64) - mean
        squared += np.einsum("i...,i...->...", deviation, deviation)
    std = np.sqrt(squared / n)
    constant = ~(std > min_std)
    return Standardization(mean=mean, scale=np.where(constant, 1.0, std), constant=constant)


def apply_standardization(x: np.ndarray, mean: np.ndarray, scale: np.ndarray, dtype: Any, *,
                          copy: bool = True) -> np.ndarray:
    """``(x - mean) / scale`` per feature as an array of ``dtype``.

    With ``copy=False`` and ``x`` already of ``dtype`` the result overwrites ``x`` (saves one copy of a
    large image set); otherwise a new array is returned.
    """
    x = np.asarray(x)
    if mean.shape != x.shape[1:] or scale.shape != x.shape[1:]:
        raise ValueError(
            f"mean and scale must have the per-example shape {x.shape[1:]}; got {mean.shape} and {scale.shape}"
        )
    out = np.array(x, dtype=dtype, copy=True) if copy or x.dtype != np.dtype(dtype) else x
    out -= mean.astype(dtype)
    out /= scale.astype(dtype)
    return out


class CorruptFileError(ValueError):
    """A dataset file exists but is not in the expected format (bad magic number, truncated, wrong shape)."""


@dataclasses.dataclass(frozen=True, eq=False)
class SourceData:
    """What a dataset loader returns: raw examples before splitting, scaling and standardisation.

    Attributes:
      x, y: the train pool (the whole data set when the source has no official test set).
      num_classes: number of classes, or None for regression.
      task: ``"classification"`` or ``"regression"``.
      info: JSON-able provenance of the source (files and MD5s, generator settings, notes).
      x_test, y_test: the source's official test set, or None.
      input_divisor: raw inputs are divided by this when converted to float (255 for uint8 pixels), so
        the float inputs are the correctly rounded ``x / input_divisor``.
      token_inputs: ``x`` holds integer token ids: kept as int32, never scaled nor standardised.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int | None
    task: str
    info: dict
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    input_divisor: float = 1.0
    token_inputs: bool = False

    def __post_init__(self):
        if self.token_inputs and not np.issubdtype(np.asarray(self.x).dtype, np.integer):
            raise TypeError(f"SourceData.x: expected integer token ids with token_inputs=True, got dtype "
                            f"{np.asarray(self.x).dtype}")
        if (self.x_test is None) != (self.y_test is None):
            raise ValueError("SourceData.x_test and SourceData.y_test must both be given or both be None")
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"SourceData.x and .y lengths differ: x.shape={self.x.shape}, y.shape={self.y.shape}")
        if self.x_test is not None:
            if self.x_test.shape[0] != self.y_test.shape[0]:
                raise ValueError(
                    f"SourceData.x_test and .y_test lengths differ: "
                    f"x_test.shape={self.x_test.shape}, y_test.shape={self.y_test.shape}"
                )
            if self.x_test.shape[1:] != self.x.shape[1:]:
                raise ValueError(
                    f"SourceData test inputs must have the train per-example shape {self.x.shape[1:]}; "
                    f"got {self.x_test.shape[1:]}"
                )

    @property
    def has_official_test(self) -> bool:
        return self.x_test is not None


def default_data_dir(name: str) -> Path:
    """Where a dataset's files live when no ``data_dir`` is given: ``$JAXNN_DATA/<name>`` (or
    ``$JAXNN_DATA_DIR/<name>``), else ``~/.cache/jaxnn/data/<name>``."""
    root = (os.environ.get(DATA_DIR_ENV) or os.environ.get(DATA_DIR_ENV_ALIAS)
            or os.path.join("~", ".cache", "jaxnn", "data"))
    return Path(root).expanduser() / name
