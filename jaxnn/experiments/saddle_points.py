"""Saddle points (CS7643 "optimisation"; "The Hessian and optimisation" notes).

Two saddles, each classified by the curvature engine (gradient 0, λmin < 0 < λmax):

- f(x, y) = x² − y² at the origin (Hessian diag(2, −2));
- a two-layer linear network ŷ = w₂ᵀ W₁ x (no biases) on data y = Ax with every weight zero: its gradient
  vanishes and its Hessian has negative eigenvalues (λmin has multiplicity 4 here: the bottom eigenspace, not one
  eigenvector, is what an escape direction can be compared with).

From each saddle, over several noise seeds: gradient descent with small Gaussian noise escapes (the loss drops below
its saddle value by a margin) and the number of steps is reported; one step along the engine's escape direction
(its bottom Ritz vector) starts a descent; and the direction noisy GD leaves along lies in the bottom eigenspace of
the dense Hessian (``jax.hessian`` + ``numpy.linalg.eigh``, the oracle): the norm of the unit displacement's
projection onto that eigenspace, taken when the displacement first reaches ``direction_radius`` (still in the
quadratic region). A random direction would project with norm ≈ √(k/n) (k the multiplicity, n the dimension).
Plain gradient descent started exactly at a zero gradient never moves: that holds by construction and is reported.
"""

from __future__ import annotations

import numpy as np

CLAIM = ("At a saddle the Hessian has a negative eigenvalue: noisy gradient descent and a step along the negative "
         "eigenvector escape, and the escape direction is the bottom eigenvector (its eigenspace).")
CONFIG = {"lr": 0.05, "noise": 1e-4, "max_steps": 2000, "escape_margin": 0.1, "direction_radius": 0.05,
          "min_projection": 0.95, "hidden": 4, "inputs": 5, "examples": 200, "seed": 0, "noise_seeds": [0, 1, 2, 3, 4]}
SMOKE = {"max_steps": 1000, "examples": 50, "noise_seeds": [0, 1, 2]}


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
    by the escape margin, or None; the displacement when it first reached ``direction_radius`` (or the last one);
    the losses)."""
    import jax
    from jax.flatten_util import ravel_pytree

    flat0, unravel = ravel_pytree(start)
    value = jax.jit(lambda f: loss(unravel(f)))
    grad = jax.jit(jax.grad(lambda f: loss(unravel(f))))
    start_value = float(value(flat0))
    flat, values, leaving = flat0, [], None
    for t in range(1, config["max_steps"] + 1):
        key, sub = jax.random.split(key)
        flat = flat - config["lr"] * grad(flat) + noise * jax.random.normal(sub, flat.shape, flat.dtype)
        values.append(float(value(flat)))
        move = np.asarray(flat - flat0)
        if leaving is None and np.linalg.norm(move) >= config["direction_radius"]:
            leaving = move
        if values[-1] < start_value - config["escape_margin"]:
            return t, move if leaving is None else leaving, values
    return None, move if leaving is None else leaving, values


def bottom_eigenspace(loss, start, tolerance: float = 1e-8):
    """(eigenvalues, orthonormal basis of λmin's eigenspace) of the dense Hessian at ``start`` (float64 oracle)."""
    import jax
    from jax.flatten_util import ravel_pytree

    flat0, unravel = ravel_pytree(start)
    eigenvalues, vectors = np.linalg.eigh(np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat0)))
    scale = max(1.0, float(np.abs(eigenvalues).max()))
    return eigenvalues, vectors[:, eigenvalues <= eigenvalues[0] + tolerance * scale]


def projection(direction: np.ndarray, basis: np.ndarray) -> float:
    """‖Pd‖/‖d‖ for P the orthogonal projector onto span(basis)."""
    return float(np.linalg.norm(basis.T @ direction) / np.linalg.norm(direction))


