"""Input checks for the landscape code: each failure names the argument, the expected and the actual value.

Structure and shape checks look at shapes only; value checks (finite, non-zero) pull one scalar per argument to
the host, once, before anything is compiled.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.curvature import validation as _shared
from jaxnn.curvature.validation import (  # noqa: F401  (re-exported for the landscape modules)
    check_choice,
    check_finite_tree,
    check_positive_float,
    leaf_paths,
)


def check_params(params: Any, name: str = "params") -> Any:
    """Return ``params`` with every leaf as a jax array; raise if empty or a leaf is not real floating point."""
    return _shared.check_params(params, name, allow_complex=False)


def check_like(tree: Any, reference: Any, name: str, reference_name: str = "params") -> Any:
    """Check ``tree`` has the structure and leaf shapes of ``reference``; return it cast to the reference dtypes."""
    expected_def = jax.tree.structure(reference)
    actual_def = jax.tree.structure(tree)
    if expected_def != actual_def:
        raise ValueError(
            f"{name}: expected a pytree with the structure of {reference_name}, {expected_def}; got {actual_def}"
        )
    for path, leaf, ref_leaf in zip(leaf_paths(reference), jax.tree.leaves(tree), jax.tree.leaves(reference)):
        if tuple(np.shape(leaf)) != tuple(np.shape(ref_leaf)):
            raise ValueError(
                f"{name}: leaf {path} expected the shape of {reference_name}{path if path != '<root>' else ''}, "
                f"{tuple(np.shape(ref_leaf))}; got {tuple(np.shape(leaf))}"
            )
    return jax.tree.map(lambda leaf, ref_leaf: jnp.asarray(leaf, dtype=jnp.result_type(ref_leaf)), tree, reference)


def check_direction(direction: Any, params: Any, name: str) -> Any:
    """A direction must match ``params`` leaf for leaf, be finite and not be zero; returns it in params' dtypes."""
    direction = check_like(direction, params, name)
    norm = check_finite_tree(direction, name)
    if norm == 0.0:
        raise ValueError(f"{name}: expected a non-zero direction, got a direction of norm 0 (all entries zero)")
    return direction


def check_grid(values: Any, name: str) -> np.ndarray:
    """A 1-D, non-empty, finite grid of coordinates."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of coordinates, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name}: expected at least one coordinate, got an empty array")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: expected finite coordinates, got {np.count_nonzero(~np.isfinite(array))} NaN/inf")
    return array


def check_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as an int >= ``minimum`` (a bool is rejected)."""
    return _shared.check_int(value, name, minimum=minimum, allow_bool=False)


def check_key(key: Any, name: str = "key") -> jax.Array:
    """Accept a typed key (``jax.random.key``), a raw uint32 key (``jax.random.PRNGKey``) or an int seed."""
    return _shared.check_key(key, name, allow_int_seed=True)


def key_description(key: jax.Array) -> list[int]:
    """The key's raw bits as a JSON-able list (enough to rebuild it with ``jax.random.wrap_key_data``)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return [int(v) for v in np.asarray(key).reshape(-1)]


def check_metric_fns(loss_fn: Callable, accuracy_fn: Callable | None,
                     metric_fns: Mapping[str, Callable] | None) -> dict[str, Callable]:
    """``{'loss': loss_fn, 'accuracy': accuracy_fn, **metric_fns}`` with every entry callable and names unique."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(params, batch) -> scalar, got {type(loss_fn).__name__}")
    metrics: dict[str, Callable] = {"loss": loss_fn}
    if accuracy_fn is not None:
        if not callable(accuracy_fn):
            raise TypeError(
                f"accuracy_fn: expected a callable (params, batch) -> scalar, got {type(accuracy_fn).__name__}")
        metrics["accuracy"] = accuracy_fn
    if metric_fns is not None:
        if not isinstance(metric_fns, Mapping):
            raise TypeError(f"metric_fns: expected a dict name -> fn(params, batch), got {type(metric_fns).__name__}")
        for metric_name, fn in metric_fns.items():
            if not isinstance(metric_name, str) or not metric_name.isidentifier():
                raise ValueError(f"metric_fns: expected metric names that are identifiers, got {metric_name!r}")
            if metric_name in metrics:
                raise ValueError(f"metric_fns: metric name {metric_name!r} is already used (by loss_fn/accuracy_fn)")
            if not callable(fn):
                raise TypeError(f"metric_fns[{metric_name!r}]: expected a callable, got {type(fn).__name__}")
            metrics[metric_name] = fn
    return metrics
