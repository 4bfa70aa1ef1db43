"""Depth, initialisation and batch norm (cs231n "Setting up the data and the model"; CS7643 "training deep nets").

A deep ReLU MLP (100 units a layer) on Gaussian inputs: the variance of the activations each layer reads and the
norms of its weight and bias gradients (the bias gradient is the batch's summed backpropagated signal ∂L/∂z), layer
by layer, for four initialisations — N(0, 0.01²), Glorot, He, and N(0, 0.01²) followed by batch norm (training mode:
the batch's statistics). Then a 10-layer tanh MLP with N(0, 0.01²) and N(0, 1) weights: the cs231n notes say that
with large weights "almost all neurons [are] completely saturated, either -1 or 1" and that with small weights the
activations collapse to zero; measured here as where |a| piles up (its histogram in tenths) and as the per-layer
factor of the variance. Measured with ``jaxnn.diagnostics.layer_statistics`` (no model code changed), for every seed
(its own inputs and initial weights). The notes' batch-norm backward pass, derived by hand, is compared with
``jax.grad`` in float64. Finally each deep ReLU variant trains for the same budget on the embedded digits, one
member per seed. Comparisons hold in every seed with a stated margin (``vanish_factor`` for gradient ratios).
"""

from __future__ import annotations

import math

import numpy as np

CLAIM = ("With ReLU, Glorot init halves the activation variance per layer (~1e-6 by layer 20), N(0, 0.01²) "
         "collapses it, He keeps it within [0.1, 10] and batch norm at ≈1; early-layer gradients vanish without "
         "batch norm; tanh with small weights collapses the activations to zero and with N(0, 1) weights \"almost all "
         "neurons [are] completely saturated, either -1 or 1\"; the hand-derived batch-norm backward equals autodiff; "
         "the well-initialised deep nets train, the collapsed one does not.")
CONFIG = {"depth": 20, "width": 100, "examples": 1000, "tanh_depth": 10, "train_steps": 300, "batch_size": 64,
          "lr": 1e-3, "seeds": [0, 1, 2], "vanish_factor": 10.0}
SMOKE = {"depth": 8, "examples": 200, "tanh_depth": 5, "train_steps": 40}
VARIANTS = {  # name -> model kwargs
    "N(0, 0.01²)": {"kernel_init": "small_normal", "kernel_init_kwargs": {"sigma": 0.01}},
    "Glorot": {"kernel_init": "glorot_normal"},
    "He": {"kernel_init": "he"},
    "N(0, 0.01²) + BN": {"kernel_init": "small_normal", "kernel_init_kwargs": {"sigma": 0.01}, "norm": "batch"},
}
TANH = {"tanh N(0, 0.01²)": 0.01, "tanh N(0, 1)": 1.0}  # name -> sigma
SHRINKING = ("N(0, 0.01²)", "Glorot")  # the inits without BN whose activations shrink with depth


def _model(depth, width, activation, **kwargs):
    from jaxnn import models

    return models.get_model("mlp", num_classes=10, width=width, depth=depth, activation=activation, **kwargs)


