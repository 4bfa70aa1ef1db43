"""Gradient noise: per-example gradients and the statistics that decide the batch size (McCandlish et al. 2018,
"An empirical model of large-batch training").

From the per-example gradients g_i (i = 1..n, ``jax.vmap`` of ``jax.grad``, ``chunk_size`` at a time, never all held
at once) of ``loss_fn`` at θ, with Ḡ = (1/n) Σ g_i:

- tr Σ = (1/(n−1)) Σ ‖g_i − Ḡ‖²: the trace of the per-example gradient covariance (unbiased);
- |G|² = ‖Ḡ‖² − tr Σ / n: the squared norm of the true gradient (unbiased: E‖Ḡ‖² = |G|² + tr Σ / n);
- B_noise = tr Σ / |G|²: the simple noise scale, the batch size at which the gradient's noise and signal are
  comparable (training speeds up almost linearly with the batch below it and barely above it);
- per layer: the same three, and the signal-to-noise ratio of the batch-mean gradient, |G_l|² / (tr Σ_l / n).

These are McCandlish et al.'s two-batch-size unbiased estimators (their Appendix A) with the small batch being one
example and the big batch all n: :func:`two_batch_noise_scale` gives the general form, for gradient norms measured at
any two batch sizes (e.g. one device's batch and the all-reduced one).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.curvature.operators import join_functions, precise_jit, split_functions
from jaxnn.curvature.callback import PeriodicMeasurement


@dataclasses.dataclass
class GradientNoise:
    """``gradient_norm_sq`` |G|², ``trace_covariance`` tr Σ, ``noise_scale`` B_noise (nan when |G|² ≤ 0: the noise
    hides the gradient at this n), ``layers``: {layer: the same and ``snr``}, over ``num_examples`` examples."""

    num_examples: int
    gradient_norm_sq: float
    trace_covariance: float
    noise_scale: float
    layers: dict

    def describe(self) -> str:
        """Two lines for a terminal: the noise scale and each layer's signal-to-noise ratio."""
        scale = "n/a (|G|² ≤ 0: noise hides the gradient)" if not np.isfinite(self.noise_scale) else \
            f"{self.noise_scale:.4g}"
        return (f"gradient noise over {self.num_examples} examples: B_noise = tr Σ / |G|² = {scale} "
                f"(tr Σ = {self.trace_covariance:.4g}, |G|² = {self.gradient_norm_sq:.4g})\n"
                f"signal-to-noise of the batch-mean gradient per layer: "
                + ", ".join(f"{name} {row['snr']:.3g}" for name, row in self.layers.items()))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def scalars(self) -> dict:
        """Flat floats for metrics.jsonl: ``grad_noise/scale``, ``grad_noise/trace_cov``, ``grad_noise/norm_sq`` and
        ``grad_snr/LAYER``."""
        out = {"grad_noise/scale": self.noise_scale, "grad_noise/trace_cov": self.trace_covariance,
               "grad_noise/norm_sq": self.gradient_norm_sq}
        out.update({f"grad_snr/{name}": row["snr"] for name, row in self.layers.items()})
        return out


def two_batch_noise_scale(norm_sq_small: float, norm_sq_big: float, batch_small: int, batch_big: int):
    """McCandlish et al.'s unbiased estimates from the squared norms of mean gradients over batches of two sizes:
    (|G|², tr Σ, B_noise = tr Σ / |G|²)."""
    if not 0 < batch_small < batch_big:
        raise ValueError(f"batch sizes: expected 0 < batch_small < batch_big, got {batch_small}, {batch_big}")
    norm_sq = (batch_big * norm_sq_big - batch_small * norm_sq_small) / (batch_big - batch_small)
    trace = (norm_sq_small - norm_sq_big) / (1.0 / batch_small - 1.0 / batch_big)
    return norm_sq, trace, trace / norm_sq if norm_sq > 0 else float("nan")


