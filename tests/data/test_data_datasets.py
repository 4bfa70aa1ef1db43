"""Dataset registry, digits, splits and train-only standardisation (oracle: sklearn's raw digits, numpy stats)."""

import json

import numpy as np
import pytest
import sklearn.datasets

import jaxnn.data as data
from jaxnn.data import registry

DIGITS_N = 1797


def _raw_digits():
    bunch = sklearn.datasets.load_digits()
    return bunch.images.astype(np.float64)[..., None] / 16.0, bunch.target.astype(np.int64)


def _row_keys(x, y):
    """Multiset of (example bytes, label) as a sorted list: compares splits as sets of examples."""
    return sorted(np.asarray(row, np.float64).round(6).tobytes() + int(label).to_bytes(2, "little")
                  for row, label in zip(x, y))


def test_registry_names_and_default():
    assert data.dataset_names() == sorted(
        ["digits", "mnist", "fashion_mnist", "cifar10", "blobs", "teacher_student", "quadratic", "seq2seq", "text"])
    assert data.DEFAULT_DATASET == "digits"
    assert set(data.DATASETS) == set(data.dataset_names())
    assert data.dataset_options("blobs")["num_classes"] == 3
    assert data.dataset_options("digits") == {}


def test_digits_shapes_classes_sizes():
    ds = data.load_dataset("digits")
    assert ds.name == "digits" and ds.task == "classification"
    assert ds.num_classes == 10 and ds.output_dim == 10
    assert ds.input_shape == (8, 8, 1)
    n_test, n_val = round(0.2 * DIGITS_N), round(0.1 * DIGITS_N)
    assert (len(ds.test), len(ds.val), len(ds.train)) == (n_test, n_val, DIGITS_N - n_test - n_val)
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == np.float32 and split.x.shape[1:] == (8, 8, 1)
        assert split.y.dtype == np.int32 and split.y.min() >= 0 and split.y.max() < 10
    assert ds.info["num_examples"] == {"train": len(ds.train), "val": len(ds.val), "test": len(ds.test)}
    json.dumps(ds.info)  # JSON-able provenance


def test_digits_splits_partition_the_real_data():
    x_raw, y_raw = _raw_digits()
    ds = data.load_dataset("digits", standardize=False, dtype="float64")
    x_all = np.concatenate([ds.train.x, ds.val.x, ds.test.x])
    y_all = np.concatenate([ds.train.y, ds.val.y, ds.test.y])
    assert _row_keys(x_all, y_all) == _row_keys(x_raw, y_raw)
    assert np.array_equal(np.bincount(y_all, minlength=10), np.bincount(y_raw, minlength=10))
    assert 0.0 <= x_all.min() and x_all.max() == 1.0  # pixels 0..16 scaled by 1/16


def test_split_is_deterministic_in_seed():
    a = data.load_dataset("digits", seed=3)
    b = data.load_dataset("digits", seed=3)
    c = data.load_dataset("digits", seed=4)
    for name in ("train", "val", "test"):
        assert np.array_equal(a.split(name).x, b.split(name).x)
        assert np.array_equal(a.split(name).y, b.split(name).y)
    assert not np.array_equal(a.test.x, c.test.x)