def _profile(model, tx, x, y, seed, activation):
    """Per layer (every hidden layer, then the head): the variance of the activations it reads, the norms of its
    weight and bias gradients (training-mode loss on the whole batch) and, for tanh, the fraction of |a| > 0.99
    (layer_statistics' threshold) and the histogram of |a| in tenths; and the variance of every batch-norm output
    (training mode: the batch's statistics). ``tx``: one optimizer object for every call, so that layer_statistics'
    compiled programs are reused across seeds."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxnn.diagnostics import layer_statistics
    from jaxnn.train import create_train_state

    state = create_train_state(model, tx, (x.shape[1],), jax.random.PRNGKey(seed))
    stats = layer_statistics(state, (x, y), mode="train", saturation="tanh" if activation == "tanh" else None)
    grads = {g["name"]: g["grad_norm"] for g in stats.gradients}
    captured = {"norm": [], "reads": []}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.BatchNorm):
            captured["norm"].append(out)
        elif isinstance(context.module, nn.Dense):
            captured["reads"].append(args[0])
        return out

    variables = {"params": state.params, **state.model_state}
    with nn.intercept_methods(capture):
        state.apply_fn(variables, jnp.asarray(x), train=True, mutable=list(state.model_state))
    reads = [np.abs(np.asarray(a, np.float64)) for a in jax.device_get(captured["reads"])]
    rows = []
    for a, r in zip(stats.activations, reads):
        rows.append({"layer": a["name"], "activation_variance": a["std"] ** 2,
                     "weight_grad_norm": grads[f"{a['name']}/kernel"], "bias_grad_norm": grads[f"{a['name']}/bias"]})
        if activation == "tanh":
            rows[-1].update(saturated=a["saturated_fraction"], mean_slope=float(np.mean(1 - r**2)),
                            abs_tenths=np.histogram(r, bins=10, range=(0.0, 1.0))[0].tolist())
    return rows, [float(jnp.var(out)) for out in jax.device_get(captured["norm"])]


def batchnorm_backward_by_hand(x, gamma, dy, eps):
    """The notes' derivation (per feature over the batch axis): with x̂ = (x − μ)/√(σ² + ε),
    dx = γ/(N√(σ² + ε)) · (N·dy − Σ dy − x̂ Σ(dy·x̂))."""
    n = x.shape[0]
    mean, var = x.mean(axis=0), x.var(axis=0)
    x_hat = (x - mean) / np.sqrt(var + eps)
    return gamma / (n * np.sqrt(var + eps)) * (n * dy - dy.sum(axis=0) - x_hat * (dy * x_hat).sum(axis=0))


def batchnorm_check(seed: int) -> float:
    """Max relative difference between the hand-derived backward pass and jax.grad (float64)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    x, gamma, beta = rng.normal(size=(32, 7)) * 3 + 1, rng.normal(size=7), rng.normal(size=7)
    dy, eps = rng.normal(size=(32, 7)), 1e-5
    with jax.enable_x64(True):
        def forward(x):
            mean, var = jnp.mean(x, axis=0), jnp.var(x, axis=0)
            return jnp.sum(dy * (gamma * (x - mean) / jnp.sqrt(var + eps) + beta))

        autodiff = np.asarray(jax.grad(forward)(jnp.asarray(x)))
    by_hand = batchnorm_backward_by_hand(x, gamma, dy, eps)
    return float(np.max(np.abs(by_hand - autodiff)) / np.max(np.abs(autodiff)))


def _spread(values, digits=3, fmt="g"):
    """'mean ± std (min to max)' of per-seed values."""
    values = np.asarray(values, np.float64)
    return (f"{values.mean():.{digits}{fmt}} ± {values.std():.{digits - 1 if fmt == 'g' else digits}{fmt}} "
            f"(range {values.min():.{digits}{fmt}} to {values.max():.{digits}{fmt}})")