@precise_jit(static_argnames=("skeleton", "chunk_size"))
def _sums(arrays, skeleton, params, batch, chunk_size):
    """Per leaf: Σ_i g_i and Σ_i ‖g_i‖², over the batch's examples, ``chunk_size`` per-example gradients at a time
    (the loss's closed-over arrays are arguments: a new closure over the same shapes reuses the compiled program)."""
    example_loss_fn = join_functions(arrays, skeleton)

    def one(example):
        grads = jax.grad(example_loss_fn)(params, jax.tree.map(lambda leaf: leaf[None], example))
        return grads, jax.tree.map(lambda g: jnp.sum(g**2), grads)

    grads, squares = jax.lax.map(one, batch, batch_size=chunk_size)
    return jax.tree.map(lambda g: jnp.sum(g, axis=0), grads), jax.tree.map(jnp.sum, squares)


@precise_jit(static_argnames=("skeleton", "layers", "shapes"))
def _ghost_sums(arrays, skeleton, params, batch, layers, shapes):
    """Σ_i g_i per leaf and Σ_i ‖g_i‖² per layer without forming any per-example gradient, for a model whose
    parameters all sit in Dense layers: one backward pass of Σ_i ℓ_i also gives each layer's per-example
    output gradients (a zero perturbation added to its output), and a layer's per-example weight gradient is
    Σ_t a_t g_tᵀ, whose squared norm is Σ_{t,t'} (a_t·a_t')(g_t·g_t') (‖a‖²‖g‖² for one position; Goodfellow 2015)."""
    from jaxnn.curvature.kfac import layer_inputs, perturbed_layers

    example_loss_fn = join_functions(arrays, skeleton)
    count = jax.tree.leaves(batch)[0].shape[0]
    names = ["/".join(layer.path) for layer in layers]
    zeros = {name: jnp.zeros(shape, jax.tree.leaves(params)[0].dtype) for name, shape in shapes}

    def total(p, perturbations):
        inputs = {}
        with perturbed_layers(perturbations, inputs):
            return example_loss_fn(p, batch) * count, inputs  # the mean over the batch, times n: Σ_i ℓ_i

    (param_grads, output_grads), inputs = jax.grad(total, argnums=(0, 1), has_aux=True)(params, zeros)
    squares = {}
    for layer, name in zip(layers, names):
        a = layer_inputs(inputs[name], layer)  # (n, T, d_in + 1)
        g = output_grads[name].reshape(a.shape[0], a.shape[1], -1)  # (n, T, d_out)
        squares[name] = jnp.sum(jnp.einsum("nti,nsi->nts", a, a) * jnp.einsum("nto,nso->nts", g, g))
    return param_grads, squares


