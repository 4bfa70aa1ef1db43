"""Edge of stability (Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the edge of
stability"; Cohen et al. 2022, "Adaptive gradient methods at the edge of stability").

Full-batch gradient descent with step size η on 1,000 embedded digits, MLP 64-200-200-10 (tanh), square loss. On a
quadratic, GD is stable only while the top Hessian eigenvalue λmax ≤ 2/η. The papers' claims, tested here:

1. *progressive sharpening*: from an initialisation below 2/η, λmax rises until it reaches 2/η;
2. *edge of stability*: it then hovers at 2/η (λmax·η/2 ≈ 1) while the loss keeps falling over long times, but
   non-monotonically (it rises on some steps);
3. Adam (β1 = 0.9): the *preconditioned* sharpness λmax(P⁻¹H), P = (1 − β1ᵗ)·diag(√v̂ + ε) read from the optax state,
   rises to its stability limit (2 + 2β1)/((1 − β1)η) = 38/η and equilibrates there.

The headline is the papers' setting: PyTorch's default initialisation of nn.Linear, weights and biases U(−1/√fan_in,
1/√fan_in) (:class:`TorchDefaultMLP`). jaxnn's default He normal init (variance 2/fan_in, 6x PyTorch's) starts this
net above 2/η, so GD first falls back to the edge instead of sharpening up to it: that run is reported beside the
checks, not counted. Every η is trained from ``seeds`` independent initialisations (init seeds 0, 1, ...;
full-batch, so no data order), all members of one η (with the He variant's) in one vmapped, scanned program; λmax of
every member from ``population_top_eigenvalues`` (Lanczos) every ``every`` steps. Adam's preconditioned sharpness is
the top Hessian eigenvalue of u ↦ L(θ + D u), D = P^-1/2, at u = 0, i.e. of D·H·D (same eigenvalues as P⁻¹H), by the
same population Lanczos. MSE is ½‖f(x) − onehot(y)‖² averaged over examples (the papers' square loss).
Data: the embedded digits by default (``data``: "digits", "mnist" or "cifar10" from ``data_dir``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import numpy as np

CLAIM = ("Full-batch GD: the sharpness λmax rises (progressive sharpening) until it reaches 2/η, then \"hovers just "
         "above the numerical value 2/(step size), and the training loss behaves non-monotonically over short "
         "timescales, yet consistently decreases over long timescales\" (Cohen et al. 2021); for Adam with β1 = 0.9 "
         "the preconditioned sharpness equilibrates at its stability threshold 38/η (Cohen et al. 2022).")
CONFIG = {"examples": 1000, "hidden": [200, 200], "activation": "tanh", "lrs": [0.1, 0.2], "steps": [2500, 1200],
          "seeds": 3, "he_seeds": 3, "every": 50, "lanczos_iters": 20, "adam_lr": 0.001, "adam_steps": 3000,
          "adam_every": 100, "adam_eps": 1e-7, "data": "digits", "data_dir": ""}
SMOKE = {"examples": 200, "hidden": [16, 16], "steps": [40, 20], "every": 10, "seeds": 2, "adam_steps": 40,
         "adam_every": 20}
ARRIVAL = 0.95    # λmax·η/2 (Adam: sharpness·η(1 − β1)/(2 + 2β1)) that counts as having reached the limit
SHARPENING_START = 0.7  # "clearly below": the ratio at initialisation must be under this
BAND = 0.10       # the median ratio after arrival within 1 ± BAND
SPREAD = 0.15     # and its 10th and 90th percentiles within 1 ± SPREAD
MIN_AFTER = 10    # measurements after arrival needed to judge the hovering
ADAM_B1, ADAM_B2 = 0.9, 0.999


class TorchDefaultMLP(nn.Module):
    """MLP with PyTorch's nn.Linear default init: weights and biases U(−1/√fan_in, 1/√fan_in) (kaiming_uniform_ with
    a = √5 for the weights); parameter names as in jaxnn.models.MLP."""

    features: tuple[int, ...]
    num_classes: int
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x, train: bool = False):
        from jaxnn.models.activations import resolve_activation

        h = x.reshape(x.shape[0], -1)
        for i, width in enumerate((*self.features, self.num_classes)):
            bound = 1 / np.sqrt(h.shape[-1])
            init = functools.partial(_uniform, bound=bound)
            h = nn.Dense(width, kernel_init=init, bias_init=init,
                         name=f"dense_{i}" if i < len(self.features) else "head")(h)
            if i < len(self.features):
                h = resolve_activation(self.activation, "TorchDefaultMLP")(h)
        return h


def _uniform(key, shape, dtype=None, *, bound):
    import jax

    return jax.random.uniform(key, shape, dtype or jax.numpy.float32, -bound, bound)


def make_model(config: dict, init: str):
    """The experiment's MLP: ``init`` "pytorch" (:class:`TorchDefaultMLP`) or "he" (jaxnn's MLP, He normal weights,
    zero biases)."""
    from jaxnn import models

    if init == "pytorch":
        return TorchDefaultMLP(tuple(config["hidden"]), 10, config["activation"])
    return models.get_model("mlp", num_classes=10, features=tuple(config["hidden"]), activation=config["activation"])


def squared_error(outputs, labels):
    """½‖f(x) − onehot(y)‖² per example (Cohen et al.'s square loss)."""
    import jax

    from jaxnn.losses import mean_squared_error

    return mean_squared_error(outputs, jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype))


