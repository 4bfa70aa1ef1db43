"""Second-order quantities along the gradient, and the Newton step.

With g = ∇L(θ) and M the curvature operator (usually the Hessian H):

* directional curvature  gᵀMg / gᵀg;
* quadratic model of a gradient step θ − εg:  ΔL(ε) ≈ −ε gᵀg + ½ ε² gᵀMg;
* its minimiser ε* = gᵀg / gᵀMg and the largest step that does not increase the model, 2 gᵀg / gᵀMg
  (for a quadratic this is the "2/λ" stability threshold along g; it is infinite when gᵀMg <= 0);
* the Newton step s solving (M + δI) s = −g, by conjugate gradients, GMRES (indefinite M) or densely.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxnn.curvature.dense import DEFAULT_MAX_PARAMS, dense_matrix
from jaxnn.curvature.operators import (
    CurvatureOperator,
    apply_operator,
    chunked_products,
    flat_operator,
    precise_jit,
    require_operator,
)
from jaxnn.curvature.products import tree_vdot
from jaxnn.validation import check_choice, check_int, check_like, check_positive_float

NEWTON_METHODS = ("cg", "gmres", "dense")


class GradientCurvature(NamedTuple):
    loss: float | None  # L(θ) when the gradient came from the operator's loss, else None
    gradient_norm: float  # ||g||
    gradient_curvature_product: float  # gᵀMg
    directional_curvature: float  # gᵀMg / gᵀg (nan if g = 0)
    optimal_step: float  # gᵀg / gᵀMg (inf if gᵀMg <= 0, nan if g = 0)
    largest_nonincreasing_step: float  # 2 gᵀg / gᵀMg (inf if gᵀMg <= 0, nan if g = 0)
    num_matvecs: int


class NewtonStep(NamedTuple):
    step: Any  # pytree like params: s with (M + δI) s ≈ −g
    relative_residual: float  # ||(M + δI) s + g|| / ||g||
    method: str
    damping: float


@precise_jit
def _as_row(tree):
    return ravel_pytree(tree)[0][None]


@precise_jit
def _squared_norm_and_form(row, product):
    return jnp.vdot(row, row), jnp.vdot(row, product)


def _curvature_along(op, gradient):
    """(gᵀg, gᵀMg); the product goes through the shared single-product program (one compilation per operator)."""
    row = _as_row(gradient)
    return _squared_norm_and_form(row, chunked_products(op, row, 1))


def gradient_curvature(op: CurvatureOperator, *, gradient: Any = None, like: Any = None) -> GradientCurvature:
    """gᵀMg, gᵀMg/gᵀg and the step sizes ε* = gᵀg/gᵀMg, 2gᵀg/gᵀMg. Cost: 1 gradient (unless given) + 1 product."""
    op = require_operator(op, like=like)
    loss = None
    if gradient is None:
        loss, gradient = op.loss_and_gradient()
        loss = float(loss)
    else:
        gradient = check_like(gradient, "gradient", reference=op.params)
    squared_norm, curvature_product = (float(x) for x in _curvature_along(op, gradient))
    if not (np.isfinite(squared_norm) and np.isfinite(curvature_product)):
        raise FloatingPointError(
            f"gradient_curvature: expected finite gᵀg and gᵀMg, got {squared_norm} and {curvature_product}"
        )
    if squared_norm == 0:
        directional, optimal, largest = math.nan, math.nan, math.nan
    else:
        directional = curvature_product / squared_norm
        optimal = squared_norm / curvature_product if curvature_product > 0 else math.inf
        largest = 2 * optimal
    return GradientCurvature(
        loss, math.sqrt(squared_norm), curvature_product, directional, optimal, largest, 1
    )


def predicted_loss_change(curvature: GradientCurvature, step_size: Any) -> Any:
    """Quadratic-model change of L for the step θ − εg: −ε gᵀg + ½ ε² gᵀMg (ε a float or an array)."""
    if not isinstance(curvature, GradientCurvature):
        raise TypeError(f"curvature: expected a GradientCurvature, got {type(curvature).__name__}")
    step_size = np.asarray(step_size, dtype=np.float64)
    squared_norm = curvature.gradient_norm**2
    change = -step_size * squared_norm + 0.5 * step_size**2 * curvature.gradient_curvature_product
    return float(change) if change.ndim == 0 else change


@precise_jit(static_argnames=("method", "max_iters"))
def _iterative_newton(op, gradient, damping, tol, method, max_iters):
    def damped(v):
        return jax.tree.map(lambda a, b: a + damping.astype(a.dtype) * b, apply_operator(op, v), v)

    rhs = jax.tree.map(jnp.negative, gradient)
    solver = jax.scipy.sparse.linalg.cg if method == "cg" else jax.scipy.sparse.linalg.gmres
    step, _ = solver(damped, rhs, tol=tol, maxiter=max_iters)
    residual = jax.tree.map(lambda a, b: a - b, damped(step), rhs)
    return step, jnp.sqrt(tree_vdot(residual, residual))


def newton_step(
    op: CurvatureOperator,
    *,
    gradient: Any = None,
    method: str = "cg",
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iters: int | None = None,
    max_params: int = DEFAULT_MAX_PARAMS,
    like: Any = None,
) -> NewtonStep:
    """s = −(M + δI)⁻¹ g. ``method``: "cg" (M + δI positive definite; ≤ max_iters products, default n),
    "gmres" (indefinite M), "dense" (n products to build M, then a least-squares solve: the minimum-norm step if
    M + δI is singular; refused above ``max_params``). ``gradient`` defaults to the operator's loss gradient.
    """
    op = require_operator(op, like=like)
    check_choice(method, "method", choices=NEWTON_METHODS)
    damping = check_positive_float(damping, "damping", allow_zero=True)
    tol = check_positive_float(tol, "tol")
    if gradient is None:
        _, gradient = op.loss_and_gradient()
    else:
        gradient = check_like(gradient, "gradient", reference=op.params)
    flat_gradient, unravel = ravel_pytree(gradient)
    gradient_norm = float(jnp.linalg.norm(flat_gradient))
    if gradient_norm == 0:
        return NewtonStep(jax.tree.map(jnp.zeros_like, gradient), 0.0, method, damping)
    if method == "dense":
        matrix = dense_matrix(op, max_params=max_params) + damping * jnp.eye(op.num_params, dtype=flat_gradient.dtype)
        flat_step = jnp.linalg.lstsq(matrix, -flat_gradient)[0]
        residual = float(jnp.linalg.norm(matrix @ flat_step + flat_gradient))
        return NewtonStep(unravel(flat_step), residual / gradient_norm, method, damping)
    max_iters = op.num_params if max_iters is None else check_int(max_iters, "max_iters")
    step, residual = _iterative_newton(op, gradient, jnp.asarray(damping), jnp.asarray(tol), method, max_iters)
    return NewtonStep(step, float(residual) / gradient_norm, method, damping)


def curvature_along_gradient(op: CurvatureOperator) -> tuple[jax.Array, jax.Array]:
    """(gᵀMg, gᵀg) along the data-set gradient g of the operator's loss at its parameters. Traceable (vmapped over
    a population's members). Cost: 1 gradient + 1 product."""
    from jaxnn.curvature.operators import _loss_and_gradient

    gradient = ravel_pytree(_loss_and_gradient(op, op.params)[1])[0]
    return jnp.vdot(gradient, flat_operator(op)[0](gradient)), jnp.vdot(gradient, gradient)
