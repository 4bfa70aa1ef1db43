"""Analysis data as groups of batches stacked on a leading axis, so operators scan over them in one compiled loop.

``data`` may be

* ``None``: the loss ignores its batch argument (analytic test functions);
* one batch: a tuple ``(x, y)`` of arrays, a dict of arrays, or any pytree that is not a list or an iterator;
* a list / iterator / generator of batches: batches of equal shapes are stacked into one group; a batch of a
  different shape (e.g. a short last batch) forms its own group;
* batches already stacked along a new leading axis, with ``stacked=True``.

Every batch carries a weight equal to its share of all examples (batch size = leading dimension of the first leaf
of the batch), so the weighted sum of per-batch mean losses is the mean loss over all examples:
``L(θ) = Σ_b (B_b / N) L_b(θ)``. Operators and gradients use the same weights, and so do the loss-landscape
surfaces of ``jaxnn.landscape``, which call ``prepare_data(..., check_finite=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.validation import check_finite_tree


class BatchGroup(NamedTuple):
    """Batches of one shape stacked on a leading axis, with each batch's share of all examples."""

    batches: Any  # pytree; every leaf has a leading axis of length num_batches (None when the loss takes no data)
    weights: jax.Array  # (num_batches,), summing to 1 over all groups


class PreparedData(NamedTuple):
    """``data`` normalised into stacked groups; ``num_examples`` is 0 when ``data`` was None."""

    groups: tuple[BatchGroup, ...]
    num_batches: int
    num_examples: int


def _batch_size(batch: Any) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves or np.ndim(leaves[0]) == 0:
        return 1
    return int(np.shape(leaves[0])[0])


def _is_sequence_of_batches(data: Any) -> bool:
    if isinstance(data, list):
        return True
    if isinstance(data, (tuple, Mapping, np.ndarray, jax.Array, str, bytes)):
        return False
    return isinstance(data, Iterable)


def _add_leading_axis(leaf: Any) -> jax.Array:
    return leaf[None] if isinstance(leaf, jax.Array) else jnp.asarray(np.asarray(leaf)[None])


def _stack(leaves: list) -> jax.Array:
    """Stack on a new leading axis (in numpy when every leaf is on the host: no device program to compile)."""
    if all(isinstance(leaf, (np.ndarray, np.generic, int, float)) for leaf in leaves):
        return jnp.asarray(np.stack([np.asarray(leaf) for leaf in leaves]))
    return jnp.stack([jnp.asarray(leaf) for leaf in leaves])


def _weights(sizes: list[int], total: int) -> jax.Array:
    return jnp.asarray(np.asarray(sizes, dtype=np.float64) / float(total), dtype=jnp.result_type(float))


def _check_finite_batch(batch: Any, name: str) -> None:
    check_finite_tree(batch, name, what="non-finite entries")


