"""Losses (thin wrappers over optax.losses) and the one abstraction: a pure ``loss_fn(params, batch)``.

Every loss here maps ``(outputs, targets) -> per-example losses``; reductions are means over the batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(logits, labels):
    """−log softmax(logits)[label], natural log. Integer labels."""
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)


def sigmoid_binary_cross_entropy(logits, labels):
    """Mean over outputs of −[y log σ(z) + (1−y) log(1−σ(z))]; labels in {0,1}, same shape as logits or (B,)."""
    labels = jnp.asarray(labels, logits.dtype)
    if labels.ndim == logits.ndim - 1:
        labels = labels[..., None]
    return optax.losses.sigmoid_binary_cross_entropy(logits, labels).mean(axis=-1)


def mean_squared_error(outputs, targets):
    """½‖f(x) − y‖² per example (the ½ makes the Gauss-Newton matrix JᵀJ)."""
    targets = jnp.asarray(targets, outputs.dtype).reshape(outputs.shape)
    return 0.5 * optax.losses.squared_error(outputs, targets).reshape(outputs.shape[0], -1).sum(axis=-1)


def multiclass_hinge(scores, labels):
    """Crammer-Singer multiclass hinge, max_j(s_j + 1[j≠y]) − s_y (optax); also named ``crammer_singer_hinge``.
    The notes' multiclass SVM sums over the classes instead: :func:`weston_watkins_hinge`."""
    return optax.losses.multiclass_hinge_loss(scores, labels)


crammer_singer_hinge = multiclass_hinge


def weston_watkins_hinge(scores, labels, delta: float = 1.0):
    """The cs231n notes' multiclass SVM (Weston-Watkins): Σ_{j≠y} max(0, s_j − s_y + Δ) per example. On the notes'
    scores [3.2, 5.1, −1.7] (cat) it is 2.9, where the Crammer-Singer form (:func:`multiclass_hinge`) is also 2.9, but
    on [2.2, 2.5, −3.1] (frog) it is 12.9 against 6.6: the sum counts every violating class, the max only the worst."""
    labels = jnp.asarray(labels)
    correct = jnp.take_along_axis(scores, labels[..., None], axis=-1)
    margins = jnp.maximum(0.0, scores - correct + delta)
    return jnp.sum(jnp.where(jax.nn.one_hot(labels, scores.shape[-1], dtype=bool), 0.0, margins), axis=-1)


def sequence_cross_entropy(logits, labels):
    """Per sequence, the mean over its scored positions of −log softmax(logits)[label]: logits (B, T, C), labels
    (B, T) with ``IGNORE_LABEL`` (−1) at padded positions, which add nothing. exp of the batch mean is the per-token
    perplexity when every sequence has the same number of scored positions. A sequence with none scores 0."""
    labels = jnp.asarray(labels)
    if logits.ndim != labels.ndim + 1 or labels.ndim < 2:
        raise ValueError(f"sequence_cross_entropy: expected logits (batch, time, classes) and labels (batch, time), "
                         f"got logits {logits.shape} and labels {labels.shape}")
    scored = labels >= 0
    tokens = optax.losses.softmax_cross_entropy_with_integer_labels(logits, jnp.where(scored, labels, 0))
    axes = tuple(range(1, labels.ndim))
    count = jnp.sum(scored, axis=axes)
    return jnp.sum(jnp.where(scored, tokens, 0), axis=axes) / jnp.maximum(count, 1).astype(tokens.dtype)


LOSSES: dict[str, Callable] = {
    "sequence_cross_entropy": sequence_cross_entropy,
    "softmax_cross_entropy": softmax_cross_entropy,
    "sigmoid_binary_cross_entropy": sigmoid_binary_cross_entropy,
    "mse": mean_squared_error,
    "multiclass_hinge": multiclass_hinge,
    "crammer_singer_hinge": crammer_singer_hinge,
    "weston_watkins_hinge": weston_watkins_hinge,
}

