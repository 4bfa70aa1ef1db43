"""Conditioning and optimisers on quadratics (cs231n / CS7643 "optimization" notes).

f(x) = ½ xᵀAx with A = Q diag(λ) Qᵀ, eigenvalues log-spaced from 1 to κ, Q a random rotation, x₀ ~ N(0, I), one
quadratic per seed. The curvature engine measures λmax and κ (Lanczos); everything else is plain arithmetic in float64:

1. gradient descent at lr = 1/λmax needs steps ∝ κ to reach f ≤ tol·f(x₀): the slope of log(steps) against
   log(κ) is ≈ 1 (each seed);
2. gradient descent diverges for lr > 2/λmax and converges below: the threshold found by bisection is 2/λmax;
3. momentum (β = 0.9, lr = 1/λmax) and Adam (lr = 0.01, a user's default) against gradient descent at every κ: the
   notes' claim is about ill-conditioned problems, so the check asks for a stated speed-up at κ ≥ 100 in every seed
   and the table shows every κ (at κ ≤ 10 momentum 0.9 is slower than gradient descent);
4. the update rules (SGD, momentum, Nesterov, Adagrad, RMSProp, Adam) follow optax's trajectories over 100 steps:
   as the notes write them (RMSProp's cache accumulated, ``cache += decay·cache + (1−decay)·g²``; Adam's second
   moment divided by (1−β1^t)) and as corrected (assigned; (1−β2^t)), with ε placed as optax places it (inside the
   square root for Adagrad and RMSProp; the notes put it outside, which is a convention, reported, not an error).
"""

from __future__ import annotations

import numpy as np

CLAIM = ("On a quadratic, gradient descent needs steps proportional to the condition number κ and diverges above "
         "lr = 2/λmax; on ill-conditioned problems momentum and Adam need fewer steps; the notes' update rules are "
         "optax's optimisers.")
CONFIG = {"kappas": [1, 10, 100, 1000], "dim": 50, "tolerance": 1e-6, "max_steps": 50000, "trajectory_steps": 100,
          "adam_lr": 0.01, "momentum": 0.9, "seeds": [0, 1, 2], "ill_conditioned": 100, "speedup": 2.0}
SMOKE = {"kappas": [1, 10, 100], "dim": 12, "max_steps": 5000}


def quadratic(kappa: float, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, x0): A symmetric with eigenvalues log-spaced in [1, κ] in a random basis."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eigenvalues = np.geomspace(1.0, kappa, dim)
    return (q * eigenvalues) @ q.T, rng.normal(size=dim)


def measured_spectrum(a: np.ndarray, x0: np.ndarray) -> tuple[float, float]:
    """(λmax, κ) from jaxnn's Lanczos on the Hessian of ½xᵀAx (float64)."""
    import jax
    import jax.numpy as jnp

    from jaxnn import curvature

    with jax.enable_x64(True):
        matrix = jnp.asarray(a)
        op = curvature.hessian(lambda x, _: 0.5 * x @ matrix @ x, jnp.asarray(x0), None)
        conditioning = curvature.condition_number(op, num_iters=len(x0), key=jax.random.PRNGKey(0), progress=False)
    return float(conditioning.lambda_max), float(conditioning.condition_number)


def steps_to_tolerance(update, a: np.ndarray, x0: np.ndarray, tolerance: float, max_steps: int) -> tuple[int, list]:
    """Steps of ``update(x, g, t) -> x`` until f(x) <= tolerance·f(x0) (max_steps + 1 if never), and f along the way."""
    f0 = 0.5 * x0 @ a @ x0
    x, values = x0.copy(), [f0]
    for t in range(1, max_steps + 1):
        x = update(x, a @ x, t)
        value = 0.5 * x @ a @ x
        values.append(value)
        if not np.isfinite(value):
            return max_steps + 1, values
        if value <= tolerance * f0:
            return t, values
    return max_steps + 1, values


def gradient_descent(lr):
    return lambda x, g, t: x - lr * g


def heavy_ball(lr, beta):
    state = {"v": 0.0}

    def update(x, g, t):
        state["v"] = beta * state["v"] - lr * g
        return x + state["v"]

    return update


