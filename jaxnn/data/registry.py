"""Dataset registry and `load_dataset`: loader -> deterministic train/val/test split -> float -> standardisation.

A loader is a function ``loader(*, data_dir, seed, download, **options) -> SourceData`` registered under a
name in `DATASETS`. `load_dataset` validates the arguments, calls the loader, splits its pool with a
permutation that depends only on ``seed`` (keeping the source's official test set when it has one),
converts inputs to floats (``x / input_divisor``) and standardises every split with per-feature
statistics fitted on the train split only.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Callable

import numpy as np

from jaxnn.data import cifar, digits, idx, sequences, synthetic, text
from jaxnn.data.dataset import Dataset, SourceData, Split, apply_standardization, fit_standardization

DatasetLoader = Callable[..., SourceData]

DATASETS: dict[str, DatasetLoader] = {
    "digits": digits.load_digits,
    "mnist": idx.load_mnist,
    "fashion_mnist": idx.load_fashion_mnist,
    "cifar10": cifar.load_cifar10,
    "blobs": synthetic.load_blobs,
    "teacher_student": synthetic.load_teacher_student,
    "quadratic": synthetic.load_quadratic,
    "seq2seq": sequences.load_seq2seq,
    "text": text.load_text,
}
DEFAULT_DATASET = "digits"
STANDARDIZATION_MIN_STD = 1e-6

_LOADER_COMMON_ARGUMENTS = ("data_dir", "seed", "download")
# Random stream tags (SeedSequence spawn keys) used by load_dataset.
_LIMIT_STREAM, _SPLIT_STREAM = 1, 2


def dataset_names() -> list[str]:
    """Sorted names of the registered data sets."""
    return sorted(DATASETS)


def register_dataset(name: str, loader: DatasetLoader) -> DatasetLoader:
    """Add ``loader`` to `DATASETS` under ``name`` (it must take keyword-only data_dir, seed, download)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string; got {name!r}")
    if name in DATASETS:
        raise ValueError(f"dataset name {name!r} is already registered")
    parameters = inspect.signature(loader).parameters
    missing = [argument for argument in _LOADER_COMMON_ARGUMENTS if argument not in parameters]
    if missing:
        raise TypeError(f"loader for {name!r} must accept the keyword arguments {list(_LOADER_COMMON_ARGUMENTS)}; "
                        f"missing {missing}")
    DATASETS[name] = loader
    return loader


def dataset_options(name: str) -> dict[str, object]:
    """The data-set specific keyword options of ``name``'s loader and their defaults."""
    loader = _get_loader(name)
    return {key: parameter.default for key, parameter in inspect.signature(loader).parameters.items()
            if key not in _LOADER_COMMON_ARGUMENTS and parameter.kind is inspect.Parameter.KEYWORD_ONLY}


def _get_loader(name) -> DatasetLoader:
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {dataset_names()}")
    return DATASETS[name]


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(stream,)))


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a number in [0, 1); got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1); got {value}")
    return float(value)


