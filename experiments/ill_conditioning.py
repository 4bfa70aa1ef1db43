"""Ill-conditioning during real training (Goodfellow et al., "Deep Learning" §8.2.1; CS7643 "the Hessian and
optimisation").

An MLP trains on the embedded digits with plain SGD. Every few steps, on a fixed batch, the curvature engine gives
g = ∇L and gᵀHg; the second-order model predicts that the gradient step θ − εg changes the loss by
−ε gᵀg + ½ ε² gᵀHg, and the loss after that step is measured. Claims:

1. the quadratic model predicts the actual change of the loss (correlation across training, median relative error);
2. a step is predicted to *increase* the loss when ε > 2 gᵀg / gᵀHg — such steps do increase it;
3. the gradient norm does not shrink as training goes on — it grows while the loss falls: training does not end
   at a critical point.
"""

from __future__ import annotations

import numpy as np

CLAIM = ("During training the second-order model −εgᵀg + ½ε²gᵀHg predicts the loss change of a gradient step; steps "
         "with ε > 2gᵀg/gᵀHg raise the loss; the gradient norm grows while the loss falls (no critical point).")
CONFIG = {"width": 128, "depth": 2, "lr": 0.1, "steps": 1500, "every": 25, "batch_size": 64, "analysis_examples": 512,
          "seed": 0}
SMOKE = {"width": 32, "steps": 150, "every": 10}


class QuadraticModelCallback:
    """Every ``every`` steps: g, gᵀg, gᵀHg on ``batch``; predicted and actual loss change of the step θ − lr·g."""

    def __init__(self, every: int, lr: float, batch):
        self.every, self.lr, self.batch, self.rows = every, lr, batch, []

    def on_step_end(self, ctx) -> None:
        import jax

        from jaxnn import curvature

        if int(ctx.step) % self.every:
            return
        loss_fn, params = ctx.loss_fn(), ctx.state.params
        op = curvature.hessian(loss_fn, params, self.batch)
        loss, gradient = op.loss_and_gradient()
        loss = float(loss)
        along = curvature.gradient_curvature(op, gradient=gradient)
        stepped = jax.tree.map(lambda p, g: p - self.lr * g, params, gradient)
        actual = float(loss_fn(stepped, self.batch)) - loss
        self.rows.append({"step": int(ctx.step), "loss": loss, "gradient_norm": along.gradient_norm,
                          "gHg": along.gradient_curvature_product,
                          "predicted": float(curvature.predicted_loss_change(along, self.lr)), "actual": actual,
                          "threshold": float(2 * along.gradient_norm**2 / along.gradient_curvature_product)
                          if along.gradient_curvature_product > 0 else float("inf")})


def run(config: dict, out_dir, progress: bool = True):
    import jax
    import jax.numpy as jnp
    import optax

    from jaxnn import data as data_lib, models
    from jaxnn.experiment import Result
    from jaxnn.train import create_train_state, fit

    digits = data_lib.load_dataset("digits", seed=0)
    count = min(config["analysis_examples"], len(digits.train))
    batch = (jnp.asarray(digits.train.x[:count]), jnp.asarray(digits.train.y[:count]))
    model = models.get_model("mlp", num_classes=10, width=config["width"], depth=config["depth"])
    state = create_train_state(model, optax.sgd(config["lr"]), digits.input_shape, jax.random.PRNGKey(config["seed"]))
    callback = QuadraticModelCallback(config["every"], config["lr"], batch)
    fit(state, digits, batch_size=config["batch_size"], num_steps=config["steps"], log_every=config["every"],
        eval_every=config["steps"], callbacks=[callback], progress=progress)
    rows = callback.rows
    predicted = np.asarray([r["predicted"] for r in rows])
    actual = np.asarray([r["actual"] for r in rows])
    correlation = float(np.corrcoef(predicted, actual)[0, 1])
    relative = float(np.median(np.abs(predicted - actual) / np.abs(actual)))
    above = [r for r in rows if config["lr"] > r["threshold"]]
    norms = np.asarray([r["gradient_norm"] for r in rows])
    losses = np.asarray([r["loss"] for r in rows])
    quarter = max(1, len(rows) // 4)
    norm_growth = float(np.median(norms[-quarter:]) / np.median(norms[:quarter]))
    loss_ratio = float(np.median(losses[-quarter:]) / np.median(losses[:quarter]))
    checks = [
        ("the quadratic model's predicted loss change correlates with the actual one", f"r = {correlation:.3f}",
         correlation > 0.9),
        ("… and is close to it", f"median relative error {relative:.1e}", relative < 0.25),
        ("the gradient norm grows while the loss falls (last vs first quarter of training)",
         f"‖g‖ ×{norm_growth:.2f}, loss ×{loss_ratio:.2f}", norm_growth > 1 and loss_ratio < 0.5),
    ]
    if above:
        raised = sum(r["actual"] > 0 for r in above)
        checks.insert(2, (f"steps with ε > 2gᵀg/gᵀHg ({len(above)} of {len(rows)}) raise the loss",
                          f"{raised} of {len(above)} did", raised == len(above)))
    _plot(rows, config, out_dir / "ill_conditioning.png")
    return Result(measured={"rows": rows, "correlation": correlation, "median_relative_error": relative,
                            "fraction_above_threshold": len(above) / len(rows), "gradient_norm_growth": norm_growth,
                            "loss_ratio": loss_ratio},
                  checks=checks, figures=["ill_conditioning.png"],
                  data=f"embedded digits; MLP width {config['width']} depth {config['depth']}, SGD lr {config['lr']}, "
                       f"batch {config['batch_size']}; curvature on a fixed batch of {count}")


def _plot(rows, config, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4))
    FigureCanvasAgg(fig)
    left, middle, right = fig.subplots(1, 3)
    predicted, actual = [r["predicted"] for r in rows], [r["actual"] for r in rows]
    left.plot(predicted, actual, "o", markersize=3)
    low, high = min(predicted + actual), max(predicted + actual)
    left.plot([low, high], [low, high], "k--", linewidth=1)
    left.set_xlabel("predicted change −εgᵀg + ½ε²gᵀHg"), left.set_ylabel("actual change"), left.grid(alpha=0.3)
    steps = [r["step"] for r in rows]
    middle.plot(steps, [r["threshold"] for r in rows], label="2gᵀg / gᵀHg")
    middle.axhline(config["lr"], color="k", linestyle="--", label=f"ε = {config['lr']}")
    middle.set_yscale("log"), middle.set_xlabel("step"), middle.legend(), middle.grid(alpha=0.3)
    right.plot(steps, [r["gradient_norm"] for r in rows], label="‖g‖")
    right.plot(steps, [r["loss"] for r in rows], label="loss")
    right.set_yscale("log"), right.set_xlabel("step"), right.legend(), right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
