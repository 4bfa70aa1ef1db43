"""Saddle points (CS7643 "optimisation"; "The Hessian and optimisation" notes).

Two saddles, each classified by the curvature engine (gradient 0, λmin < 0 < λmax):

- f(x, y) = x² − y² at the origin (Hessian diag(2, −2));
- a two-layer linear network ŷ = w₂ᵀ W₁ x (no biases) on data y = Ax with every weight zero: its gradient
  vanishes and its Hessian has negative eigenvalues.

From each saddle: plain gradient descent started exactly there never moves; gradient descent with small Gaussian
noise escapes (the loss drops below its saddle value by a margin) and the number of steps is reported; one step
along the bottom eigenvector (the engine's escape direction) starts a descent; and the direction noisy GD leaves
along is the bottom eigenvector's (x² − y²: |cos| ≈ 1).
"""

from __future__ import annotations

import numpy as np

CLAIM = ("At a saddle the Hessian has a negative eigenvalue: plain gradient descent started there stays, noisy "
         "gradient descent and a step along the negative eigenvector escape, and the escape direction is the bottom "
         "eigenvector.")
CONFIG = {"lr": 0.05, "noise": 1e-4, "max_steps": 2000, "escape_margin": 0.1, "hidden": 4, "inputs": 5,
          "examples": 200, "seed": 0}
SMOKE = {"max_steps": 1000, "examples": 50}


def _problems(config):
    import jax.numpy as jnp

    rng = np.random.default_rng(config["seed"])
    x = rng.normal(size=(config["examples"], config["inputs"]))
    a = rng.normal(size=config["inputs"])
    y = x @ a

    def network(params, _=None):
        hidden = jnp.asarray(x) @ params["w1"]
        return 0.5 * jnp.mean((hidden @ params["w2"] - jnp.asarray(y)) ** 2)

    zeros = {"w1": jnp.zeros((config["inputs"], config["hidden"])), "w2": jnp.zeros(config["hidden"])}
    return {"x² − y²": (lambda p, _=None: p[0] ** 2 - p[1] ** 2, jnp.zeros(2)),
            "two-layer linear network": (network, zeros)}


def _descend(loss, start, config, noise, key):
    """Gradient descent (plus N(0, noise²) per step) from ``start``: (steps until the loss is below its start value
    by the escape margin, or None; the position then; the losses)."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    flat0, unravel = ravel_pytree(start)
    value = jax.jit(lambda f: loss(unravel(f)))
    grad = jax.jit(jax.grad(lambda f: loss(unravel(f))))
    start_value = float(value(flat0))
    flat, values = flat0, []
    for t in range(1, config["max_steps"] + 1):
        key, sub = jax.random.split(key)
        flat = flat - config["lr"] * grad(flat) + noise * jax.random.normal(sub, flat.shape, flat.dtype)
        values.append(float(value(flat)))
        if values[-1] < start_value - config["escape_margin"]:
            return t, np.asarray(flat - flat0), values
    return None, np.asarray(flat - flat0), values


def run(config: dict, out_dir, progress: bool = True):
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from jaxnn import curvature
    from jaxnn.experiments import Result

    measured, checks, curves = {}, [], {}
    with jax.enable_x64(True):
        for name, (loss, start) in _problems(config).items():
            start = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), start)
            op = curvature.hessian(loss, start, None)
            critical = curvature.classify_critical_point(op, num_iters=op.num_params, progress=False,
                                                         key=jax.random.PRNGKey(0))
            escape = (None if critical.escape_direction is None
                      else np.asarray(ravel_pytree(critical.escape_direction)[0]))
            key = jax.random.PRNGKey(config["seed"])
            plain_steps, plain_move, _ = _descend(loss, start, config, 0.0, key)
            noisy_steps, noisy_move, noisy_values = _descend(loss, start, config, config["noise"], key)
            kicked = jax.tree.map(lambda p, d: p + 1e-3 * d, start, critical.escape_direction)
            kick_steps, _, kick_values = _descend(loss, kicked, config, 0.0, key)
            cosine = float(abs(noisy_move @ escape) / np.linalg.norm(noisy_move)) if escape is not None else 0.0
            measured[name] = {"kind": critical.kind, "gradient_norm": critical.gradient_norm,
                              "lambda_min": critical.lambda_min, "lambda_max": critical.lambda_max,
                              "plain_gd_moved": float(np.linalg.norm(plain_move)), "noisy_gd_escape_steps": noisy_steps,
                              "eigenvector_step_escape_steps": kick_steps, "escape_direction_cosine": cosine}
            curves[name] = {"noisy GD": noisy_values, "one step along the bottom eigenvector, then GD": kick_values}
            checks += [
                (f"{name}: the engine classifies the start as a saddle", f"{critical.kind}, λ ∈ "
                 f"[{critical.lambda_min:.3g}, {critical.lambda_max:.3g}], |∇| = {critical.gradient_norm:.1e}",
                 critical.kind == "saddle"),
                (f"{name}: plain GD started at the saddle stays", f"moved {np.linalg.norm(plain_move):.1e}",
                 plain_steps is None and np.linalg.norm(plain_move) == 0.0),
                (f"{name}: noisy GD escapes", f"in {noisy_steps} steps" if noisy_steps else
                 f"not within {config['max_steps']}", noisy_steps is not None),
                (f"{name}: a step along the bottom eigenvector escapes", f"in {kick_steps} steps" if kick_steps else
                 f"not within {config['max_steps']}", kick_steps is not None),
            ]
            if name == "x² − y²":
                checks.append((f"{name}: noisy GD leaves along the bottom eigenvector",
                               f"|cos| = {cosine:.4f}", cosine > 0.99))
    _plot(curves, out_dir / "saddle_points.png")
    return Result(measured=measured, checks=checks, figures=["saddle_points.png"],
                  data=f"x² − y², and a two-layer linear network on {config['examples']} synthetic examples; float64")


def _plot(curves, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    for ax, (name, series) in zip(fig.subplots(1, len(curves)), curves.items()):
        for label, values in series.items():
            ax.plot(range(1, len(values) + 1), values, label=label)
        ax.set_title(name), ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