def _check_arguments(seed, val_fraction, test_fraction, limit, standardize, download, dtype):
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 to leave training examples; "
            f"got {val_fraction} + {test_fraction} = {val_fraction + test_fraction}"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ValueError(f"limit must be None or a positive int; got {limit!r}")
    for flag_name, flag in (("standardize", standardize), ("download", download)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{flag_name} must be a bool; got {flag!r}")
    try:
        dtype = np.dtype(dtype)
    except TypeError as error:
        raise TypeError(f"dtype must be a numpy floating dtype; got {dtype!r}") from error
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a floating dtype (float32 or float64); got {dtype}")
    return int(seed), val_fraction, test_fraction, dtype


def _limited(x: np.ndarray, y: np.ndarray, limit: int | None, rng: np.random.Generator):
    """At most ``limit`` examples chosen at random (kept in source order)."""
    if limit is None or limit >= x.shape[0]:
        return x, y, x.shape[0]
    chosen = np.sort(rng.choice(x.shape[0], size=limit, replace=False))
    return x[chosen], y[chosen], x.shape[0]


def _to_float(x: np.ndarray, divisor: float, dtype: np.dtype) -> np.ndarray:
    out = np.array(x, dtype=dtype, copy=True)
    if divisor != 1.0:
        out /= dtype.type(divisor)
    return out


def _targets(y: np.ndarray, task: str, dtype: np.dtype) -> np.ndarray:
    return y.astype(np.int32) if task == "classification" else y.astype(dtype)


def load_dataset(name: str = DEFAULT_DATASET, *, data_dir=None, seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, standardize: bool = True, download: bool = True,
                 limit: int | None = None, dtype="float32", **kwargs) -> Dataset:
    """Load data set ``name`` split deterministically into train / val / test, inputs as float ``dtype``.

    Split: a permutation drawn from ``seed`` only (same seed, same split; each split keeps source order).
    Sources with an official test set (MNIST/Fashion-MNIST four-file layout, CIFAR-10) keep it as test
    and take ``round(val_fraction · n_train_pool)`` validation examples from the train pool
    (``test_fraction`` is then unused, recorded in ``info``). Otherwise test and val take
    ``round(test_fraction · n)`` and ``round(val_fraction · n)`` examples and train the rest.
    ``limit`` keeps at most that many examples of each source partition (train pool and official
    test), chosen at random with ``seed``, before splitting.
    Standardisation (``standardize=True``): x ← (x − μ)/s per feature (pixel-channel), μ and s the mean
    and std of the TRAIN split (s = 1 where std <= 1e-6, i.e. constant features are only centred);
    μ and s are stored in ``info["standardization"]``. Labels are int32 in [0, num_classes); regression
    targets are float ``dtype``. ``kwargs`` are the data set's own options (`dataset_options(name)`).
    Cost: one pass over the data (plus loading/decompressing the source files).
    """
    loader = _get_loader(name)
    seed, val_fraction, test_fraction, dtype = _check_arguments(
        seed, val_fraction, test_fraction, limit, standardize, download, dtype)
    options = dataset_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"dataset {name!r} got unknown option(s) {unknown}; its options are {sorted(options)}")
    source = loader(data_dir=data_dir, seed=seed, download=bool(download), **kwargs)
    if not isinstance(source, SourceData):
        raise TypeError(f"loader for {name!r} must return SourceData; got {type(source).__name__}")

    limit_rng = _rng(seed, _LIMIT_STREAM)
    x_pool, y_pool, pool_size = _limited(source.x, source.y, limit, limit_rng)
    n = x_pool.shape[0]
    if n == 0:
        raise ValueError(f"dataset {name!r} has no examples")
    n_val = int(round(val_fraction * n))
    n_test = 0 if source.has_official_test else int(round(test_fraction * n))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(
            f"dataset {name!r}: {n} examples leave no training examples with val_fraction={val_fraction} "
            f"and test_fraction={test_fraction}"
        )
    permutation = _rng(seed, _SPLIT_STREAM).permutation(n)
    test_rows = np.sort(permutation[:n_test])
    val_rows = np.sort(permutation[n_test:n_test + n_val])
    train_rows = np.sort(permutation[n_test + n_val:])
    raw = {"train": (x_pool[train_rows], y_pool[train_rows]), "val": (x_pool[val_rows], y_pool[val_rows])}
    if source.has_official_test:
        x_test, y_test, test_pool_size = _limited(source.x_test, source.y_test, limit, limit_rng)
        raw["test"] = (x_test, y_test)
    else:
        raw["test"] = (x_pool[test_rows], y_pool[test_rows])

    if source.token_inputs:
        x_float = {split: np.asarray(x, np.int32) for split, (x, _) in raw.items()}
        standardization: dict = {"applied": False, "note": "token ids are neither scaled nor standardised"}
    else:
        x_float = {split: _to_float(x, source.input_divisor, dtype) for split, (x, _) in raw.items()}
        standardization = {"applied": bool(standardize)}
    if standardize and not source.token_inputs:
        statistics = fit_standardization(x_float["train"], min_std=STANDARDIZATION_MIN_STD)
        x_float = {split: apply_standardization(x, statistics.mean, statistics.scale, dtype, copy=False)
                   for split, x in x_float.items()}  # x_float are private copies: standardise in place
        standardization.update({
            "kind": "per-feature (x - mean) / scale, fitted on the train split only; "
                    "scale = train std, or 1 where std <= min_std (constant features are only centred)",
            "min_std": STANDARDIZATION_MIN_STD,
            "num_constant_features": int(statistics.constant.sum()),
            "mean": statistics.mean.tolist(),
            "scale": statistics.scale.tolist(),
        })
    splits = {split: Split(x_float[split], _targets(y, source.task, dtype)) for split, (_, y) in raw.items()}

    info = {
        "name": name,
        **source.info,
        "seed": seed,
        "options": {key: _json_value(value) for key, value in kwargs.items()},
        "split": {
            "method": "seeded permutation (numpy SeedSequence(seed)); each split kept in source order",
            "official_test": source.has_official_test,
            "val_fraction": val_fraction,
            "test_fraction": None if source.has_official_test else test_fraction,
            "limit": limit,
            "pool_size": pool_size,
        },
        "num_examples": {split: len(splits[split]) for split in splits},
        "input_divisor": source.input_divisor,
        "dtype": dtype.name,
        "standardization": standardization,
    }
    if source.has_official_test:
        info["split"]["note"] = "the source's official test set is the test split; test_fraction is not used"
        info["split"]["test_pool_size"] = test_pool_size
    return Dataset(name=name, train=splits["train"], val=splits["val"], test=splits["test"],
                   num_classes=source.num_classes, input_shape=tuple(x_pool.shape[1:]), task=source.task, info=info)


def _json_value(value):
    """Options as JSON-able values (tuples -> lists, numpy scalars/arrays -> python)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    return value