def run(config: dict, out_dir, progress: bool = True):
    import optax

    from jaxnn import data as data_lib
    from jaxnn.experiments import Result
    from jaxnn.train.population import train_population

    depth, width, n, seeds = config["depth"], config["width"], config["examples"], list(config["seeds"])
    factor, count = config["vanish_factor"], f"{len(config['seeds'])} seeds"
    if len(seeds) < 3:
        raise ValueError(f"seeds: the comparisons need at least 3 seeds, got {seeds!r}")
    inputs = {}
    for seed in seeds:  # each seed: its own Gaussian inputs and random labels, and its own initial weights
        rng = np.random.default_rng(seed)
        inputs[seed] = (rng.normal(size=(n, width)).astype(np.float32), rng.integers(0, 10, size=n).astype(np.int32))
    profiles, norms, tanh, tx = {}, {}, {}, optax.adam(1e-3)
    for name, kwargs in VARIANTS.items():
        model = _model(depth, width, "relu", **kwargs)
        runs = [_profile(model, tx, *inputs[seed], seed, "relu") for seed in seeds]
        profiles[name], norms[name] = [rows for rows, _ in runs], [bn for _, bn in runs]
    for name, sigma in TANH.items():
        model = _model(config["tanh_depth"], width, "tanh", kernel_init="small_normal",
                       kernel_init_kwargs={"sigma": sigma})
        tanh[name] = [_profile(model, tx, *inputs[seed], seed, "tanh")[0] for seed in seeds]

    digits = data_lib.load_dataset("digits", seed=0)
    trained = {}
    for name, kwargs in VARIANTS.items():
        population = train_population(_model(depth, width, "relu", **kwargs), optax.adam, digits,
                                      members={"seed": seeds}, num_steps=config["train_steps"],
                                      batch_size=config["batch_size"], shuffle_per_member=True,
                                      optimizer_kwargs={"learning_rate": config["lr"]}, progress=progress)
        trained[name] = [float(m["val_accuracy"]) for m in population.members]

    def column(rows_per_seed, key):
        return {name: [[r[key] for r in rows] for rows in runs] for name, runs in rows_per_seed.items()}

    variance, weight_grad, bias_grad = (column(profiles, key) for key in
                                        ("activation_variance", "weight_grad_norm", "bias_grad_norm"))
    hidden = depth - 1  # index of the last hidden layer: same 100×100 kernel as the first (the head's is 100×10)

    def per_layer(values):  # geometric mean factor per layer, past the data
        return float(np.exp(np.mean(np.diff(np.log(values[1:])))))

    glorot_ratio = [per_layer(v) for v in variance["Glorot"]]
    small_ratio = [per_layer(v) for v in variance["N(0, 0.01²)"]]
    last = {name: [v[-1] for v in runs] for name, runs in variance.items()}
    expected_glorot = 0.5 ** (depth - 1)
    he_range = [min(min(v) for v in variance["He"]), max(max(v) for v in variance["He"])]
    across = [a[0] / b[0] for a, b in zip(weight_grad["N(0, 0.01²)"], weight_grad["N(0, 0.01²) + BN"])]
    within = {kind: {name: [g[0] / g[hidden] for g in grads[name]] for name in VARIANTS}
              for kind, grads in (("weight", weight_grad), ("bias", bias_grad))}
    tanh_variance = column(tanh, "activation_variance")
    tanh_small = tanh_variance["tanh N(0, 0.01²)"]
    tanh_factor = [per_layer(v) for v in tanh_small]
    tanh_falls = all(np.all(np.diff(v) < 0) for v in tanh_small)
    big = [rows[1:] for rows in tanh["tanh N(0, 1)"]]  # the hidden layers (the first reads the data)
    modal_tenth = [int(np.argmax(r["abs_tenths"])) for rows in big for r in rows]
    top_tenth = [r["abs_tenths"][-1] / sum(r["abs_tenths"]) for rows in big for r in rows]
    saturated = [r["saturated"] for rows in big for r in rows]
    slope = [r["mean_slope"] for rows in big for r in rows]
    # z ~ N(0, width · E[a²]) for a unit reading tanh activations through N(0, 1) weights
    second_moment = float(np.mean([v[1:] for v in tanh_variance["tanh N(0, 1)"]]))
    predicted = 1 - math.erf(math.atanh(0.99) / math.sqrt(2 * width * second_moment))
    bn_bias = bias_grad["N(0, 0.01²) + BN"]
    bn_variance = [v for runs in norms["N(0, 0.01²) + BN"] for v in runs]
    backward_error = max(batchnorm_check(seed) for seed in seeds)
    low = 1 / factor
    checks = [
        ("Glorot + ReLU: activation variance shrinks ≈ 0.5× per layer (geometric mean in [0.4, 0.6], every seed)",
         f"{_spread(glorot_ratio)}× per layer ({count})", all(0.4 <= r <= 0.6 for r in glorot_ratio)),
        (f"Glorot: variance at layer {depth} ≈ 0.5^{depth - 1} = {expected_glorot:.1e} (within 10×, every seed)",
         f"variance at layer {depth} {_spread(last['Glorot'], 2, 'e')} ({count})",
         all(expected_glorot / 10 <= v <= expected_glorot * 10 for v in last["Glorot"])),
        ("N(0, 0.01²): variance collapses by ≥ 10 orders of magnitude by the last layer (every seed)",
         f"variance at layer {depth} {_spread(last['N(0, 0.01²)'], 2, 'e')} ({count}; input variance ≈ 1)",
         all(v <= 1e-10 for v in last["N(0, 0.01²)"])),
        ("He: variance within [0.1, 10] at every layer (every seed)",
         f"variance {he_range[0]:.2f} to {he_range[1]:.2f} over all layers and {count} (per seed: "
         + ", ".join(f"{min(v):.2f} to {max(v):.2f}" for v in variance["He"]) + ")",
         0.1 <= he_range[0] and he_range[1] <= 10),
        ("without BN, early-layer weight gradients ≈ 0: N(0, 0.01²) first-layer ‖∂L/∂W‖ < 1e-3 of the same init with "
         "BN (every seed)", f"ratio {_spread(across, 2, 'e')} ({count})", all(r < 1e-3 for r in across)),
        (f"within one init without BN ({', '.join(SHRINKING)}), early-layer weight gradients vanish: first-layer "
         f"‖∂L/∂W‖ below the last hidden layer's by ≥ {factor:g}× (ratio < {low:g}, every seed)",
         "; ".join(f"{name} first/last {_spread(within['weight'][name], 2, 'e')}" for name in SHRINKING)
         + f" ({count})",
         all(r < low for name in SHRINKING for r in within["weight"][name])),
        (f"within one init without BN ({', '.join(SHRINKING)}), the backpropagated signal vanishes: first-layer bias "
         f"gradient ‖∂L/∂b‖ (the batch's summed ∂L/∂z) below the last hidden layer's by ≥ {factor:g}× (every seed)",
         "; ".join(f"{name} first/last {_spread(within['bias'][name], 2, 'e')}" for name in SHRINKING) + f" ({count})",
         all(r < low for name in SHRINKING for r in within["bias"][name])),
        (f"with BN, early-layer weight gradients do not vanish: first-layer ‖∂L/∂W‖ not below the last hidden "
         f"layer's by {factor:g}× (ratio ≥ {low:g}, every seed)",
         f"N(0, 0.01²) + BN first/last {_spread(within['weight']['N(0, 0.01²) + BN'], 2, 'e')} ({count})",
         all(r >= low for r in within["weight"]["N(0, 0.01²) + BN"])),
        (f"tanh, N(0, 0.01²): activations collapse to zero, falling at every layer by ≈ width·σ² = {width * 1e-4:g} "
         "(tanh is linear near 0; geometric mean within 2× of it, every seed)",
         f"{_spread(tanh_factor)}× per layer ({count}); falls at every layer: {'yes' if tanh_falls else 'no'}; "
         f"variance at layer {config['tanh_depth']} {_spread([v[-1] for v in tanh_small], 2, 'e')}",
         tanh_falls and all(width * 1e-4 / 2 <= f <= width * 1e-4 * 2 for f in tanh_factor)),
        ("tanh, N(0, 1): units pile up at -1 or 1: in every hidden layer the most frequent tenth of |a| is the last, "
         "(0.9, 1] (every seed)",
         f"modal tenth of |a|: the last in {sum(t == 9 for t in modal_tenth)} of {len(modal_tenth)} layers × seeds; "
         f"(0.9, 1] holds {min(top_tenth):.0%} to {max(top_tenth):.0%} of the units",
         all(t == 9 for t in modal_tenth)),
        (f"the notes' batch-norm backward equals jax.grad (float64, {count})",
         f"max relative difference {backward_error:.1e}", backward_error < 1e-10),
        (f"after {config['train_steps']} Adam steps on the digits, He and BN learn (val accuracy > 0.5) and "
         "N(0, 0.01²) does not (< 0.2; chance 0.1), every seed",
         f"val accuracy He {_spread(trained['He'], 2, 'f')}, N(0, 0.01²) + BN "
         f"{_spread(trained['N(0, 0.01²) + BN'], 2, 'f')}, N(0, 0.01²) {_spread(trained['N(0, 0.01²)'], 2, 'f')} "
         f"({count})",
         min(trained["He"]) > 0.5 and min(trained["N(0, 0.01²) + BN"]) > 0.5 and max(trained["N(0, 0.01²)"]) < 0.2),
    ]
    reported = [
        ("batch norm output variance (training mode: 1 by construction, up to ε)",
         f"{min(bn_variance):.4f} to {max(bn_variance):.4f} over every normalisation and {count}"),
        (f"Glorot: variance at layer {depth}, geometric mean over seeds (mean field: (1/2 − 1/(2π))·0.5^{depth - 1} = "
         f"{(0.5 - 0.5 / math.pi) * 0.5 ** (depth - 1):.1e}; finite width makes it a product of random factors)",
         f"{np.exp(np.mean(np.log(last['Glorot']))):.1e}"),
        ("N(0, 0.01²) + ReLU: variance factor per layer (width·σ²/2 = 0.005 predicted)", f"{_spread(small_ratio)}×"),
        ("first/last-hidden-layer ‖∂L/∂W‖, He and N(0, 0.01²) + BN",
         f"He {_spread(within['weight']['He'], 2, 'e')}; BN {_spread(within['weight']['N(0, 0.01²) + BN'], 2, 'e')}"),
        ("first/last-hidden-layer bias gradient ‖∂L/∂b‖, He", _spread(within["bias"]["He"], 2, "e")),
        ("N(0, 0.01²) + BN: hidden-layer bias gradients (0 up to rounding by construction: batch norm subtracts the "
         "batch mean, so the bias has no effect)",
         f"‖∂L/∂b‖ ≤ {max(max(g[:depth]) for g in bn_bias):.1e} at every hidden layer (the head's: "
         f"{min(g[depth] for g in bn_bias):.1e} or more)"),
        ("tanh, N(0, 1): fraction of units with |a| > 0.99 (jaxnn's threshold in layer_statistics; the notes give "
         "none)", f"{min(saturated):.0%} to {max(saturated):.0%} per hidden layer; the Gaussian closed form "
         f"P(|z| > atanh 0.99), z ~ N(0, width·E[a²] = {width * second_moment:.0f}), gives {predicted:.0%}"),
        ("tanh, N(0, 1): mean local slope 1 − a² (what tanh passes back; 1 at a = 0)",
         f"{min(slope):.3f} to {max(slope):.3f} per hidden layer"),
        (f"val accuracy after {config['train_steps']} Adam steps, Glorot (not bounded by the claim)",
         _spread(trained["Glorot"], 2, "f")),
    ]
    corrections = ["Batch norm normalises each feature over the batch axis (mean and variance per column), as "
                   "implemented here; the hand-derived backward pass uses the same axis."]
    if not checks[5][2] and checks[6][2]:
        corrections.append(
            "Without BN, what vanishes toward the first layer is the backpropagated signal ∂L/∂z (measured by the "
            "bias gradient), not the weight gradient: ∂L/∂W_l = a_(l−1)ᵀ ∂L/∂z_l, and the activations a shrink "
            "forward by the factor by which ∂L/∂z shrinks backward, so ‖∂L/∂W‖ stays of one size from the first to "
            "the last hidden layer (it is tiny at every layer for N(0, 0.01²)).")
    _plot(variance, weight_grad, bias_grad, tanh_variance, big, trained, out_dir / "depth_init_batchnorm.png", depth)
    return Result(
        measured={"seeds": seeds, "activation_variance": variance, "weight_grad_norm": weight_grad,
                  "bias_grad_norm": bias_grad, "first_last_ratio": within, "first_layer_weight_grad_ratio_without_bn":
                  across, "batchnorm_output_variance": norms["N(0, 0.01²) + BN"], "glorot_ratio_per_layer":
                  glorot_ratio, "tanh": tanh, "tanh_small_factor_per_layer": tanh_factor,
                  "batchnorm_backward_error": backward_error, "val_accuracy_after_training": trained},
        checks=checks, reported=reported, figures=["depth_init_batchnorm.png"], corrections=corrections,
        data=f"{n} Gaussian inputs of dimension {width} with random labels per seed (seeds {seeds}: inputs and "
             "initial weights) for the statistics; the embedded digits for training (one population per init, "
             "members by seed)")


