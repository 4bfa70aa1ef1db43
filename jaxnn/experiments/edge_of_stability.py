"""Edge of stability (Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the edge of
stability"; Cohen et al. 2022, "Adaptive gradient methods at the edge of stability").

Full-batch gradient descent with step size η on 1,000 embedded digits, MLP 64-200-200-10. On a quadratic, GD is
stable only while the top Hessian eigenvalue λmax ≤ 2/η. The papers' claims:

1. *progressive sharpening*: λmax rises during training until it reaches 2/η;
2. *edge of stability*: it then hovers at 2/η (λmax·η/2 ≈ 1) while the loss keeps falling, non-monotonically;
3. the same in a population over η trained in one vmapped program;
4. Adam (β1 = 0.9): the *preconditioned* sharpness λmax(P⁻¹H), P = (1 − β1ᵗ)·diag(√v̂ + ε) read from the optax state,
   equilibrates near its stability limit (2 + 2β1)/((1 − β1)η) = 38/η.

MSE is ½‖f(x) − onehot(y)‖² averaged over examples (the papers' square loss); CE is softmax cross-entropy. λmax comes
from jaxnn's ``HessianCallback`` (Lanczos to 1e-3) during ``fit``; the population's from
``population_top_eigenvalues``; Adam's preconditioned sharpness from Lanczos on the operator P^-1/2 H P^-1/2 (same
eigenvalues as P⁻¹H).
Data: the embedded digits by default (``data``: "digits", "mnist" or "cifar10" from ``data_dir``).
"""

from __future__ import annotations

import numpy as np

CLAIM = ("Under full-batch gradient descent the sharpness λmax rises (progressive sharpening) until it reaches 2/η "
         "and then hovers there, median λmax·η/2 over the last half of training within 10% of 1, while the loss "
         "keeps falling (Cohen et al. 2021); Adam's preconditioned sharpness equilibrates near 38/η (Cohen et al. "
         "2022).")
CONFIG = {"examples": 1000, "hidden": [200, 200], "activations": ["tanh", "relu"], "losses": ["mse", "ce"],
          "lrs": [0.1, 0.2], "steps": 2000, "every": 20, "population": True, "adam_lr": 0.001, "adam_steps": 2000,
          "adam_eps": 1e-7, "kernel_init": "he", "seed": 0, "data": "digits", "data_dir": ""}
SMOKE = {"examples": 200, "hidden": [16, 16], "activations": ["tanh"], "losses": ["mse"], "steps": 40, "every": 10,
         "adam_steps": 40}
TOLERANCE = 0.10  # the verdict's band around λmax·η/2 = 1
ADAM_B1 = 0.9


def squared_error(outputs, labels):
    """½‖f(x) − onehot(y)‖² per example (Cohen et al.'s square loss)."""
    import jax

    from jaxnn.losses import mean_squared_error

    return mean_squared_error(outputs, jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype))


def _loss(name: str):
    return squared_error if name == "mse" else "softmax_cross_entropy"


