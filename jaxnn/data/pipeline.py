"""The batch pipeline: deterministic, resumable shuffled batches placed on device ahead of use.

Order: epoch ``e`` visits the examples in `epoch_permutation(n, seed, e)` (a permutation that depends
only on ``(seed, e)``), cut into consecutive batches. Global step ``s`` is batch ``s mod S`` of epoch
``s div S`` (S = steps per epoch), so an iterator started at ``start_step=s`` yields exactly what an
uninterrupted one yields from step ``s`` on: bit-identical resume after a kill needs only the step.

Placement: host batches are gathered with numpy and handed to ``jax.device_put`` (asynchronous) up to
``prefetch`` batches ahead of the one being consumed, onto the default device or a ``sharding`` (for
data parallelism, e.g. ``NamedSharding(mesh, PartitionSpec("data"))`` splits the batch axis over the
mesh's "data" axis). No host synchronisation happens per step.
"""

from __future__ import annotations

import collections
from typing import Iterator

import jax
import numpy as np

from jaxnn.validation import check_int
from jaxnn.data.dataset import Split

_EPOCH_STREAM = 7


def steps_per_epoch(n: int, batch_size: int, drop_remainder: bool) -> int:
    """Batches in one pass over ``n`` examples: ⌊n/B⌋ with ``drop_remainder``, else ⌈n/B⌉.

    Raises ValueError when that is zero (no examples, or B > n with drop_remainder).
    """
    n = check_int(n, "n", minimum=0, allow_bool=False)
    batch_size = check_int(batch_size, "batch_size", minimum=1, allow_bool=False)
    if n == 0:
        raise ValueError("n must be positive: an empty split has no batches")
    if drop_remainder and batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} is larger than the split ({n} examples) with drop_remainder=True: "
            f"no full batch exists; use batch_size <= {n} or drop_remainder=False"
        )
    return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which epoch ``epoch`` visits ``n`` examples: a permutation drawn from (seed, epoch) only.

    ``numpy.random.default_rng(SeedSequence(seed, spawn_key=(7, epoch))).permutation(n)``; identity
    when ``shuffle=False``.
    """
    if not shuffle:
        return np.arange(n)
    sequence = np.random.SeedSequence(entropy=seed, spawn_key=(_EPOCH_STREAM, epoch))
    return np.random.default_rng(sequence).permutation(n)


def _as_split(split) -> Split:
    if isinstance(split, Split):
        return split
    if isinstance(split, tuple) and len(split) == 2:
        return Split(*split)
    raise TypeError(f"split must be a jaxnn.data.Split or an (x, y) tuple of arrays; got {type(split).__name__}")


def batch_rows(num_examples: int, batch_size: int, seed: int, start: int, count: int) -> np.ndarray:
    """(count, B) example indices of steps ``start .. start+count-1`` in :func:`batch_iterator`'s order (full
    batches): a compiled loop over many steps gathers its batches on the device from these rows."""
    per_epoch = steps_per_epoch(num_examples, batch_size, True)
    rows, cached = [], {}
    for step in range(start, start + count):
        epoch, position = divmod(step, per_epoch)
        if epoch not in cached:
            cached[epoch] = epoch_permutation(num_examples, seed, epoch)
        rows.append(cached[epoch][position * batch_size:(position + 1) * batch_size])
    return np.asarray(rows, np.int32)


def device_dtypes(split: Split) -> tuple[np.dtype, np.dtype]:
    """x: the split's float dtype canonicalised by jax (float64 only under x64), int32 for signed integer inputs
    (token ids), float32 for others (unsigned integers such as uint8 pixels, bool); y: int32 for labels,
    canonicalised float for targets."""
    if np.issubdtype(split.x.dtype, np.floating):
        x_dtype = split.x.dtype
    elif np.issubdtype(split.x.dtype, np.signedinteger):
        x_dtype = np.dtype(np.int32)
    else:
        x_dtype = np.dtype(np.float32)
    if np.issubdtype(split.y.dtype, np.floating):
        y_dtype = split.y.dtype
    else:
        y_dtype = np.dtype(np.int32)
    return np.dtype(jax.dtypes.canonicalize_dtype(x_dtype)), np.dtype(jax.dtypes.canonicalize_dtype(y_dtype))


def _check_sharding(sharding, split: Split, batch_sizes) -> None:
    if sharding is None:
        return
    if not isinstance(sharding, jax.sharding.Sharding):
        raise TypeError(f"sharding must be a jax.sharding.Sharding (e.g. NamedSharding(mesh, PartitionSpec('data'))) "
                        f"or None; got {type(sharding).__name__}")
    for size in sorted(set(batch_sizes)):
        for name, array in (("x", split.x), ("y", split.y)):
            shape = (size, *array.shape[1:])
            try:
                sharding.shard_shape(shape)
            except Exception as error:  # jax raises its own IndivisibleError / ValueError types
                raise ValueError(
                    f"sharding cannot place a batch of {name} with shape {shape}: the batch size {size} must be "
                    f"divisible by the number of devices the sharding splits the batch axis over ({error})"
                ) from error


class BatchIterator:
    """Iterator of device batches ``(x, y)``; see `batch_iterator`. ``step`` is the global step of the next batch."""

    def __init__(self, split: Split, batch_size: int, *, seed: int, shuffle: bool, drop_remainder: bool,
                 epochs: int | None, start_step: int, prefetch: int, sharding):
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch(len(split), batch_size, drop_remainder)
        self.num_steps = None if epochs is None else epochs * self.steps_per_epoch
        self.step = start_step
        self._next_host_step = start_step
        self._prefetch = prefetch
        self._sharding = sharding
        self._x_dtype, self._y_dtype = device_dtypes(split)
        self._queue: collections.deque = collections.deque()
        self._permutation_epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    def batch_indices(self, step: int) -> np.ndarray:
        """Indices (into the split) of the examples in global step ``step``'s batch."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._permutation_epoch:
            self._permutation = epoch_permutation(len(self.split), self.seed, epoch, self.shuffle)
            self._permutation_epoch = epoch
        return self._permutation[position * self.batch_size:(position + 1) * self.batch_size]

    def _device_batch(self, step: int):
        rows = self.batch_indices(step)
        if self._sharding is not None and not self._sharding.is_fully_addressable:
            # Several processes: each gathers only its slice of the global batch (contiguous, in process order).
            count, index = jax.process_count(), jax.process_index()
            per = len(rows) // count
            local = rows[index * per:(index + 1) * per]
            return tuple(jax.make_array_from_process_local_data(
                self._sharding, np.asarray(array[local], dtype=dtype), (len(rows),) + array.shape[1:])
                for array, dtype in ((self.split.x, self._x_dtype), (self.split.y, self._y_dtype)))
        x = np.asarray(self.split.x[rows], dtype=self._x_dtype)
        y = np.asarray(self.split.y[rows], dtype=self._y_dtype)
        return jax.device_put(x, self._sharding), jax.device_put(y, self._sharding)

    def _fill(self) -> None:
        while len(self._queue) <= self._prefetch and (self.num_steps is None or self._next_host_step < self.num_steps):
            self._queue.append(self._device_batch(self._next_host_step))
            self._next_host_step += 1

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> tuple[jax.Array, jax.Array]:
        self._fill()
        if not self._queue:
            raise StopIteration
        self.step += 1
        return self._queue.popleft()

    def __len__(self) -> int:
        """Batches left to yield (finite ``epochs`` only)."""
        if self.num_steps is None:
            raise TypeError("an iterator with epochs=None is infinite and has no length")
        return self.num_steps - self.step


