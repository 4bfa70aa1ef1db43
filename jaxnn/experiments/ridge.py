"""Ridge regression as a Gaussian prior (cs229 / CS7643 "regularisation" notes).

L(w) = ½‖Xw − y‖² + ½λ‖w‖² on synthetic data y = Xw* + σε. The curvature engine reads the Hessian XᵀX + λI of the
loss; the claims:

1. the closed form w = (XᵀX + λI)⁻¹Xᵀy equals the solution optax's L-BFGS finds;
2. the Hessian's condition number is (σ²max + λ)/(σ²min + λ) (σ the singular values of X), so it falls as λ grows
   (shown, not counted: it follows from the formula);
3. with more features than examples (d > n) ordinary least squares is singular — Lanczos finds λmin = 0 — and
   ridge is not (λmin = λ);
4. the MAP estimate under the prior w ~ N(0, τ²I) with noise variance σ² (minimising ‖y − Xw‖²/2σ² + ‖w‖²/2τ²)
   equals ridge with λ = σ²/τ².
"""

from __future__ import annotations

import numpy as np

CLAIM = ("Ridge regression's closed form is what an optimiser finds; its Hessian's condition number is "
         "(σ²max + λ)/(σ²min + λ), falling with λ; with d > n least squares is singular and ridge is not; ridge "
         "with λ = σ²/τ² is the MAP estimate under a N(0, τ²) prior.")
CONFIG = {"examples": 200, "features": 20, "wide_features": 300, "noise": 0.5, "prior_std": 0.8,
          "lambdas": [0.0, 0.1, 1.0, 10.0, 100.0], "seed": 0}
SMOKE = {"examples": 40, "features": 8, "wide_features": 60, "lambdas": [0.0, 1.0, 10.0]}


def data(examples, features, noise, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(examples, features)) * np.geomspace(1.0, 10.0, features)  # uneven feature scales
    w_true = rng.normal(size=features)
    return x, x @ w_true + noise * rng.normal(size=examples)


def ridge_closed_form(x, y, lam):
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)


def _loss(x, y, lam):
    """The ridge objective as a ``loss_fn(params, batch)`` for the curvature engine (the data closed over)."""
    import jax.numpy as jnp

    x, y = jnp.asarray(x), jnp.asarray(y)
    return lambda w, _=None: _ridge_objective(w, x, y, lam)


def _ridge_objective(w, x, y, lam):
    import jax.numpy as jnp

    return 0.5 * jnp.sum((x @ w - y) ** 2) + 0.5 * lam * jnp.sum(w * w)


def _posterior_objective(w, x, y, noise, prior_std):
    import jax.numpy as jnp

    return jnp.sum((y - x @ w) ** 2) / (2 * noise**2) + jnp.sum(w * w) / (2 * prior_std**2)


def lbfgs_minimize(objective, x, y, *args, steps: int = 200):
    """argmin_w objective(w, x, y, *args) by optax's L-BFGS (zoom line search), ``steps`` steps in one program."""
    import jax
    import jax.numpy as jnp
    import optax

    @jax.jit
    def solve(x, y, *args):
        fun = lambda w: objective(w, x, y, *args)  # noqa: E731
        tx = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(fun)

        def body(carry, _):
            w, state = carry
            value, grad = value_and_grad(w, state=state)
            updates, state = tx.update(grad, state, w, value=value, grad=grad, value_fn=fun)
            return (optax.apply_updates(w, updates), state), None

        w0 = jnp.zeros(x.shape[1], x.dtype)
        return jax.lax.scan(body, (w0, tx.init(w0)), None, length=steps)[0][0]

    return np.asarray(solve(jnp.asarray(x), jnp.asarray(y), *args))


def lbfgs_solution(x, y, lam):
    return lbfgs_minimize(_ridge_objective, x, y, lam)


def engine_spectrum(x, y, lam):
    """(λmax, λmin) of the loss's Hessian from jaxnn's Lanczos."""
    import jax
    import jax.numpy as jnp

    from jaxnn import curvature

    op = curvature.hessian(_loss(x, y, lam), jnp.zeros(x.shape[1]), None)
    lanczos = curvature.lanczos(op, jax.random.PRNGKey(0), op.num_params, k=1, progress=False)
    return float(lanczos.top_eigenvalues[0]), float(lanczos.bottom_eigenvalues[0])


