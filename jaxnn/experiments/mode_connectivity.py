"""Mode connectivity (Garipov et al. 2018, "Loss surfaces, mode connectivity, and fast ensembling of DNNs";
Draxler et al. 2018, "Essentially no barriers in neural network energy landscape").

Pairs of networks (an MLP on the embedded digits), each member with its own initialisation and data order, train by
minibatch SGD with momentum and weight decay to convergence of the ℓ2-regularised training loss
L(θ) = CE(θ) + λ/2‖θ‖² (the loss Garipov et al. train and plot): ``check_every`` epochs at a time until it fell by
less than ``converged`` (relative) over the last ``check_every`` epochs, so that both endpoints are minima of the loss
the barrier is measured on (unregularised cross-entropy has none on separable data: it keeps falling as the weights
grow, and a curve can then dip below endpoints that are not minima). The straight line (1−t)θ₀ + tθ₁ between them
crosses a loss barrier; a quadratic Bézier curve φ(t) = (1−t)²θ₀ + 2t(1−t)θ_b + t²θ₁ whose bend θ_b is trained to
minimise E_t~U(0,1) L(φ(t)) (Garipov et al.'s objective, a fresh t and minibatch each step, the endpoints fixed)
connects them at (almost) constant loss. Barrier: the largest excess of L over the chord between the endpoints' values
(``Surface.summary()``'s ``barrier``), measured by jaxnn's ``interpolation_surface`` and ``bezier_surface``; every
pair is an independent repetition. Data: the embedded digits by default (``data``: "digits", "mnist" or "cifar10"
from ``data_dir``).
"""

from __future__ import annotations

import numpy as np

CLAIM = ("The straight line between two independently trained networks crosses a loss barrier; a trained quadratic "
         "Bézier curve between them has (almost) none, and keeps the endpoints' test accuracy (Garipov et al. 2018; "
         "Draxler et al. 2018).")
CONFIG = {"width": 64, "depth": 2, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64,
          "seeds": [0, 1, 2, 3, 4, 5], "check_every": 10, "converged": 0.001, "max_epochs": 2000, "curve_steps": 3000,
          "curve_lr": 0.01, "curve_batch": 128, "ts_per_step": 4, "points": 41, "barrier_floor": 0.1,
          "curve_fraction": 0.1, "data": "digits", "data_dir": ""}
SMOKE = {"width": 16, "check_every": 5, "max_epochs": 20, "curve_steps": 50, "points": 11}


def regularised(loss_fn, weight_decay):
    """L(θ, batch) = loss_fn(θ, batch) + λ/2 ‖θ‖² (every parameter; its gradient is optax.add_decayed_weights')."""
    import jax
    import jax.numpy as jnp

    def loss(params, batch):
        return loss_fn(params, batch) + weight_decay / 2 * sum(jnp.sum(p**2) for p in jax.tree.leaves(params))

    return loss


def train_endpoints(model, loss_fn, data, config):
    """The networks of ``config["seeds"]`` (initial weights ``init_model(model, PRNGKey(seed))``, a permutation of
    the examples per epoch from the same key), vmapped over the seeds: minibatch SGD with momentum on ``loss_fn`` (the
    regularised loss: weight decay through its gradient) in one scanned program per ``check_every`` epochs, until every
    member's full-batch loss fell by less than ``converged`` (relative) over the last ``check_every`` epochs, or
    ``max_epochs``. Returns (params with a leading seed axis, the epochs trained, the members' full-batch losses at
    every check: (checks + 1, seeds))."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxnn.models import init_model

    x, y = data
    batch, every = config["batch_size"], config["check_every"]
    per_epoch = x.shape[0] // batch
    keys = jnp.stack([jax.random.PRNGKey(seed) for seed in config["seeds"]])
    tx = optax.sgd(config["lr"], momentum=config["momentum"])
    params = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                          *(init_model(model, key, x.shape[1:])[0] for key in keys))

    def epoch(carry, key):
        def step(carry, rows):
            params, opt_state = carry
            updates, opt_state = tx.update(jax.grad(loss_fn)(params, (x[rows], y[rows])), opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        rows = jax.random.permutation(key, x.shape[0])[:per_epoch * batch].reshape(per_epoch, batch)
        return jax.lax.scan(step, carry, rows)[0], None

    def chunk(params, opt_state, key, first):
        epoch_keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(first + jnp.arange(every))
        params, opt_state = jax.lax.scan(epoch, (params, opt_state), epoch_keys)[0]
        return params, opt_state, loss_fn(params, (x, y))

    run = jax.jit(jax.vmap(chunk, in_axes=(0, 0, 0, None)))
    full_loss = jax.jit(jax.vmap(lambda p: loss_fn(p, (x, y))))
    opt_state, losses, epochs = jax.jit(jax.vmap(tx.init))(params), [np.asarray(full_loss(params))], 0
    while epochs < config["max_epochs"]:
        params, opt_state, loss = run(params, opt_state, keys, epochs)
        epochs += every
        losses.append(np.asarray(loss))
        if len(losses) > 2 and np.all((losses[-2] - losses[-1]) / losses[-2] < config["converged"]):
            break
    return params, epochs, np.stack(losses)


def bend_program(loss_fn, data, config):
    """(params0, params1, key) -> (bend, the per-step objective): the bend θ_b (started at the midpoint) trained with
    Adam on E_t L(φ(t)): each step ``ts_per_step`` values of t ~ U(0, 1) and a minibatch of ``curve_batch`` examples
    drawn with replacement; one scan, to be jitted (or vmapped over pairs first)."""
    import jax
    import jax.numpy as jnp
    import optax

    x, y = data
    tx = optax.adam(config["curve_lr"])

    def program(params0, params1, key):
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

        bend = jax.tree.map(lambda a, b: (a + b) / 2, params0, params1)
        (bend, _), values = jax.lax.scan(step, (bend, tx.init(bend)), jax.random.split(key, config["curve_steps"]))
        return bend, values

    return program


def train_bend(loss_fn, params0, params1, data, config, key):
    """One pair's bend (see :func:`bend_program`): (bend, the per-step objective as a numpy array)."""
    import jax

    bend, values = jax.jit(bend_program(loss_fn, data, config))(params0, params1, key)
    return bend, np.asarray(values)


