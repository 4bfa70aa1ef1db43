"""Lanczos with full re-orthogonalisation: extreme eigenvalues and eigenvectors of any curvature operator, adaptive.

Each iteration multiplies the newest basis vector(s) by the operator, records the projections ``q_iᵀ M q_j`` on every
basis vector (a column of T = QᵀMQ, so the Ritz values are the Rayleigh-Ritz values of the basis even where
orthogonality is imperfect), and orthogonalises the product against the basis by classical Gram-Schmidt with a
second pass only when the first one cancelled heavily (a Daniel-Gragg-Kaufman-Stewart test, ``‖w'‖ < ‖w‖/4``: one
pass leaves an orthogonality error of about ε‖w‖/‖w'‖, so at most 4ε without the second pass).
When the product lies numerically inside the basis (an invariant Krylov space) the iteration continues with a random
vector orthogonal to the basis instead of breaking down. Blocks of ``block_size`` vectors find eigenvalues of
multiplicity up to ``block_size``.

Stopping. With ``tol`` the iteration stops as soon as the wanted Ritz pairs have converged: the Lanczos residual
bound ``‖M y − θ y‖ = ‖B s_last‖`` (B the coupling of the last block to the next, s the pair's coordinates) is at
most ``tol·|θ|`` for the top-k, bottom-k or both. The check (an eigendecomposition of the small projected matrix)
runs on the device inside the loop every ``check_every`` iterations: no host synchronisation per iteration.

Cost: at most ``num_iters * block_size`` operator products (+ 2k for computed residuals), and per iteration two
passes over the basis (O(m n) flops, O(m n) memory, m the basis size, n the number of parameters). The iterations
run inside one compiled ``lax.while_loop`` (in a few chunks only to advance a progress bar), or, for operators with
``loop_mode="python"`` (convolutional models on CPU, see :func:`jaxnn.curvature.hessian`), as one compiled
iteration per Python step with a convergence check every ``check_every`` steps. The compiled loop, its convergence
test and the extraction of the Ritz values are one program per (operator, basis size, block size): top-k, bottom-k,
k, the tolerance and the spectral-density runs reuse it.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from tqdm import tqdm

from jaxnn.curvature.operators import (
    precise_jit,
    CurvatureOperator,
    chunked_products,
    flat_operator,
    placed_like_params,
    require_operator,
)
from jaxnn.runtime import quick_jit
from jaxnn.validation import check_choice, check_int, check_key, check_like

WHICH = ("top", "bottom", "both")
_WHICH_CODE = {"top": 0, "bottom": 1, "both": 2}
DEFAULT_TOL = 1e-3


class LanczosResult(NamedTuple):
    """Extreme Ritz pairs. Eigenvectors are pytrees shaped like params with a leading axis of length k."""

    top_eigenvalues: jax.Array  # (k,), descending
    top_eigenvectors: Any
    top_residuals: jax.Array  # (k,), ||M v − λ v||: computed, or the Lanczos estimate (see ``lanczos``)
    bottom_eigenvalues: jax.Array  # (k,), ascending
    bottom_eigenvectors: Any
    bottom_residuals: jax.Array
    ritz_values: jax.Array  # (m,), ascending: all eigenvalues of the projected matrix
    num_iters: int  # block iterations run (fewer than asked for when ``tol`` stopped the iteration)
    num_matvecs: int
    converged: bool = False  # the wanted pairs met the tolerance (always False without ``tol``)
    ritz_residual_bounds: Any = None  # (m,): the Lanczos bound ||B s_last|| of every Ritz value, as ``ritz_values``


class Eigenpairs(tuple):
    """``(values, vectors)`` — unpacks like a pair — with ``num_iters`` (Lanczos iterations used) and ``converged``."""

    def __new__(cls, values: jax.Array, vectors: Any, num_iters: int, converged: bool):
        pair = super().__new__(cls, (values, vectors))
        pair.num_iters, pair.converged = num_iters, converged
        return pair

    @property
    def values(self) -> jax.Array:
        return self[0]

    @property
    def vectors(self) -> Any:
        return self[1]


class _LanczosState(NamedTuple):
    basis: jax.Array  # (R, n) rows q_i written so far; later rows are zero
    pending: jax.Array  # (b, n): the next block, written into the basis at the start of the next iteration
    projected: jax.Array  # (R, R); projected[i, c] = q_iᵀ M q_c for i <= c (and the next-block coupling)
    step: jax.Array  # int32: completed block iterations
    nonfinite_step: jax.Array  # int32: first block iteration whose product was not finite, -1 if none
    converged: jax.Array  # bool: the last convergence check passed
    seed: jax.Array  # uint32 from the key: seeds the restart vectors of an invariant Krylov space
    analysis: "_RitzAnalysis"  # of the basis at the last check (and always at the end of a run)


class _Controls(NamedTuple):
    """Traced run parameters (changing them does not recompile)."""

    stop_at: jax.Array  # int32: run until this many block iterations
    k: jax.Array  # int32: number of wanted pairs at each end
    which: jax.Array  # int32: 0 top, 1 bottom, 2 both
    tol: jax.Array  # float: relative residual tolerance; <= 0 runs all iterations
    check_every: jax.Array  # int32


class _RitzAnalysis(NamedTuple):
    """Eigendecomposition of the used part of T, padded to its static size; ``valid`` marks real Ritz pairs."""

    values: jax.Array  # (R,)
    coordinates: jax.Array  # (R, R): column i holds the coordinates of Ritz pair i in the basis
    bounds: jax.Array  # (R,): Lanczos residual bounds ||B s_last||
    valid: jax.Array  # (R,) bool


def _safe_normalize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    norm = jnp.linalg.norm(w)
    return w / jnp.where(norm > 0, norm, 1), norm


def _hashed_vector(seed: jax.Array, like: jax.Array) -> jax.Array:
    """A pseudo-random vector with entries in [−1, 1) from an integer hash of (seed, index): a restart direction that
    costs a few integer operations to compile, where a threefry draw costs a large share of the loop's compile time."""
    index = jnp.arange(like.shape[0], dtype=jnp.uint32)
    bits = (index + seed.astype(jnp.uint32) * jnp.uint32(0x9E3779B9)) * jnp.uint32(0x85EBCA6B)
    bits = (bits ^ (bits >> 13)) * jnp.uint32(0xC2B2AE35)
    bits = bits ^ (bits >> 16)
    return (bits.astype(jnp.float32) / 2.0**31 - 1.0).astype(like.dtype)


