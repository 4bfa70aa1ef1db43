"""Input checks shared by the curvature engine: each failure names the argument, the expected and the actual value.

Structure, shape and dtype checks are free inside ``jit`` and never synchronise with the device; the value checks
(``check_finite_tree``) pull one scalar per leaf to the host, once. ``jaxnn.landscape`` reuses these checks.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from jaxnn.runtime import quick_jit


def leaf_paths(tree: Any) -> list[str]:
    """``jax.tree_util.keystr`` of every leaf (``'<root>'`` for a bare array)."""
    paths_and_leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(path) or "<root>" for path, _ in paths_and_leaves]


@quick_jit
def _nonfinite_counts_and_norm(leaves: list) -> tuple[list, jax.Array]:
    counts = [jnp.sum(~jnp.isfinite(leaf)) if jnp.issubdtype(leaf.dtype, jnp.inexact) else jnp.int32(0)
              for leaf in leaves]
    floating = [leaf for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return counts, otu.tree_norm(floating) if floating else jnp.float32(0)


def _in_host_memory(leaf: Any) -> bool:
    """A numpy value, or a jax array whose every shard this process holds in CPU memory (numpy reads it in place)."""
    if isinstance(leaf, (np.ndarray, np.generic, int, float)):
        return True
    return (isinstance(leaf, jax.Array) and leaf.is_fully_addressable
            and all(device.platform == "cpu" for device in leaf.devices()))


def nonfinite_counts_and_norm(tree: Any) -> tuple[list[int], float]:
    """Per-leaf number of NaN/inf entries and the Euclidean norm of the floating leaves: in numpy when every leaf
    is in host memory (data batches, parameters on CPU: no program to compile, ~0.3 s each on CPU), else one compiled
    call on the device."""
    leaves = jax.tree.leaves(tree)
    if all(_in_host_memory(leaf) for leaf in leaves):
        arrays = [np.asarray(leaf) for leaf in leaves]
        inexact = [a for a in arrays if np.issubdtype(a.dtype, np.inexact)]
        counts = [int(np.count_nonzero(~np.isfinite(a))) if np.issubdtype(a.dtype, np.inexact) else 0 for a in arrays]
        return counts, float(np.sqrt(sum(float(np.vdot(a, a).real) for a in inexact)))
    counts, norm = _nonfinite_counts_and_norm([jnp.asarray(leaf) for leaf in leaves])
    return [int(c) for c in counts], float(norm)


def check_finite_tree(tree: Any, name: str, *, what: str = "NaN/inf entries") -> float:
    """Raise naming the first leaf with a NaN or infinity; return the tree's norm."""
    counts, norm = nonfinite_counts_and_norm(tree)
    for path, count in zip(leaf_paths(tree), counts):
        if count:
            raise ValueError(f"{name}: leaf {path} expected finite values, got {count} {what}")
    return norm


def check_params(params: Any, name: str = "params", *, allow_complex: bool = True) -> Any:
    """Return ``params`` with every leaf as a jax array; raise if it is empty or has a non-floating leaf.

    With ``allow_complex=False`` complex leaves are rejected too (only real floating dtypes pass).
    """
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError(f"{name}: expected a pytree with at least one floating-point array leaf, got an empty pytree")
    params = jax.tree.map(jnp.asarray, params)
    allowed = jnp.inexact if allow_complex else jnp.floating
    for path, leaf in zip(leaf_paths(params), jax.tree.leaves(params)):
        if not jnp.issubdtype(leaf.dtype, allowed):
            raise TypeError(f"{name}: leaf {path} expected a floating-point dtype, got {leaf.dtype}")
    return params


def num_params(params: Any) -> int:
    """Total number of scalar parameters in a pytree."""
    return int(sum(int(np.prod(np.shape(leaf), dtype=np.int64)) for leaf in jax.tree.leaves(params)))


def check_like_params(
    vector: Any, params: Any, name: str, *, leading_axis: bool = False, cast: bool = True
) -> Any:
    """Check ``vector`` has the structure and leaf shapes of ``params``; cast it to the params' dtypes if ``cast``.

    With ``leading_axis=True`` every leaf must carry the same extra leading (block) axis.
    """
    expected_def = jax.tree.structure(params)
    actual_def = jax.tree.structure(vector)
    if expected_def != actual_def:
        raise ValueError(
            f"{name}: expected a pytree with the structure of params, {expected_def}; got {actual_def}"
        )
    block_sizes = set()
    for path, v_leaf, p_leaf in zip(leaf_paths(params), jax.tree.leaves(vector), jax.tree.leaves(params)):
        v_shape, p_shape = tuple(np.shape(v_leaf)), tuple(np.shape(p_leaf))
        if leading_axis:
            if len(v_shape) != len(p_shape) + 1 or v_shape[1:] != p_shape:
                raise ValueError(
                    f"{name}: leaf {path} expected shape (block,) + {p_shape}, got {v_shape}"
                )
            block_sizes.add(v_shape[0])
        elif v_shape != p_shape:
            raise ValueError(f"{name}: leaf {path} expected shape {p_shape}, got {v_shape}")
    if leading_axis and len(block_sizes) > 1:
        raise ValueError(f"{name}: expected one leading block size shared by all leaves, got sizes {sorted(block_sizes)}")
    if not cast:
        return vector
    return jax.tree.map(lambda v, p: jnp.asarray(v, dtype=p.dtype), vector, params)


def check_key(key: Any, name: str = "key", *, allow_int_seed: bool = False) -> jax.Array:
    """Accept a typed key (``jax.random.key``) or a raw uint32 key (``jax.random.PRNGKey``).

    With ``allow_int_seed=True`` a Python/numpy int (not a bool) is accepted too and becomes ``jax.random.key(seed)``.
    """
    seed_hint = " or an int seed" if allow_int_seed else ""
    if key is None:
        raise ValueError(f"{name}: expected a PRNG key (jax.random.key(seed)){seed_hint}, got None")
    if allow_int_seed and isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"{name}: expected a single PRNG key of shape (), got shape {key.shape}")
        return key
    if key.dtype != jnp.uint32 or key.shape != (2,):
        kinds = "typed key, uint32 array of shape (2,), or int seed" if allow_int_seed else (
            "typed key, or uint32 array of shape (2,)")
        raise ValueError(
            f"{name}: expected a PRNG key ({kinds}), got dtype {key.dtype} shape {key.shape}"
        )
    return key


def check_int(value: Any, name: str, *, minimum: int = 1, maximum: int | None = None, maximum_name: str = "",
              allow_bool: bool = True) -> int:
    """Return ``value`` as an int in ``[minimum, maximum]``; raise naming the bound otherwise.

    With ``allow_bool=False`` a bool (an int subclass) is rejected with a ``TypeError``.
    """
    if not allow_bool and isinstance(value, bool):
        raise TypeError(f"{name}: expected an integer, got bool {value!r}")
    try:
        as_int = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}") from None
    if as_int < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {as_int}")
    if maximum is not None and as_int > maximum:
        bound = f"{maximum_name}={maximum}" if maximum_name else str(maximum)
        raise ValueError(f"{name}: expected at most {bound}, got {as_int}")
    return as_int


def check_positive_float(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a finite float > 0 (or >= 0 with ``allow_zero``)."""
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}") from None
    if not np.isfinite(as_float) or as_float < 0 or (as_float == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {bound}, got {as_float}")
    return as_float


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value