def edge_analysis(ratios, steps, losses) -> dict:
    """A run's sharpness read against its limit: ``ratios`` = sharpness / limit at ``steps``; ``losses[t]`` the loss
    after t steps. Returns the ratio at the first measurement, the lowest before arrival (of the run if it never
    arrives), the first step where it reaches ARRIVAL from below, i.e. after some measurement under it (None if
    never; a run that starts above the limit arrives only once it has come back under it), the median and 10th/90th
    percentiles of the ratios from that measurement on, how many there are, the steps after arrival on which the loss
    rose, and the loss at arrival and at the end; a run whose loss turns non-finite is read up to that step and
    ``diverged_at`` names it."""
    ratios, steps, losses = np.asarray(ratios, float), np.asarray(steps), np.asarray(losses, float)
    finite = np.isfinite(losses)
    diverged = None if finite.all() else int(np.argmin(finite))
    if diverged is not None:
        ratios, steps, losses = ratios[steps < diverged], steps[steps < diverged], losses[:diverged]
    reached = np.nonzero((ratios[1:] >= ARRIVAL) & (np.minimum.accumulate(ratios)[:-1] < ARRIVAL))[0] + 1
    out = {"start": float(ratios[0]), "low": float(ratios[: reached[0] if len(reached) else None].min()),
           "peak": float(ratios.max()), "diverged_at": diverged, "arrival_step": None, "after": 0,
           "median_after": None, "p10_after": None, "p90_after": None, "rises_after": None,
           "loss_at_arrival": None, "loss_final": float(losses[-1]) if losses.size else None}
    if not len(reached):
        return out
    first = int(reached[0])
    after, arrival = ratios[first:], int(steps[first])
    out.update(arrival_step=arrival, after=len(after), median_after=float(np.median(after)),
               p10_after=float(np.percentile(after, 10)), p90_after=float(np.percentile(after, 90)))
    if losses.size > arrival:
        out.update(rises_after=int(np.sum(np.diff(losses[arrival:]) > 0)), loss_at_arrival=float(losses[arrival]))
    return out


def hovers(analysis: dict) -> bool:
    """Reached the limit and stayed at it: at least MIN_AFTER measurements after arrival, median within 1 ± BAND,
    10th and 90th percentiles within 1 ± SPREAD."""
    return (analysis["diverged_at"] is None and analysis["after"] >= MIN_AFTER
            and abs(analysis["median_after"] - 1) <= BAND
            and analysis["p10_after"] >= 1 - SPREAD and analysis["p90_after"] <= 1 + SPREAD)