def _random_orthogonal(basis: jax.Array, seed: jax.Array, like: jax.Array) -> jax.Array:
    """A pseudo-random unit vector orthogonal to the rows of ``basis`` (two Gram-Schmidt passes)."""
    candidate = _hashed_vector(seed, like)
    for _ in range(2):
        candidate = _safe_normalize(candidate - (basis @ candidate) @ basis)[0]
    return candidate


def _next_basis_vector(basis: jax.Array, w: jax.Array, projections: jax.Array, seed: jax.Array) -> jax.Array:
    """``w`` orthogonalised against the basis and normalised, given ``projections = Q w``.

    One classical Gram-Schmidt pass, and a second when the first left less than 1/√2 of w's norm (DGKS, the
    textbook η). η = 1/4 saved ~1 ms a step on an 85k-parameter model but lost orthogonality over long runs on wide
    spectra: a 300-parameter ridge Hessian (κ ≈ 4e4, an eigenvalue 1 of multiplicity 100) gave λmax 10% too high and
    λmin = -1e-12 after 175 steps; η = 1/√2 gives both to 1e-12.
    If the second pass removes more than half of what the first left, w lay in the span of the basis (an invariant
    Krylov space): a random vector orthogonal to the basis continues the iteration.
    """
    first = w - projections @ basis
    norm_w, norm_first = jnp.linalg.norm(w), jnp.linalg.norm(first)
    second = jax.lax.cond(norm_first < 0.7071 * norm_w, lambda f: f - (basis @ f) @ basis, lambda f: f, first)
    norm_second = jnp.linalg.norm(second)
    # Also invariant when what is left is rounding noise: normalising a remainder of ~ε·‖w‖ would blow its error
    # along the basis up to O(1) (a 300-parameter ridge Hessian with a 100-fold eigenvalue 1 then gave a spurious
    # Ritz value of -2e-12 after breakdown, below the spectrum).
    tiny = 1e3 * jnp.finfo(w.dtype).eps * norm_w
    invariant = (norm_second <= 0.5 * norm_first) | (norm_second <= tiny)
    return jax.lax.cond(invariant, lambda s: _random_orthogonal(basis, seed, s),
                        lambda s: s / jnp.where(norm_second > 0, norm_second, 1), second)