def notes_adam(lr, b1=0.9, b2=0.999, eps=1e-8):
    state = {"m": 0.0, "v": 0.0}

    def update(x, g, t):
        state["m"] = b1 * state["m"] + (1 - b1) * g
        state["v"] = b2 * state["v"] + (1 - b2) * g * g
        m_hat, v_hat = state["m"] / (1 - b1**t), state["v"] / (1 - b2**t)  # the correct bias corrections
        return x - lr * m_hat / (np.sqrt(v_hat) + eps)

    return update


def divergence_threshold(a: np.ndarray, x0: np.ndarray, lam_max: float, steps: int = 400, iterations: int = 40):
    """The smallest learning rate at which gradient descent's loss grows over ``steps`` steps, by bisection."""
    def diverges(lr):
        x = x0.copy()
        with np.errstate(over="ignore", invalid="ignore"):
            for _ in range(steps):
                x = x - lr * (a @ x)
            return not 0.5 * x @ a @ x <= 0.5 * x0 @ a @ x0

    low, high = 0.5 / lam_max, 4.0 / lam_max
    assert not diverges(low) and diverges(high)
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        low, high = (low, middle) if diverges(middle) else (middle, high)
    return 0.5 * (low + high)


def notes_rules(lr: float, eps_as_optax: bool, as_written: bool = False) -> dict:
    """The notes' update rules (cs231n "Parameter updates") as functions (x, g, t, state) -> x, float64.
    ``eps_as_optax``: Adagrad's and RMSProp's ε inside the square root as optax puts it (the notes add it outside).
    ``as_written``: the two rules the notes get wrong, as they write them (RMSProp's cache accumulated, Adam's second
    moment corrected by 1−β1^t); else corrected."""
    mu, decay, b1, b2, eps = 0.9, 0.9, 0.9, 0.999, 1e-8

    def sgd(x, g, t, s):
        return x - lr * g

    def momentum(x, g, t, s):
        s["v"] = mu * s.get("v", 0.0) - lr * g
        return x + s["v"]

    def nesterov(x, g, t, s):
        v_prev = s.get("v", 0.0)
        s["v"] = mu * v_prev - lr * g
        return x - mu * v_prev + (1 + mu) * s["v"]

    def root(cache):
        return np.sqrt(cache + eps) if eps_as_optax else np.sqrt(cache) + eps

    def adagrad(x, g, t, s):
        s["cache"] = s.get("cache", 0.0) + g * g
        return x - lr * g / root(s["cache"])

    def rmsprop(x, g, t, s):
        cache = decay * s.get("cache", 0.0) + (1 - decay) * g * g  # assigned, not accumulated
        s["cache"] = s.get("cache", 0.0) + cache if as_written else cache
        return x - lr * g / root(s["cache"])

    def adam(x, g, t, s):
        s["m"] = b1 * s.get("m", 0.0) + (1 - b1) * g
        s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * g * g
        v_hat = s["v"] / (1 - (b1 if as_written else b2) ** t)
        return x - lr * (s["m"] / (1 - b1**t)) / (np.sqrt(v_hat) + eps)

    return {"sgd": sgd, "momentum": momentum, "nesterov": nesterov, "adagrad": adagrad, "rmsprop": rmsprop,
            "adam": adam}


def optax_rules(lr: float) -> dict:
    import optax

    return {"sgd": optax.sgd(lr), "momentum": optax.sgd(lr, momentum=0.9),
            "nesterov": optax.sgd(lr, momentum=0.9, nesterov=True),
            "adagrad": optax.adagrad(lr, initial_accumulator_value=0.0, eps=1e-8),
            "rmsprop": optax.rmsprop(lr, decay=0.9, eps=1e-8), "adam": optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)}


def trajectory_gap(a: np.ndarray, x0: np.ndarray, lr: float, steps: int, eps_as_optax: bool,
                   as_written: bool) -> dict:
    """Max |x_notes − x_optax| over ``steps`` steps, per optimiser, for one reading of the notes' rules."""
    import jax
    import jax.numpy as jnp

    gaps = {}
    with jax.enable_x64(True):
        rules = notes_rules(lr, eps_as_optax=eps_as_optax, as_written=as_written)
        for name, tx in optax_rules(lr).items():
            x_notes, state = x0.copy(), {}
            x_optax = jnp.asarray(x0)
            opt_state = tx.init(x_optax)
            worst = 0.0
            for t in range(1, steps + 1):
                x_notes = rules[name](x_notes, a @ x_notes, t, state)
                updates, opt_state = tx.update(jnp.asarray(a) @ x_optax, opt_state, x_optax)
                x_optax = x_optax + updates
                worst = max(worst, float(np.max(np.abs(x_notes - np.asarray(x_optax)))))
            gaps[name] = worst
    return gaps