def run(config: dict, out_dir, progress: bool = True):
    import jax

    from jaxnn.experiments import Result, image_data

    dataset = image_data(config, "edge_of_stability", seed=0, limit=round(config["examples"] / 0.7),
                         val_fraction=0.1, test_fraction=0.2)
    batch = (jax.numpy.asarray(dataset.train.x), jax.numpy.asarray(dataset.train.y))
    seeds = list(range(config["seeds"]))
    runs = [r for lr, steps in zip(config["lrs"], config["steps"])
            for r in _gradient_descent(config, batch, dataset.input_shape, lr, steps)]
    gd = {init: [r for r in runs if r["init"] == init] for init in ("pytorch", "he")[: 1 + (config["he_seeds"] > 0)]}
    checks, reported = [], []
    for lr, steps in zip(config["lrs"], config["steps"]):
        a = [r["analysis"] for r in gd["pytorch"] if r["lr"] == lr]
        label = f"GD η = {lr} (2/η = {2 / lr:g}), PyTorch init, {len(a)} seeds"
        arrivals = [x["arrival_step"] for x in a]
        checks.append((f"{label}: progressive sharpening from below, λmax·η/2 starts below {SHARPENING_START} and "
                       f"rises to {ARRIVAL} within {steps} steps, in every seed",
                       f"λmax·η/2 at init {_values([x['start'] for x in a])}; first ≥ {ARRIVAL} at step "
                       f"{_steps(arrivals)}; peak {_values([x['peak'] for x in a])}",
                       all(x["start"] < SHARPENING_START and x["arrival_step"] is not None
                           and x["diverged_at"] is None for x in a)))
        checks.append((f"{label}: then hovers at 2/η, from the first measurement ≥ {ARRIVAL} on (≥ {MIN_AFTER} "
                       f"measurements) median λmax·η/2 within 1 ± {BAND} and its 10th–90th percentiles within "
                       f"1 ± {SPREAD}, in every seed", _hover_text(a), all(hovers(x) for x in a)))
        checks.append((f"{label}: \"just above\" 2/η, median λmax·η/2 after arrival above 1, in every seed",
                       _median_text(a), all(x["median_after"] is not None and x["median_after"] > 1 for x in a)))
        checks.append((f"{label}: at the edge the loss is non-monotone yet falls, it rises on > 0 steps after λmax "
                       f"first reaches {ARRIVAL}·2/η and ends below its value there, in every seed", _loss_text(a),
                       all(x["rises_after"] and x["loss_final"] < x["loss_at_arrival"] and x["diverged_at"] is None
                           for x in a)))
    for lr in config["lrs"] if "he" in gd else []:
        a = [r["analysis"] for r in gd["he"] if r["lr"] == lr]
        reported.append((f"variant, jaxnn's He init (not counted), GD η = {lr}, {len(a)} seeds",
                         f"λmax·η/2 at init {_values([x['start'] for x in a])} (1 = 2/η), "
                         f"lowest {_values([x['low'] for x in a])}, back to ≥ {ARRIVAL} at step "
                         f"{_steps([x['arrival_step'] for x in a])}; {_hover_text(a)}; {_loss_text(a)}"))
    adam = None
    if config["adam_lr"]:
        adam = _adam(make_model(config, "pytorch"), batch, dataset.input_shape, config)
        a = [r["analysis"] for r in adam["runs"]]
        limit = adam["limit"]
        label = f"Adam (β1 = {ADAM_B1}, η = {config['adam_lr']}, 38/η = {limit:.0f}), PyTorch init, {len(a)} seeds"
        checks.append((f"{label}: preconditioned sharpness reaches {ARRIVAL}·38/η within {config['adam_steps']} "
                       f"steps and then equilibrates there, median within 1 ± {BAND} of 38/η and 10th–90th "
                       f"percentiles within 1 ± {SPREAD} (≥ {MIN_AFTER} measurements after arrival), in every seed",
                       f"sharpness/(38/η) at the first measurement {_values([x['start'] for x in a])}, first ≥ "
                       f"{ARRIVAL} at step {_steps([x['arrival_step'] for x in a])}; {_hover_text(a)}",
                       all(x["arrival_step"] is not None and hovers(x) for x in a)))
        drift = [r["drift"] for r in adam["runs"]]
        reported.append((f"{label}: drift of sharpness/(38/η), median of the last quarter of the run minus the "
                         f"median of the quarter before (near 0: equilibrated)", _values(drift, signed=True)))
    _plot(gd, adam, config, out_dir / "edge_of_stability.png")
    every = config["every"]  # result.json keeps the loss at every λmax measurement, the figure has every step
    for record in [r for runs in gd.values() for r in runs] + (adam["runs"] if adam else []):
        losses = np.asarray(record.pop("loss"), float)
        record["loss_at_measurements"] = _json_list(losses[np.minimum(record["steps"], len(losses) - 1)])
    return Result(
        measured={"gd": gd, "adam": adam, "train_examples": len(dataset.train), "seeds": seeds},
        checks=checks, reported=reported, figures=["edge_of_stability.png"],
        data=(f"{config['data']} {dataset.input_shape}, {len(dataset.train)} training examples, full-batch; MLP "
              f"{int(np.prod(dataset.input_shape))}-{'-'.join(map(str, config['hidden']))}-10 "
              f"({config['activation']}), MSE = ½‖f − onehot(y)‖²; GD η = {config['lrs']} for {config['steps']} steps, "
              f"λmax every {every} ({config['lanczos_iters']} Lanczos steps); init seeds {seeds} per η; headline "
              f"init PyTorch's nn.Linear default U(±1/√fan_in) for weights and biases (Cohen et al.'s setting)"
              + (f"; variant: jaxnn's He normal (variance 2/fan_in, 6x PyTorch's), zero biases, seeds "
                 f"{list(range(config['he_seeds']))}" if "he" in gd else "")
              + (f"; Adam η = {config['adam_lr']}, ε = {config['adam_eps']}, {config['adam_steps']} steps, "
                 f"preconditioned sharpness every {config['adam_every']}" if adam else "")))