def test_standardization_fitted_on_train_only():
    raw = data.load_dataset("digits", seed=1, standardize=False, dtype="float64")
    std_ds = data.load_dataset("digits", seed=1, standardize=True, dtype="float64")
    mean = raw.train.x.mean(axis=0)  # oracle: by hand from the raw train rows
    std = raw.train.x.std(axis=0)
    scale = np.where(std > 1e-6, std, 1.0)
    assert (std <= 1e-6).sum() >= 1  # digits has always-blank pixels: the floor matters here
    for name in ("train", "val", "test"):
        np.testing.assert_allclose(std_ds.split(name).x, (raw.split(name).x - mean) / scale, rtol=0, atol=1e-12)
        assert np.array_equal(std_ds.split(name).y, raw.split(name).y)
    varying = std > 1e-6
    np.testing.assert_allclose(std_ds.train.x.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(std_ds.train.x.std(axis=0)[varying], 1.0, atol=1e-12)
    assert np.all(np.isfinite(std_ds.val.x)) and np.all(np.isfinite(std_ds.test.x))
    # val is transformed with TRAIN statistics, so its own mean is not zero.
    assert np.abs(std_ds.val.x.mean(axis=0)).max() > 1e-3
    info = std_ds.info["standardization"]
    np.testing.assert_allclose(np.array(info["mean"]), mean, atol=1e-12)
    np.testing.assert_allclose(np.array(info["scale"]), scale, atol=1e-12)
    assert info["num_constant_features"] == int((std <= 1e-6).sum())


def test_float32_standardization_matches_oracle():
    raw = data.load_dataset("digits", standardize=False, dtype="float64")
    ds = data.load_dataset("digits")
    std = raw.train.x.std(axis=0)
    expected = (raw.val.x - raw.train.x.mean(axis=0)) / np.where(std > 1e-6, std, 1.0)
    np.testing.assert_allclose(ds.val.x, expected, atol=2e-5)


def test_limit_and_fractions():
    full = data.load_dataset("digits", standardize=False)
    ds = data.load_dataset("digits", limit=100, val_fraction=0.15, test_fraction=0.25, standardize=False)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (60, 15, 25)
    assert ds.info["split"]["limit"] == 100 and ds.info["split"]["pool_size"] == DIGITS_N
    full_keys = set(_row_keys(np.concatenate([full.train.x, full.val.x, full.test.x]),
                              np.concatenate([full.train.y, full.val.y, full.test.y])))
    assert set(_row_keys(ds.train.x, ds.train.y)) <= full_keys
    no_holdout = data.load_dataset("digits", val_fraction=0.0, test_fraction=0.0)
    assert len(no_holdout.train) == DIGITS_N and len(no_holdout.val) == 0 and len(no_holdout.test) == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"val_fraction": 1.0}, ValueError, r"val_fraction must be in \[0, 1\); got 1.0"),
        ({"val_fraction": -0.1}, ValueError, "val_fraction"),
        ({"test_fraction": float("nan")}, TypeError, "test_fraction"),
        ({"val_fraction": "0.1"}, TypeError, "val_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, ValueError, r"val_fraction \+ test_fraction must be < 1"),
        ({"limit": 0}, ValueError, "limit must be None or a positive int; got 0"),
        ({"seed": -1}, ValueError, "seed must be a non-negative int; got -1"),
        ({"dtype": "int32"}, ValueError, "dtype must be a floating dtype"),
        ({"standardize": "yes"}, TypeError, "standardize must be a bool"),
        ({"limit": 2, "val_fraction": 0.5, "test_fraction": 0.4}, ValueError, "leave no training examples"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        data.load_dataset("digits", **kwargs)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as info:
        data.load_dataset("imagenet")
    for name in data.dataset_names():
        assert name in str(info.value)


def test_unknown_option_lists_options():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['num_clases'\].*num_classes"):
        data.load_dataset("blobs", num_clases=4)


def test_register_dataset(monkeypatch):
    monkeypatch.setattr(registry, "DATASETS", dict(registry.DATASETS))

    def load_tiny(*, data_dir=None, seed=0, download=True, size=20):
        x = np.arange(size * 2, dtype=np.float64).reshape(size, 2)
        return data.SourceData(x=x, y=(np.arange(size) % 2).astype(np.int32), num_classes=2,
                               task="classification", info={"source": "test"})

    registry.register_dataset("tiny", load_tiny)
    ds = registry.load_dataset("tiny", size=10, standardize=False, val_fraction=0.2, test_fraction=0.2)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 2, 2) and ds.info["options"] == {"size": 10}
    with pytest.raises(ValueError, match="already registered"):
        registry.register_dataset("tiny", load_tiny)
    with pytest.raises(TypeError, match=r"missing \['download'\]"):
        registry.register_dataset("bad", lambda *, data_dir=None, seed=0: None)


def test_split_validation():
    with pytest.raises(ValueError, match=r"same number of examples.*x.shape=\(3, 2\) and y.shape=\(4,\)"):
        data.Split(np.zeros((3, 2)), np.zeros(4))
    x = np.zeros((3, 2))
    x[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"Split.x must be finite; found 1 NaN/inf entries \(first in example 1\)"):
        data.Split(x, np.zeros(3))
    with pytest.raises(TypeError, match="Split.y must be a numeric array"):
        data.Split(np.zeros((2, 1)), np.array(["a", "b"]))
    assert len(data.Split(np.zeros((5, 1)), np.zeros(5))) == 5


def test_dataset_validation():
    good = data.Split(np.zeros((4, 3), np.float32), np.array([0, 1, 2, 1], np.int32))
    kwargs = dict(name="t", train=good, val=good, test=good, num_classes=3, input_shape=(3,),
                  task="classification", info={})
    assert data.Dataset(**kwargs).output_dim == 3
    with pytest.raises(ValueError, match=r"must lie in \[0, num_classes=2\); got labels in \[0, 2\]"):
        data.Dataset(**{**kwargs, "num_classes": 2})
    with pytest.raises(ValueError, match=r"input_shape=\(4,\); got x.shape=\(4, 3\)"):
        data.Dataset(**{**kwargs, "input_shape": (4,)})
    with pytest.raises(ValueError, match="task must be one of"):
        data.Dataset(**{**kwargs, "task": "ranking"})
    with pytest.raises(ValueError, match="int32 labels"):
        data.Dataset(**{**kwargs, "train": data.Split(np.zeros((4, 3)), np.zeros(4, np.int64))})
    with pytest.raises(ValueError, match="split name must be one of"):
        data.Dataset(**kwargs).split("validation")


def test_float64_dataset_under_x64(x64):
    ds = data.load_dataset("digits", dtype="float64")
    assert ds.train.x.dtype == np.float64
    x, y = next(data.batch_iterator(ds.train, 16))
    assert x.dtype == np.float64 and y.dtype == np.int32


def test_fit_standardization_chunks_match_numpy(monkeypatch):
    from jaxnn.data import dataset

    monkeypatch.setattr(dataset, "_STATISTICS_CHUNK_ROWS", 7)  # several chunks plus a ragged last one
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(50, 4, 3)).astype(np.float32)
    x[:, 0, 0] = 5.0
    stats = data.fit_standardization(x)
    np.testing.assert_allclose(stats.mean, x.astype(np.float64).mean(axis=0), rtol=1e-12)
    expected_scale = x.astype(np.float64).std(axis=0)
    expected_scale[0, 0] = 1.0
    np.testing.assert_allclose(stats.scale, expected_scale, rtol=1e-12)
    assert stats.constant.sum() == 1 and stats.constant[0, 0]
    with pytest.raises(ValueError, match="at least one example"):
        data.fit_standardization(np.zeros((0, 3)))


def test_apply_standardization_checks_shapes_and_copies():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    mean, scale = np.ones(3), np.full(3, 2.0)
    out = data.apply_standardization(x, mean, scale, np.float32)
    np.testing.assert_array_equal(out, (x - 1) / 2)
    assert out is not x and x[0, 0] == 0  # input untouched by default
    in_place = data.apply_standardization(x, mean, scale, np.float32, copy=False)
    assert in_place is x and x[0, 0] == -0.5
    with pytest.raises(ValueError, match=r"per-example shape \(3,\); got \(4,\) and \(3,\)"):
        data.apply_standardization(x, np.zeros(4), scale, np.float32)
