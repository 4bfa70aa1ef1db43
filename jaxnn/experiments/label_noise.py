"""Label noise (the "noisy labels" post; Rolnick et al. 2017, "Deep learning is robust to massive label noise").

A LeNet-style CNN learns MNIST from labels of which each was replaced, with probability p, by a random *other* class
(symmetric noise, drawn once per training example: :func:`jaxnn.data.noisy_labels`); the test labels are clean.
The post reports ~2.3% test error at p = 0.5 and a breakdown above p ≈ 0.83. Theory: the true class keeps frequency
1 − p and every other class gets p/(C − 1), so the true class stays the most frequent label — and a learner that
fits the label distribution stays right — up to p = (C − 1)/C = 0.9; above it, the most frequent label is wrong.

Every (p, seed) is a member of one population (``train_population`` with a ``label_noise`` column): one program,
one data stream, each member its own noisy labels and initialisation.
"""

from __future__ import annotations

import numpy as np

CLAIM = ("Training on MNIST labels of which a fraction p was replaced by random other classes still reaches ~2.3% "
         "clean test error at p = 0.5, and breaks down above p ≈ 0.83 (theory: the true class stops being the most "
         "frequent label at p = (C−1)/C = 0.9).")
CONFIG = {"data_dir": "", "limit": 0, "noise": [0.0, 0.2, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95],
          "seeds": 3, "steps": 1000, "batch_size": 64, "lr": 0.02, "momentum": 0.9, "split_seed": 0}
SMOKE = {"limit": 1200, "noise": [0.0, 0.5, 0.95], "seeds": 1, "steps": 40}
POST_ERROR_AT_HALF, POST_BREAKDOWN = 0.023, 0.83


def breakdown_point(noise, error, level: float = 0.5) -> float:
    """The smallest p at which the mean test error reaches ``level``, linearly interpolated between the grid
    points (inf when it never does)."""
    noise, error = np.asarray(noise, float), np.asarray(error, float)
    above = np.nonzero(error >= level)[0]
    if not len(above):
        return float("inf")
    i = above[0]
    if i == 0:
        return float(noise[0])
    return float(noise[i - 1] + (level - error[i - 1]) * (noise[i] - noise[i - 1]) / (error[i] - error[i - 1]))


