"""Power iteration with deflation: dominant (largest-magnitude) eigenpairs of a curvature operator.

This is PyHessian's estimator, compiled: each eigenpair is one ``lax.while_loop`` (or, for operators with
``loop_mode="python"``, one compiled step per Python iteration with a host check of the stopping rule); pairs
after the first iterate
orthogonally to those already found (deflation by projection), so repeated eigenvalues are found with their
multiplicity. Power iteration converges to the eigenvalue of largest |λ| at a rate |λ₂/λ₁| per iteration; prefer
:func:`jaxnn.curvature.lanczos` for the algebraically largest / smallest eigenvalues.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from tqdm import tqdm

from jaxnn.curvature.operators import CurvatureOperator, require_operator, flat_operator, precise_jit
from jaxnn.validation import check_int, check_key, check_positive_float


class PowerIterationResult(NamedTuple):
    eigenvalues: jax.Array  # (k,), in the order found (non-increasing |λ|)
    eigenvectors: Any  # pytree like params with leading axis k
    residuals: jax.Array  # (k,), ||M v − λ v||
    num_iterations: jax.Array  # (k,) int32, products used per eigenpair
    converged: jax.Array  # (k,) bool: |λ_t − λ_{t−1}| <= tol |λ_t| reached before num_iters


class _PowerState(NamedTuple):
    iterate: jax.Array  # v_{t+1}: the next vector to multiply
    vector: jax.Array  # v_t: the vector the eigenvalue and residual below belong to
    eigenvalue: jax.Array  # λ_t = v_tᵀ M v_t
    previous: jax.Array  # λ_{t−1}
    residual: jax.Array  # ||M v_t − λ_t v_t||
    iteration: jax.Array
    nonfinite: jax.Array


def _converged(s: _PowerState, tol) -> jax.Array:
    return jnp.abs(s.eigenvalue - s.previous) <= tol * jnp.abs(s.eigenvalue)


def _deflate(found: jax.Array, v: jax.Array) -> jax.Array:
    """v projected off the rows of ``found`` (twice, for orthogonality to working precision), normalised."""
    v = v - (found @ v) @ found
    v = v - (found @ v) @ found
    return v / jnp.linalg.norm(v)


def _start(op, key, found) -> _PowerState:
    flat_params = ravel_pytree(op.params)[0]
    start = _deflate(found, jax.random.normal(key, flat_params.shape, flat_params.dtype))
    nan = jnp.array(jnp.nan, flat_params.dtype)
    return _PowerState(start, start, nan, nan, nan, jnp.int32(0), jnp.array(False))


def _power_step(flat_matvec, found, s: _PowerState) -> _PowerState:
    product = flat_matvec(s.iterate)
    eigenvalue = jnp.vdot(s.iterate, product)
    return _PowerState(
        iterate=_deflate(found, product),
        vector=s.iterate,
        eigenvalue=eigenvalue,
        previous=s.eigenvalue,
        residual=jnp.linalg.norm(product - eigenvalue * s.iterate),
        iteration=s.iteration + 1,
        nonfinite=~jnp.all(jnp.isfinite(product)),
    )


class _Found(NamedTuple):
    """Eigenpairs found so far; row/entry ``index`` is filled by the next call."""

    vectors: jax.Array  # (k, n); zero rows for pairs not yet found
    eigenvalues: jax.Array  # (k,)
    residuals: jax.Array  # (k,)
    iterations: jax.Array  # (k,) int32
    converged: jax.Array  # (k,) bool


def _record(found: _Found, index, state: _PowerState, tol) -> _Found:
    return _Found(
        vectors=found.vectors.at[index].set(state.vector),
        eigenvalues=found.eigenvalues.at[index].set(state.eigenvalue),
        residuals=found.residuals.at[index].set(state.residual),
        iterations=found.iterations.at[index].set(state.iteration),
        converged=found.converged.at[index].set(_converged(state, tol)),
    )


@precise_jit(static_argnames=("num_iters",))
def _dominant_pair(op, key, index, found, num_iters, tol):
    """Eigenpair ``index`` by a deflated power iteration in one compiled while loop; returns (found, non-finite)."""
    flat_matvec, _, _ = flat_operator(op)  # outside the loop: a single-batch product is linearised once

    def keep_going(s):
        return (s.iteration < num_iters) & ~_converged(s, tol) & ~s.nonfinite

    start = _start(op, jax.random.fold_in(key, index), found.vectors)
    state = jax.lax.while_loop(keep_going, lambda s: _power_step(flat_matvec, found.vectors, s), start)
    return _record(found, index, state, tol), state.nonfinite


@precise_jit
def _start_jit(op, key, index, vectors):
    return _start(op, jax.random.fold_in(key, index), vectors)


@precise_jit
def _power_step_jit(op, vectors, state, tol):
    state = _power_step(flat_operator(op)[0], vectors, state)
    return state, _converged(state, tol)


_record_jit = precise_jit(_record)


def _dominant_pair_from_python(op, key, index, found, num_iters, tol):
    """The same iteration driven from Python (``loop_mode="python"``): one compiled step and one host read of the
    stopping flags per iteration."""
    state = _start_jit(op, key, index, found.vectors)
    for _ in range(num_iters):
        state, converged = _power_step_jit(op, found.vectors, state, tol)
        if bool(converged) or bool(state.nonfinite):
            break
    return _record_jit(found, index, state, tol), state.nonfinite


@precise_jit
def _as_pytrees(op, vectors):
    return jax.vmap(ravel_pytree(op.params)[1])(vectors)


def power_iteration(
    op: CurvatureOperator,
    key: Any,
    num_iters: int = 100,
    tol: float = 1e-3,
    k: int = 1,
    *,
    progress: bool = True,
    like: Any = None,
) -> PowerIterationResult:
    """k dominant eigenpairs: v ← Mv/||Mv|| (deflated), λ = vᵀMv, stopping when |λ_t − λ_{t−1}| <= tol·|λ_t|.

    Cost: at most ``num_iters`` products per eigenpair (k · num_iters in all). Raises ``FloatingPointError``
    naming the eigenpair and iteration if a product is not finite.
    """
    op = require_operator(op, like=like)
    key = check_key(key)
    num_iters = check_int(num_iters, "num_iters")
    tol = check_positive_float(tol, "tol")
    k = check_int(k, "k", maximum=op.num_params, maximum_name="num_params")
    dtype = jnp.result_type(*jax.tree.leaves(op.params))
    found = _Found(
        vectors=jnp.zeros((k, op.num_params), dtype),
        eigenvalues=jnp.zeros((k,), dtype),
        residuals=jnp.zeros((k,), dtype),
        iterations=jnp.zeros((k,), jnp.int32),
        converged=jnp.zeros((k,), bool),
    )
    pair = _dominant_pair if op.loop_mode == "scan" else _dominant_pair_from_python
    for index in tqdm(range(k), desc="power iteration", unit="eigenpair", disable=not progress, leave=False):
        found, nonfinite = pair(op, key, index, found, num_iters, tol)
        if bool(nonfinite):
            raise FloatingPointError(
                f"power_iteration: the {op.kind} product became non-finite (NaN/inf) at iteration "
                f"{int(found.iterations[index])} of eigenpair {index + 1}; check the loss, parameters and data for NaN/inf"
            )
    return PowerIterationResult(
        eigenvalues=found.eigenvalues,
        eigenvectors=_as_pytrees(op, found.vectors),
        residuals=found.residuals,
        num_iterations=found.iterations,
        converged=found.converged,
    )
