"""Directions in parameter space, as pytrees shaped like ``params``, and their JSON-able descriptions.

* ``random_direction``: Gaussian ``d ~ N(0, I)``.
* ``filter_normalized_direction`` (Li et al. 2018): every filter of a Gaussian direction rescaled to the norm of
  the matching filter of θ, ``d_f ← d_f ‖θ_f‖/‖d_f‖``. A filter is a slice along the output axis: for Flax Dense
  kernels ``(in, out)`` the column ``[:, j]`` (one output unit), for Conv kernels ``HWIO`` the slice ``[..., o]``
  (``filter_axis=-1``; PyTorch-layout weights would use ``filter_axis=0``). Leaves with at most one dimension
  (biases, norm-layer scales and offsets) are zeroed with ``ignore="biasbn"`` (the reference tool's
  ``--xignore biasbn``) or, with ``ignore=None``, kept and normalised as a whole, ``d ← d ‖θ‖/‖d‖`` (the reference
  tool instead copies θ into these entries, a radial direction).
* ``layer_normalized_direction``: the same per leaf (layer) instead of per filter.
* ``eigenvector_directions``: top Hessian eigenvectors from :mod:`jaxnn.curvature` (unit norm).
* ``checkpoint_difference_direction``: ``θ_b − θ_a``.
* PCA directions of a trajectory: :func:`jaxnn.landscape.trajectory.trajectory_pca_directions`.

Normalisation uses θ's own filter norms, which makes the surface invariant to the rescaling symmetries of ReLU
networks (a layer's weights ×c and the next layer's ×1/c).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from jaxnn.runtime import quick_jit
from jaxnn.validation import (
    check_choice,
    check_finite_tree,
    check_int,
    check_key,
    check_like,
    check_params,
    key_description,
    leaf_paths,
)

NORMALIZATIONS = ("filter", "layer")
IGNORE_CHOICES = ("biasbn", None)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def direction_description(kind: str, *, key: Any = None, **options: Any) -> dict:
    """A small JSON-able record of how a direction was made: ``{"kind", "seed", "options"}``.

    ``seed`` is the raw PRNG key data as a list of ints (``None`` for deterministic directions).
    """
    seed = None if key is None else key_description(check_key(key, allow_int_seed=True))
    return {"kind": str(kind), "seed": seed, "options": _jsonable(dict(options))}


@quick_jit
def _gaussian_like(key: jax.Array, params: Any) -> Any:
    """One draw of ``n`` standard normals for all ``n`` parameters, in ``ravel_pytree`` order (one random-number
    program for the whole tree: per-leaf draws took 1.5 s to compile for a 3-layer MLP, one flat draw 0.3 s)."""
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


def random_direction(key: Any, params: Any) -> Any:
    """Gaussian direction ``d ~ N(0, I)`` with the structure, shapes and dtypes of ``params`` (one compiled call)."""
    params = check_params(params, allow_complex=False)
    return _gaussian_like(check_key(key, allow_int_seed=True), params)


def _filter_scaled(d: jax.Array, theta: jax.Array, filter_axis: int) -> jax.Array:
    axis = filter_axis % d.ndim
    reduce_axes = tuple(a for a in range(d.ndim) if a != axis)
    d_norm = jnp.sqrt(jnp.sum(d * d, axis=reduce_axes, keepdims=True))
    theta_norm = jnp.sqrt(jnp.sum(theta * theta, axis=reduce_axes, keepdims=True))
    scale = jnp.where(d_norm > 0, theta_norm / jnp.where(d_norm > 0, d_norm, 1), 0)
    return d * scale


def _whole_scaled(d: jax.Array, theta: jax.Array) -> jax.Array:
    d_norm = jnp.linalg.norm(d.ravel())
    theta_norm = jnp.linalg.norm(theta.ravel())
    return d * jnp.where(d_norm > 0, theta_norm / jnp.where(d_norm > 0, d_norm, 1), 0)


def normalize_direction(direction: Any, params: Any, *, norm: str = "filter", ignore: str | None = "biasbn",
                        filter_axis: int = -1) -> Any:
    """Rescale ``direction`` to the scale of ``params``.

    ``norm="filter"``: ``d_f ← d_f ‖θ_f‖/‖d_f‖`` for every filter (slice along ``filter_axis``) of every leaf with
    two or more dimensions; ``norm="layer"``: ``d ← d ‖θ‖/‖d‖`` per such leaf. Leaves with at most one dimension:
    zero with ``ignore="biasbn"``, else ``d ← d ‖θ‖/‖d‖``. A zero filter of θ gives a zero filter of d.
    """
    check_choice(norm, "norm", choices=NORMALIZATIONS)
    check_choice(ignore, "ignore", choices=IGNORE_CHOICES)
    if isinstance(filter_axis, bool) or not isinstance(filter_axis, (int, np.integer)):
        raise TypeError(f"filter_axis: expected an int axis, got {type(filter_axis).__name__} {filter_axis!r}")
    params = check_params(params, allow_complex=False)
    direction = check_like(direction, "direction", reference=params)
    check_finite_tree(direction, "direction")

    if norm == "filter":
        for path, leaf in zip(leaf_paths(params), jax.tree.leaves(params)):
            if leaf.ndim > 1 and not -leaf.ndim <= filter_axis < leaf.ndim:
                raise ValueError(f"filter_axis: expected an axis of leaf {path} (ndim {leaf.ndim}), got {filter_axis}")
    return _normalized(direction, params, norm=norm, ignore=ignore, filter_axis=int(filter_axis))


@functools.partial(jax.jit, static_argnames=("norm", "ignore", "filter_axis"))
def _normalized(direction: Any, params: Any, norm: str, ignore: str | None, filter_axis: int) -> Any:
    """Every leaf rescaled in one compiled program (see :func:`normalize_direction`)."""

    def scale(d: jax.Array, theta: jax.Array) -> jax.Array:
        if d.ndim <= 1:
            return jnp.zeros_like(d) if ignore == "biasbn" else _whole_scaled(d, theta)
        if norm == "layer":
            return _whole_scaled(d, theta)
        return _filter_scaled(d, theta, filter_axis)

    return jax.tree.map(scale, direction, params)


def filter_normalized_direction(key: Any, params: Any, *, ignore: str | None = "biasbn",
                                filter_axis: int = -1) -> Any:
    """Filter-normalised Gaussian direction (Li et al. 2018): ``d_f ~ N(0, I)``, then ``d_f ← d_f ‖θ_f‖/‖d_f‖``."""
    return normalize_direction(random_direction(key, params), params, norm="filter", ignore=ignore,
                               filter_axis=filter_axis)


def layer_normalized_direction(key: Any, params: Any, *, ignore: str | None = "biasbn") -> Any:
    """Layer-normalised Gaussian direction: ``d_l ~ N(0, I)``, then ``d_l ← d_l ‖θ_l‖/‖d_l‖`` per leaf."""
    return normalize_direction(random_direction(key, params), params, norm="layer", ignore=ignore)


def checkpoint_difference_direction(params_a: Any, params_b: Any) -> Any:
    """``θ_b − θ_a`` (the direction from checkpoint a to checkpoint b); equal checkpoints are an error."""
    params_a = check_params(params_a, "params_a", allow_complex=False)
    params_b = check_like(check_params(params_b, "params_b", allow_complex=False), "params_b", reference=params_a,
                          reference_name="params_a")
    difference = otu.tree_sub(params_b, params_a)
    if check_finite_tree(difference, "params_b - params_a") == 0.0:
        raise ValueError("params_b: expected a checkpoint different from params_a, got identical parameters "
                         "(their difference is the zero direction)")
    return difference


def eigenvector_directions(loss_fn: Callable, params: Any, data: Any, k: int = 2, key: Any = None, *,
                           stacked: bool = False, **top_eigenvalues_options: Any) -> tuple[list[Any], np.ndarray]:
    """The top-``k`` Hessian eigenvectors (unit norm) and their eigenvalues, descending.

    ``H v = λ v`` with ``H = ∇²L(θ)`` over ``data``; uses ``jaxnn.curvature.hessian`` and
    ``jaxnn.curvature.top_eigenvalues`` (Lanczos; cost: its ``num_iters`` HVPs over ``data``). Extra keyword
    arguments (``num_iters``, ``progress``, ...) go to ``top_eigenvalues``.
    """
    k = check_int(k, "k", allow_bool=False)
    key = check_key(key, allow_int_seed=True)
    params = check_params(params, allow_complex=False)
    try:
        from jaxnn import curvature
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(f"eigenvector_directions needs jaxnn.curvature, which failed to import: {error}") from error
    for needed in ("hessian", "top_eigenvalues"):
        if not hasattr(curvature, needed):
            raise ImportError(f"eigenvector_directions needs jaxnn.curvature.{needed}, which is not available")
    operator = curvature.hessian(loss_fn, params, data, stacked=stacked)
    values, vectors = curvature.top_eigenvalues(operator, k=k, key=key, **top_eigenvalues_options)
    values = np.asarray(values)
    directions = [jax.tree.map(lambda leaf, i=i: leaf[i], vectors) for i in range(k)]
    directions = [check_like(d, f"eigenvector {i}", reference=params) for i, d in enumerate(directions)]
    return directions, values
