"""Loss functions (cs231n "Linear classification"; CS7643 "loss functions").

1. A sigmoid unit σ(wᵀx + b) started saturated on the wrong side: with binary cross-entropy the gradient is
   x(σ − y), with no σ′ factor, so gradient descent leaves the saturated start quickly; with the squared error the
   gradient carries σ′(z) ≈ 0 and it stalls. Steps to reach 90% accuracy, same learning rate.
2. The notes' worked values: the multiclass SVM (hinge, Δ = 1) on the three-class example gives 2.9, 0 and 12.9
   (mean 5.27); softmax cross-entropy on the same scores, in natural log (the notes' p = 0.8 example: −ln 0.8 =
   0.223).
"""

from __future__ import annotations

import math

import numpy as np

CLAIM = ("From a saturated sigmoid, cross-entropy learns in fewer steps than the squared error (no σ′ factor in its "
         "gradient); the notes' worked hinge losses are 2.9, 0, 12.9 (mean 5.27) and cross-entropy uses natural log.")
CONFIG = {"examples": 500, "features": 10, "saturation": 8.0, "lr": 0.5, "max_steps": 5000, "target_accuracy": 0.9,
          "seed": 0}
SMOKE = {"examples": 200, "max_steps": 3000}
SCORES = np.array([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]])  # rows: the cat, car and frog images
LABELS = np.array([0, 1, 2])


def weston_watkins_hinge(scores, labels, delta=1.0):
    """The notes' multiclass SVM: Σ_{j≠y} max(0, s_j − s_y + Δ) per example."""
    correct = scores[np.arange(len(labels)), labels][:, None]
    margins = np.maximum(0.0, scores - correct + delta)
    margins[np.arange(len(labels)), labels] = 0.0
    return margins.sum(axis=1)


def steps_to_accuracy(loss: str, config: dict) -> tuple[int, list]:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(config["seed"])
    x = rng.normal(size=(config["examples"], config["features"]))
    w_true = rng.normal(size=config["features"])
    y = (x @ w_true > 0).astype(np.float64)
    # Saturated on the wrong side: the start is −saturation × the true direction.
    w0 = -config["saturation"] * w_true / np.linalg.norm(w_true)

    def objective(w, x, y):
        z = x @ w
        if loss == "cross-entropy":
            return jnp.mean(jnp.logaddexp(0.0, z) - y * z)  # −y log σ − (1−y) log(1−σ), stable
        return jnp.mean(0.5 * (jax.nn.sigmoid(z) - y) ** 2)

    step = jax.jit(lambda w, x, y: w - config["lr"] * jax.grad(objective)(w, x, y))
    accuracy = jax.jit(lambda w, x, y: jnp.mean((x @ w > 0) == (y > 0.5)))
    w, xs, ys, history = jnp.asarray(w0), jnp.asarray(x), jnp.asarray(y), []
    for t in range(1, config["max_steps"] + 1):
        w = step(w, xs, ys)
        history.append(float(accuracy(w, xs, ys)))
        if history[-1] >= config["target_accuracy"]:
            return t, history
    return config["max_steps"] + 1, history


def run(config: dict, out_dir, progress: bool = True):
    import jax

    from jaxnn import losses
    from jaxnn.experiments import Result

    with jax.enable_x64(True):
        ce_steps, ce_history = steps_to_accuracy("cross-entropy", config)
        mse_steps, mse_history = steps_to_accuracy("squared error", config)
        cross_entropy = np.asarray(losses.softmax_cross_entropy(jax.numpy.asarray(SCORES), LABELS))
        crammer_singer = np.asarray(losses.multiclass_hinge(jax.numpy.asarray(SCORES), LABELS))
    hinge = weston_watkins_hinge(SCORES, LABELS)
    by_hand = -np.log(np.exp(SCORES[np.arange(3), LABELS]) / np.exp(SCORES).sum(axis=1))
    limit = config["max_steps"]
    checks = [
        (f"cross-entropy reaches {config['target_accuracy']:.0%} in fewer steps than the squared error",
         f"{ce_steps} vs {mse_steps if mse_steps <= limit else 'not within ' + str(limit)}", ce_steps < mse_steps),
        ("multiclass SVM on the notes' scores: 2.9, 0, 12.9, mean 5.27", ", ".join(f"{v:.1f}" for v in hinge)
         + f", mean {hinge.mean():.2f}", np.allclose(hinge, [2.9, 0.0, 12.9]) and round(hinge.mean(), 2) == 5.27),
        ("softmax cross-entropy uses natural log (−ln 0.8 = 0.223; optax equals the hand formula)",
         f"{-math.log(0.8):.3f}; losses {', '.join(f'{v:.3f}' for v in cross_entropy)}",
         round(-math.log(0.8), 3) == 0.223 and np.allclose(cross_entropy, by_hand, rtol=1e-12)),
    ]
    _plot(ce_history, mse_history, config, out_dir / "losses.png")
    return Result(
        measured={"cross_entropy_steps": ce_steps, "squared_error_steps": mse_steps, "hinge": hinge.tolist(),
                  "softmax_cross_entropy": cross_entropy.tolist(), "crammer_singer_hinge": crammer_singer.tolist()},
        checks=checks, figures=["losses.png"],
        data=f"{config['examples']} linearly separable Gaussian examples in {config['features']} dimensions; the "
             "notes' three-image score table",
        corrections=["jaxnn's (optax's) multiclass_hinge is the Crammer-Singer form max_j(s_j + 1[j≠y]) − s_y, not "
                     "the notes' sum over j ≠ y: on the same scores it gives "
                     f"{', '.join(f'{v:.1f}' for v in crammer_singer)} (mean {crammer_singer.mean():.2f}).",
                     "Cross-entropy values in the notes' examples are natural logs (−ln 0.8 = 0.223, not 0.097)."])


def _plot(ce, mse, config, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(range(1, len(ce) + 1), ce, label="binary cross-entropy")
    ax.plot(range(1, len(mse) + 1), mse, label="squared error on σ")
    ax.axhline(config["target_accuracy"], color="k", linestyle="--", linewidth=1)
    ax.set_xscale("log"), ax.set_xlabel("gradient-descent step"), ax.set_ylabel("training accuracy")
    ax.set_title(f"sigmoid started saturated (|z| ≈ {config['saturation']:g}), lr {config['lr']}")
    ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