def _spread(values) -> str:
    values = np.asarray(values, float)
    return f"{values.mean():.0f}" if values.std() == 0 else f"{values.mean():.0f} ± {values.std():.0f}"


def run(config: dict, out_dir, progress: bool = True):
    from jaxnn.experiments import Result

    kappas, dim, tol, max_steps = config["kappas"], config["dim"], config["tolerance"], config["max_steps"]
    seeds, speedup, ill = config["seeds"], config["speedup"], config["ill_conditioned"]
    rows, curves, slopes, thresholds = [], {}, [], []
    for seed in seeds:
        seed_rows = []
        for kappa in kappas:
            a, x0 = quadratic(kappa, dim, seed)
            lam_max, kappa_measured = measured_spectrum(a, x0)
            gd, gd_curve = steps_to_tolerance(gradient_descent(1.0 / lam_max), a, x0, tol, max_steps)
            mom, mom_curve = steps_to_tolerance(heavy_ball(1.0 / lam_max, config["momentum"]), a, x0, tol,
                                                max_steps)
            adam, adam_curve = steps_to_tolerance(notes_adam(config["adam_lr"]), a, x0, tol, max_steps)
            seed_rows.append({"seed": seed, "kappa": kappa, "lambda_max": lam_max, "kappa_measured": kappa_measured,
                              "gd_steps": gd, "momentum_steps": mom, "adam_steps": adam})
            if seed == seeds[0]:
                curves[kappa] = {"gradient descent": gd_curve, f"momentum {config['momentum']}": mom_curve,
                                 f"Adam lr {config['adam_lr']}": adam_curve}
        fit = [r for r in seed_rows if r["kappa"] > 1 and r["gd_steps"] <= max_steps]
        slopes.append(float(np.polyfit(np.log([r["kappa"] for r in fit]), np.log([r["gd_steps"] for r in fit]),
                                       1)[0]))
        a, x0 = quadratic(kappas[-1], dim, seed)
        thresholds.append(divergence_threshold(a, x0, seed_rows[-1]["lambda_max"]) * seed_rows[-1]["lambda_max"])
        rows += seed_rows
    a, x0 = quadratic(min(100, kappas[-1]), dim, seeds[0])
    lr = 0.5 / max(r["lambda_max"] for r in rows if r["seed"] == seeds[0])
    steps = config["trajectory_steps"]
    corrected = trajectory_gap(a, x0, lr, steps, eps_as_optax=True, as_written=False)
    written = trajectory_gap(a, x0, lr, steps, eps_as_optax=True, as_written=True)
    eps_outside = trajectory_gap(a, x0, lr, steps, eps_as_optax=False, as_written=False)
    worst_kappa_error = max(abs(r["kappa_measured"] / r["kappa"] - 1) for r in rows)

    def by_kappa(key):
        return "; ".join(f"κ={k}: {_spread([r[key] for r in rows if r['kappa'] == k])} vs GD "
                         f"{_spread([r['gd_steps'] for r in rows if r['kappa'] == k])}" for k in kappas)

    ill_rows = [r for r in rows if r["kappa"] >= ill]
    checks = [
        ("κ measured by the curvature engine (Lanczos) equals the construction", f"worst relative error "
         f"{worst_kappa_error:.1e} over {len(rows)} quadratics", worst_kappa_error < 1e-6),
        (f"GD steps to tolerance grow ~linearly in κ: log-log slope in [0.85, 1.15] in each of {len(seeds)} seeds",
         f"slopes {', '.join(f'{v:.3f}' for v in slopes)} over κ = {[k for k in kappas if k > 1]}",
         all(0.85 <= v <= 1.15 for v in slopes)),
        ("GD diverges above lr = 2/λmax (bisection, largest κ, each seed): threshold within 1 % of 2/λmax",
         "thresholds " + ", ".join(f"{v:.4f}/λmax" for v in thresholds), all(abs(v / 2 - 1) < 0.01 for v in thresholds)),
        (f"momentum {config['momentum']} needs ≥ {speedup:g}× fewer steps than GD at κ ≥ {ill}, every seed "
         f"(steps, mean ± sd over {len(seeds)} seeds)", f"momentum {by_kappa('momentum_steps')}",
         all(r["momentum_steps"] * speedup <= r["gd_steps"] for r in ill_rows)),
        (f"Adam (lr {config['adam_lr']}) needs ≥ {speedup:g}× fewer steps than GD at κ ≥ {ill}, every seed "
         f"(steps, mean ± sd over {len(seeds)} seeds; {max_steps + 1} = not within {max_steps})",
         f"Adam {by_kappa('adam_steps')}", all(r["adam_steps"] * speedup <= r["gd_steps"] for r in ill_rows)),
        (f"the notes' update rules as written (RMSProp cache accumulated, Adam's v̂ = v/(1−β1^t)) follow optax for "
         f"{steps} steps (max gap < 1e-6)", "max gap " + ", ".join(f"{k} {v:.1e}" for k, v in written.items()),
         max(written.values()) < 1e-6),
        (f"the notes' update rules as corrected (RMSProp cache assigned, Adam's v̂ = v/(1−β2^t)) follow optax for "
         f"{steps} steps (max gap < 1e-6)", "max gap " + ", ".join(f"{k} {v:.1e}" for k, v in corrected.items()),
         max(corrected.values()) < 1e-6),
    ]
    reported = [("the notes' ε outside the square root (Adagrad, RMSProp; corrected rules otherwise) against optax's "
                 "ε inside, ε = 1e-8", "max gap " + ", ".join(f"{k} {eps_outside[k]:.1e}"
                                                                for k in ("adagrad", "rmsprop")))]
    _plot(rows, curves, slopes, out_dir / "conditioning.png")
    return Result(
        measured={"rows": rows, "gd_slopes": slopes, "divergence_threshold_times_lambda_max": thresholds,
                  "trajectory_gap_as_corrected": corrected, "trajectory_gap_as_written": written,
                  "trajectory_gap_eps_as_notes": eps_outside},
        checks=checks, reported=reported, figures=["conditioning.png"],
        data=f"synthetic quadratics in {dim} dimensions, {len(seeds)} seeds (rotation and x₀)",
        corrections=[
            "RMSProp's cache is assigned (cache = decay·cache + (1−decay)·g²), not accumulated as one note writes "
            f"it: as written its trajectory leaves optax's by {written['rmsprop']:.1e} within {steps} steps.",
            "Adam's second-moment correction divides by (1−β2^t), not (1−β1^t): as written its trajectory leaves "
            f"optax's by {written['adam']:.1e} within {steps} steps.",
        ])