def run(config: dict, out_dir, progress: bool = True):
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from jaxnn import curvature
    from jaxnn.experiments import Result

    measured, checks, reported, curves = {}, [], [], {}
    seeds, floor = config["noise_seeds"], config["min_projection"]
    with jax.enable_x64(True):
        for name, (loss, start) in _problems(config).items():
            start = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), start)
            op = curvature.hessian(loss, start, None)
            critical = curvature.classify_critical_point(op, num_iters=op.num_params, progress=False,
                                                         key=jax.random.PRNGKey(0))
            eigenvalues, basis = bottom_eigenspace(loss, start)
            n, k = len(eigenvalues), basis.shape[1]
            escape = None if critical.escape_direction is None else np.asarray(
                ravel_pytree(critical.escape_direction)[0])
            engine_projection = projection(escape, basis) if escape is not None else 0.0
            plain_steps, plain_move, _ = _descend(loss, start, config, 0.0, jax.random.PRNGKey(0))
            noisy_steps, projections = [], []
            for seed in seeds:
                steps, leaving, values = _descend(loss, start, config, config["noise"], jax.random.PRNGKey(seed))
                noisy_steps.append(steps)
                projections.append(projection(leaving, basis))
                if seed == seeds[0]:
                    curves[name] = {f"noisy GD (seed {seed})": values}
            if escape is not None:
                kicked = jax.tree.map(lambda p, d: p + 1e-3 * d, start, critical.escape_direction)
                kick_steps, _, kick_values = _descend(loss, kicked, config, 0.0, jax.random.PRNGKey(0))
                curves[name]["one step along the bottom eigenvector, then GD"] = kick_values
            else:
                kick_steps = None
            escaped = [s for s in noisy_steps if s is not None]
            measured[name] = {
                "kind": critical.kind, "gradient_norm": critical.gradient_norm, "lambda_min": critical.lambda_min,
                "lambda_max": critical.lambda_max, "dense_eigenvalues": eigenvalues.tolist(),
                "bottom_multiplicity": k, "engine_direction_projection": engine_projection,
                "plain_gd_moved": float(np.linalg.norm(plain_move)), "noise_seeds": seeds,
                "noisy_gd_escape_steps": noisy_steps, "leaving_direction_projection": projections,
                "eigenvector_step_escape_steps": kick_steps}
            steps_text = (f"{np.mean(escaped):.0f} ± {np.std(escaped):.0f} steps" if escaped else "none")
            checks += [
                (f"{name}: the engine classifies the start as a saddle (dense eigh: λ ∈ [{eigenvalues[0]:.4g}, "
                 f"{eigenvalues[-1]:.4g}])", f"{critical.kind}, engine λ ∈ [{critical.lambda_min:.4g}, "
                 f"{critical.lambda_max:.4g}], |∇| = {critical.gradient_norm:.1e}",
                 critical.kind == "saddle" and abs(critical.lambda_min - eigenvalues[0]) < 1e-8 * abs(eigenvalues[0])),
                (f"{name}: the engine's escape direction lies in the bottom eigenspace (multiplicity {k} of {n})",
                 f"projection norm {engine_projection:.6f}", engine_projection > 1 - 1e-6),
                (f"{name}: noisy GD (noise {config['noise']:g}) escapes in each of {len(seeds)} seeds",
                 f"{len(escaped)}/{len(seeds)} escaped, {steps_text}", len(escaped) == len(seeds)),
                (f"{name}: noisy GD leaves along the bottom eigenspace (projection norm of the displacement at radius "
                 f"{config['direction_radius']:g} ≥ {floor:g} in each seed; a random direction: √(k/n) = "
                 f"{np.sqrt(k / n):.2f})", "projection norms " + ", ".join(f"{p:.3f}" for p in projections),
                 min(projections) >= floor),
                (f"{name}: a step of 1e-3 along the escape direction, then plain GD, escapes",
                 f"in {kick_steps} steps" if kick_steps else f"not within {config['max_steps']}",
                 kick_steps is not None),
            ]
            reported.append((f"{name}: plain GD started at the saddle (zero gradient: stays by construction)",
                             f"moved {np.linalg.norm(plain_move):.1e}"))
    _plot(curves, out_dir / "saddle_points.png")
    return Result(measured=measured, checks=checks, reported=reported, figures=["saddle_points.png"],
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
