"""Per-layer statistics of a network on one batch, captured without editing the model.

    stats = layer_statistics(state, (x, y))        # a TrainState (fit's, load_run(...).state) and a batch
    print(stats.table())                           # per layer: activations it reads, its outputs, its gradients
    stats.flags                                    # what a careful researcher would look at first

Every parameterised layer (Dense, Conv, ...) is intercepted while the model runs (``flax.linen.intercept_methods``):
its input is the activation of the layer before it (after the non-linearity, pooling and dropout), its output the
pre-activation. Per layer: the input's mean and std, the fraction of exact zeros, the fraction of *dead units*
(features that are zero for every example and position of the batch: dead ReLUs), the fraction of *saturated* units
(|a| > 0.99 after tanh, a < 0.01 or > 0.99 after sigmoid; the activation is read off the model when it has an
``activation`` attribute), the output's mean and std, and histograms. Per parameter: the gradient of the eval-mode
loss, its norm and histogram, and the size of the update the optimizer would make from it relative to the weights
(‖Δθ‖ / ‖θ‖; the cs231n rule of thumb is ~1e-3: far above, the learning rate is too high for that layer, far
below, too low).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.curvature.callback import PeriodicMeasurement

LAYER_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.ConvLocal, nn.Embed)
UPDATE_RATIO_BAND = (1e-4, 1e-2)  # a decade either side of the ~1e-3 rule of thumb
SATURATION = {"tanh": "tanh", "sigmoid": "sigmoid", "hard_tanh": "tanh", "soft_sign": "tanh"}


@dataclasses.dataclass
class LayerStatistics:
    """``activations``: one dict per layer (its input and output statistics); ``gradients``: one dict per parameter
    (gradient and update statistics); ``flags``: plain-language warnings; ``saturation``: the activation whose
    saturation was measured (``"tanh"``, ``"sigmoid"`` or None)."""

    activations: list[dict]
    gradients: list[dict]
    flags: list[str]
    saturation: str | None

    def table(self) -> str:
        lines = [f"{'layer (input it reads)':<24} {'mean':>9} {'std':>9} {'zeros':>6} {'dead':>6} {'satur.':>6}"
                 f" {'out std':>9}"]
        for a in self.activations:
            saturated = "-" if a["saturated_fraction"] is None else f"{a['saturated_fraction']:.0%}"
            dead = "-" if a["reads"] == "the data" else f"{a['dead_fraction']:.0%}"
            lines.append(f"{a['name']:<24} {a['mean']:9.3g} {a['std']:9.3g} {a['zero_fraction']:6.0%} "
                         f"{dead:>6} {saturated:>6} {a['output_std']:9.3g}")
        lines.append(f"{'parameter':<24} {'|grad|':>9} {'|param|':>9} {'update/param':>13}")
        for g in self.gradients:
            ratio = "-" if g["update_ratio"] is None else f"{g['update_ratio']:.2e}"
            lines.append(f"{g['name']:<24} {g['grad_norm']:9.3g} {g['param_norm']:9.3g} {ratio:>13}")
        lines += [f"! {flag}" for flag in self.flags] or ["no flags"]
        return "\n".join(lines)

    def scalars(self) -> dict[str, float]:
        """Flat scalars for metrics.jsonl: ``act_std/LAYER``, ``dead/LAYER``, ``saturated/LAYER``,
        ``grad_norm/PARAM``, ``update_ratio/PARAM``."""
        out: dict[str, float] = {}
        for a in self.activations:
            out[f"act_std/{a['name']}"] = a["std"]
            out[f"dead/{a['name']}"] = a["dead_fraction"]
            if a["saturated_fraction"] is not None:
                out[f"saturated/{a['name']}"] = a["saturated_fraction"]
        for g in self.gradients:
            out[f"grad_norm/{g['name']}"] = g["grad_norm"]
            if g["update_ratio"] is not None:
                out[f"update_ratio/{g['name']}"] = g["update_ratio"]
        return out

    def to_json(self) -> dict:
        return {"saturation": self.saturation, "flags": self.flags, "activations": self.activations,
                "gradients": self.gradients}


def layer_statistics(state: Any, batch: Any, *, loss: Any = "softmax_cross_entropy", layers: Any = None,
                     saturation: str | None = "auto", bins: int = 40, mode: str = "eval",
                     flag_small_updates: bool = True) -> LayerStatistics:
    """Statistics of every parameterised layer of ``state``'s model on ``batch`` = (x, y) (see the module
    docstring). ``layers``: names (e.g. ``["dense_1"]``) to keep, default all; an unknown name is an error that lists
    the layers. ``saturation``: "auto" (from the model's ``activation``), "tanh", "sigmoid" or None. ``mode``:
    "eval" (running batch-norm statistics, as at test time) or "train" (the batch's own statistics, as a training
    step sees them; dropout stays off). ``flag_small_updates``: flag update/weight ratios far below ~1e-3 too (during
    training; a finished run's last updates are small by design when its schedule decays)."""
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    x, y = batch
    records = _forward_records(state, jnp.asarray(x), mode == "train")
    names = list(records)
    if layers is not None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        unknown = [name for name in layers if name not in records]
        if unknown:
            raise ValueError(f"layers: no layer named {', '.join(map(repr, unknown))}; this model's layers: "
                             f"{', '.join(names)}")
        names = layers
    if saturation == "auto":
        activation = getattr(getattr(state.apply_fn, "__self__", None), "activation", None)
        saturation = SATURATION.get(activation) if isinstance(activation, str) else None
    elif saturation not in (None, "tanh", "sigmoid"):
        raise ValueError(f"saturation: expected 'auto', 'tanh', 'sigmoid' or None, got {saturation!r}")
    activations = [_activation_row(name, *jax.device_get(records[name]), saturation, bins, index == 0)
                   for index, name in enumerate(names)]
    grads, updates = _gradients_and_updates(state, (jnp.asarray(x), jnp.asarray(y)), loss, mode)
    grad_leaves = jax.tree.leaves(grads)
    update_leaves = jax.tree.leaves(updates) if updates is not None else [None] * len(grad_leaves)
    gradients = []
    for (path, param), grad, update in zip(jax.tree_util.tree_leaves_with_path(state.params), grad_leaves,
                                           update_leaves):
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        if layers is not None and not any(name == layer or name.startswith(layer + "/") for layer in names):
            continue
        gradients.append(_gradient_row(name, np.asarray(param), np.asarray(grad),
                                       None if update is None else np.asarray(update), bins))
    position = {name: index for index, name in enumerate(records)}  # call order, not the sorted parameter keys
    gradients.sort(key=lambda g: (position.get(g["name"].rsplit("/", 1)[0], len(position)), g["name"]))
    return LayerStatistics(activations, gradients, _flags(activations, gradients, saturation, flag_small_updates),
                           saturation)


def _forward_records(state: Any, x: jax.Array, train: bool = False) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Every layer's (input, output), in the order the model calls them (a compiled program returns a dict with
    sorted keys: dense_10 would come before dense_2, so the call order is read off a shape-only trace)."""
    variables = {"params": state.params, **state.model_state}
    order: list[str] = []
    jax.eval_shape(lambda v, x: _run_intercepted(state.apply_fn, v, x, train, lambda name, *_: order.append(name)),
                   variables, x)
    records = _forward_records_jit(state.apply_fn, variables, x, train)
    return {name: records[name] for name in order}


def _run_intercepted(apply_fn, variables, x, train, record) -> None:
    """Apply the model with ``record(name, input, output)`` called for every parameterised layer, in call order."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, LAYER_TYPES) and args:
            record("/".join(context.module.path), args[0], out)
        return out

    with nn.intercept_methods(interceptor):
        if train:
            apply_fn(variables, x, train=True, mutable=[name for name in variables if name != "params"])
        else:
            apply_fn(variables, x, train=False)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward_records_jit(apply_fn, variables, x, train):
    records: dict[str, tuple] = {}
    _run_intercepted(apply_fn, variables, x, train, lambda name, inputs, out: records.__setitem__(name, (inputs, out)))
    return records


@functools.partial(jax.jit, static_argnums=(2, 3))
def _gradients_and_updates_jit(state, batch, loss, mode):
    from jaxnn.losses import make_loss_fn

    grads = jax.grad(make_loss_fn(state.apply_fn, loss, state.model_state, mode=mode))(state.params, batch)
    updates, _ = state.tx.update(grads, state.opt_state, state.params)
    return grads, updates


@functools.partial(jax.jit, static_argnums=(2, 3))
def _gradients_jit(state, batch, loss, mode):
    from jaxnn.losses import make_loss_fn

    return jax.grad(make_loss_fn(state.apply_fn, loss, state.model_state, mode=mode))(state.params, batch)


def _gradients_and_updates(state, batch, loss, mode="eval"):
    """(gradients, the optimizer's updates from them — None without an optimizer state, or when its update needs
    more than the gradient, e.g. a line search's loss)."""
    if getattr(state, "opt_state", None) is None:  # a run read back without its optimizer's state: no updates
        return jax.device_get(_gradients_jit(state, batch, loss, mode)), None
    try:
        return jax.device_get(_gradients_and_updates_jit(state, batch, loss, mode))
    except TypeError:
        return jax.device_get(_gradients_jit(state, batch, loss, mode)), None


def _histogram(values: np.ndarray, bins: int) -> dict:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"counts": [], "edges": []}
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(finite, bins=bins, range=(low, high))
    return {"counts": counts.tolist(), "edges": edges.tolist()}