def run(config: dict, out_dir, progress: bool = True):
    import jax
    import jax.numpy as jnp

    from jaxnn import landscape, losses, models
    from jaxnn.experiments import Result, image_data

    seeds = list(config["seeds"])
    if len(seeds) < 6 or len(seeds) % 2:
        raise ValueError(f"seeds: mode connectivity needs pairs of members, at least 3 pairs, got {seeds!r}")
    digits = image_data(config, "mode_connectivity", seed=0)
    model = models.get_model("mlp", num_classes=10, width=config["width"], depth=config["depth"])
    loss_fn = regularised(losses.make_loss_fn(model.apply, "softmax_cross_entropy"), config["weight_decay"])
    train = (jnp.asarray(digits.train.x), jnp.asarray(digits.train.y))
    test = (jnp.asarray(digits.test.x), jnp.asarray(digits.test.y))
    members, epochs, history = train_endpoints(model, loss_fn, train, config)
    change = (history[-2] - history[-1]) / history[-2]
    ts = np.linspace(0.0, 1.0, config["points"])
    firsts, seconds = (jax.tree.map(lambda leaf: leaf[j::2], members) for j in (0, 1))
    keys = jnp.stack([jax.random.PRNGKey(seed) for seed in seeds[::2]])  # pair i's key: its first seed
    bends, objectives = jax.jit(jax.vmap(bend_program(loss_fn, train, config)))(firsts, seconds, keys)
    objectives, pairs, accuracy = np.asarray(objectives), [], _accuracy_fn(model)
    for i in range(len(seeds) // 2):
        params0, params1, bend = (jax.tree.map(lambda leaf: leaf[i], tree) for tree in (firsts, seconds, bends))
        paths = {"seeds": seeds[2 * i:2 * i + 2]}
        for name, evaluate in (("line", lambda data: landscape.interpolation_surface(
                loss_fn, params0, params1, ts, data, accuracy_fn=accuracy, progress=False)),
                               ("curve", lambda data: landscape.bezier_surface(
                loss_fn, params0, bend, params1, ts, data, accuracy_fn=accuracy, progress=False))):
            on_train, on_test = evaluate(train), evaluate(test)
            paths[name] = {"train_loss": on_train.losses.tolist(), "test_accuracy": on_test.accuracies.tolist(),
                           "barrier": on_train.summary()["metrics"]["loss"]["barrier"]}
        pairs.append(paths)
    line = np.array([p["line"]["barrier"] for p in pairs])
    curve = np.array([p["curve"]["barrier"] for p in pairs])
    fraction = curve / line
    ends = [min(p["line"]["test_accuracy"][0], p["line"]["test_accuracy"][-1]) for p in pairs]
    lowest_curve = [min(p["curve"]["test_accuracy"]) for p in pairs]
    lowest_line = [min(p["line"]["test_accuracy"]) for p in pairs]
    end_losses = [p["line"]["train_loss"][k] for p in pairs for k in (0, -1)]
    floor, share, count = config["barrier_floor"], config["curve_fraction"], f"{len(pairs)} pairs"
    checks = [
        (f"the straight line crosses a barrier: ≥ {floor} nats of regularised training loss above the chord "
         "(jaxnn's floor), every pair",
         f"line barrier {_spread(line)} ({count}; endpoint losses {min(end_losses):.3f} to {max(end_losses):.3f})",
         bool(np.all(line >= floor))),
        (f"the trained Bézier curve has (almost) none: ≤ {share:.0%} of its pair's line barrier, every pair",
         f"curve barrier {_spread(curve)}, {_spread(100 * fraction, 2)}% of the line's ({count})",
         bool(np.all(fraction <= share))),
        ("test accuracy along the curve stays within 2 points of the lower endpoint's, every pair",
         "lowest on the curve minus the lower endpoint: "
         f"{', '.join(f'{100 * (c - e):+.1f}' for c, e in zip(lowest_curve, ends))} points (line: "
         f"{', '.join(f'{100 * (c - e):+.1f}' for c, e in zip(lowest_line, ends))})",
         all(c >= e - 0.02 for c, e in zip(lowest_curve, ends))),
    ]
    dip = [min(p["curve"]["train_loss"]) - min(p["curve"]["train_loss"][0], p["curve"]["train_loss"][-1])
           for p in pairs]
    converged = bool(np.all(change < config["converged"]))
    reported = [
        (f"endpoints trained to convergence: regularised training loss fell by < {100 * config['converged']:g}% "
         f"over the last {config['check_every']} epochs"
         + ("" if converged else f" (not reached in {config['max_epochs']} epochs)"),
         f"{epochs} epochs; fell by {', '.join(f'{100 * c:.2f}%' for c in change)} over the last check; losses "
         f"{', '.join(f'{v:.4f}' for v in history[-1])} (seeds {seeds})"),
        ("lowest regularised training loss on the curve minus the lower endpoint's (below 0: the curve dips below "
         "both endpoints)", ", ".join(f"{d:+.4f}" for d in dip)),
    ]
    _plot(ts, pairs, objectives, out_dir / "mode_connectivity.png")
    return Result(
        measured={"ts": ts.tolist(), "pairs": pairs, "endpoint_epochs": epochs, "endpoint_loss_history":
                  history.tolist(), "curve_objective_first_last": [[float(o[:50].mean()), float(o[-50:].mean())]
                                                                   for o in objectives]},
        checks=checks, reported=reported, figures=["mode_connectivity.png"],
        data=(f"{config['data']} ({len(digits.train)} training, {len(digits.test)} test examples); MLP width "
              f"{config['width']} depth {config['depth']}; loss: cross-entropy + {config['weight_decay']:g}/2 ‖θ‖²; "
              f"endpoints (seeds {seeds}, paired in order): SGD lr {config['lr']} momentum {config['momentum']}, "
              f"batches of {config['batch_size']}, {epochs} epochs; bends: Adam lr {config['curve_lr']}, "
              f"{config['curve_steps']} steps of {config['ts_per_step']} t × {config['curve_batch']} examples"))


def _spread(values, digits=3):
    values = np.asarray(values, np.float64)
    return (f"{values.mean():.{digits}g} ± {values.std():.{digits - 1}g} "
            f"(range {values.min():.{digits}g} to {values.max():.{digits}g})")


def _accuracy_fn(model):
    import jax.numpy as jnp

    def accuracy(params, batch):
        x, y = batch
        return jnp.mean(jnp.argmax(model.apply({"params": params}, x), axis=-1) == y)

    return accuracy


def _plot(ts, pairs, objectives, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(fig)
    left, middle, right = fig.subplots(1, 3)
    for i, paths in enumerate(pairs):
        for name, color in (("line", "C3"), ("curve", "C0")):
            numbers = paths[name]
            label = ("straight line" if name == "line" else "trained Bézier curve") if i == 0 else None
            left.plot(ts, numbers["train_loss"], color=color, alpha=0.8, label=label)
            middle.plot(ts, 100 * (1 - np.asarray(numbers["test_accuracy"])), color=color, alpha=0.8, label=label)
        window = max(1, len(objectives[i]) // 50)
        right.plot(np.convolve(objectives[i], np.ones(window) / window, mode="valid"), color=f"C{i}", alpha=0.8,
                   label=f"pair {i + 1} (seeds {paths['seeds'][0]}, {paths['seeds'][1]})")
    left.set_title(f"regularised training loss, {len(pairs)} pairs", fontsize=9)
    left.set_xlabel("t (0 = θ₀, 1 = θ₁)"), left.set_ylabel("CE + λ/2‖θ‖² (training set)"), left.set_yscale("log")
    middle.set_xlabel("t"), middle.set_ylabel("test error (%)"), middle.set_title("test error", fontsize=9)
    right.set_xlabel("bend training step"), right.set_ylabel(f"E_t L(φ(t)) (mean over {window} steps)")
    right.set_yscale("log"), right.set_title("bend training objective", fontsize=9)
    for ax in (left, middle, right):
        ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