def batch_iterator(split, batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_remainder: bool = True,
                   epochs: int | None = None, start_step: int = 0, prefetch: int = 2,
                   sharding: jax.sharding.Sharding | None = None) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Shuffled batches ``(x, y)`` of ``split`` as jax arrays, ``epochs`` passes (None = forever), resumable.

    Batch of global step s = rows ``epoch_permutation(n, seed, s div S)[(s mod S)·B : (s mod S + 1)·B]``
    with S = `steps_per_epoch`(n, B, drop_remainder); ``start_step=s`` starts there, so a resumed stream
    equals the tail of an uninterrupted one. ``drop_remainder=False`` yields a last, smaller batch per
    epoch. x is float32 (float64 only for a float64 split under x64); y is int32 labels or float targets.
    Up to ``prefetch`` batches are ``jax.device_put`` ahead of use, on the default device or ``sharding``
    (applied to both x and y: a batch-axis sharding such as ``NamedSharding(mesh, P("data"))``).
    Cost per batch: one host gather of B rows and one asynchronous host-to-device copy.
    Returns a `BatchIterator` (``.step``, ``.steps_per_epoch``, ``.num_steps``, ``len()`` when finite).
    """
    split = _as_split(split)
    batch_size = check_int(batch_size, "batch_size", minimum=1, allow_bool=False)
    if len(split) == 0:
        raise ValueError("split is empty (0 examples): there is nothing to batch")
    seed = check_int(seed, "seed", minimum=0, allow_bool=False)
    if epochs is not None:
        epochs = check_int(epochs, "epochs", minimum=1, allow_bool=False)
    start_step = check_int(start_step, "start_step", minimum=0, allow_bool=False)
    prefetch = check_int(prefetch, "prefetch", minimum=0, allow_bool=False)
    per_epoch = steps_per_epoch(len(split), batch_size, drop_remainder)
    if epochs is not None and start_step > epochs * per_epoch:
        raise ValueError(
            f"start_step={start_step} is past the end of the stream: epochs={epochs} x {per_epoch} steps per epoch "
            f"= {epochs * per_epoch} steps"
        )
    remainder = len(split) % batch_size
    _check_sharding(sharding, split, [batch_size] + ([remainder] if remainder and not drop_remainder else []))
    return BatchIterator(split, batch_size, seed=seed, shuffle=bool(shuffle), drop_remainder=bool(drop_remainder),
                         epochs=epochs, start_step=start_step, prefetch=prefetch, sharding=sharding)


def stacked_batches(split, batch_size: int, num_batches: int | None = None, *, seed: int = 0, shuffle: bool = False,
                    sharding: jax.sharding.Sharding | None = None) -> tuple[jax.Array, jax.Array]:
    """The first ``num_batches`` batches of epoch 0 stacked on a new leading axis: x (K, B, ...), y (K, B, ...).

    The layout curvature/landscape code scans over (one compiled lax.scan over K). ``num_batches=None``
    takes every full batch (⌊n/B⌋). Same order as `batch_iterator` with the same seed and shuffle.
    ``sharding`` applies to the stacked arrays (e.g. ``NamedSharding(mesh, P(None, "data"))``).
    """
    if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
        raise TypeError(f"sharding must be a jax.sharding.Sharding or None; got {type(sharding).__name__}")
    x, y = host_stacked_batches(split, batch_size, num_batches, seed=seed, shuffle=shuffle)
    return jax.device_put(x, sharding), jax.device_put(y, sharding)


def host_stacked_batches(split, batch_size: int, num_batches: int | None = None, *, seed: int = 0,
                         shuffle: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`stacked_batches` as host numpy arrays (no device copy): for callers that place them themselves."""
    split = _as_split(split)
    batch_size = check_int(batch_size, "batch_size", minimum=1, allow_bool=False)
    seed = check_int(seed, "seed", minimum=0, allow_bool=False)
    available = steps_per_epoch(len(split), batch_size, drop_remainder=True)
    if num_batches is None:
        num_batches = available
    num_batches = check_int(num_batches, "num_batches", minimum=1, allow_bool=False)
    if num_batches > available:
        raise ValueError(
            f"num_batches={num_batches} exceeds the {available} full batches of size {batch_size} in the split "
            f"({len(split)} examples)"
        )
    rows = epoch_permutation(len(split), seed, 0, bool(shuffle))[:num_batches * batch_size]
    x_dtype, y_dtype = device_dtypes(split)
    x = np.asarray(split.x[rows], dtype=x_dtype).reshape(num_batches, batch_size, *split.x.shape[1:])
    y = np.asarray(split.y[rows], dtype=y_dtype).reshape(num_batches, batch_size, *split.y.shape[1:])
    return x, y


def full_batch(split, *, sharding: jax.sharding.Sharding | None = None) -> tuple[jax.Array, jax.Array]:
    """The whole split as one device batch ``(x, y)`` in split order (for exact full-data analysis)."""
    split = _as_split(split)
    if len(split) == 0:
        raise ValueError("split is empty (0 examples): there is no batch to build")
    if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
        raise TypeError(f"sharding must be a jax.sharding.Sharding or None; got {type(sharding).__name__}")
    x_dtype, y_dtype = device_dtypes(split)
    return (jax.device_put(np.asarray(split.x, dtype=x_dtype), sharding),
            jax.device_put(np.asarray(split.y, dtype=y_dtype), sharding))