def prepare_data(data: Any, *, stacked: bool = False, name: str = "data", check_finite: bool = False) -> PreparedData:
    """Normalise ``data`` (see the module docstring) into stacked batch groups with example-share weights.

    Raises a ``ValueError`` naming ``name`` for empty data, batches of different structure, or a stacked pytree whose
    leaves disagree on the number of batches. With ``check_finite=True`` it also raises for a single batch with no
    array leaf and for NaN/inf input values (naming the batch and leaf); this pulls one scalar per leaf to the host.
    """
    if data is None:
        return PreparedData((BatchGroup(None, _weights([1], 1)),), num_batches=1, num_examples=0)

    if stacked:
        leaves = jax.tree.leaves(data)
        if not leaves:
            raise ValueError(f"{name}: expected stacked batches with at least one array leaf, got an empty pytree")
        lengths = {int(np.shape(leaf)[0]) if np.ndim(leaf) else None for leaf in leaves}
        if None in lengths or len(lengths) != 1:
            raise ValueError(
                f"{name}: with stacked=True every leaf needs the same leading (num_batches) axis, got leading sizes "
                f"{sorted(str(n) for n in lengths)}"
            )
        num_batches = lengths.pop()
        if num_batches == 0:
            raise ValueError(f"{name}: expected at least one stacked batch, got a leading axis of length 0")
        if check_finite:
            _check_finite_batch(data, name)
        batches = jax.tree.map(jnp.asarray, data)
        per_batch = _batch_size(jax.tree.map(lambda leaf: leaf[0], batches))
        return PreparedData(
            (BatchGroup(batches, _weights([1] * num_batches, num_batches)),),
            num_batches=num_batches,
            num_examples=per_batch * num_batches,
        )

    if not _is_sequence_of_batches(data):
        if check_finite:
            if not jax.tree.leaves(data):
                raise ValueError(
                    f"{name}: expected a batch with at least one array leaf, got an empty pytree {data!r}")
            _check_finite_batch(data, name)
        batch = jax.tree.map(_add_leading_axis, data)
        return PreparedData((BatchGroup(batch, _weights([1], 1)),), num_batches=1, num_examples=_batch_size(data))

    batches = list(data)
    if not batches:
        raise ValueError(f"{name}: expected at least one batch, got an empty {type(data).__name__}")
    first_def = jax.tree.structure(batches[0])
    signatures: dict[tuple, list[int]] = {}
    for index, batch in enumerate(batches):
        treedef = jax.tree.structure(batch)
        if treedef != first_def:
            raise ValueError(
                f"{name}: batch {index} expected the structure of batch 0, {first_def}; got {treedef}"
            )
        if check_finite:
            _check_finite_batch(batch, f"{name}[{index}]")
        signature = tuple((tuple(np.shape(leaf)), str(jnp.result_type(leaf))) for leaf in jax.tree.leaves(batch))
        signatures.setdefault(signature, []).append(index)
    sizes = [_batch_size(batch) for batch in batches]
    total = sum(sizes)
    groups = []
    for indices in signatures.values():
        members = [batches[i] for i in indices]
        stacked_group = jax.tree.map(lambda *leaves: _stack(list(leaves)), *members)
        groups.append(BatchGroup(stacked_group, _weights([sizes[i] for i in indices], total)))
    return PreparedData(tuple(groups), num_batches=len(batches), num_examples=total)


def group_first_batch(group: BatchGroup) -> Any:
    """Shapes and dtypes (``jax.ShapeDtypeStruct``) of one batch of a group, to trace the loss on; None when the loss
    takes no data. No device work."""
    if group.batches is None:
        return None
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), group.batches)


def first_batch(prepared: PreparedData) -> Any:
    """Shapes and dtypes of one batch of the first group, for shape checks and tracing."""
    return group_first_batch(prepared.groups[0])


def place_on_mesh(prepared: PreparedData, mesh: Any, replicate: bool = False) -> PreparedData:
    """Every group's batches split along their batch axis over the mesh's ``data`` axis, so each device holds its
    slice of every batch and an operator product is data-parallel (one reduction per product); weights and batches
    whose size the axis does not divide are replicated. ``replicate=True``: every device holds all the data (a
    landscape grid split by point). ``mesh=None`` (parameters not on a mesh) changes nothing.
    Works across processes: every process holds the same host data and keeps the shards of its own devices."""
    if mesh is None:
        return prepared
    from jaxnn import parallel  # only jax, no Flax

    devices = int(mesh.shape[parallel.DATA_AXIS]) if parallel.DATA_AXIS in mesh.shape else 1
    replicated = parallel.replicated(mesh)

    def place(leaf, sharding):
        value = np.asarray(jax.device_get(leaf)) if not isinstance(leaf, np.ndarray) else leaf
        return parallel.global_array(value, sharding)

    groups = []
    for group in prepared.groups:
        batches = group.batches
        if batches is not None:
            size = _batch_size(jax.tree.map(lambda leaf: leaf[0], batches))
            split = size % devices == 0 and devices > 1 and not replicate
            sharding = parallel.stacked_batch_sharding(mesh) if split else replicated
            batches = jax.tree.map(lambda leaf: place(leaf, sharding), batches)
        groups.append(BatchGroup(batches, place(group.weights, replicated)))
    return prepared._replace(groups=tuple(groups))
