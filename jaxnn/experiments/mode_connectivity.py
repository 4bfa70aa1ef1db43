"""Mode connectivity (Garipov et al. 2018, "Loss surfaces, mode connectivity, and fast ensembling of DNNs";
Draxler et al. 2018, "Essentially no barriers in neural network energy landscape").

Two members of one population (different initialisations and data orders) train to two minima θ₀, θ₁ of an MLP on
the embedded digits. The straight line (1−t)θ₀ + tθ₁ between them crosses a loss barrier; a quadratic Bézier curve
φ(t) = (1−t)²θ₀ + 2t(1−t)θ_b + t²θ₁ whose bend θ_b is trained to minimise E_t~U(0,1) L(φ(t)) (Garipov et al.'s
objective, a fresh t and minibatch each step, the endpoints fixed) connects them at (almost) constant loss.
Barrier: the largest excess of the training loss over the chord between the endpoints' losses
(``Surface.summary()``'s ``barrier``), measured by jaxnn's ``interpolation_surface`` and ``bezier_surface``.
Data: the embedded digits by default (``data``: "digits", "mnist" or "cifar10" from ``data_dir``).
"""

from __future__ import annotations

import numpy as np

CLAIM = ("The straight line between two independently trained networks crosses a loss barrier; a trained quadratic "
         "Bézier curve between them has (almost) none, and keeps the endpoints' test accuracy (Garipov et al. 2018; "
         "Draxler et al. 2018).")
CONFIG = {"width": 64, "depth": 2, "lr": 0.05, "momentum": 0.9, "epochs": 30, "batch_size": 64, "seeds": [0, 1],
          "curve_steps": 3000, "curve_lr": 0.01, "curve_batch": 128, "ts_per_step": 4, "points": 41,
          "barrier_floor": 0.1, "data": "digits", "data_dir": ""}
SMOKE = {"width": 16, "epochs": 3, "curve_steps": 50, "points": 11}


def train_bend(loss_fn, params0, params1, data, config, key):
    """The bend θ_b (started at the midpoint) trained with Adam on E_t L(φ(t)): each step ``ts_per_step`` values of
    t ~ U(0, 1) and a minibatch of ``curve_batch`` examples drawn with replacement; one scanned program. Returns
    (bend, the per-step objective)."""
    import jax
    import jax.numpy as jnp
    import optax

    x, y = data
    tx = optax.adam(config["curve_lr"])
    bend = jax.tree.map(lambda a, b: (a + b) / 2, params0, params1)

    def objective(bend, batch, ts):
        def at(t):
            point = jax.tree.map(lambda a, m, b: (1 - t) ** 2 * a + 2 * t * (1 - t) * m + t**2 * b,
                                 params0, bend, params1)
            return loss_fn(point, batch)

        return jnp.mean(jax.vmap(at)(ts))

    def step(carry, step_key):
        bend, opt_state = carry
        rows_key, t_key = jax.random.split(step_key)
        rows = jax.random.randint(rows_key, (config["curve_batch"],), 0, x.shape[0])
        ts = jax.random.uniform(t_key, (config["ts_per_step"],), dtype=x.dtype)
        value, grads = jax.value_and_grad(objective)(bend, (x[rows], y[rows]), ts)
        updates, opt_state = tx.update(grads, opt_state, bend)
        return (optax.apply_updates(bend, updates), opt_state), value

    run = jax.jit(lambda bend, keys: jax.lax.scan(step, (bend, tx.init(bend)), keys))
    (bend, _), values = run(bend, jax.random.split(key, config["curve_steps"]))
    return bend, np.asarray(values)


