"""Batch pipeline: epochs, drop remainder, determinism, exact resume, prefetch, sharding, errors."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxnn.runtime import simulated_device_environment

import jaxnn.data as data


def indexed_split(n=10, features=3):
    """x[i] = i in every feature, so a batch's rows say which examples it holds."""
    x = np.repeat(np.arange(n, dtype=np.float64)[:, None], features, axis=1)
    return data.Split(x, np.arange(n) % 4)


def rows(batches):
    return [np.asarray(x)[:, 0].astype(int).tolist() for x, _ in batches]


def test_steps_per_epoch():
    assert data.steps_per_epoch(10, 3, True) == 3
    assert data.steps_per_epoch(10, 3, False) == 4
    assert data.steps_per_epoch(9, 3, False) == 3
    assert data.steps_per_epoch(5, 5, True) == 1
    with pytest.raises(ValueError, match=r"batch_size=6 is larger than the split \(5 examples\)"):
        data.steps_per_epoch(5, 6, True)
    assert data.steps_per_epoch(5, 6, False) == 1
    with pytest.raises(ValueError, match="n must be positive"):
        data.steps_per_epoch(0, 1, False)
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1, got 0"):
        data.steps_per_epoch(5, 0, True)


def test_epochs_and_drop_remainder():
    split = indexed_split(10)
    batches = list(data.batch_iterator(split, 3, epochs=2, seed=1))
    assert len(batches) == 6 and all(x.shape == (3, 3) for x, _ in batches)
    epochs = [sum(rows(batches[i:i + 3]), []) for i in (0, 3)]
    for order in epochs:
        assert len(set(order)) == 9 and set(order) <= set(range(10))  # one example dropped per epoch
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    kept = list(data.batch_iterator(split, 3, epochs=2, seed=1, drop_remainder=False))
    assert [x.shape[0] for x, _ in kept] == [3, 3, 3, 1, 3, 3, 3, 1]
    for start in (0, 4):
        assert sorted(sum(rows(kept[start:start + 4]), [])) == list(range(10))  # every example once per epoch


def test_unshuffled_order_and_dtypes():
    split = indexed_split(7)
    batches = list(data.batch_iterator(split, 2, shuffle=False, epochs=1, drop_remainder=False))
    assert rows(batches) == [[0, 1], [2, 3], [4, 5], [6]]
    x, y = batches[0]
    assert isinstance(x, jax.Array) and x.dtype == np.float32  # float64 host data -> float32 without x64
    assert y.dtype == np.int32  # int64 host labels -> int32
    np.testing.assert_array_equal(np.asarray(y), split.y[:2])
    regression = data.Split(np.zeros((4, 2), np.float32), np.ones((4, 1), np.float64))
    _, targets = next(data.batch_iterator(regression, 2))
    assert targets.dtype == np.float32 and targets.shape == (2, 1)


def test_determinism_and_seed():
    split = indexed_split(20)
    a = rows(data.batch_iterator(split, 4, seed=3, epochs=3))
    b = rows(data.batch_iterator(split, 4, seed=3, epochs=3))
    c = rows(data.batch_iterator(split, 4, seed=4, epochs=3))
    assert a == b and a != c


