"""Influence functions (Koh & Liang 2017): how the loss on test data would change if one training example were removed.

For θ* minimising R(θ) = (1/n) Σ_i ℓ(z_i, θ) (+ a regulariser), removing z_i from the sum moves the minimum by
Δθ ≈ (1/n) H⁻¹ ∇ℓ(z_i, θ*) (H the Hessian of R at θ*), so the test loss changes by

    ΔL_test(i) ≈ (1/n) ∇L_testᵀ H⁻¹ ∇ℓ(z_i)        (> 0: removing z_i raises the test loss; it helped)

Computed as s_test = (H + δI)⁻¹ ∇L_test by :func:`jaxnn.curvature.solve` (one solve, with its residual and
converged flag), then every ∇ℓ(z_i)ᵀ s_test at once as the directional derivative of the per-example losses along
s_test: one forward-mode pass over the training set, no per-example gradients stored.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.curvature.operators import hessian, join_functions, precise_jit, split_functions
from jaxnn.curvature.solve import SolveResult, solve
from jax.flatten_util import ravel_pytree

from jaxnn.curvature.dense import DEFAULT_MAX_PARAMS
from jaxnn.validation import check_choice, check_int


class InfluenceResult(NamedTuple):
    removal_effect: np.ndarray  # (n,): predicted L_test(θ without z_i) − L_test(θ*), first order
    s_test: Any  # (H + δI)⁻¹ ∇L_test, pytree like params
    solve: SolveResult  # how well s_test was solved (residual, converged)
    num_train: int


def _batch_of_one(example: Any) -> Any:
    return jax.tree.map(lambda leaf: leaf[None], example)


@precise_jit(static_argnames=("skeleton", "chunk_size"))
def _directional_derivatives(arrays, skeleton, params, direction, train, chunk_size):
    """∇ℓ(z_i)ᵀ direction for every training example: jvp of the per-example losses (vmapped over each chunk)."""
    example_loss_fn = join_functions(arrays, skeleton)

    def derivative(example):
        return jax.jvp(lambda p: example_loss_fn(p, _batch_of_one(example)), (params,), (direction,))[1]

    return jax.lax.map(derivative, train, batch_size=chunk_size)  # vmapped over chunk_size examples at a time


def _check_train(train: Any) -> int:
    leaves = jax.tree.leaves(train)
    if not leaves or any(np.ndim(leaf) < 1 or leaf.shape[0] != leaves[0].shape[0] for leaf in leaves):
        raise ValueError("train: expected arrays with one leading example axis of the same length")
    return leaves[0].shape[0]


def influence(loss_fn: Callable, params: Any, train: Any, test: Any, *, example_loss_fn: Callable | None = None,
              damping: float = 0.0, method: str = "cg", tol: float = 1e-6, max_iters: int | None = None,
              hessian_data: Any = None, chunk_size: int = 256) -> InfluenceResult:
    """The first-order effect on the test loss of removing each training example (see the module docstring).

    ``loss_fn(params, batch)``: the training objective R on a batch (mean over its examples, plus any regulariser);
    its Hessian over ``hessian_data`` (default ``train``) is H. ``train``: the n training examples as one batch
    (arrays with a leading example axis). ``test``: the test examples as one batch; L_test is the mean of their
    per-example losses. ``example_loss_fn(params, batch_of_one)``: the loss of one example without the
    regulariser (default ``loss_fn``; pass it when ``loss_fn`` adds weight decay, which removing an example does not
    remove). ``damping``, ``method``, ``tol``, ``max_iters``: of the solve (CG needs H + δI positive definite;
    "minres" otherwise). Cost: one gradient on ``test``, the solve's products, one jvp over ``train``."""
    example_loss_fn = loss_fn if example_loss_fn is None else example_loss_fn
    chunk_size = check_int(chunk_size, "chunk_size")
    count = _check_train(train)
    op = hessian(loss_fn, params, train if hessian_data is None else hessian_data)
    test_gradient = jax.grad(lambda p: jnp.mean(jax.vmap(
        lambda example: example_loss_fn(p, _batch_of_one(example)))(test)))(params)
    solved = solve(op, test_gradient, damping=damping, method=method, tol=tol, max_iters=max_iters)
    arrays, skeleton = split_functions(example_loss_fn)
    derivatives = _directional_derivatives(arrays, skeleton, params, solved.solution, train,
                                           chunk_size=min(chunk_size, count))
    return InfluenceResult(np.asarray(derivatives) / count, solved.solution, solved, count)


SELF_INFLUENCE_METHODS = ("dense", "lanczos")


class SelfInfluenceResult(NamedTuple):
    scores: np.ndarray  # (n,): ∇ℓ_iᵀ (H + δI)⁻¹ ∇ℓ_i (method "lanczos": on the top-``rank`` eigenspace)
    losses: np.ndarray  # (n,): ℓ_i at params, the training-loss ranking's score
    gradient_norms: np.ndarray  # (n,): ‖∇ℓ_i‖, the gradient-norm ranking's score
    eigenvalues: np.ndarray  # of H used by the scores: all of them ascending ("dense"), the top ``rank`` descending
    method: str
    damping: float
    converged: bool  # "lanczos": the top-``rank`` pairs met their tolerance; "dense": True
    num_train: int