@functools.partial(jax.jit, static_argnames=("rows", "num_params", "dtype", "block_size"))
def _initial_state(flat_start, key, rows, num_params, dtype, block_size):
    """Zero basis and the orthonormal start block (pending): the normalised ``flat_start``, or random from ``key``.

    The random start is a hashed vector (:func:`_hashed_vector`) seeded from ``key``, not a threefry draw: this
    program is compiled for speed of compilation, and a threefry normal over an 85k-parameter model then took 15 ms
    to run (measured), a tenth of a converged top-1 Lanczos; the hash costs well under a millisecond. Any start
    vector with components along the wanted eigenvectors serves."""
    start_seed, seed = jax.random.bits(key, (2,), jnp.uint32)
    like = jnp.zeros((num_params,), dtype)
    if flat_start is not None:
        block = _safe_normalize(flat_start.astype(dtype))[0][None]
    elif block_size == 1:
        block = _safe_normalize(_hashed_vector(start_seed, like))[0][None]
    else:
        columns = jnp.stack([_hashed_vector(start_seed + c, like) for c in range(block_size)], axis=1)
        block = jnp.linalg.qr(columns)[0].T
    return _fresh_state(block, seed, rows // block_size - 1)


def initial_state(op: CurvatureOperator, key: jax.Array, flat_start: jax.Array | None, num_iters: int,
                  block_size: int) -> _LanczosState:
    """Zero basis for ``num_iters`` block iterations and the start block: ``flat_start`` normalised, or drawn from
    ``key``."""
    rows = (num_iters + 1) * block_size
    state = _initial_state(flat_start, key, rows=rows, num_params=op.num_params, dtype=jnp.dtype(op.dtype).name,
                           block_size=block_size)
    return placed_like_params(op, state)


@precise_jit
def flat_vector(tree: Any) -> jax.Array:
    """A pytree flattened in ``ravel_pytree`` order (compiled: one program, not one per leaf)."""
    return ravel_pytree(tree)[0]


def _lanczos_iteration(flat_matvec: Any, s: _LanczosState, block_size: int) -> _LanczosState:
    """One block iteration: write the current block into the basis, multiply it, record its projections, and build
    the next orthonormal block (kept in ``pending`` until the next iteration writes it).

    The basis is written first and only read afterwards: updating it in place after the conditional branches that
    read it made XLA copy the whole basis twice per iteration (measured: 2x the cost of a 100-vector basis). A
    non-finite product shows in its projections (a NaN/inf coefficient), which is what is checked.
    """
    b, j = block_size, s.step
    basis = jax.lax.dynamic_update_slice_in_dim(s.basis, s.pending, j * b, axis=0)
    products = jax.vmap(flat_matvec)(s.pending) if b > 1 else flat_matvec(s.pending[0])[None]
    # (b, R): q_iᵀ M q_{jb+c}. One product: a matrix-vector product; as a (R, n) @ (n, 1) matrix product XLA:CPU
    # packs the whole basis first, which made each iteration cost ~2 extra passes over it (measured).
    coefficients = (basis @ products[0])[None] if b == 1 else (basis @ products.T).T
    finite = jnp.all(jnp.isfinite(coefficients))
    projected = jax.lax.dynamic_update_slice_in_dim(s.projected, coefficients.T, j * b, axis=1)
    new_rows: list = []
    for c in range(b):
        restart_seed = s.seed + j * b + c  # only used when the Krylov space is invariant
        q = _next_basis_vector(basis, products[c], coefficients[c], restart_seed)
        for _ in range(2):  # orthogonal to this block's earlier new vectors too (not in the basis yet)
            for earlier in new_rows:
                q = q - jnp.vdot(earlier, q) * earlier
        new_rows.append(_safe_normalize(q)[0] if new_rows else q)
    pending = jnp.stack(new_rows)
    # Coupling of this block to the next one, q_{(j+1)b+i}ᵀ M q_{jb+c}: the residual bound of every Ritz pair.
    projected = jax.lax.dynamic_update_slice(projected, pending @ products.T, ((j + 1) * b, j * b))
    nonfinite = jnp.where((s.nonfinite_step < 0) & ~finite, j, s.nonfinite_step)
    return s._replace(basis=basis, pending=pending, projected=projected, step=j + 1,
                      nonfinite_step=nonfinite.astype(jnp.int32))


# --------------------------------------------------------------------------------------------------------------
# The pure core: a fixed number of iterations on any flat matvec, vmappable (populations, layer blocks).


def _fresh_state(block: jax.Array, seed: jax.Array, num_iters: int) -> _LanczosState:
    """A zero basis for ``num_iters`` block iterations and ``block`` (orthonormal rows) as the next block."""
    b, n = block.shape
    rows, dtype = (num_iters + 1) * b, block.dtype
    return _LanczosState(
        basis=jnp.zeros((rows, n), dtype),
        pending=block,
        projected=jnp.zeros((rows, rows), dtype),
        step=jnp.int32(0),
        nonfinite_step=jnp.int32(-1),
        converged=jnp.asarray(False),
        seed=jnp.asarray(seed, jnp.uint32),
        analysis=_RitzAnalysis(jnp.zeros((rows,), dtype), jnp.zeros((rows, rows), dtype), jnp.zeros((rows,), dtype),
                               jnp.zeros((rows,), bool)),
    )


def lanczos_decomposition(matvec: Any, start: jax.Array, num_iters: int, *, seed: Any = 0) -> _LanczosState:
    """``num_iters`` (block) Lanczos iterations with full re-orthogonalisation on ``matvec`` (flat vectors ↦ flat
    vectors), from ``start``: a vector (normalised here) or a (b, n) block with orthonormal rows. Pure and traceable:
    ``jax.vmap`` it over members, layer blocks or start vectors. ``seed`` seeds the restart vectors of an invariant
    Krylov space. The state holds the basis Q, the projected matrix T = QᵀMQ (with the coupling to the next block)
    and ``nonfinite_step`` (the first iteration whose product was not finite, −1 if none); :func:`ritz_values`
    reads the Ritz values and residual bounds from it. This is the iteration the adaptive driver
    (:func:`run_lanczos`) runs, stopping on residuals. Cost: ``num_iters · b`` products."""
    block = _safe_normalize(start)[0][None] if start.ndim == 1 else start
    state = _fresh_state(block, seed, num_iters)
    b = block.shape[0]
    return jax.lax.fori_loop(0, num_iters, lambda _, s: _lanczos_iteration(matvec, s, b), state)


def ritz_values(state: _LanczosState) -> tuple[jax.Array, jax.Array]:
    """(values ascending, residual bounds ‖M y − θ y‖ = ‖B s_last‖) of every Ritz pair of a
    :func:`lanczos_decomposition` (m = iterations · block size of them). Traceable."""
    b = state.pending.shape[0]
    size = state.basis.shape[0] - b  # a decomposition runs all its iterations: every row but the spare block
    analysis = _analyze(state, state.basis.shape[1], b)
    return analysis.values[:size], analysis.bounds[:size]


def projected_matrix(state: _LanczosState, size: Any) -> jax.Array:
    """T = QᵀMQ over the first ``size`` basis vectors (symmetric, from the recorded upper triangle), zero-padded to
    the static shape (R, R). ``size`` may be traced."""
    rows = jnp.arange(state.projected.shape[0])
    used = (rows[:, None] < size) & (rows[None, :] < size)
    upper = jnp.where(used, jnp.triu(state.projected), 0)
    return upper + jnp.triu(upper, 1).T


def _padded_projected_matrix(state: _LanczosState, size: Any) -> jax.Array:
    """:func:`projected_matrix` with the unused diagonal set above every Ritz value: the padding's eigenvalues come
    last in ``eigh``'s ascending order, far from the real ones (no mixing in the eigensolver). "Above every Ritz
    value" needs a bound on the spectral radius: the largest absolute row sum (Gershgorin). The largest entry is
    not one: a Lanczos T with α ≈ β ≈ 6 has eigenvalues up to ≈ 18 > 1 + 2·6, and the sentinel was then reported as
    a converged λmax (14.92 for a spectrum topped by 15.28, after 6 iterations)."""
    matrix = projected_matrix(state, size)
    sentinel = 1 + 2 * jnp.max(jnp.sum(jnp.abs(matrix), axis=1))
    rows = jnp.arange(matrix.shape[0])
    return matrix + jnp.diag(jnp.where(rows >= size, sentinel, 0))


@jax.custom_batching.sequential_vmap
def _eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.eigh``, one matrix per LAPACK call also under ``vmap`` (a loop over the batch). jaxlib's batched
    CPU eigh spreads the batch over XLA's intra-op thread pool and waits for it from a thread of that pool; in
    programs that vmap the Ritz analysis (several probes, blocks or population members) it hung in about half of
    the runs here, every thread waiting (jaxlib 0.10.2; the same wedge as PyAutoFit issue 1528, whose workaround
    turns the pool off for everything). The matrices are at most a few hundred wide: the loop costs nothing."""
    return jnp.linalg.eigh(matrix)


def _analyze(state: _LanczosState, num_params: int, block_size: int) -> _RitzAnalysis:
    """Ritz values (ascending; the first ``size`` are real), coordinates and residual bounds of the basis built so
    far (traced size)."""
    size = state.step * block_size
    values, coordinates = _eigh(_padded_projected_matrix(state, size))
    valid = jnp.arange(values.shape[0]) < size
    # M Q − Q T is non-zero only in its last block of columns, (next block)·B, so ||M y − θ y|| = ||B s_last||.
    coupling = jax.lax.dynamic_slice(state.projected, (size, size - block_size), (block_size, block_size))
    last = jax.lax.dynamic_slice_in_dim(coordinates, size - block_size, block_size, axis=0)
    bounds = jnp.linalg.norm(coupling @ last, axis=0)
    bounds = jnp.where(size >= num_params, 0.0, bounds)  # the basis spans the whole space: exact pairs
    return _RitzAnalysis(values, coordinates, bounds, valid)


def _converged(analysis: _RitzAnalysis, size: jax.Array, controls: _Controls) -> jax.Array:
    """The k largest (which 0), k smallest (1) or both (2) real Ritz pairs have bounds <= tol·|θ|."""
    index = jnp.arange(analysis.values.shape[0])
    top = (index >= size - controls.k) & (index < size)
    bottom = index < jnp.minimum(controls.k, size)
    wanted = jnp.where(controls.which == 0, top, jnp.where(controls.which == 1, bottom, top | bottom))
    small = analysis.bounds <= controls.tol.astype(analysis.values.dtype) * jnp.abs(analysis.values)
    return (controls.tol > 0) & (size >= controls.k) & jnp.all(jnp.where(wanted, small, True))


def _maybe_check(state: _LanczosState, controls: _Controls, num_params: int, block_size: int) -> _LanczosState:
    """Every ``check_every`` iterations (with a tolerance) and at the last one: the Ritz analysis, kept in the
    state (the result at the end of a run), and whether the wanted pairs converged."""
    due = ((controls.tol > 0) & (state.step % controls.check_every == 0)) | (state.step >= controls.stop_at)

    def check(s):
        analysis = _analyze(s, num_params, block_size)
        return s._replace(analysis=analysis, converged=_converged(analysis, s.step * block_size, controls))

    return jax.lax.cond(due, check, lambda s: s, state)


@precise_jit(static_argnames=("block_size",), donate_argnums=(1,))
def _run_compiled(op, state, controls, block_size):
    """Iterations until ``stop_at``, convergence or a non-finite product, in one ``lax.while_loop``, with the Ritz
    analysis of the basis at the end. One program for every k, tolerance and stopping point."""
    flat_matvec, _, _ = flat_operator(op)  # outside the loop: a single-batch product is linearised once

    def keep_going(s):
        return (s.step < controls.stop_at) & (s.nonfinite_step < 0) & ~s.converged

    def body(s):
        return _maybe_check(_lanczos_iteration(flat_matvec, s, block_size), controls, op.num_params, block_size)

    return jax.lax.while_loop(keep_going, body, state)


@precise_jit(static_argnames=("block_size",), donate_argnums=(1,))
def _single_iteration(op, state, controls, block_size):
    """One compiled block iteration and, when due, the convergence check (``loop_mode="python"`` operators)."""
    state = _lanczos_iteration(flat_operator(op)[0], state, block_size)
    return _maybe_check(state, controls, op.num_params, block_size)


FIRST_STAGE_ITERS = 20  # an adaptive run starts with a basis for this many iterations (see _stage_iters)


def _stage_iters(num_iters: int, k: int, block_size: int, adaptive: bool) -> list[int]:
    """Basis capacities (in block iterations) an adaptive run grows through: FIRST_STAGE_ITERS (at least 6k
    vectors), doubling, then ``num_iters``. Every iteration reads the whole basis, written rows or not: a top-1 run
    that converges in ~10 iterations read a 41-row basis (the default 40 iterations) four times a step, ~2 ms a step
    for 100k parameters on CPU. Growing copies the basis once (and compiles the loop for the new size)."""
    if not adaptive:
        return [num_iters]
    stages, size = [], max(FIRST_STAGE_ITERS, -(-6 * k // block_size))
    while size < num_iters:
        stages.append(size)
        size *= 2
    return stages + [num_iters]


@quick_jit(static_argnames=("rows",))
def _grown(state: _LanczosState, rows: int) -> _LanczosState:
    """``state`` with room for ``rows`` basis vectors (zero rows appended; the analysis padded as unused)."""

    def pad(array: jax.Array, axes: tuple[int, ...]) -> jax.Array:
        extra = rows - state.basis.shape[0]
        return jnp.pad(array, [(0, extra if axis in axes else 0) for axis in range(array.ndim)])

    analysis = state.analysis
    return state._replace(basis=pad(state.basis, (0,)), projected=pad(state.projected, (0, 1)),
                          analysis=_RitzAnalysis(pad(analysis.values, (0,)), pad(analysis.coordinates, (0, 1)),
                                                 pad(analysis.bounds, (0,)), pad(analysis.valid, (0,))))


def run_lanczos(
    op: CurvatureOperator,
    key: jax.Array,
    num_iters: int,
    block_size: int,
    flat_start: jax.Array | None,
    progress: bool,
    description: str = "lanczos",
    *,
    k: int = 1,
    which: str = "both",
    tol: float | None = None,
    check_every: int = 1,
) -> tuple[_LanczosState, _RitzAnalysis]:
    """Run Lanczos (until ``num_iters`` or, with ``tol``, convergence); raise on a non-finite product.

    ``op.loop_mode == "scan"``: one compiled program (called once per progress-bar chunk when a bar is shown).
    ``"python"``: one compiled iteration per Python step, dispatched asynchronously. The host synchronises once per
    chunk (compiled) or once per convergence check (unrolled), never per iteration. With ``tol`` the basis starts
    small and grows when needed (:func:`_stage_iters`).
    """
    stages = _stage_iters(num_iters, k, block_size, tol is not None)
    state = initial_state(op, key, flat_start, stages[0], block_size)
    dtype = state.basis.dtype
    controls = placed_like_params(op, _Controls(
        jnp.int32(num_iters), jnp.int32(k), jnp.int32(_WHICH_CODE[which]),
        jnp.asarray(-1.0 if tol is None else tol, dtype), jnp.int32(check_every)))
    chunk = max(1, math.ceil(num_iters / 20)) if progress else num_iters
    if op.loop_mode != "scan":
        chunk = min(chunk, check_every) if tol is not None else chunk
    done = 0
    with tqdm(total=num_iters, desc=description, unit="it", disable=not progress, leave=False) as bar:
        while done < num_iters:
            if done >= stages[0]:
                stages.pop(0)
                state = placed_like_params(op, _grown(state, rows=(stages[0] + 1) * block_size))
            stop = min(done + chunk, stages[0])
            if op.loop_mode == "scan":
                controls = controls._replace(stop_at=placed_like_params(op, jnp.int32(stop)))
                state = _run_compiled(op, state, controls, block_size)
            else:
                for _ in range(stop - done):
                    state = _single_iteration(op, state, controls, block_size)
            step, nonfinite, converged = (int(v) for v in jax.device_get((state.step, state.nonfinite_step,
                                                                           state.converged)))
            if nonfinite >= 0:
                raise FloatingPointError(
                    f"{description}: the {op.kind} product became non-finite (NaN/inf) at iteration {nonfinite + 1} "
                    f"of {num_iters}; check the loss, parameters and data for NaN/inf"
                )
            bar.update(step - done)
            done = step
            if converged:
                break
    return state, state.analysis


@quick_jit(static_argnames=("k",))
def _ritz_pairs(op, basis, analysis, indices, k):
    """Values, unit vectors (flat rows and pytrees, split top/bottom) and residual bounds of the pairs ``indices``."""
    values = analysis.values[indices]
    vectors = analysis.coordinates[:, indices].T @ basis
    vectors = vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)
    trees = jax.vmap(ravel_pytree(op.params)[1])(vectors)
    split = lambda tree: (jax.tree.map(lambda leaf: leaf[:k], tree), jax.tree.map(lambda leaf: leaf[k:], tree))
    return values, vectors, split(trees), analysis.bounds[indices]


@precise_jit
def _residual_norms(products, values, vectors):
    return jnp.linalg.norm(products - values[:, None] * vectors, axis=1)


def _pick(analysis: _RitzAnalysis, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the top-k (descending) and bottom-k (ascending) valid Ritz values, all valid values ascending and
    their residual bounds."""
    values, valid, bounds = (np.asarray(v) for v in jax.device_get((analysis.values, analysis.valid,
                                                                     analysis.bounds)))
    index = np.flatnonzero(valid)
    index = index[np.argsort(values[index], kind="stable")]
    return index[::-1][:k], index[:k], values[index], bounds[index]


def default_num_iters(num_params: int, k: int, block_size: int = 1) -> int:
    """max(40, 4k) block iterations, capped so the basis fits in the parameter space."""
    return max(1, min(num_params // block_size, max(40, 4 * k)))


def _check_common(op, k, block_size, like=None):
    op = require_operator(op, like=like)
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
    tol: float | None = None,
    which: str = "both",
    check_every: int = 1,
    like: Any = None,
) -> LanczosResult:
    """Top-k and bottom-k eigenpairs of ``op`` by (block) Lanczos with full re-orthogonalisation.

    Ritz values of T = QᵀMQ over the Krylov space K_m(M, q₀), m ≤ num_iters · block_size (``num_iters`` is capped
    at num_params // block_size). ``tol``: stop early once the ``which`` ("top", "bottom" or "both") k pairs have
    residual bounds ≤ tol·|θ|, checked every ``check_every`` iterations on the device; ``None`` runs all
    ``num_iters``. ``start``: an optional start vector (pytree like params, block_size 1); default random from
    ``key``. Residuals are ||M v − λ v||: computed with 2k more products when ``compute_residuals``, otherwise the
    Lanczos bound ||B s_last|| (equal in exact arithmetic, free). ``num_iters`` of the result is the number of
    iterations run. Cost: m products (+ 2k). Raises ``FloatingPointError`` naming the iteration if a product is not
    finite.
    """
    op, k, block_size = _check_common(op, k, block_size, like)
    key = check_key(key)
    num_iters = check_int(num_iters, "num_iters")
    num_iters = min(num_iters, op.num_params // block_size)
    check_int(k, "k", maximum=num_iters * block_size, maximum_name="num_iters*block_size")
    check_choice(which, "which", choices=WHICH)
    check_every = check_int(check_every, "check_every")
    if tol is not None and not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol: expected None or a finite number > 0, got {tol}")
    if start is not None:
        if block_size != 1:
            raise ValueError(f"start: a start vector needs block_size=1, got block_size={block_size}")
        start = check_like(start, "start", reference=op.params)
        if not any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(start)):
            raise ValueError("start: expected a non-zero start vector, got all zeros")
    flat_start = None if start is None else flat_vector(start)
    state, analysis = run_lanczos(op, key, num_iters, block_size, flat_start, progress, k=k, which=which, tol=tol,
                                  check_every=check_every)
    iterations = int(state.step)
    top, bottom, ritz_values, ritz_bounds = _pick(analysis, k)
    if top.size < k:
        raise ValueError(f"k: expected at most {top.size} (the Ritz values of {iterations} iterations), got {k}")
    values, vectors, (top_vectors, bottom_vectors), residuals = _ritz_pairs(
        op, state.basis, analysis, jnp.asarray(np.concatenate([top, bottom]), jnp.int32), k)
    if compute_residuals:
        residuals = _residual_norms(chunked_products(op, vectors, 1), values, vectors)  # the shared 1-product program
    values, residuals = np.asarray(values), np.asarray(residuals)
    return LanczosResult(
        top_eigenvalues=jnp.asarray(values[:k]),
        top_eigenvectors=top_vectors,
        top_residuals=jnp.asarray(residuals[:k]),
        bottom_eigenvalues=jnp.asarray(values[k:]),
        bottom_eigenvectors=bottom_vectors,
        bottom_residuals=jnp.asarray(residuals[k:]),
        ritz_values=jnp.asarray(ritz_values),
        num_iters=iterations,
        num_matvecs=iterations * block_size + (2 * k if compute_residuals else 0),
        converged=bool(state.converged),
        ritz_residual_bounds=jnp.asarray(ritz_bounds),
    )


def _eigenpairs(op, k, key, num_iters, block_size, progress, which, tol):
    op, k, block_size = _check_common(op, k, block_size)
    key = jax.random.key(0) if key is None else check_key(key)
    if num_iters is None:
        num_iters = default_num_iters(op.num_params, k, block_size)
    result = lanczos(op, key, num_iters, k=k, block_size=block_size, compute_residuals=False, progress=progress,
                     tol=tol, which=which)
    if which == "top":
        return Eigenpairs(result.top_eigenvalues, result.top_eigenvectors, result.num_iters, result.converged)
    return Eigenpairs(result.bottom_eigenvalues, result.bottom_eigenvectors, result.num_iters, result.converged)


def top_eigenvalues(
    op: CurvatureOperator,
    k: int = 1,
    key: Any = None,
    *,
    num_iters: int | None = None,
    block_size: int = 1,
    progress: bool = True,
    tol: float | None = DEFAULT_TOL,
    like: Any = None,
) -> Eigenpairs:
    """(λ₁ ≥ … ≥ λ_k, eigenvectors with leading axis k) of ``op`` by Lanczos; ``key`` defaults to key(0).

    Stops as soon as the k pairs have residual bounds ≤ ``tol``·|λ| (default 1e-3; ``None``: run all iterations),
    at most ``num_iters`` iterations (default max(40, 4k), capped by the parameter count). The result unpacks as
    ``values, vectors`` and also carries ``num_iters`` (iterations used) and ``converged``.
    Cost: that many products (times block_size).
    """
    return _eigenpairs(require_operator(op, like=like), k, key, num_iters, block_size, progress, "top", tol)


def bottom_eigenvalues(
    op: CurvatureOperator,
    k: int = 1,
    key: Any = None,
    *,
    num_iters: int | None = None,
    block_size: int = 1,
    progress: bool = True,
    tol: float | None = DEFAULT_TOL,
    like: Any = None,
) -> Eigenpairs:
    """(λ_n ≤ … ≤ λ_{n−k+1}, eigenvectors with leading axis k): the most negative / smallest first.

    Stopping and cost as :func:`top_eigenvalues` (the tolerance is relative to |λ|: eigenvalues near zero need
    many iterations, or a ``tol`` of None with a fixed ``num_iters``).
    """
    return _eigenpairs(require_operator(op, like=like), k, key, num_iters, block_size, progress, "bottom", tol)