CLASSIFICATION_LOSSES = ("softmax_cross_entropy", "sequence_cross_entropy", "sigmoid_binary_cross_entropy",
                         "multiclass_hinge",
                         "crammer_singer_hinge", "weston_watkins_hinge")


def get_loss(name: str) -> Callable:
    """Per-example loss by name; unknown names list the valid ones."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def resolve_loss(loss: Callable | str) -> Callable:
    """The per-example loss for ``loss``: a registry name (:func:`get_loss`) or already a function ``(outputs,
    targets) -> per-example losses``. The one place a loss name becomes a function (the training step, the
    evaluation step, ``fit`` and :func:`make_loss_fn` all call it)."""
    if isinstance(loss, str):
        return get_loss(loss)
    if not callable(loss):
        raise TypeError(f"loss: expected a loss name ({', '.join(sorted(LOSSES))}) or a function (outputs, targets) "
                        f"-> per-example losses, got {type(loss).__name__}")
    return loss


def _softmax_root(logits, labels):
    # H = diag(p) − ppᵀ = S Sᵀ with S = diag(√p) − p√pᵀ (because Σ p = 1). S√p = 0, so H has rank C − 1: a Householder
    # reflection Q with Q e_m = √p makes column m of SQ zero, and the other C − 1 columns are a root too, one backward
    # pass fewer per example. m is the least likely class (√p_m ≤ 1/√C keeps the reflection away from 0/0).
    classes = logits.shape[-1]
    p = jax.nn.softmax(logits, axis=-1)
    r = jnp.sqrt(p)
    eye = jnp.eye(classes, dtype=logits.dtype)
    roots = eye * r[:, None, :] - p[:, :, None] * r[:, None, :]  # (B, C, C): S per example, columns last
    if classes == 1:
        return jnp.moveaxis(roots, 2, 0)
    least = jnp.argmin(p, axis=-1)
    v = r - eye[least]  # Q = I − 2vvᵀ/vᵀv, vᵀv = 2 − 2√p_m
    reflected = roots - 2 * jnp.einsum("bij,bj,bk->bik", roots, v, v) / (2 - 2 * jnp.take_along_axis(
        r, least[:, None], axis=1))[:, :, None]
    keep = jnp.arange(classes - 1) + (jnp.arange(classes - 1) >= least[:, None])  # (B, C − 1): every column but m
    return jnp.moveaxis(jnp.take_along_axis(reflected, keep[:, None, :], axis=2), 2, 0)  # (C − 1, B, C)


def _squared_error_root(outputs, targets):
    # H = I: the unit vectors
    eye = jnp.eye(outputs.shape[-1], dtype=outputs.dtype)
    return jnp.broadcast_to(eye[:, None, :], (outputs.shape[-1], *outputs.shape))


def _sigmoid_root(logits, labels):
    # mean over the C outputs of independent Bernoulli losses: H = diag(σ(1 − σ)) / C
    s = jax.nn.sigmoid(logits)
    scale = jnp.sqrt(s * (1 - s) / logits.shape[-1])
    eye = jnp.eye(logits.shape[-1], dtype=logits.dtype)
    return eye[:, None, :] * scale[None]


_HESSIAN_ROOTS = {"softmax_cross_entropy": _softmax_root, "mse": _squared_error_root,
                  "sigmoid_binary_cross_entropy": _sigmoid_root}


@functools.lru_cache(maxsize=None)
def batch_mean(name: str) -> Callable:
    """The batch mean of the per-example loss ``name``: an output loss ``(outputs, targets) -> scalar``, the form
    the curvature engine takes (``curvature.ggn``, ``curvature.kfac``, the Laplace fit). The same function object
    for the same name (compiled programs keyed on it are shared). For softmax cross-entropy, squared error and
    sigmoid binary cross-entropy it carries ``hessian_root(outputs, targets) -> (k, B, C)``: per example, the k columns
    of a square root S of the loss's Hessian in the outputs (H = S Sᵀ) in closed form (k = C − 1 for softmax
    cross-entropy, whose Hessian has rank C − 1; C for the others), which K-FAC's and Laplace's
    statistics use where another loss forms and eigen-decomposes each example's Hessian."""
    per_example = get_loss(name)

    def output_loss(outputs, targets):
        return jnp.mean(per_example(outputs, targets))

    output_loss.__name__ = output_loss.__qualname__ = f"batch_mean_{name}"
    if name in _HESSIAN_ROOTS:
        output_loss.hessian_root = _HESSIAN_ROOTS[name]
    return output_loss