def test_epoch_order_depends_only_on_seed_and_epoch():
    """The visiting order of epoch e is the same whatever the batch size (it depends only on (seed, e))."""
    split = indexed_split(12)
    by_2 = sum(rows(data.batch_iterator(split, 2, seed=8, epochs=3)), [])
    by_3 = sum(rows(data.batch_iterator(split, 3, seed=8, epochs=3)), [])
    by_12 = sum(rows(data.batch_iterator(split, 12, seed=8, epochs=3)), [])
    assert by_2 == by_3 == by_12
    assert by_2[12:24] == data.epoch_permutation(12, 8, 1).tolist()


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_resume_equals_tail_of_uninterrupted_stream(drop_remainder):
    split = indexed_split(11)
    full = list(data.batch_iterator(split, 3, seed=5, epochs=3, drop_remainder=drop_remainder))
    per_epoch = data.steps_per_epoch(11, 3, drop_remainder)
    assert len(full) == 3 * per_epoch
    for start in (0, 1, per_epoch - 1, per_epoch, per_epoch + 2, 3 * per_epoch - 1, 3 * per_epoch):
        resumed = list(data.batch_iterator(split, 3, seed=5, epochs=3, start_step=start,
                                           drop_remainder=drop_remainder))
        assert len(resumed) == len(full) - start
        for (x_full, y_full), (x_resumed, y_resumed) in zip(full[start:], resumed):
            np.testing.assert_array_equal(np.asarray(x_full), np.asarray(x_resumed))  # bit-identical
            np.testing.assert_array_equal(np.asarray(y_full), np.asarray(y_resumed))


def test_resume_infinite_stream_after_kill():
    split = indexed_split(9)
    uninterrupted = data.batch_iterator(split, 4, seed=2)
    expected = [next(uninterrupted) for _ in range(12)]
    killed = data.batch_iterator(split, 4, seed=2)
    for _ in range(7):
        next(killed)
    assert killed.step == 7 and killed.num_steps is None
    resumed = data.batch_iterator(split, 4, seed=2, start_step=killed.step)
    assert rows([next(resumed) for _ in range(5)]) == rows(expected[7:])
    with pytest.raises(TypeError, match="infinite"):
        len(resumed)


def test_iterator_bookkeeping():
    iterator = data.batch_iterator(indexed_split(10), 3, epochs=2, start_step=2)
    assert iterator.steps_per_epoch == 3 and iterator.num_steps == 6 and len(iterator) == 4
    next(iterator)
    assert iterator.step == 3 and len(iterator) == 3
    assert len(list(iterator)) == 3
    with pytest.raises(StopIteration):
        next(iterator)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_prefetch_puts_batches_on_device_ahead(monkeypatch, prefetch):
    calls = []
    real_device_put = jax.device_put

    def counting_device_put(value, device=None, **kwargs):
        calls.append(np.shape(value))
        return real_device_put(value, device, **kwargs)

    monkeypatch.setattr(jax, "device_put", counting_device_put)
    iterator = data.batch_iterator(indexed_split(10), 2, epochs=1, prefetch=prefetch)
    assert calls == []  # nothing is transferred before the first request
    next(iterator)
    assert len(calls) == 2 * (1 + prefetch)  # x and y of the current batch and `prefetch` more
    next(iterator)
    assert len(calls) == 2 * (2 + prefetch)
    list(iterator)
    assert len(calls) == 2 * 5  # never more transfers than batches


def test_one_device_mesh_sharding():
    mesh = jax.make_mesh((1,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    split = indexed_split(8)
    plain = list(data.batch_iterator(split, 4, seed=1, epochs=1))
    sharded = list(data.batch_iterator(split, 4, seed=1, epochs=1, sharding=sharding))
    for (x_plain, y_plain), (x, y) in zip(plain, sharded):
        assert x.sharding == sharding and y.sharding == sharding
        np.testing.assert_array_equal(np.asarray(x), np.asarray(x_plain))
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y_plain))
    stacked_x, _ = data.stacked_batches(split, 4, sharding=NamedSharding(mesh, PartitionSpec(None, "data")))
    assert stacked_x.shape == (2, 4, 3)


