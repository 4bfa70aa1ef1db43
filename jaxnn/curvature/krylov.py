"""Lanczos with full re-orthogonalisation: extreme eigenvalues and eigenvectors of any curvature operator.

The Krylov basis Q is built with classical Gram-Schmidt applied twice against every previous basis vector (plus a
third pass when the second one cancels heavily), and the projected matrix T = QᵀMQ is assembled from those same projections, so
the Ritz values are the Rayleigh-Ritz values of an orthonormal basis even when the Krylov space becomes invariant
(it then continues with a random vector orthogonal to the basis instead of breaking down). Blocks of
``block_size`` vectors find eigenvalues of multiplicity up to ``block_size``; a single start vector
(``block_size=1``) sees each distinct eigenvalue once unless the basis spans the whole space.

Cost: ``num_iters * block_size`` operator products (+ 2k more for the residuals), and O(m² n) flops / O(m n)
memory for the basis with m = num_iters * block_size, n = number of parameters. All iterations run inside one
compiled ``lax.while_loop`` (split into a few compiled chunks only to advance the progress bar), or, for operators
with ``loop_mode="unrolled"`` (convolutional models on CPU, see :func:`jaxnn.curvature.hessian`), as one compiled
iteration per Python step.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from tqdm import tqdm

from jaxnn.curvature.operators import CurvatureOperator, flat_operator, require_operator
from jaxnn.curvature.validation import check_int, check_key, check_like_params


class LanczosResult(NamedTuple):
    """Extreme Ritz pairs. Eigenvectors are pytrees shaped like params with a leading axis of length k."""

    top_eigenvalues: jax.Array  # (k,), descending
    top_eigenvectors: Any
    top_residuals: jax.Array  # (k,), ||M v − λ v||: computed, or the Lanczos estimate (see ``lanczos``)
    bottom_eigenvalues: jax.Array  # (k,), ascending
    bottom_eigenvectors: Any
    bottom_residuals: jax.Array
    ritz_values: jax.Array  # (m,), ascending: all eigenvalues of the projected matrix
    num_iters: int
    num_matvecs: int


class _LanczosState(NamedTuple):
    basis: jax.Array  # (M, n) rows q_i; rows not yet built are zero (row 0 holds the given start, if any)
    projected: jax.Array  # (M, M); projected[i, c] = q_iᵀ M q_c filled for i <= c (and the next-block coupling)
    step: jax.Array  # int32: number of completed block iterations
    nonfinite_step: jax.Array  # int32: first block iteration whose product was not finite, -1 if none
    key: jax.Array
    random_start: jax.Array  # bool: draw the start block from ``key`` (else normalise basis row 0)


def _orthogonalize(basis: jax.Array, w: jax.Array) -> jax.Array:
    """w − QᵀQw (one classical Gram-Schmidt pass against every row of Q; zero rows are no-ops)."""
    return w - (basis @ w) @ basis


def _safe_normalize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    norm = jnp.linalg.norm(w)
    return w / jnp.where(norm > 0, norm, 1), norm


def _next_basis_vector(
    basis: jax.Array, w: jax.Array, key: jax.Array, projections: jax.Array | None = None
) -> jax.Array:
    """A unit vector orthogonal to the basis: w after two classical Gram-Schmidt passes (CGS2), or a random one.

    ``projections``: Q w if already known (saves one pass over the basis). When the second pass removes more than
    half of what the first left (w is numerically close to the span of the basis), the normalised vector gets a
    third pass, and if more than half of it is removed again the Krylov space is invariant: a random vector
    orthogonal to the basis continues the iteration.
    """
    first = w - (basis @ w if projections is None else projections) @ basis
    second = _orthogonalize(basis, first)
    norm_first, norm_second = jnp.linalg.norm(first), jnp.linalg.norm(second)

    def repaired(_):
        direction, norm_after = _safe_normalize(_orthogonalize(basis, _safe_normalize(second)[0]))

        def random_orthogonal(_):
            candidate = jax.random.normal(key, w.shape, w.dtype)
            candidate, _ = _safe_normalize(_orthogonalize(basis, _orthogonalize(basis, candidate)))
            return _safe_normalize(_orthogonalize(basis, candidate))[0]

        return jax.lax.cond(norm_after > 0.5, lambda _: direction, random_orthogonal, None)

    healthy = (norm_second > 0.5 * norm_first) & (norm_second > 0)
    return jax.lax.cond(healthy, lambda _: second / jnp.where(healthy, norm_second, 1), repaired, None)


def initial_state(op: CurvatureOperator, key: jax.Array, start: Any, num_iters: int, block_size: int) -> _LanczosState:
    """Zero basis for ``num_iters`` block iterations; the start block is drawn inside the compiled loop."""
    dtype = jnp.result_type(*jax.tree.leaves(op.params))
    rows = (num_iters + 1) * block_size
    basis = jnp.zeros((rows, op.num_params), dtype)
    if start is not None:
        basis = basis.at[0].set(ravel_pytree(start)[0].astype(dtype))
    return _LanczosState(
        basis=basis,
        projected=jnp.zeros((rows, rows), dtype),
        step=jnp.int32(0),
        nonfinite_step=jnp.int32(-1),
        key=key,
        random_start=jnp.asarray(start is None),
    )


def _start_block(state: _LanczosState, block_size: int) -> _LanczosState:
    """Fill rows 0..b−1 with the orthonormal start block (random from the key, or the normalised given start)."""
    key, start_key = jax.random.split(state.key)
    n, dtype = state.basis.shape[1], state.basis.dtype
    if block_size == 1:
        random_block = _safe_normalize(jax.random.normal(start_key, (n,), dtype))[0][None]
        given_block = _safe_normalize(state.basis[0])[0][None]
        block = jnp.where(state.random_start, random_block, given_block)
    else:
        block = jnp.linalg.qr(jax.random.normal(start_key, (n, block_size), dtype))[0].T
    return state._replace(basis=state.basis.at[:block_size].set(block), key=key)


def _lanczos_iteration(flat_matvec: Any, s: _LanczosState, block_size: int) -> _LanczosState:
    """One block iteration: products of the current block, their projections, the next orthonormal block.

    Kept to few operations: XLA runs a loop body operation by operation, so small ones cost time too. A
    non-finite product shows in its projections (a NaN/inf coefficient), which is what is checked.
    """
    b, j = block_size, s.step
    block = jax.lax.dynamic_slice_in_dim(s.basis, j * b, b, axis=0)
    products = jax.vmap(flat_matvec)(block)
    coefficients = (s.basis @ products.T).T  # (b, M): q_iᵀ M q_{jb+c} (basis @ …: no transpose of the basis)
    finite = jnp.all(jnp.isfinite(coefficients))
    projected = jax.lax.dynamic_update_slice_in_dim(s.projected, coefficients.T, j * b, axis=1)
    basis = s.basis
    for c in range(b):
        # Column 0 of the block sees the basis the coefficients were computed with: reuse them for its first pass.
        restart_key = jax.random.fold_in(s.key, j * b + c)  # only used when the Krylov space is invariant
        q = _next_basis_vector(basis, products[c], restart_key, coefficients[0] if c == 0 else None)
        basis = jax.lax.dynamic_update_slice_in_dim(basis, q[None], (j + 1) * b + c, axis=0)
    # Coupling of this block to the next one, q_{(j+1)b+i}ᵀ M q_{jb+c}: gives the residual estimate at the end.
    next_block = jax.lax.dynamic_slice_in_dim(basis, (j + 1) * b, b, axis=0)
    projected = jax.lax.dynamic_update_slice(projected, next_block @ products.T, ((j + 1) * b, j * b))
    nonfinite = jnp.where((s.nonfinite_step < 0) & ~finite, j, s.nonfinite_step)
    return s._replace(basis=basis, projected=projected, step=j + 1, nonfinite_step=nonfinite.astype(jnp.int32))


def _begin(state: _LanczosState, block_size: int) -> _LanczosState:
    return jax.lax.cond(state.step == 0, lambda s: _start_block(s, block_size), lambda s: s, state)


@functools.partial(jax.jit, static_argnames=("block_size",))
def _advance(op, state, stop_at, block_size):
    """Block iterations until ``stop_at`` (or a non-finite product) inside one compiled ``lax.while_loop``."""

    flat_matvec, _, _ = flat_operator(op)  # outside the loop: a single-batch product is linearised once

    def keep_going(s):
        return (s.step < stop_at) & (s.nonfinite_step < 0)

    return jax.lax.while_loop(
        keep_going, lambda s: _lanczos_iteration(flat_matvec, s, block_size), _begin(state, block_size)
    )


@functools.partial(jax.jit, static_argnames=("block_size",))
def _single_iteration(op, state, block_size):
    """One compiled block iteration (the Python-driven path of ``loop_mode="unrolled"`` operators)."""
    return _lanczos_iteration(flat_operator(op)[0], _begin(state, block_size), block_size)


def projected_matrix(state: _LanczosState, size: int) -> jax.Array:
    """T = QᵀMQ (m × m), symmetric, from the upper triangle of the recorded projections."""
    upper = jnp.triu(state.projected[:size, :size])
    return upper + jnp.triu(upper, 1).T


def run_lanczos(
    op: CurvatureOperator,
    key: jax.Array,
    num_iters: int,
    block_size: int,
    start: Any,
    progress: bool,
    description: str = "lanczos",
) -> _LanczosState:
    """Run Lanczos; raise on a non-finite product.

    ``op.loop_mode == "compiled"``: the iterations run in a compiled while loop (split into ~20 chunks only when a
    progress bar is shown). ``"unrolled"``: one compiled iteration per Python step, dispatched asynchronously.
    Either way the host synchronises once per chunk (to check for non-finite products), not per iteration.
    """
    state = initial_state(op, key, start, num_iters, block_size)
    chunk = max(1, math.ceil(num_iters / 20)) if progress else num_iters
    done = 0
    with tqdm(total=num_iters, desc=description, unit="it", disable=not progress, leave=False) as bar:
        while done < num_iters:
            stop = min(done + chunk, num_iters)
            if op.loop_mode == "compiled":
                state = _advance(op, state, jnp.int32(stop), block_size)
            else:
                for _ in range(stop - done):
                    state = _single_iteration(op, state, block_size)
            nonfinite = int(state.nonfinite_step)  # one host sync per chunk
            if nonfinite >= 0:
                raise FloatingPointError(
                    f"{description}: the {op.kind} product became non-finite (NaN/inf) at iteration {nonfinite + 1} "
                    f"of {num_iters}; check the loss, parameters and data for NaN/inf"
                )
            bar.update(stop - done)
            done = stop
    return state


@functools.partial(jax.jit, static_argnames=("size", "k", "block_size", "compute_residuals"))
def _extreme_ritz_pairs(op, state, size, k, block_size, compute_residuals):
    flat_matvec, flat_params, unravel = flat_operator(op)
    values, vectors = jnp.linalg.eigh(projected_matrix(state, size))
    basis = state.basis[:size]
    top_index = jnp.arange(size - 1, size - 1 - k, -1)
    bottom_index = jnp.arange(k)
    # M Q − Q T is non-zero only in its last block of columns, (next block) · B, so ||M y − θ y|| = ||B s_last||.
    coupling = state.projected[size : size + block_size, size - block_size : size]

    def ritz(index):
        ritz_vectors = vectors[:, index].T @ basis
        ritz_vectors = ritz_vectors / jnp.linalg.norm(ritz_vectors, axis=1, keepdims=True)
        if compute_residuals:
            products = jax.vmap(flat_matvec)(ritz_vectors)
            residuals = jnp.linalg.norm(products - values[index][:, None] * ritz_vectors, axis=1)
        elif size == flat_params.size:  # the basis spans the whole space: Ritz pairs are exact
            residuals = jnp.zeros((k,), values.dtype)
        else:
            residuals = jnp.linalg.norm(coupling @ vectors[size - block_size :, index], axis=0)
        return values[index], jax.vmap(unravel)(ritz_vectors), residuals

    return ritz(top_index), ritz(bottom_index), values


def default_num_iters(num_params: int, k: int, block_size: int = 1) -> int:
    """max(40, 4k) block iterations, capped so the basis fits in the parameter space."""
    return max(1, min(num_params // block_size, max(40, 4 * k)))


def _check_common(op, k, block_size):
    op = require_operator(op)
    k = check_int(k, "k", maximum=op.num_params, maximum_name="num_params")
    block_size = check_int(block_size, "block_size", maximum=op.num_params, maximum_name="num_params")
    return op, k, block_size


def lanczos(
    op: CurvatureOperator,
    key: Any,
    num_iters: int,
    *,
    k: int = 1,
    block_size: int = 1,
    start: Any = None,
    compute_residuals: bool = True,
    progress: bool = True,
) -> LanczosResult:
    """Top-k and bottom-k eigenpairs of ``op`` by (block) Lanczos with full re-orthogonalisation.

    Ritz values of T = QᵀMQ over the Krylov space K_m(M, q₀), m = num_iters · block_size (``num_iters`` is capped
    at num_params // block_size). ``start``: an optional start vector (pytree like params, block_size 1); default
    random from ``key``. Residuals are ||M v − λ v||: computed with 2k more products when ``compute_residuals``,
    otherwise the Lanczos estimate ||B s_last|| (B the coupling of the last block to the next, s the Ritz vector's
    coordinates; equal in exact arithmetic, free). Cost: m products (+ 2k).
    Raises ``FloatingPointError`` naming the iteration if a product is not finite.
    """
    op, k, block_size = _check_common(op, k, block_size)
    key = check_key(key)
    num_iters = check_int(num_iters, "num_iters")
    num_iters = min(num_iters, op.num_params // block_size)
    size = num_iters * block_size
    check_int(k, "k", maximum=size, maximum_name="num_iters*block_size")
    if start is not None:
        if block_size != 1:
            raise ValueError(f"start: a start vector needs block_size=1, got block_size={block_size}")
        start = check_like_params(start, op.params, "start")
        if not any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(start)):
            raise ValueError("start: expected a non-zero start vector, got all zeros")
    state = run_lanczos(op, key, num_iters, block_size, start, progress)
    (top_values, top_vectors, top_res), (bottom_values, bottom_vectors, bottom_res), ritz_values = (
        _extreme_ritz_pairs(op, state, size, k, block_size, compute_residuals)
    )
    return LanczosResult(
        top_eigenvalues=top_values,
        top_eigenvectors=top_vectors,
        top_residuals=top_res,
        bottom_eigenvalues=bottom_values,
        bottom_eigenvectors=bottom_vectors,
        bottom_residuals=bottom_res,
        ritz_values=ritz_values,
        num_iters=num_iters,
        num_matvecs=size + (2 * k if compute_residuals else 0),
    )


def _eigenvalues(op, k, key, num_iters, block_size, progress, which):
    op, k, block_size = _check_common(op, k, block_size)
    key = jax.random.key(0) if key is None else check_key(key)
    if num_iters is None:
        num_iters = default_num_iters(op.num_params, k, block_size)
    result = lanczos(
        op, key, num_iters, k=k, block_size=block_size, compute_residuals=False, progress=progress
    )
    if which == "top":
        return result.top_eigenvalues, result.top_eigenvectors
    return result.bottom_eigenvalues, result.bottom_eigenvectors


def top_eigenvalues(
    op: CurvatureOperator,
    k: int = 1,
    key: Any = None,
    *,
    num_iters: int | None = None,
    block_size: int = 1,
    progress: bool = True,
) -> tuple[jax.Array, Any]:
    """(λ₁ ≥ … ≥ λ_k, eigenvectors with leading axis k) of ``op`` by Lanczos; ``key`` defaults to key(0).

    Cost: num_iters · block_size products (default num_iters: max(40, 4k), capped by the parameter count).
    """
    return _eigenvalues(op, k, key, num_iters, block_size, progress, "top")


def bottom_eigenvalues(
    op: CurvatureOperator,
    k: int = 1,
    key: Any = None,
    *,
    num_iters: int | None = None,
    block_size: int = 1,
    progress: bool = True,
) -> tuple[jax.Array, Any]:
    """(λ_n ≤ … ≤ λ_{n−k+1}, eigenvectors with leading axis k): the most negative / smallest first.

    Cost as :func:`top_eigenvalues`.
    """
    return _eigenvalues(op, k, key, num_iters, block_size, progress, "bottom")