def map_estimate(x, y, noise, prior_std):
    """argmin ‖y − Xw‖²/2σ² + ‖w‖²/2τ² by L-BFGS (a different objective from ridge's: no λ appears)."""
    return lbfgs_minimize(_posterior_objective, x, y, noise, prior_std)


def run(config: dict, out_dir, progress: bool = True):
    import jax

    from jaxnn.experiments import Result

    with jax.enable_x64(True):
        x, y = data(config["examples"], config["features"], config["noise"], config["seed"])
        singular = np.linalg.svd(x, compute_uv=False)
        rows = []
        for lam in config["lambdas"]:
            closed = ridge_closed_form(x, y, lam)
            found = lbfgs_solution(x, y, lam)
            lam_max, lam_min = engine_spectrum(x, y, lam)
            formula = (singular[0] ** 2 + lam) / (singular[-1] ** 2 + lam)
            rows.append({"lambda": lam, "solution_gap": float(np.max(np.abs(found - closed)) / np.max(np.abs(closed))),
                         "kappa_engine": lam_max / lam_min, "kappa_formula": float(formula)})
        wide_x, wide_y = data(config["examples"], config["wide_features"], config["noise"], config["seed"] + 1)
        ols_max, ols_min = engine_spectrum(wide_x, wide_y, 0.0)
        ridge_lam = 1.0
        ridge_max, ridge_min = engine_spectrum(wide_x, wide_y, ridge_lam)
        posterior = map_estimate(x, y, config["noise"], config["prior_std"])
        equivalent = ridge_closed_form(x, y, config["noise"] ** 2 / config["prior_std"] ** 2)
    map_gap = float(np.max(np.abs(posterior - equivalent)) / np.max(np.abs(equivalent)))
    kappa_gap = max(abs(r["kappa_engine"] / r["kappa_formula"] - 1) for r in rows)
    kappas = [r["kappa_engine"] for r in rows]
    checks = [
        ("closed form = L-BFGS solution (every λ)", f"max relative gap {max(r['solution_gap'] for r in rows):.1e}",
         max(r["solution_gap"] for r in rows) < 1e-6),
        ("κ from the curvature engine = (σ²max + λ)/(σ²min + λ)", f"worst relative gap {kappa_gap:.1e}",
         kappa_gap < 1e-6),
        (f"d > n ({config['wide_features']} > {config['examples']}): least squares has λmin = 0 (Lanczos)",
         f"λmin/λmax = {ols_min / ols_max:.1e}", abs(ols_min) / ols_max < 1e-10),
        (f"ridge (λ = {ridge_lam}) on the same data is not singular: λmin = λ", f"λmin = {ridge_min:.6g}",
         abs(ridge_min - ridge_lam) < 1e-6),
        ("MAP under N(0, τ²) = ridge with λ = σ²/τ²", f"max relative gap {map_gap:.1e}", map_gap < 1e-6),
    ]
    # Given the formula (checked above), κ falls with λ whenever σmax > σmin: shown, not counted as a check.
    reported = [("κ (curvature engine) as λ grows", "; ".join(f"λ = {r['lambda']:g}: κ = {k:.5g}"
                                                             for r, k in zip(rows, kappas)))]
    _plot(rows, out_dir / "ridge.png")
    return Result(measured={"rows": rows, "ols_wide_lambda_min_over_max": ols_min / ols_max,
                            "ridge_wide_lambda_min": ridge_min, "map_gap": map_gap},
                  checks=checks, reported=reported, figures=["ridge.png"],
                  data=f"synthetic regression, {config['examples']} examples, {config['features']} features "
                       f"(and {config['wide_features']} for d > n), noise σ = {config['noise']}; float64")


def _plot(rows, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    lambdas = [max(r["lambda"], 1e-3) for r in rows]
    ax.plot(lambdas, [r["kappa_formula"] for r in rows], "k-", label="(σ²max + λ)/(σ²min + λ)")
    ax.plot(lambdas, [r["kappa_engine"] for r in rows], "o", label="κ from jaxnn's Lanczos")
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("λ (0 drawn at 1e-3)"), ax.set_ylabel("κ")
    ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
