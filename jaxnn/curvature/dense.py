"""Reference paths for checking the matrix-free operators on small models: dense matrices and finite differences."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxnn.curvature.operators import CurvatureOperator, join_functions, precise_jit, require_operator, split_functions
from jaxnn.curvature.products import tree_vdot
from jaxnn.curvature.trace_estimators import chunked_products
from jaxnn.validation import check_like, check_params, check_positive_float, num_params

DEFAULT_MAX_PARAMS = 5_000


def check_dense_size(count: int, max_params: int, what: str) -> None:
    """ValueError naming ``what`` and the limit when an n×n matrix of ``count`` parameters is too big to form."""
    if count > max_params:
        raise ValueError(
            f"params: {what} is an n×n matrix for small models only; expected at most max_params={max_params} "
            f"parameters, got {count} (use the matrix-free operators, or raise max_params)"
        )


@precise_jit(static_argnames=("skeleton",))
def _dense_hessian_jit(function_arrays, skeleton, params, batch):
    loss_fn = join_functions(function_arrays, skeleton)
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda x: loss_fn(unravel(x), batch))(flat)


@precise_jit(static_argnames=("skeleton",))
def _gradient_jit(function_arrays, skeleton, params, batch):
    return jax.grad(join_functions(function_arrays, skeleton))(params, batch)


def dense_hessian(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any = None,
    *,
    max_params: int = DEFAULT_MAX_PARAMS,
) -> jax.Array:
    """H_ij = ∂²L/∂θ_i∂θ_j as an (n, n) array over ``ravel_pytree(params)`` order, by ``jax.hessian``.

    One batch only. Cost: n HVPs worth of work and n² memory; refused above ``max_params`` parameters.
    """
    params = check_params(params)
    check_dense_size(num_params(params), max_params, "the dense Hessian")
    out = jax.eval_shape(loss_fn, params, batch)
    if len(jax.tree.leaves(out)) != 1 or jax.tree.leaves(out)[0].shape != ():
        raise ValueError(f"loss_fn: expected a scalar loss (shape ()), got {[o.shape for o in jax.tree.leaves(out)]}")
    arrays, skeleton = split_functions(loss_fn)
    return _dense_hessian_jit(arrays, skeleton, params, batch)


def dense_matrix(op: CurvatureOperator, *, max_params: int = DEFAULT_MAX_PARAMS, chunk_size: int = 128,
                 like: Any = None) -> jax.Array:
    """The operator as an (n, n) array, column i = M e_i, in ``ravel_pytree(params)`` order.

    Cost: n products (vmapped ``chunk_size`` at a time); refused above ``max_params`` parameters.
    """
    op = require_operator(op, like=like)
    check_dense_size(op.num_params, max_params, "the dense operator")
    flat = ravel_pytree(op.params)[0]
    return chunked_products(op, jnp.eye(flat.size, dtype=flat.dtype), chunk_size).T


def finite_difference_hvp(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    v: Any,
    h: float | None = None,
) -> Any:
    """Hv ≈ (∇L(θ+hv) − ∇L(θ−hv)) / 2h (central difference, error O(h²||v||³)). Cost: 2 gradients.

    Default ``h``: ε^(1/3)·max(1, ||θ||)/||v|| with ε the machine epsilon of the parameters' dtype.
    """
    params = check_params(params)
    v = check_like(v, "v", reference=params)
    v_norm = float(jnp.sqrt(tree_vdot(v, v)))
    if v_norm == 0:
        raise ValueError("v: expected a non-zero direction, got a vector of norm 0")
    if h is None:
        eps = float(jnp.finfo(ravel_pytree(params)[0].dtype).eps)
        theta_norm = float(jnp.sqrt(tree_vdot(params, params)))
        h = eps ** (1.0 / 3.0) * max(1.0, theta_norm) / v_norm
    h = check_positive_float(h, "h")
    arrays, skeleton = split_functions(loss_fn)
    plus = _gradient_jit(arrays, skeleton, jax.tree.map(lambda p, d: p + h * d, params, v), batch)
    minus = _gradient_jit(arrays, skeleton, jax.tree.map(lambda p, d: p - h * d, params, v), batch)
    return jax.tree.map(lambda a, b: (a - b) / (2 * h), plus, minus)