@precise_jit(static_argnames=("skeleton", "chunk_size"))
def _example_projections(arrays, skeleton, params, basis, train, chunk_size):
    """(ℓ_i, ‖∇ℓ_i‖, basis ∇ℓ_i) for every training example: one backward pass each, ``chunk_size`` at a time."""
    example_loss_fn = join_functions(arrays, skeleton)

    def one(example):
        loss, grad = jax.value_and_grad(lambda p: example_loss_fn(p, _batch_of_one(example)))(params)
        flat = ravel_pytree(grad)[0]
        return loss, jnp.linalg.norm(flat), basis @ flat

    return jax.lax.map(one, train, batch_size=chunk_size)


def self_influence(loss_fn: Callable, params: Any, train: Any, *, example_loss_fn: Callable | None = None,
                   damping: float = 0.0, method: str = "dense", rank: int = 20, key: Any = None,
                   hessian_data: Any = None, chunk_size: int = 256, max_params: int = DEFAULT_MAX_PARAMS,
                   tol: float = 1e-6) -> SelfInfluenceResult:
    """Every training example's self-influence ∇ℓ_iᵀ (H + δI)⁻¹ ∇ℓ_i (Koh & Liang 2017, §5.4: ranked, it finds
    mislabeled examples; removing z_i raises its own loss by ≈ this / n), with the two rankings it is compared with:
    the per-example training losses and gradient norms.

    ``method="dense"``: H over ``hessian_data`` (default ``train``) as a dense matrix and ``eigh``; exact, for up to
    ``max_params`` parameters. ``method="lanczos"``: the top-``rank`` eigenpairs of H by Lanczos (stopping at
    relative residual ``tol``), the scores restricted to that eigenspace, Σ_k (v_kᵀ∇ℓ_i)²/(λ_k + δ) (the low-rank
    route of Schioppa et al. 2022, for models too large to factor; it ignores the curvature outside the top
    ``rank`` directions). An indefinite H (a non-convex net) makes scores of examples along negative directions
    negative unless ``damping`` exceeds −λmin; a singular H + δI raises ValueError naming the eigenvalue.
    ``example_loss_fn``, ``hessian_data``, ``chunk_size``: as in :func:`influence`. Cost: the eigenproblem (dense:
    n products and an n³ factorisation; lanczos: about 2·rank products) plus one backward pass per example."""
    from jaxnn.curvature.dense import dense_matrix
    from jaxnn.curvature.krylov import top_eigenvalues

    example_loss_fn = loss_fn if example_loss_fn is None else example_loss_fn
    method = check_choice(method, "method", choices=SELF_INFLUENCE_METHODS)
    chunk_size = check_int(chunk_size, "chunk_size")
    damping = float(damping)
    if not np.isfinite(damping) or damping < 0:
        raise ValueError(f"damping: expected a finite number >= 0, got {damping}")
    count = _check_train(train)
    op = hessian(loss_fn, params, train if hessian_data is None else hessian_data)
    flat_params = ravel_pytree(params)[0]
    if method == "dense":
        matrix = np.asarray(dense_matrix(op, max_params=max_params), np.float64)
        values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
        basis, converged = vectors.T, True
    else:
        rank = check_int(rank, "rank", maximum=op.num_params, maximum_name="the number of parameters")
        found = top_eigenvalues(op, k=rank, key=jax.random.PRNGKey(0) if key is None else key, tol=tol,
                                num_iters=min(op.num_params, max(40, 4 * rank)), progress=False)
        values = np.asarray(found[0], np.float64)
        basis = np.asarray(jax.vmap(lambda tree: ravel_pytree(tree)[0])(found[1]), np.float64)
        converged = bool(found.converged)
    shifted = values + damping
    scale = max(float(np.max(np.abs(values))), np.finfo(np.float64).tiny)
    if np.any(np.abs(shifted) <= 1e-12 * scale):
        worst = values[np.argmin(np.abs(shifted))]
        raise ValueError(f"H + δI is singular: H has the eigenvalue {worst:.6g} and damping is {damping:g}; pass a "
                         f"damping above {max(-float(values.min()), 0.0) + 1e-6 * scale:.3g}")
    arrays, skeleton = split_functions(example_loss_fn)
    losses, norms, projections = _example_projections(
        arrays, skeleton, params, jnp.asarray(basis, flat_params.dtype), train, chunk_size=min(chunk_size, count))
    projections = np.asarray(projections, np.float64)
    scores = np.sum(projections**2 / shifted, axis=1)
    return SelfInfluenceResult(scores, np.asarray(losses, np.float64), np.asarray(norms, np.float64), values,
                               method, damping, converged, count)