def _log_lines(ax, values_per_seed, color, label):
    """Every seed's values on a log axis as measured; a value ≤ 0 (not drawable) is marked ▼ at the axis' bottom.
    Returns whether any was."""
    hidden = False
    for i, values in enumerate(values_per_seed):
        values = np.asarray(values, np.float64)
        layers = np.arange(1, len(values) + 1)
        positive = values > 0
        ax.plot(layers[positive], values[positive], "o-", color=color, markersize=2.5, lw=1, alpha=0.8,
                label=label if i == 0 else None)
        if not positive.all():
            hidden = True
            ax.plot(layers[~positive], np.full((~positive).sum(), np.nan), "v", color=color)
    return hidden


def _plot(variance, weight_grad, bias_grad, tanh_variance, big, trained, path, depth):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 8.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    panels = [(variance, f"ReLU, depth {depth}: variance of the activations each layer reads", "variance"),
              (weight_grad, f"ReLU: weight-gradient norm per layer (layer {depth + 1} = the head, 100×10)", "‖∂L/∂W‖"),
              (bias_grad, "ReLU: bias-gradient norm per layer (the summed ∂L/∂z)", "‖∂L/∂b‖"),
              (tanh_variance, "tanh: variance of the activations each layer reads", "variance")]
    for ax, (values, title, ylabel) in zip(axes, panels):
        hidden = False
        for color, (name, runs) in zip(("C0", "C1", "C2", "C3"), values.items()):
            hidden |= _log_lines(ax, runs, color, name)
        ax.set_yscale("log"), ax.set_xlabel("layer"), ax.set_ylabel(ylabel), ax.legend(fontsize=7)
        ax.set_title(title + ("\n(exact zeros, not drawable on a log axis, marked ▼ at the bottom)" if hidden else ""),
                     fontsize=9)
        if hidden:  # place the markers at the bottom of the drawn range
            bottom = ax.set_ylim(ax.get_ylim())[0]
            for line in ax.get_lines():
                if line.get_marker() == "v":
                    line.set_ydata(np.full(len(line.get_xdata()), bottom))
    tenths = np.arange(0.05, 1.0, 0.1)
    for i, rows in enumerate(big):
        counts = np.asarray(rows[-1]["abs_tenths"], np.float64)
        axes[4].plot(tenths, counts / counts.sum(), "o-", color="C4", alpha=0.8, label="seeds" if i == 0 else None)
    axes[4].set_xlabel("|a| (centre of each tenth of [0, 1])"), axes[4].set_ylabel("fraction of units")
    axes[4].set_title("tanh, N(0, 1) weights: |a| read by the last layer", fontsize=9), axes[4].legend(fontsize=7)
    for x, (name, accuracies) in enumerate(trained.items()):
        axes[5].plot([x] * len(accuracies), accuracies, "o", color=f"C{x}")
    axes[5].axhline(0.1, color="gray", ls=":", label="chance")
    axes[5].set_xticks(range(len(trained)), list(trained), fontsize=7), axes[5].set_ylim(0, 1)
    axes[5].set_ylabel("validation accuracy"), axes[5].set_xlabel("init (one dot per seed)")
    axes[5].set_title("digits, after training", fontsize=9), axes[5].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
