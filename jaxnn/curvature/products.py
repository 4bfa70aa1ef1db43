"""The curvature mathematics, one product per function: Hessian (three autodiff orders), generalised Gauss-Newton
and Fisher (empirical and true) products of a loss on one batch. Everything else in :mod:`jaxnn.curvature` (the
operator, batching, compilation, the estimators) is plumbing around these formulas.

Notation: L(θ) the batch loss, f(θ, x) the model's outputs, ℓ(o, y) the output loss, J = ∂f/∂θ,
H_out = ∂²ℓ/∂o², g_i = ∇ℓ_i the per-example gradients. Each product kind that can be linearised also has a
``linearize(functions, params, batch) -> (v -> product)`` (:data:`LINEARIZERS`): the forward and backward passes at
θ run once and every product afterwards costs only the tangent pass; estimators that apply a single-batch operator
many times (Lanczos, power iteration) build it once per compiled call.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def tree_vdot(a: Any, b: Any) -> jax.Array:
    """Σ_leaves <a_leaf, b_leaf> (real inner product of two pytrees with equal structure)."""
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def linearize_hessian(loss_fn, params, batch):
    """v ↦ Hv = ∂/∂ε ∇L(θ+εv)|ε=0: forward-mode over the gradient, linearised at θ."""
    return jax.linearize(lambda p: jax.grad(loss_fn)(p, batch), params)[1]


def hvp_forward_over_reverse(loss_fn, params, batch, v):
    """Hv = ∂/∂ε ∇L(θ+εv)|ε=0: one jvp of the gradient (≈ 2-3 gradient costs)."""
    return linearize_hessian(loss_fn, params, batch)(v)


def hvp_reverse_over_reverse(loss_fn, params, batch, v):
    """Hv = ∇_θ <∇L(θ), v>: gradient of a gradient inner product (PyHessian's double backward)."""
    return jax.grad(lambda p: tree_vdot(jax.grad(loss_fn)(p, batch), v))(params)


def hvp_reverse_over_forward(loss_fn, params, batch, v):
    """Hv = ∇_θ (∂/∂ε L(θ+εv)): gradient of a directional derivative."""
    return jax.grad(lambda p: jax.jvp(lambda q: loss_fn(q, batch), (p,), (v,))[1])(params)


HVP_PRODUCTS = {
    "forward-over-reverse": hvp_forward_over_reverse,
    "reverse-over-reverse": hvp_reverse_over_reverse,
    "reverse-over-forward": hvp_reverse_over_forward,
}


def linearize_ggn(functions, params, batch):
    """v ↦ Gv = Jᵀ H_out J v, J = ∂f(θ,x)/∂θ, H_out = ∂²ℓ(o,y)/∂o² at o = f(θ,x)."""
    predict_fn, output_loss = functions
    x, y = batch[0], batch[1]
    outputs, jvp_fn = jax.linearize(lambda p: predict_fn(p, x), params)
    transpose = jax.linear_transpose(jvp_fn, params)
    _, output_curvature = jax.linearize(lambda o: jax.grad(output_loss)(o, y), outputs)
    return lambda v: transpose(output_curvature(jvp_fn(v)))[0]


def ggn_product(functions, params, batch, v):
    """Gv = Jᵀ H_out J v: one linearisation of the model and of the output loss's gradient, then a transpose."""
    return linearize_ggn(functions, params, batch)(v)


def per_example_losses(output_loss, outputs, targets):
    """ℓ_i = output_loss(o_i, y_i) for each row i (the loss applied to a batch of one)."""
    return jax.vmap(
        lambda o, t: output_loss(jax.tree.map(lambda a: a[None], o), jax.tree.map(lambda a: a[None], t))
    )(outputs, targets)


def linearize_fisher_from_losses(losses, params):
    """v ↦ Fv = (1/m) Σ_i g_i (g_iᵀ v), g_i = ∇ℓ_i, for the m entries of ``losses(θ)``."""
    values, jvp_fn = jax.linearize(losses, params)
    transpose = jax.linear_transpose(jvp_fn, params)
    return lambda v: transpose(jvp_fn(v) / values.size)[0]


def linearize_empirical_fisher(functions, params, batch):
    predict_fn, output_loss = functions
    x, y = batch[0], batch[1]
    return linearize_fisher_from_losses(lambda p: per_example_losses(output_loss, predict_fn(p, x), y), params)


def linearize_true_fisher(functions, params, batch):
    predict_fn, output_loss = functions
    x, sampled_labels = batch[0], batch[2]

    def losses(p):
        outputs = predict_fn(p, x)
        return jax.vmap(lambda labels: per_example_losses(output_loss, outputs, labels))(sampled_labels)

    return linearize_fisher_from_losses(losses, params)


def empirical_fisher_product(functions, params, batch, v):
    return linearize_empirical_fisher(functions, params, batch)(v)


def true_fisher_product(functions, params, batch, v):
    return linearize_true_fisher(functions, params, batch)(v)


LINEARIZERS = {
    hvp_forward_over_reverse: linearize_hessian,
    ggn_product: linearize_ggn,
    empirical_fisher_product: linearize_empirical_fisher,
    true_fisher_product: linearize_true_fisher,
}


def apply_user_matvec(matvec, params, batch, v):
    return matvec(v)


def loss_of_loss_fn(loss_fn, params, batch):
    return loss_fn(params, batch)


def loss_of_outputs(functions, params, batch):
    predict_fn, output_loss = functions
    return output_loss(predict_fn(params, batch[0]), batch[1])