def gradient_noise(loss_fn: Callable, params: Any, batch: Any, *, example_loss_fn: Callable | None = None,
                   chunk_size: int = 256) -> GradientNoise:
    """The statistics of the module docstring over the examples of ``batch`` (arrays with a leading example axis).
    ``example_loss_fn(params, batch_of_one)``: one example's loss (default ``loss_fn``; pass it when ``loss_fn`` adds
    a regulariser, which has no noise). Layers are :func:`jaxnn.curvature.layer_names`. Cost: for a Flax model
    whose parameters all sit in Dense layers, one backward pass of the batch (per-example norms from each
    layer's inputs and output gradients, no per-example gradient formed); otherwise one backward pass per example,
    vmapped ``chunk_size`` at a time."""
    from jaxnn.curvature.blocks import layer_names, parameter_paths

    example_loss_fn = loss_fn if example_loss_fn is None else example_loss_fn
    leaves = jax.tree.leaves(batch)
    if not leaves or any(np.ndim(leaf) < 1 or leaf.shape[0] != leaves[0].shape[0] for leaf in leaves):
        raise ValueError("batch: expected arrays with one leading example axis of the same length")
    count = int(leaves[0].shape[0])
    if count < 2:
        raise ValueError(f"batch: gradient noise needs at least 2 examples, got {count}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1, got {chunk_size!r}")
    arrays, skeleton = split_functions(example_loss_fn)
    paths = parameter_paths(params)
    shapes_key = (skeleton, jax.tree.structure(params), tuple(np.shape(leaf) for leaf in jax.tree.leaves(params)),
                  tuple(np.shape(leaf) for leaf in leaves))
    if shapes_key not in _FACTORED:  # the layer search traces the loss once per loss and shapes (a callback's
        if len(_FACTORED) > 64:       # measurements reuse it)
            _FACTORED.clear()
        _FACTORED[shapes_key] = _factored_layers(example_loss_fn, params, batch)
    factored = _FACTORED[shapes_key]
    if factored is not None:  # every parameter in a Dense / Conv layer: per-example norms without the gradients
        layers_found, shapes = factored
        total, layer_squares = _ghost_sums(arrays, skeleton, params, batch, layers=layers_found, shapes=shapes)
        sum_sq = {name: float(value) for name, value in layer_squares.items()}
    else:
        total, squares = _sums(arrays, skeleton, params, batch, chunk_size=min(chunk_size, count))
        sum_sq = dict(zip(paths, (float(s) for s in jax.tree.leaves(squares))))
    mean_sq = dict(zip(paths, (float(jnp.sum((g / count) ** 2)) for g in jax.tree.leaves(total))))

    def stats(selected):
        norm_bar = sum(mean_sq[p] for p in selected)
        squares_of = ([sum_sq[layer] for layer in {p.rsplit("/", 1)[0] for p in selected}] if factored is not None
                      else [sum_sq[p] for p in selected])
        trace = (sum(squares_of) - count * norm_bar) / (count - 1)
        norm_sq = norm_bar - trace / count
        return {"gradient_norm_sq": norm_sq, "trace_covariance": trace,
                "noise_scale": trace / norm_sq if norm_sq > 0 else float("nan"),
                "snr": norm_sq / (trace / count) if trace > 0 else float("inf")}

    layers = {}
    for layer in layer_names(params):
        layers[layer] = stats([p for p in paths if p == layer or p.rsplit("/", 1)[0] == layer])
    whole = stats(paths)
    return GradientNoise(count, whole["gradient_norm_sq"], whole["trace_covariance"], whole["noise_scale"], layers)


_FACTORED: dict = {}


def _factored_layers(example_loss_fn: Callable, params: Any, batch: Any):
    """(the Dense layers the loss calls, their output shapes) when every parameter belongs to one of them (each called
    once); None otherwise: convolutions (measured on LeNet, batch 256: the vmapped per-example gradients cost 2.0x a
    plain gradient, the Gram form over positions 4.0x), normalisation layers, embeddings, a loss that is not a Flax
    model."""
    from jaxnn.curvature.blocks import layer_names
    from jaxnn.curvature.kfac import discover_layers

    try:
        layers, skipped, shapes = discover_layers(example_loss_fn, params, batch)
    except Exception:  # not a Flax model, or one the interception cannot run
        return None
    names = {"/".join(layer.path) for layer in layers}
    if skipped or not layers or set(layer_names(params)) != names or any(layer.kind != "dense" for layer in layers):
        return None
    return tuple(layers), tuple((name, tuple(shapes[name])) for name in sorted(names))


class GradientNoiseCallback(PeriodicMeasurement):
    """A ``fit`` callback: every ``every_k_steps`` steps, :func:`gradient_noise` of the eval-mode loss on ``batch``
    (default: the fit's analysis batch) into metrics.jsonl (``grad_noise/scale``, ``grad_noise/trace_cov``,
    ``grad_noise/norm_sq``, ``grad_snr/LAYER``); ``history`` keeps every measurement."""

    def __init__(self, every_k_steps: int, batch: Any = None, *, chunk_size: int = 256):
        super().__init__(every_k_steps, batch)
        self.chunk_size = chunk_size

    def measure_step(self, ctx: Any, batch: Any) -> dict:
        return gradient_noise(ctx.loss_fn(), ctx.state.params, batch, chunk_size=self.chunk_size).scalars()