def run(config: dict, out_dir, progress: bool = True):
    import jax
    import jax.numpy as jnp
    import optax

    from jaxnn import landscape, losses, models
    from jaxnn.experiments import Result, image_data
    from jaxnn.train.population import train_population

    if len(config["seeds"]) != 2:
        raise ValueError(f"seeds: mode connectivity needs two members, got {config['seeds']!r}")
    digits = image_data(config, "mode_connectivity", seed=0)
    model = models.get_model("mlp", num_classes=10, width=config["width"], depth=config["depth"])
    steps = round(config["epochs"] * len(digits.train) / config["batch_size"])
    population = train_population(model, optax.sgd, digits, members={"seed": list(config["seeds"])}, num_steps=steps,
                                  batch_size=config["batch_size"], shuffle_per_member=True,
                                  optimizer_kwargs={"learning_rate": config["lr"], "momentum": config["momentum"]},
                                  progress=progress)
    params0, params1 = (population.member_state(i).params for i in range(2))
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy")
    train = (jnp.asarray(digits.train.x), jnp.asarray(digits.train.y))
    test = (jnp.asarray(digits.test.x), jnp.asarray(digits.test.y))
    bend, objective = train_bend(loss_fn, params0, params1, train, config, jax.random.PRNGKey(config["seeds"][0]))
    ts = np.linspace(0.0, 1.0, config["points"])
    paths = {}
    for name, evaluate in (("line", lambda data: landscape.interpolation_surface(
            loss_fn, params0, params1, ts, data, accuracy_fn=_accuracy_fn(model), progress=False)),
                           ("curve", lambda data: landscape.bezier_surface(
            loss_fn, params0, bend, params1, ts, data, accuracy_fn=_accuracy_fn(model), progress=False))):
        on_train, on_test = evaluate(train), evaluate(test)
        paths[name] = {"train_loss": on_train.losses.tolist(), "test_accuracy": on_test.accuracies.tolist(),
                       "barrier": on_train.summary()["metrics"]["loss"]["barrier"]}
    line, curve = paths["line"], paths["curve"]
    ends = [line["test_accuracy"][0], line["test_accuracy"][-1]]
    lowest_on_curve, lowest_on_line = min(curve["test_accuracy"]), min(line["test_accuracy"])
    checks = [
        (f"the straight line crosses a barrier (≥ {config['barrier_floor']} nats of training loss above the chord)",
         f"barrier {line['barrier']:.3f} (endpoint losses {line['train_loss'][0]:.3f}, {line['train_loss'][-1]:.3f})",
         line["barrier"] >= config["barrier_floor"]),
        ("the trained Bézier curve has (almost) none: ≤ 10% of the line's barrier",
         f"barrier {curve['barrier']:.4f} ({curve['barrier'] / line['barrier']:.1%} of the line's)",
         curve["barrier"] <= 0.1 * line["barrier"]),
        ("test accuracy along the curve stays within 2 points of the endpoints'",
         f"lowest {100 * lowest_on_curve:.1f}% on the curve vs endpoints {100 * ends[0]:.1f}%, {100 * ends[1]:.1f}% "
         f"(line: {100 * lowest_on_line:.1f}%)", lowest_on_curve >= min(ends) - 0.02),
    ]
    _plot(ts, paths, objective, out_dir / "mode_connectivity.png")
    return Result(
        measured={"ts": ts.tolist(), "line": line, "curve": curve, "curve_objective_first_last": [
            float(objective[:50].mean()), float(objective[-50:].mean())], "endpoint_steps": steps},
        checks=checks, figures=["mode_connectivity.png"],
        data=(f"{config['data']} ({len(digits.train)} training, {len(digits.test)} test examples); MLP width "
              f"{config['width']} depth {config['depth']}; endpoints: SGD lr {config['lr']} momentum "
              f"{config['momentum']}, {config['epochs']} epochs, seeds {config['seeds']} (one population); bend: Adam "
              f"lr {config['curve_lr']}, {config['curve_steps']} steps of {config['ts_per_step']} t × "
              f"{config['curve_batch']} examples"))


def _accuracy_fn(model):
    import jax.numpy as jnp

    def accuracy(params, batch):
        x, y = batch
        return jnp.mean(jnp.argmax(model.apply({"params": params}, x), axis=-1) == y)

    return accuracy


def _plot(ts, paths, objective, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(fig)
    left, middle, right = fig.subplots(1, 3)
    for name, style in (("line", "C3"), ("curve", "C0")):
        numbers = paths[name]
        label = ("straight line" if name == "line" else "trained Bézier curve") + f" (barrier {numbers['barrier']:.3f})"
        left.plot(ts, numbers["train_loss"], color=style, label=label)
        middle.plot(ts, 100 * (1 - np.asarray(numbers["test_accuracy"])), color=style, label=label)
    left.set_xlabel("t (0 = θ₀, 1 = θ₁)"), left.set_ylabel("training loss"), left.set_yscale("log")
    middle.set_xlabel("t"), middle.set_ylabel("test error (%)")
    window = max(1, len(objective) // 50)
    right.plot(np.convolve(objective, np.ones(window) / window, mode="valid"), color="C0")
    right.set_xlabel("bend training step"), right.set_ylabel(f"E_t L(φ(t)) (mean over {window} steps)")
    right.set_yscale("log")
    for ax in (left, middle, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8), middle.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