def _json_list(values) -> list:
    """Floats, None where not finite (a diverged run)."""
    return [float(v) if np.isfinite(v) else None for v in values]


def _values(values, signed: bool = False) -> str:
    """'0.20 ± 0.01 (0.19–0.21)': mean ± sample standard deviation over seeds, and the range."""
    values = np.asarray(values, float)
    spread = values.std(ddof=1) if len(values) > 1 else 0.0
    fmt = "+.3f" if signed else ".2f"
    return f"{values.mean():{fmt}} ± {spread:.3f} ({values.min():{fmt}} to {values.max():{fmt}})"


def _steps(steps) -> str:
    return "/".join("never" if s is None else str(s) for s in steps) + " (per seed)"


def _hover_text(analyses) -> str:
    diverged = [x["diverged_at"] for x in analyses if x["diverged_at"] is not None]
    note = f"; {len(diverged)} seed(s) diverged (non-finite loss) at step {'/'.join(map(str, diverged))}"
    return _reached_text(analyses) + (note if diverged else "")


def _reached_text(analyses) -> str:
    reached = [x for x in analyses if x["arrival_step"] is not None]
    if not reached:
        return "never reached the limit: hovering not assessed"
    text = (f"after arrival ({'/'.join(str(x['after']) for x in reached)} measurements) median ratio "
            f"{_values([x['median_after'] for x in reached])}, 10th–90th percentiles widest "
            f"{min(x['p10_after'] for x in reached):.3f}–{max(x['p90_after'] for x in reached):.3f}")
    return text + (f"; {len(analyses) - len(reached)} seed(s) never reached it" if len(reached) < len(analyses) else "")


def _median_text(analyses) -> str:
    medians = [x["median_after"] for x in analyses if x["median_after"] is not None]
    if not medians:
        return "never reached the limit: not assessed"
    return (f"median λmax·η/2 after arrival {_values(medians)}, per seed "
            f"{'/'.join(f'{m:.3f}' for m in medians)}" + ("" if len(medians) == len(analyses) else
                                                         f"; {len(analyses) - len(medians)} seed(s) never arrived"))


def _loss_text(analyses) -> str:
    reached = [x for x in analyses if x["rises_after"] is not None]
    if not reached:
        return "loss after arrival not assessed (never reached the limit)"
    return (f"loss rose on {'/'.join(str(x['rises_after']) for x in reached)} steps after arrival (per seed), "
            f"loss at arrival {_joined(x['loss_at_arrival'] for x in reached)} → final "
            f"{_joined(x['loss_final'] for x in reached)}")


def _joined(values) -> str:
    return "/".join(f"{v:.4f}" for v in values)


