"""Sharpness vs learning rate and batch size (Keskar et al. 2017, "On large-batch training for deep learning:
generalization gap and sharp minima"; Jastrzębski et al. 2018, "Three factors influencing minima in SGD").

SGD (no momentum) on the embedded digits, an MLP, every (η, seed) of a grid trained for the same number of epochs as
one population per batch size B (the batch size fixes the shapes of the compiled step, so it cannot vary inside a
population; η and the seed can). At the end, λmax of every member on a fixed set of training examples
(``population_sharpness``: one vmapped Lanczos) and the clean test accuracy. The papers' claims:

1. the sharpness of the minimum SGD finds falls as the ratio η/B grows (Jastrzębski et al.);
2. at a fixed η, large batches end in sharper minima (Keskar et al.) ...
3. ... and generalise worse;
4. (stability) SGD does not settle where λmax exceeds the gradient-descent limit 2/η.
Data: the embedded digits by default (``data``: "digits", "mnist" or "cifar10" from ``data_dir``).
"""

from __future__ import annotations

import numpy as np

CLAIM = ("The sharpness λmax of the minimum SGD reaches falls as η/B grows; at a fixed learning rate large batches "
         "end sharper and generalise worse (Keskar et al. 2017; Jastrzębski et al. 2018); no member ends above 2/η.")
CONFIG = {"width": 128, "depth": 2, "lrs": [0.01, 0.03, 0.1, 0.3], "batch_sizes": [16, 64, 256], "seeds": 2,
          "epochs": 40, "analysis_examples": 1024, "split_seed": 0, "data": "digits",
          "data_dir": ""}
SMOKE = {"width": 16, "lrs": [0.03, 0.3], "batch_sizes": [16, 128], "seeds": 1, "epochs": 2, "analysis_examples": 256}