def _activation_row(name, inputs, outputs, saturation, bins, is_data) -> dict:
    a = np.asarray(inputs, np.float64)
    features = a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(-1, 1)
    dead = float(np.mean(np.all(features == 0, axis=0)))
    saturated = None
    if saturation == "tanh" and not is_data:
        saturated = float(np.mean(np.abs(a) > 0.99))
    elif saturation == "sigmoid" and not is_data:
        saturated = float(np.mean((a < 0.01) | (a > 0.99)))
    z = np.asarray(outputs, np.float64)
    return {"name": name, "reads": "the data" if is_data else "the previous layer's activations",
            "shape": list(a.shape), "mean": float(a.mean()), "std": float(a.std()),
            "zero_fraction": float(np.mean(a == 0)), "dead_fraction": dead, "saturated_fraction": saturated,
            "output_mean": float(z.mean()), "output_std": float(z.std()),
            "histogram": _histogram(a.ravel(), bins), "output_histogram": _histogram(z.ravel(), bins)}


def _gradient_row(name, param, grad, update, bins) -> dict:
    param_norm = float(np.linalg.norm(param.astype(np.float64)))
    ratio = None
    if update is not None and param_norm > 0:
        ratio = float(np.linalg.norm(update.astype(np.float64)) / param_norm)
    return {"name": name, "shape": list(param.shape), "param_norm": param_norm,
            "grad_norm": float(np.linalg.norm(grad.astype(np.float64))),
            "update_norm": None if update is None else float(np.linalg.norm(update.astype(np.float64))),
            "update_ratio": ratio, "histogram": _histogram(grad.ravel().astype(np.float64), bins)}