def _gradient_descent(config, batch, input_shape, lr: float, steps: int) -> list[dict]:
    """GD with step size ``lr`` from the PyTorch init of seeds 0..seeds-1 and the He init of seeds 0..he_seeds-1
    (the same network, only the initial weights differ): ``every`` steps at a time for all members in one vmapped,
    scanned program; λmax of all members after each segment (population_top_eigenvalues)."""
    import jax
    import jax.numpy as jnp

    from jaxnn import curvature, losses as losses_lib
    from jaxnn.models import init_model

    members = ([("pytorch", seed) for seed in range(config["seeds"])]
               + [("he", seed) for seed in range(config["he_seeds"])])
    params = [init_model(make_model(config, init), jax.random.PRNGKey(seed), input_shape)[0] for init, seed in members]
    stacked = jax.tree.map(lambda *p: jnp.stack(p), *params)
    loss_fn = losses_lib.make_loss_fn(make_model(config, "pytorch").apply, squared_error)

    @jax.jit
    def segment(stacked):
        def member(params):
            def step(params, _):
                value, grads = jax.value_and_grad(loss_fn)(params, batch)
                return jax.tree.map(lambda p, g: p - lr * g, params, grads), value

            return jax.lax.scan(step, params, None, length=config["every"])

        return jax.vmap(member)(stacked)

    def top(stacked, done):
        return curvature.population_top_eigenvalues(loss_fn, stacked, batch, num_iters=config["lanczos_iters"],
                                                    key=jax.random.PRNGKey(done))[:, 0]

    done_steps, values, losses = [0], [top(stacked, 0)], []
    for done in range(config["every"], steps + 1, config["every"]):
        stacked, segment_losses = segment(stacked)
        losses.append(np.asarray(segment_losses))
        values.append(top(stacked, done))
        done_steps.append(done)
    values, losses = np.stack(values, axis=1), np.concatenate(losses, axis=1)
    final = np.asarray(jax.vmap(loss_fn, (0, None))(stacked, batch))  # the loss after the last step
    runs = []
    for i, (init, seed) in enumerate(members):
        member_losses = np.append(losses[i], final[i])  # member_losses[t]: after t steps
        runs.append({"lr": lr, "init": init, "seed": seed, "threshold": 2 / lr, "steps": done_steps,
                     "lambda_max": _json_list(values[i]), "loss": member_losses.tolist(),
                     "analysis": edge_analysis(values[i] * lr / 2, done_steps, member_losses)})
    return runs


def _shifted_loss(loss_fn, params, scale, u, batch):
    """L(θ + D·u): its Hessian in u at u = 0 is D·H·D."""
    import jax

    return loss_fn(jax.tree.map(lambda p, d, x: p + d * x, params, scale, u), batch)