def rank_correlation(a, b) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks (no ties expected in measured floats)."""
    ranks = [np.argsort(np.argsort(np.asarray(v, float))).astype(float) for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def run(config: dict, out_dir, progress: bool = True):
    import jax.numpy as jnp
    import optax

    from jaxnn import curvature, models
    from jaxnn.experiments import Result, image_data
    from jaxnn.train.population import population_grid, train_population

    digits = image_data(config, "sharpness_lr_batch", seed=config["split_seed"])
    count = min(config["analysis_examples"], len(digits.train))
    batch = (jnp.asarray(digits.train.x[:count]), jnp.asarray(digits.train.y[:count]))
    model = models.get_model("mlp", num_classes=10, width=config["width"], depth=config["depth"])
    rows = []
    for size in config["batch_sizes"]:
        steps = max(1, round(config["epochs"] * len(digits.train) / size))
        members = population_grid(learning_rate=list(config["lrs"]), seed=list(range(config["seeds"])))
        result = train_population(model, optax.sgd, digits, members=members, num_steps=steps, batch_size=size,
                                  progress=progress)
        sharpness = curvature.population_sharpness(result.state, batch)[:, 0]
        for member, value in zip(result.members, sharpness):
            rows.append({"batch_size": size, "learning_rate": member["learning_rate"], "seed": member["seed"],
                         "steps": steps, "lambda_max": float(value), "ratio": member["learning_rate"] / size,
                         "test_accuracy": member["test_accuracy"], "train_loss": member["train_loss"],
                         "status": member["status"]})
    trained = [r for r in rows if r["status"] == "completed"]
    rho = rank_correlation([r["ratio"] for r in trained], [r["lambda_max"] for r in trained])
    small, large = min(config["batch_sizes"]), max(config["batch_sizes"])

    def mean(values):
        return float(np.mean(values)) if values else float("nan")

    per_lr = []
    for lr in config["lrs"]:
        at = {b: [r for r in trained if r["learning_rate"] == lr and r["batch_size"] == b] for b in (small, large)}
        if at[small] and at[large]:
            per_lr.append((lr, mean([r["lambda_max"] for r in at[small]]), mean([r["lambda_max"] for r in at[large]]),
                           mean([r["test_accuracy"] for r in at[small]]),
                           mean([r["test_accuracy"] for r in at[large]])))
    sharper = sum(big > little for _, little, big, _, _ in per_lr)
    worse = sum(acc_big < acc_little for *_, acc_little, acc_big in per_lr)
    above = [r for r in trained if r["lambda_max"] > 2 / r["learning_rate"]]
    checks = [
        ("λmax falls as η/B grows (Spearman ρ over the trained members ≤ −0.5)", f"ρ = {rho:.2f} ({len(trained)} "
         f"members)", rho <= -0.5),
        (f"at a fixed η, batch {large} ends sharper than batch {small}",
         f"{sharper} of {len(per_lr)} learning rates; " + ", ".join(f"η={lr:g}: {a:.3g} → {b:.3g}"
                                                                   for lr, a, b, _, _ in per_lr),
         bool(per_lr) and sharper == len(per_lr)),
        (f"… and generalises worse (mean test accuracy, batch {large} vs {small})",
         f"{worse} of {len(per_lr)} learning rates; " + ", ".join(f"η={lr:g}: {100 * a:.1f}% → {100 * b:.1f}%"
                                                                  for lr, _, _, a, b in per_lr),
         bool(per_lr) and worse == len(per_lr)),
        ("no trained member ends with λmax above the gradient-descent limit 2/η",
         f"{len(above)} of {len(trained)} above" + (f" (largest λmax·η/2 = "
                                                    f"{max(r['lambda_max'] * r['learning_rate'] / 2 for r in above):.2f})"
                                                    if above else ""), not above),
    ]
    _plot(rows, config, out_dir / "sharpness_lr_batch.png")
    diverged = len(rows) - len(trained)
    largest = [r["train_loss"] for r in trained if r["batch_size"] == large]
    return Result(measured={"rows": rows, "spearman": rho, "diverged": diverged},
                  checks=checks, figures=["sharpness_lr_batch.png"],
                  data=(f"{config['data']} ({len(digits.train)} training examples); MLP width {config['width']} depth "
                        f"{config['depth']}, plain SGD, {config['epochs']} epochs at every batch size, "
                        f"{config['seeds']} seed(s); λmax on {count} training examples; {diverged} member(s) "
                        f"diverged and are left out of the checks. Equal epochs (as Keskar et al.) give the largest "
                        f"batch the fewest steps ({max(1, round(config['epochs'] * len(digits.train) / large))}); "
                        f"its final training loss spans "
                        + (f"{min(largest):.3g}–{max(largest):.3g}" if largest else "nothing (all diverged)")
                        + " (the smallest batch's: "
                        + ", ".join(f"{r['train_loss']:.3g}" for r in trained if r["batch_size"] == small)
                        + ")"))


def _plot(rows, config, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    markers = "osD^v<>"
    for i, size in enumerate(config["batch_sizes"]):
        mine = [r for r in rows if r["batch_size"] == size and r["status"] == "completed"]
        ratio = [r["ratio"] for r in mine]
        left.scatter(ratio, [r["lambda_max"] for r in mine], marker=markers[i % len(markers)], color=f"C{i}",
                     label=f"B = {size}")
        right.scatter(ratio, [100 * r["test_accuracy"] for r in mine], marker=markers[i % len(markers)],
                      color=f"C{i}", label=f"B = {size}")
    for lr in config["lrs"]:
        left.axhline(2 / lr, color="gray", linestyle=":", linewidth=0.8)
    left.set_xscale("log"), left.set_yscale("log"), left.set_xlabel("η / B"), left.set_ylabel("final λmax")
    left.set_title("sharpness at the end of training (dotted: 2/η)")
    right.set_xscale("log"), right.set_xlabel("η / B"), right.set_ylabel("test accuracy (%)")
    right.set_title(f"after {config['epochs']} epochs")
    for ax in (left, right):
        ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
