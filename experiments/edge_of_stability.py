"""Edge of stability (Cohen et al. 2021) on the embedded digits: full-batch gradient descent with step size η.

The top Hessian eigenvalue (sharpness) rises during training until it reaches 2/η, the stability limit of
gradient descent on a quadratic, and then hovers there while the loss keeps decreasing non-monotonically.
jaxnn's HessianCallback records λmax every few steps into the run's metrics; this script trains one model per
step size and writes ``results/edge_of_stability/{results.json, sharpness.png}``.

    python experiments/edge_of_stability.py            # smoke size unless JAXNN_FULL=1
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import jax
import numpy as np
import optax

import jaxnn

FULL = dict(num_examples=1000, steps=1500, every=25, lrs=(0.05, 0.1, 0.2), width=64)
SMOKE_SIZE = dict(num_examples=128, steps=60, every=10, lrs=(0.1, 0.2), width=8)
SMOKE = SMOKE_SIZE  # the experiment frame's names (jaxnn experiment edge_of_stability)
CONFIG = FULL
CLAIM = ("Under full-batch gradient descent the sharpness λmax rises to 2/η and hovers there "
         "(Cohen et al. 2021): the median λmax·η/2 over the second half of training is 1 within 10%.")


def run(config, out_dir="results/edge_of_stability", progress: bool = True):
    """The experiment frame's entry: train, then judge every step size by its median λmax·η/2 over the second half
    of training (agrees within ±10% of 1)."""
    from jaxnn.experiment import Result

    results = measure(pathlib.Path(out_dir), size=dict(config), progress=progress)
    checks = []
    for r in results["runs"]:
        half = r["lambda_max"][len(r["lambda_max"]) // 2:]
        ratio = float(np.median(half)) * r["lr"] / 2
        checks.append((f"η = {r['lr']}: median λmax·η/2 over the second half ≈ 1", f"{ratio:.3f}",
                       abs(ratio - 1) <= 0.1))
    return Result(measured={"runs": results["runs"]}, checks=checks, figures=["sharpness.png"],
                  data=f"embedded digits, {results['num_train']} training examples, tanh MLP width "
                       f"{config['width']}, softmax cross-entropy")


def measure(out_dir: str | pathlib.Path = "results/edge_of_stability", *, full: bool | None = None,
            progress: bool = True, size: dict | None = None) -> dict:
    if size is None:
        full = os.environ.get("JAXNN_FULL") == "1" if full is None else full
        size = FULL if full else SMOKE_SIZE
    full = size == FULL
    ds = jaxnn.data.load_dataset("digits", seed=0, limit=size["num_examples"] * 10 // 7, val_fraction=0.1,
                                 test_fraction=0.2)
    n = len(ds.train)
    full_batch = (jax.numpy.asarray(ds.train.x), jax.numpy.asarray(ds.train.y))
    results = {"size": "full" if full else "smoke", "num_train": n, "runs": []}
    for lr in size["lrs"]:
        model = jaxnn.models.get_model("mlp", num_classes=10, width=size["width"], depth=2, activation="tanh")
        state = jaxnn.train.create_train_state(model, optax.sgd(lr), ds.input_shape, jax.random.PRNGKey(0))
        callback = jaxnn.curvature.HessianCallback(every_k_steps=size["every"], k=1, batch=full_batch)
        fit = jaxnn.train.fit(state, ds, batch_size=n, num_steps=size["steps"], log_every=size["every"],
                              eval_every=size["steps"], callbacks=[callback], progress=progress)
        losses = {r["step"]: r["loss"] for r in fit.history if "loss" in r}
        results["runs"].append({
            "lr": lr, "threshold": 2.0 / lr,
            "steps": [h["step"] for h in callback.history],
            "lambda_max": [h["lambda_max"] for h in callback.history],
            "loss": [losses.get(h["step"]) for h in callback.history],
            "final_val_accuracy": fit.history[-1].get("val_accuracy"),
            "max_sharpness_over_threshold": max(h["lambda_max"] for h in callback.history) / (2.0 / lr),
        })
        results.setdefault("final_params", []).append(fit.state.params)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final_params = results.pop("final_params")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out_dir / "sharpness.png")
    results["final_params"] = final_params
    results["full_batch"] = full_batch
    return results


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r, color in zip(results["runs"], plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        ax1.plot(r["steps"], r["lambda_max"], "o-", color=color, markersize=3, label=f"η={r['lr']}")
        ax1.axhline(r["threshold"], color=color, linestyle="--", linewidth=1)
        ax2.plot(r["steps"], r["loss"], "-", color=color, label=f"η={r['lr']}")
    ax1.set_xlabel("step"), ax1.set_ylabel("λmax (sharpness); dashed: 2/η"), ax1.legend(), ax1.grid(alpha=0.3)
    ax2.set_xlabel("step"), ax2.set_ylabel("train loss"), ax2.set_yscale("log"), ax2.legend(), ax2.grid(alpha=0.3)
    fig.suptitle(f"Edge of stability: full-batch GD on digits ({results['num_train']} examples, {results['size']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/edge_of_stability")
    parser.add_argument("--full", action="store_true", help="full size (same as JAXNN_FULL=1)")
    args = parser.parse_args()
    out = measure(args.out, full=args.full or None)
    for r in out["runs"]:
        print(f"lr={r['lr']}: 2/lr={r['threshold']:.2f}, max lambda_max={max(r['lambda_max']):.2f} "
              f"({r['max_sharpness_over_threshold']:.2f} of the threshold), val acc {r['final_val_accuracy']:.3f}")