def _adam(model, batch, input_shape, config) -> dict:
    """Full-batch Adam from every seed's init, all members in one program (Adam is elementwise, so one optax state
    over the stacked parameters is each member's own); every ``adam_every`` steps the top eigenvalue of
    P^-1/2 H P^-1/2, P = (1 − β1ᵗ)(√v̂ + ε), v̂ the bias-corrected second moment of the optax state."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxnn import curvature, losses as losses_lib
    from jaxnn.models import init_model

    seeds = list(range(config["seeds"]))
    params = [init_model(model, jax.random.PRNGKey(seed), input_shape)[0] for seed in seeds]
    stacked = jax.tree.map(lambda *p: jnp.stack(p), *params)
    loss_fn = losses_lib.make_loss_fn(model.apply, squared_error)
    shifted = functools.partial(_shifted_loss, loss_fn)  # one function object: one compiled Lanczos program
    tx = optax.adam(config["adam_lr"], b1=ADAM_B1, b2=ADAM_B2, eps=config["adam_eps"])
    opt_state = tx.init(stacked)
    every = config["adam_every"]

    @jax.jit
    def segment(stacked, opt_state):
        def step(carry, _):
            stacked, opt_state = carry
            values, grads = jax.vmap(jax.value_and_grad(loss_fn), (0, None))(stacked, batch)
            updates, opt_state = tx.update(grads, opt_state, stacked)
            return (optax.apply_updates(stacked, updates), opt_state), values

        return jax.lax.scan(step, (stacked, opt_state), None, length=every)

    def sharpness(stacked, opt_state, done):
        moments = opt_state[0]
        t = int(moments.count)
        scale = jax.tree.map(lambda nu: 1 / jnp.sqrt((1 - ADAM_B1**t) * (jnp.sqrt(nu / (1 - ADAM_B2**t))
                                                                         + config["adam_eps"])), moments.nu)
        op = jax.tree_util.Partial(shifted, stacked, scale)
        zeros = jax.tree.map(jnp.zeros_like, stacked)
        return curvature.population_top_eigenvalues(op, zeros, batch, num_iters=config["lanczos_iters"],
                                                    key=jax.random.PRNGKey(done))[:, 0]

    steps, values, losses = [], [], []
    for done in range(every, config["adam_steps"] + 1, every):
        (stacked, opt_state), segment_losses = segment(stacked, opt_state)
        losses.append(np.asarray(segment_losses).T)
        values.append(sharpness(stacked, opt_state, done))
        steps.append(done)
    values, losses = np.stack(values, axis=1), np.concatenate(losses, axis=1)
    final = np.asarray(jax.vmap(loss_fn, (0, None))(stacked, batch))
    limit = (2 + 2 * ADAM_B1) / ((1 - ADAM_B1) * config["adam_lr"])
    runs = []
    for i, seed in enumerate(seeds):
        ratios = values[i] / limit
        quarter = max(1, len(ratios) // 4)
        runs.append({"seed": seed, "steps": steps, "preconditioned_sharpness": _json_list(values[i]),
                     "loss": np.append(losses[i], final[i]).tolist(),
                     "analysis": edge_analysis(ratios, steps, np.append(losses[i], final[i])),
                     "drift": float(np.median(ratios[-quarter:]) - np.median(ratios[-2 * quarter:-quarter]))})
    return {"lr": config["adam_lr"], "limit": limit, "runs": runs}


def _plot(gd, adam, config, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = len(gd) + (adam is not None)
    fig = Figure(figsize=(13, 3.8 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    names = {"pytorch": "PyTorch default init (headline)", "he": "jaxnn He init (variant, not counted)"}
    for (left, right), (init, runs) in zip(axes, gd.items()):
        for r in runs:
            color, first = f"C{config['lrs'].index(r['lr'])}", r["seed"] == 0
            left.plot(r["steps"], np.asarray(r["lambda_max"], float) * r["lr"] / 2, color=color, linewidth=1,
                      label=f"η = {r['lr']}" if first else None)
            right.plot(np.arange(len(r["loss"])), np.asarray(r["loss"], float), color=color, linewidth=0.6,
                       label=f"η = {r['lr']}" if first else None)
            diverged = r["analysis"]["diverged_at"]
            if diverged is not None:  # its curves stop at the last finite value: mark where, and say so
                ratios, losses = np.asarray(r["lambda_max"], float), np.asarray(r["loss"], float)
                last = np.flatnonzero(np.isfinite(ratios))
                if len(last):
                    left.plot([r["steps"][last[-1]]], [ratios[last[-1]] * r["lr"] / 2], "x", color=color,
                              markersize=9, markeredgewidth=2)
                finite = np.flatnonzero(np.isfinite(losses))
                if len(finite):
                    right.plot([finite[-1]], [losses[finite[-1]]], "x", color=color, markersize=9, markeredgewidth=2)
            arrival = r["analysis"]["arrival_step"]
            if arrival is not None:
                left.plot([arrival], [r["lambda_max"][r["steps"].index(arrival)] * r["lr"] / 2], "o", color=color,
                          markersize=4)
        crossed = sum(r["analysis"]["diverged_at"] is not None for r in runs)
        left.set_title(f"GD, {names[init]}: λmax·η/2, {len(runs) // len(config['lrs'])} seed(s) per η "
                       f"(dot: first ≥ {ARRIVAL}" + (f";\n✕: last finite value of {crossed} diverged run(s)"
                                                     if crossed else "") + ")", fontsize=9)
        left.set_ylabel("λmax · η/2  (1 = 2/η)")
        right.set_title(f"GD, {names[init]}: training loss" + ("\n(✕: last finite value before divergence)"
                                                                if crossed else ""), fontsize=9)
        right.set_ylabel("½‖f − onehot(y)‖², mean"), right.set_yscale("log")
    if adam is not None:
        left, right = axes[-1]
        for r in adam["runs"]:
            left.plot(r["steps"], np.asarray(r["preconditioned_sharpness"], float) / adam["limit"], color="C3",
                      linewidth=1, label=f"Adam η = {adam['lr']}" if r["seed"] == 0 else None)
            right.plot(np.arange(len(r["loss"])), r["loss"], color="C3", linewidth=0.6)
        left.set_title(f"Adam, PyTorch init: preconditioned sharpness λmax(P⁻¹H) / (38/η = {adam['limit']:.0f}), "
                       f"{config['seeds']} seeds", fontsize=9)
        left.set_ylabel("λmax(P⁻¹H) / (38/η)")
        right.set_title("Adam: training loss", fontsize=9), right.set_ylabel("½‖f − onehot(y)‖², mean")
        right.set_yscale("log")
    for left, right in axes:
        left.axhline(1, color="k", linestyle="--", linewidth=1, label="limit")
        left.axhspan(1 - BAND, 1 + BAND, color="0.85", zorder=0, label=f"1 ± {BAND}")
        for ax in (left, right):
            ax.set_xlabel("step"), ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