@pytest.mark.multidevice
def test_eight_device_sharding_subprocess():
    script = textwrap.dedent("""
        import os
        import jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec
        import jaxnn.data as data
        assert jax.device_count() == 8, jax.devices()
        mesh = jax.make_mesh((8,), ("data",))
        sharding = NamedSharding(mesh, PartitionSpec("data"))
        x = np.repeat(np.arange(40, dtype=np.float32)[:, None], 2, axis=1)
        split = data.Split(x, np.arange(40) % 3)
        plain = next(data.batch_iterator(split, 16, seed=4))
        xs, ys = next(data.batch_iterator(split, 16, seed=4, sharding=sharding))
        assert len(xs.addressable_shards) == 8
        for shard in xs.addressable_shards:
            assert shard.data.shape == (2, 2)
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(plain[0])[shard.index])
        np.testing.assert_array_equal(np.asarray(ys), np.asarray(plain[1]))
        try:
            data.batch_iterator(split, 12, sharding=sharding)
        except ValueError as error:
            assert "batch size 12 must be divisible" in str(error), error
        else:
            raise AssertionError("indivisible batch accepted")
        try:
            data.batch_iterator(split, 16, sharding=sharding, drop_remainder=False)  # last batch of 8 is fine
            data.batch_iterator(data.Split(x[:36], np.zeros(36)), 16, sharding=sharding, drop_remainder=False)
        except ValueError as error:
            assert "batch size 4 must be divisible" in str(error), error
        else:
            raise AssertionError("indivisible remainder batch accepted")
        print("OK")
    """)
    environment = {**simulated_device_environment(os.environ, 8), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stderr[-3000:]


def test_stacked_and_full_batches():
    split = indexed_split(10)
    x, y = data.stacked_batches(split, 3, seed=6, shuffle=True)
    assert x.shape == (3, 3, 3) and y.shape == (3, 3) and x.dtype == np.float32
    first_epoch = list(data.batch_iterator(split, 3, seed=6, epochs=1))
    for k, (xb, yb) in enumerate(first_epoch):
        np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(xb))
        np.testing.assert_array_equal(np.asarray(y[k]), np.asarray(yb))
    x2, _ = data.stacked_batches(split, 5, num_batches=1)
    assert np.asarray(x2)[0, :, 0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="num_batches=3 exceeds the 2 full batches of size 5"):
        data.stacked_batches(split, 5, num_batches=3)
    full_x, full_y = data.full_batch(split)
    np.testing.assert_array_equal(np.asarray(full_x), split.x.astype(np.float32))
    assert full_y.dtype == np.int32


def test_real_dataset_batches():
    ds = data.load_dataset("digits")
    x, y = next(data.batch_iterator(ds.train, 64, seed=0))
    assert x.shape == (64, 8, 8, 1) and x.dtype == np.float32 and y.shape == (64,) and y.dtype == np.int32


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((indexed_split(5), 6), {}, ValueError, r"batch_size=6 is larger than the split \(5 examples\) with drop_remainder=True"),
        ((indexed_split(5), 0), {}, ValueError, "batch_size: expected an integer >= 1, got 0"),
        ((indexed_split(5), 2.0), {}, TypeError, "batch_size: expected an integer >= 1, got float 2.0"),
        ((indexed_split(5), 2), {"epochs": 0}, ValueError, "epochs: expected an integer >= 1, got 0"),
        ((indexed_split(5), 2), {"start_step": -1}, ValueError, "start_step: expected an integer >= 0, got -1"),
        ((indexed_split(5), 2), {"epochs": 1, "start_step": 3}, ValueError, "start_step=3 is past the end of the stream"),
        ((indexed_split(5), 2), {"prefetch": -1}, ValueError, "prefetch: expected an integer >= 0"),
        ((indexed_split(5), 2), {"sharding": "data"}, TypeError, "sharding must be a jax.sharding.Sharding"),
        ((np.zeros((5, 2)), 2), {}, TypeError, r"split must be a jaxnn.data.Split or an \(x, y\) tuple"),
        ((data.Split(np.zeros((0, 2)), np.zeros(0)), 1), {}, ValueError, r"split is empty \(0 examples\)"),
        (((np.zeros((3, 2)), np.zeros(4)), 1), {}, ValueError, "same number of examples"),
    ],
)
def test_invalid_iterator_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        data.batch_iterator(*args, **kwargs)