def _flags(activations: list[dict], gradients: list[dict], saturation: str | None,
           flag_small_updates: bool = True) -> list[str]:
    flags = []
    for index, a in enumerate(activations):
        if index == 0 and a["reads"] == "the data":
            continue
        if a["dead_fraction"] >= 0.5:
            flags.append(f"{a['name']}: {a['dead_fraction']:.0%} of the units it reads are dead (zero for the whole "
                         "batch: dead ReLUs; lower the learning rate or change the init)")
        if a["saturated_fraction"] is not None and a["saturated_fraction"] >= 0.5:
            flags.append(f"{a['name']}: {a['saturated_fraction']:.0%} of the {saturation} units it reads are "
                         "saturated (their gradient vanishes; the init scale is too large)")
        if a["std"] < 1e-3 or a["std"] > 1e3:
            flags.append(f"{a['name']}: the activations it reads have std {a['std']:.2g} "
                         f"({'vanishing' if a['std'] < 1e-3 else 'exploding'} with depth: check the init scale)")
    for g in gradients:
        if g["grad_norm"] == 0 and g["param_norm"] > 0:
            flags.append(f"{g['name']}: no gradient reaches it")
        ratio = g["update_ratio"]
        if ratio is not None and g["param_norm"] > 0 and g["name"].endswith("kernel") and (
                ratio > UPDATE_RATIO_BAND[1] or (flag_small_updates and ratio < UPDATE_RATIO_BAND[0])):
            flags.append(f"{g['name']}: update/weight ratio {ratio:.1e}, far from ~1e-3 (learning rate too "
                         f"{'high' if ratio > UPDATE_RATIO_BAND[1] else 'low'} for this layer?)")
        if not math.isfinite(g["grad_norm"]):
            flags.append(f"{g['name']}: non-finite gradient")
    return flags


class LayerStatisticsCallback(PeriodicMeasurement):
    """A ``fit`` callback: every ``every_k_steps`` steps, :func:`layer_statistics` on ``batch`` (default: the fit's
    analysis batch) into metrics.jsonl as ``act_std/LAYER``, ``dead/LAYER``, ``grad_norm/PARAM``,
    ``update_ratio/PARAM``; ``history`` keeps every measurement."""

    def __init__(self, every_k_steps: int, batch: Any = None, *, loss: Any = "softmax_cross_entropy",
                 layers: Any = None):
        super().__init__(every_k_steps, batch)
        self.loss, self.layers = loss, layers

    def measure_step(self, ctx: Any, batch: Any) -> dict:
        return layer_statistics(ctx.state, batch, loss=self.loss, layers=self.layers).scalars()
