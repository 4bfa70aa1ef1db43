"""Analysis data as groups of equal-shape batches stacked on a leading axis, for one compiled scan per group.

``data`` may be

* ``None``: the loss ignores its batch argument (analytic test functions);
* one batch: a tuple ``(x, y)`` of arrays, a dict of arrays, or any pytree that is not a list or an iterator;
* a list / iterator / generator of batches: batches of equal shapes are stacked into one group; a batch of a
  different shape (e.g. a short last batch) forms its own group;
* batches already stacked along a new leading axis, with ``stacked=True``.

Every batch carries a weight equal to its share of all examples (batch size = leading dimension of the first leaf
of the batch), so for mean-reduced losses the weighted sum of per-batch values is the value over all examples:
``L(θ) = Σ_b (B_b / N) L_b(θ)`` (the same convention as ``jaxnn.curvature``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.landscape.validation import check_finite_tree


class BatchGroup(NamedTuple):
    """Batches of one shape stacked on a leading axis, with each batch's share of all examples."""

    batches: Any  # pytree, every leaf with a leading axis of length num_batches (None when the loss takes no data)
    weights: np.ndarray  # (num_batches,) float64, summing to 1 over all groups


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


def _check_finite_batch(batch: Any, name: str) -> None:
    check_finite_tree(batch, name, what="non-finite entries")


def prepare_data(data: Any, *, stacked: bool = False, name: str = "data") -> PreparedData:
    """Normalise ``data`` (see the module docstring) into stacked batch groups with example-share weights.

    Raises a ``ValueError`` naming ``name`` for empty data, batches of different structure, a stacked pytree whose
    leaves disagree on the number of batches, or non-finite input values.
    """
    if data is None:
        return PreparedData((BatchGroup(None, np.ones(1)),), num_batches=1, num_examples=0)

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
        _check_finite_batch(data, name)
        batches = jax.tree.map(jnp.asarray, data)
        per_batch = _batch_size(jax.tree.map(lambda leaf: leaf[0], batches))
        return PreparedData(
            (BatchGroup(batches, np.full(num_batches, 1.0 / num_batches)),),
            num_batches=num_batches,
            num_examples=per_batch * num_batches,
        )

    if not _is_sequence_of_batches(data):
        if not jax.tree.leaves(data):
            raise ValueError(f"{name}: expected a batch with at least one array leaf, got an empty pytree {data!r}")
        _check_finite_batch(data, name)
        batch = jax.tree.map(lambda leaf: jnp.asarray(leaf)[None], data)
        return PreparedData((BatchGroup(batch, np.ones(1)),), num_batches=1, num_examples=_batch_size(data))

    batches = list(data)
    if not batches:
        raise ValueError(f"{name}: expected at least one batch, got an empty {type(data).__name__}")
    first_def = jax.tree.structure(batches[0])
    signatures: dict[tuple, list[int]] = {}
    for index, batch in enumerate(batches):
        treedef = jax.tree.structure(batch)
        if treedef != first_def:
            raise ValueError(f"{name}: batch {index} expected the structure of batch 0, {first_def}; got {treedef}")
        _check_finite_batch(batch, f"{name}[{index}]")
        signature = tuple((tuple(np.shape(leaf)), str(jnp.result_type(leaf))) for leaf in jax.tree.leaves(batch))
        signatures.setdefault(signature, []).append(index)
    sizes = [_batch_size(batch) for batch in batches]
    total = sum(sizes)
    groups = []
    for indices in signatures.values():
        members = [batches[i] for i in indices]
        stacked_group = jax.tree.map(lambda *leaves: jnp.stack([jnp.asarray(leaf) for leaf in leaves]), *members)
        groups.append(BatchGroup(stacked_group, np.asarray([sizes[i] for i in indices], np.float64) / total))
    return PreparedData(tuple(groups), num_batches=len(batches), num_examples=total)


def first_batch(group: BatchGroup) -> Any:
    """The first batch of a group (unstacked), e.g. to trace the loss on its shapes."""
    if group.batches is None:
        return None
    return jax.tree.map(lambda leaf: leaf[0], group.batches)