def example_accuracy(logits, labels):
    """Per example (B,): 1 where argmax(logits) == label, else 0; with sequence labels (B, T), the fraction of the
    example's scored positions (label ≥ 0) that are right (1 for an example with none). Teacher-forced: a sequence
    model's own decoding is scored by :func:`jaxnn.models.seq2seq.sequence_accuracy`."""
    labels = jnp.asarray(labels)
    right = jnp.argmax(logits, axis=-1) == labels
    if labels.ndim < 2:
        return right.astype(jnp.result_type(float))
    axes = tuple(range(1, labels.ndim))
    scored = labels >= 0
    count = jnp.sum(scored, axis=axes)
    return jnp.where(count > 0, jnp.sum(right & scored, axis=axes) / jnp.maximum(count, 1), 1.0)


def accuracy(logits, labels):
    """Fraction of argmax(logits) == label: the batch mean of :func:`example_accuracy`."""
    return jnp.mean(example_accuracy(logits, labels))


def make_loss_fn(apply_fn: Callable, loss: Callable | str, model_state: Any = None, *, mode: str = "eval",
                 weight_decay: float = 0.0) -> Callable:
    """Build the pure ``loss_fn(params, batch) -> scalar`` every analysis consumes.

    ``apply_fn`` is a Flax ``module.apply``; ``model_state`` (e.g. ``{'batch_stats': ...}``) is closed over.
    ``mode="eval"`` uses running statistics; ``mode="train"`` normalises with the batch's own statistics
    (what PyHessian differentiates) and discards the statistics update; dropout is off in both.
    ``weight_decay`` adds ½·wd·‖θ‖² (an L2 term that is part of the differentiated loss).

    The result is a ``jax.tree_util.Partial`` whose function is shared by every call with the same
    (apply_fn, loss, mode, weight_decay) and whose arguments are the model-state arrays: compiled analyses
    (curvature, landscape, the Hessian callback) reuse one compilation when only the numbers change.
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"make_loss_fn mode must be 'eval' or 'train', got {mode!r}")
    per_example = resolve_loss(loss)
    try:
        fn = _model_loss(apply_fn, per_example, mode, float(weight_decay))
    except TypeError:  # an unhashable apply_fn or loss: no sharing, same maths
        fn = _model_loss.__wrapped__(apply_fn, per_example, mode, float(weight_decay))
    return jax.tree_util.Partial(fn, dict(model_state or {}))


@functools.lru_cache(maxsize=64)
def _model_loss(apply_fn: Callable, per_example: Callable, mode: str, weight_decay: float) -> Callable:
    def loss_fn(model_state, params, batch):
        x, y = batch
        variables = {"params": params, **model_state}
        if mode == "train" and model_state:
            outputs, _ = apply_fn(variables, x, train=True, mutable=list(model_state))
        else:
            outputs = apply_fn(variables, x, train=False)
        value = jnp.mean(per_example(outputs, y))
        if weight_decay:
            value = value + 0.5 * weight_decay * optax.tree.norm(params, squared=True)
        return value

    return loss_fn


def make_metric_fn(apply_fn: Callable, model_state: Any = None) -> Callable:
    """Pure ``accuracy_fn(params, batch)`` in eval mode (for landscape accuracy grids)."""
    model_state = dict(model_state or {})

    def accuracy_fn(params, batch):
        x, y = batch
        return accuracy(apply_fn({"params": params, **model_state}, x, train=False), y)

    return accuracy_fn
