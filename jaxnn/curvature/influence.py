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
from jaxnn.curvature.validation import check_int


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
    leaves = jax.tree.leaves(train)
    if not leaves or any(np.ndim(leaf) < 1 or leaf.shape[0] != leaves[0].shape[0] for leaf in leaves):
        raise ValueError("train: expected arrays with one leading example axis of the same length")
    count = leaves[0].shape[0]
    op = hessian(loss_fn, params, train if hessian_data is None else hessian_data)
    test_gradient = jax.grad(lambda p: jnp.mean(jax.vmap(
        lambda example: example_loss_fn(p, _batch_of_one(example)))(test)))(params)
    solved = solve(op, test_gradient, damping=damping, method=method, tol=tol, max_iters=max_iters)
    arrays, skeleton = split_functions(example_loss_fn)
    derivatives = _directional_derivatives(arrays, skeleton, params, solved.solution, train,
                                           chunk_size=min(chunk_size, count))
    return InfluenceResult(np.asarray(derivatives) / count, solved.solution, solved, count)