def _plot(rows, curves, slopes, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    kappas = sorted({r["kappa"] for r in rows})
    for i, (key, label) in enumerate((("gd_steps", "gradient descent (lr 1/λmax)"), ("momentum_steps", "momentum 0.9"),
                                      ("adam_steps", "Adam"))):
        mean = [np.mean([r[key] for r in rows if r["kappa"] == k]) for k in kappas]
        left.plot(kappas, mean, "o-", color=f"C{i}", label=f"{label} (mean)")
        left.plot([r["kappa"] for r in rows], [r[key] for r in rows], ".", color=f"C{i}", alpha=0.5)
    left.set_xscale("log"), left.set_yscale("log"), left.set_xlabel("condition number κ")
    left.set_ylabel("steps to f ≤ tol·f(x₀)"), left.legend(fontsize=8), left.grid(alpha=0.3)
    left.set_title(f"GD log-log slopes {', '.join(f'{v:.2f}' for v in slopes)} (dots: seeds)", fontsize=9)
    for label, values in curves[kappas[-1]].items():
        values = np.asarray(values)
        right.plot(np.flatnonzero(values > 0), values[values > 0], label=label)  # f = 0 exactly has no log
    right.set_yscale("log"), right.set_xlabel("step"), right.set_ylabel("f(x)")
    right.set_title(f"κ = {kappas[-1]}, first seed", fontsize=9), right.legend(fontsize=8), right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