def run(config: dict, out_dir, progress: bool = True):
    import optax

    from jaxnn import models
    from jaxnn.experiments import Result, data_folder, mnist
    from jaxnn.train.population import population_grid, train_population

    dataset = mnist(config, "label_noise", seed=config["split_seed"], limit=config["limit"] or None)
    classes = dataset.num_classes
    members = population_grid(label_noise=list(config["noise"]), seed=list(range(config["seeds"])))
    model = models.get_model("lenet", num_classes=classes)
    result = train_population(model, optax.sgd, dataset, members=members, num_steps=config["steps"],
                              batch_size=config["batch_size"],
                              optimizer_kwargs={"learning_rate": config["lr"], "momentum": config["momentum"]},
                              progress=progress)
    noise = np.asarray(config["noise"], float)
    errors = np.asarray([[1 - row["test_accuracy"] for row in result.members if row["label_noise"] == p]
                         for p in noise])  # (noise levels, seeds)
    train_fit = np.asarray([[np.nanmean(result.accuracies[-50:, i]) for i, row in enumerate(result.members)
                             if row["label_noise"] == p] for p in noise])  # accuracy on the labels it trained on
    mean, spread = errors.mean(axis=1), errors.std(axis=1)
    threshold = (classes - 1) / classes
    breakdown = breakdown_point(noise, mean)
    rows = [{"p": float(p), "test_error": float(m), "test_error_std": float(s), "seeds": errors.shape[1],
             "fit_of_noisy_labels": float(f)} for p, m, s, f in zip(noise, mean, spread, train_fit.mean(axis=1))]
    checks = []
    if 0.5 in noise:
        half = float(mean[list(noise).index(0.5)])
        clean = float(mean[list(noise).index(0.0)]) if 0.0 in noise else float("nan")
        checks.append(("at p = 0.5 the clean test error stays near the post's 2.3% (within 2 points)",
                       f"{100 * half:.2f}% (p = 0: {100 * clean:.2f}%)", abs(half - POST_ERROR_AT_HALF) <= 0.02))
    checks.append(("training breaks down (test error ≥ 50%) near the post's p ≈ 0.83 (within 0.05)",
                   f"p* = {breakdown:.3f}; the theory's (C−1)/C = {threshold:.2f}",
                   abs(breakdown - POST_BREAKDOWN) <= 0.05))
    beyond = noise > threshold + 1e-9
    if beyond.any():
        worst = float(mean[beyond].min())
        checks.append((f"above p = (C−1)/C = {threshold:.2f} the most frequent label is wrong: test error at or "
                       f"above chance ({100 * threshold:.0f}%)", f"{100 * worst:.1f}% at p = {noise[beyond][0]:g}",
                       worst >= threshold - 0.02))
    _plot(noise, errors, threshold, breakdown, result.losses, config, out_dir / "label_noise.png")
    epochs = config["steps"] * config["batch_size"] / len(dataset.train)
    memorised = [f"p = {r['p']:g}: {r['fit_of_noisy_labels']:.2f} vs 1 − p = {1 - r['p']:.2f}" for r in rows
                 if 0 < r["p"] < threshold and r["fit_of_noisy_labels"] > 1 - r["p"] + 0.01]
    why = (f" Differences from the post: {len(dataset.train)} training images instead of 60,000 (clean test error "
           f"here {100 * mean[0]:.1f}% at p = {noise[0]:g}) and a fixed budget without early stopping")
    if memorised:
        why += (f", in which the members fit their noisy training labels beyond the share of true labels "
                f"({'; '.join(memorised)}): they start to memorise the noise")
    why += "."
    return Result(
        measured={"rows": rows, "breakdown": breakdown, "theoretical_threshold": threshold,
                  "post_breakdown": POST_BREAKDOWN, "train_examples": len(dataset.train),
                  "test_examples": len(dataset.test), "epochs": epochs, "compile_s": result.compile_s,
                  "train_s": result.run_s},
        checks=checks, figures=["label_noise.png"],
        data=(f"MNIST from {data_folder(config, 'mnist')} ({dataset.info.get('layout', '')}): {len(dataset.train)} training "
              f"images with noisy labels, {len(dataset.test)} clean test images; LeNet (6-16 conv, 120-84 dense), "
              f"SGD lr {config['lr']} momentum {config['momentum']}, batch {config['batch_size']}, {config['steps']} "
              f"steps ({epochs:.1f} epochs), no early stopping; {config['seeds']} seed(s) per p, all in one "
              f"population.{why}"),
    )


def _plot(noise, errors, threshold, breakdown, losses, config, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.errorbar(noise, 100 * errors.mean(axis=1), yerr=100 * errors.std(axis=1), marker="o", capsize=3,
                  label=f"jaxnn LeNet ({errors.shape[1]} seed(s), ±1 sd)")
    left.plot(noise, 100 * errors, ".", color="C0", alpha=0.4)
    left.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"(C−1)/C = {threshold:.2f}")
    left.axvline(POST_BREAKDOWN, color="C3", linestyle=":", label=f"post's breakdown {POST_BREAKDOWN}")
    if np.isfinite(breakdown):
        left.axvline(breakdown, color="C2", linestyle="-.", linewidth=1, label=f"measured p* = {breakdown:.3f}")
    left.axhline(100 * threshold, color="gray", linewidth=0.8, label="chance (90%)")
    left.set_xlabel("label noise p"), left.set_ylabel("clean test error (%)"), left.set_ylim(0, 100)
    left.legend(fontsize=8), left.grid(alpha=0.3)
    per_level = losses.reshape(losses.shape[0], len(noise), -1)
    window = max(1, losses.shape[0] // 50)
    kernel = np.ones(window) / window
    for i, p in enumerate(noise):
        curve = np.convolve(np.nanmean(per_level[:, i], axis=1), kernel, mode="valid")
        right.plot(np.arange(len(curve)) + window, curve, label=f"p = {p:g}")
    right.set_xlabel("step"), right.set_ylabel(f"training loss on the noisy labels (mean over {window} steps)")
    right.legend(fontsize=8, ncol=2), right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