def edge_ratio(lambda_max, lr) -> float:
    """The median of λmax·η/2 over the second half of the measurements."""
    values = np.asarray(lambda_max, float)
    return float(np.median(values[len(values) // 2:]) * lr / 2)


def sharpening(lambda_max, threshold) -> tuple[float, float, float]:
    """λmax / threshold: (at the first measurement, the lowest before the sharpness first climbs from below 0.7 to
    0.9 — or the lowest of the run when it never does —, the highest after that low). A catapult at initialisation
    (starting above 2/η and falling in a few steps) does not count as sharpening."""
    values = np.asarray(lambda_max, float) / threshold
    rose = np.nonzero((values >= 0.9) & (np.minimum.accumulate(values) < 0.7))[0]
    low = int(np.argmin(values[: rose[0] + 1])) if len(rose) else int(np.argmin(values))
    return float(values[0]), float(values[low]), float(values[low:].max())


def run(config: dict, out_dir, progress: bool = True):
    import jax

    from jaxnn import models
    from jaxnn.experiments import Result, image_data

    dataset = image_data(config, "edge_of_stability", seed=0, limit=round(config["examples"] / 0.7),
                         val_fraction=0.1, test_fraction=0.2)
    batch = (jax.numpy.asarray(dataset.train.x), jax.numpy.asarray(dataset.train.y))
    runs, checks = [], []
    for activation in config["activations"]:
        for loss in config["losses"]:
            model = models.get_model("mlp", num_classes=10, features=tuple(config["hidden"]), activation=activation,
                                     kernel_init=config["kernel_init"])
            for lr in config["lrs"]:
                run_ = _gradient_descent(model, dataset, batch, _loss(loss), lr, config, progress)
                run_.update(activation=activation, objective=loss)
                runs.append(run_)
                label = f"{activation}, {loss.upper()}, η = {lr}"
                if run_["diverged_at"] is not None:
                    checks.append((f"{label}: GD trains (λmax at initialisation below 2/η)",
                                   f"diverged at step {run_['diverged_at']}; λmax·η/2 at init "
                                   f"{run_['lambda_max'][0] * lr / 2:.2f}", False))
                    continue
                start, low, peak = sharpening(run_["lambda_max"], 2 / lr)
                checks.append((f"{label}: progressive sharpening, λmax·η/2 rising from below 0.7 to at least 0.9",
                               f"{start:.2f} at init; lowest {low:.2f}, then up to {peak:.2f}",
                               low < 0.7 and peak >= 0.9))
                ratio = edge_ratio(run_["lambda_max"], lr)
                checks.append((f"{label}: median λmax·η/2 over the last half within 10% of 1", f"{ratio:.3f}",
                               abs(ratio - 1) <= TOLERANCE))
    population = None
    if config["population"]:
        model = models.get_model("mlp", num_classes=10, features=tuple(config["hidden"]),
                                 activation=config["activations"][0], kernel_init=config["kernel_init"])
        population = _population(model, dataset, batch, _loss(config["losses"][0]), config)
        for lr, values in zip(config["lrs"], population["lambda_max"]):
            ratio = edge_ratio(values, lr)
            checks.append((f"population member η = {lr} ({config['activations'][0]}, {config['losses'][0].upper()}; "
                           f"all η in one vmapped program): median λmax·η/2 over the last half within 10% of 1",
                           f"{ratio:.3f}", abs(ratio - 1) <= TOLERANCE))
    adam = None
    if config["adam_lr"]:
        model = models.get_model("mlp", num_classes=10, features=tuple(config["hidden"]),
                                 activation=config["activations"][0], kernel_init=config["kernel_init"])
        adam = _adam(model, dataset, batch, _loss(config["losses"][0]), config)
        limit = (2 + 2 * ADAM_B1) / ((1 - ADAM_B1) * config["adam_lr"])
        values = np.asarray(adam["preconditioned_sharpness"])
        ratio = float(np.median(values[len(values) // 2:]) / limit)
        checks.append((f"Adam (β1 = {ADAM_B1}, η = {config['adam_lr']}): median preconditioned sharpness over the last "
                       f"half within 10% of 38/η = {limit:.0f}",
                       f"{ratio:.3f} of it (first {values[0] / limit:.2f}, last {values[-1] / limit:.2f})",
                       abs(ratio - 1) <= TOLERANCE))
        adam["limit"] = limit
    _plot(runs, population, adam, config, out_dir / "edge_of_stability.png")
    every = config["every"]  # result.json keeps the loss at every λmax measurement, the figure has every step
    for record in runs + [r for r in (population, adam) if r is not None]:
        losses = np.asarray(record.pop("loss"), float)
        record["loss_at_measurements"] = (losses[..., every - 1::every].tolist() if losses.size else [])
    return Result(
        measured={"runs": runs, "population": population, "adam": adam, "train_examples": len(dataset.train)},
        checks=checks, figures=["edge_of_stability.png"],
        data=(f"{config['data']} {dataset.input_shape}, {len(dataset.train)} training examples, full-batch; MLP "
              f"{int(np.prod(dataset.input_shape))}-"
              f"{'-'.join(map(str, config['hidden']))}-10 ({', '.join(config['activations'])}), "
              f"{config['steps']} steps, λmax every {config['every']}; MSE = ½‖f − onehot(y)‖²; weights "
              f"initialised {config['kernel_init']!r} (jaxnn's default He normal has variance 2/fan_in, 6x PyTorch's "
              f"default 1/(3 fan_in) that Cohen et al. used: where the first λmax is above 2/η the network starts "
              f"beyond the edge and GD's first steps bring it back, instead of sharpening up to it)"))


def _gradient_descent(model, dataset, batch, loss, lr, config, progress) -> dict:
    import jax
    import optax

    from jaxnn import curvature, losses as losses_lib
    from jaxnn.train import NonFiniteLossError, create_train_state, fit

    state = create_train_state(model, optax.sgd(lr), dataset.input_shape, jax.random.PRNGKey(config["seed"]))
    callback = curvature.HessianCallback(every_k_steps=config["every"], batch=batch)
    initial = curvature.hessian(losses_lib.make_loss_fn(model.apply, loss), state.params, batch)
    first = float(curvature.top_eigenvalues(initial, progress=False)[0][0])
    try:
        result = fit(state, dataset, loss=loss, batch_size=len(dataset.train), num_steps=config["steps"],
                     log_every=1, eval_every=config["steps"], callbacks=[callback], progress=progress)
    except NonFiniteLossError as error:  # GD unstable from the start: the run is reported, not dropped
        return {"lr": lr, "threshold": 2 / lr, "steps": [0], "lambda_max": [first], "loss": [],
                "diverged_at": error.step, "loss_increases": None, "val_accuracy": None}
    losses = [r["loss"] for r in result.history if "loss" in r]
    return {"lr": lr, "threshold": 2 / lr, "steps": [0] + [h["step"] for h in callback.history],
            "lambda_max": [first] + [h["lambda_max"] for h in callback.history], "loss": losses, "diverged_at": None,
            "loss_increases": int(np.sum(np.diff(losses) > 0)),
            "val_accuracy": result.history[-1].get("val_accuracy")}


def _population(model, dataset, batch, loss, config) -> dict:
    """Every η of ``config["lrs"]`` from the same initial weights, ``every`` GD steps at a time in one vmapped,
    scanned program; λmax of all members after each segment (population_top_eigenvalues)."""
    import jax
    import jax.numpy as jnp

    from jaxnn import curvature, losses as losses_lib
    from jaxnn.models import init_model

    params, _ = init_model(model, jax.random.split(jax.random.PRNGKey(config["seed"]))[0], dataset.input_shape)
    loss_fn = losses_lib.make_loss_fn(model.apply, loss)
    lrs = jnp.asarray(config["lrs"], jnp.result_type(float))
    stacked = jax.tree.map(lambda p: jnp.stack([p] * len(config["lrs"])), params)

    @jax.jit
    def segment(stacked):
        def member(params, lr):
            def step(params, _):
                value, grads = jax.value_and_grad(loss_fn)(params, batch)
                return jax.tree.map(lambda p, g: p - lr * g, params, grads), value

            return jax.lax.scan(step, params, None, length=config["every"])

        return jax.vmap(member)(stacked, lrs)

    steps, values, losses = [0], [curvature.population_top_eigenvalues(loss_fn, stacked, batch)[:, 0]], []
    for done in range(config["every"], config["steps"] + 1, config["every"]):
        stacked, segment_losses = segment(stacked)
        losses.append(np.asarray(segment_losses))
        values.append(curvature.population_top_eigenvalues(loss_fn, stacked, batch, key=jax.random.PRNGKey(done))[:, 0])
        steps.append(done)
    return {"lrs": list(config["lrs"]), "steps": steps, "lambda_max": np.stack(values, axis=1).tolist(),
            "loss": np.concatenate(losses, axis=1).tolist()}


def _preconditioned_product(scale, loss_fn, params, batch, v):
    """D·H·D·v with D = P^-1/2 (elementwise): the symmetric form of P⁻¹H."""
    import jax

    scaled = jax.tree.map(lambda d, x: d * x, scale, v)
    _, hv = jax.jvp(jax.grad(lambda p: loss_fn(p, batch)), (params,), (scaled,))
    return jax.tree.map(lambda d, x: d * x, scale, hv)


def _adam(model, dataset, batch, loss, config) -> dict:
    """Full-batch Adam; every ``every`` steps the top eigenvalue of P^-1/2 H P^-1/2, P = (1 − β1ᵗ)(√v̂ + ε) with v̂
    the bias-corrected second moment of the optax state."""
    import jax
    import optax

    from jaxnn import curvature, losses as losses_lib
    from jaxnn.models import init_model

    params, _ = init_model(model, jax.random.split(jax.random.PRNGKey(config["seed"]))[0], dataset.input_shape)
    loss_fn = losses_lib.make_loss_fn(model.apply, loss)
    b2 = 0.999
    tx = optax.adam(config["adam_lr"], b1=ADAM_B1, b2=b2, eps=config["adam_eps"])
    opt_state = tx.init(params)

    @jax.jit
    def segment(params, opt_state):
        def step(carry, _):
            params, opt_state = carry
            value, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        return jax.lax.scan(step, (params, opt_state), None, length=config["every"])

    steps, sharpness, losses = [], [], []
    for done in range(config["every"], config["adam_steps"] + 1, config["every"]):
        (params, opt_state), segment_losses = segment(params, opt_state)
        losses.extend(np.asarray(segment_losses).tolist())
        moments = opt_state[0]
        t = int(moments.count)
        scale = jax.tree.map(lambda nu: 1 / np.sqrt((1 - ADAM_B1**t) * (np.sqrt(nu / (1 - b2**t)) + config["adam_eps"])),
                             moments.nu)
        op = curvature.linear_operator(jax.tree_util.Partial(_preconditioned_product, scale, loss_fn, params, batch),
                                       params)
        values, _ = curvature.top_eigenvalues(op, k=1, key=jax.random.PRNGKey(done), progress=False)
        sharpness.append(float(values[0]))
        steps.append(done)
    return {"lr": config["adam_lr"], "steps": steps, "preconditioned_sharpness": sharpness, "loss": losses}


def _plot(runs, population, adam, config, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = list(dict.fromkeys((r["activation"], r["objective"]) for r in runs))
    rows = len(settings) + (population is not None) + (adam is not None)
    fig = Figure(figsize=(12, 3.6 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    for (left, right), (activation, loss) in zip(axes, settings):
        for i, r in enumerate(x for x in runs if (x["activation"], x["objective"]) == (activation, loss)):
            diverged = f" (diverged at step {r['diverged_at']})" if r["diverged_at"] is not None else ""
            left.plot(r["steps"], r["lambda_max"], "o-" if diverged else "-", color=f"C{i}",
                      label=f"η = {r['lr']}{diverged}")
            left.axhline(r["threshold"], color=f"C{i}", linestyle="--", linewidth=1)
            right.plot(np.arange(1, len(r["loss"]) + 1), r["loss"], color=f"C{i}", linewidth=0.8,
                       label=f"η = {r['lr']}")
        left.set_title(f"GD, {activation}, {loss.upper()}: λmax (dashed: 2/η)")
        right.set_title("training loss"), right.set_yscale("log")
    row = len(settings)
    if population is not None:
        left, right = axes[row]
        for i, (lr, values) in enumerate(zip(population["lrs"], population["lambda_max"])):
            left.plot(population["steps"], values, color=f"C{i}", label=f"η = {lr}")
            left.axhline(2 / lr, color=f"C{i}", linestyle="--", linewidth=1)
            right.plot(np.arange(1, len(population["loss"][i]) + 1), population["loss"][i], color=f"C{i}",
                       linewidth=0.8, label=f"η = {lr}")
        left.set_title("population over η in one vmapped program: λmax"), right.set_title("training loss")
        right.set_yscale("log")
        row += 1
    if adam is not None:
        left, right = axes[row]
        left.plot(adam["steps"], adam["preconditioned_sharpness"], color="C3", label=f"Adam η = {adam['lr']}")
        left.axhline(adam["limit"], color="C3", linestyle="--", linewidth=1, label="38/η")
        left.set_title("Adam: preconditioned sharpness λmax(P⁻¹H)")
        right.plot(np.arange(1, len(adam["loss"]) + 1), adam["loss"], color="C3", linewidth=0.8)
        right.set_title("Adam training loss"), right.set_yscale("log")
    for left, right in axes:
        for ax in (left, right):
            ax.set_xlabel("step"), ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
