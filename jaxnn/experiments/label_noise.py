"""Label noise (the notes' post on Guan, Gulshan, Dai & Hinton 2017, "Who said what: modeling individual labelers
improves classification", arXiv 1703.08774).

The paper's motivating experiment: an MNIST CNN with two convolutional layers and one fully connected layer, trained
by SGD in minibatches of 200 on labels of which a fraction p was corrupted, reaches 2.29% test error at p = 0.5 and
fails above p ≈ 0.83 (the notes' post: "minibatches of 200 samples instead of the entire training set of 50,000
examples").
Here the same architecture (conv-pool-conv-pool-dense: :class:`jaxnn.models.LeNet` without hidden dense layers)
learns MNIST from labels of which each was replaced, with probability p, by a random *other* class (symmetric noise,
drawn once per training example: :func:`jaxnn.data.noisy_labels`); the test labels are clean. Theory: the true class
keeps frequency 1 − p and every other class gets p/(C − 1), so the true class stays the most frequent label — and a
learner that fits the label distribution stays right — up to p = (C − 1)/C = 0.9; above it, the most frequent label
is wrong.

Data: only MNIST's 10,000-image t10k pair is available here; it is split into train and test (no validation split:
nothing is selected on one), against the paper's 50,000 training images. Every (p, seed) is a member of one
population (``train_population`` with a ``label_noise`` column): one program, one data stream, each member its own
noisy labels and initialisation. A second, small population trains at p = 0.5 on a random ``subset_fraction`` of
the training images (same steps), to show which way the training-set size moves the error at p = 0.5.
"""

from __future__ import annotations

import numpy as np

PAPER = "Guan et al. 2017 (arXiv 1703.08774)"
CLAIM = (f"An MNIST CNN with two convolutional layers and one fully connected layer, trained by SGD on labels of "
         f"which a fraction p was corrupted, reaches 2.29% clean test error at p = 0.5 and fails above p ≈ 0.83 "
         f"({PAPER}); theory: the true class stops being the most frequent label at p = (C−1)/C = 0.9.")
CONFIG = {"data_dir": "", "limit": 0, "test_fraction": 0.2, "noise": [0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95],
          "seeds": 3, "steps": 1000, "batch_size": 200, "lr": 0.02, "momentum": 0.9, "conv_features": [6, 16],
          "subset_fraction": 0.5, "split_seed": 0}
SMOKE = {"limit": 1200, "noise": [0.0, 0.5, 0.95], "seeds": 1, "steps": 40}
PAPER_ERROR_AT_HALF, PAPER_BREAKDOWN, PAPER_TRAIN_IMAGES = 0.0229, 0.83, 50_000  # the notes' post; batch 200 (CONFIG)
ERROR_MARGIN, BREAKDOWN_MARGIN, BREAKDOWN_LEVEL = 0.02, 0.05, 0.5


def breakdown_point(noise, error, level: float = BREAKDOWN_LEVEL) -> float:
    """The smallest p at which the test error reaches ``level``, linearly interpolated between the grid points
    (inf when it never does)."""
    noise, error = np.asarray(noise, float), np.asarray(error, float)
    above = np.nonzero(error >= level)[0]
    if not len(above):
        return float("inf")
    i = above[0]
    if i == 0:
        return float(noise[0])
    return float(noise[i - 1] + (level - error[i - 1]) * (noise[i] - noise[i - 1]) / (error[i] - error[i - 1]))


def paper_cnn(config: dict, num_classes: int):
    """The paper's architecture: two conv layers (5x5, ``conv_features`` channels, each followed by ReLU and 2x2 max
    pooling) and one fully connected layer (the logits)."""
    from jaxnn import models

    return models.get_model("lenet", num_classes=num_classes, conv_features=tuple(config["conv_features"]),
                            dense_features=())


def load_data(config: dict):
    """MNIST split into train and test only (``test_fraction`` of the t10k pair is test; the four-file layout keeps
    its official test set and trains on all 60,000)."""
    from jaxnn.experiments import mnist

    return mnist(config, "label_noise", seed=config["split_seed"], limit=config["limit"] or None, val_fraction=0.0,
                 test_fraction=config["test_fraction"])


def _pm(values, scale: float = 100, digits: int = 2) -> str:
    values = np.asarray(values, float)
    return f"{scale * values.mean():.{digits}f} ± {scale * values.std():.{digits}f}"


def training_subset(dataset, fraction: float, seed: int):
    """``dataset`` with a random ``fraction`` of its training images (drawn with ``seed``, kept in split order)."""
    import dataclasses

    from jaxnn import data as data_lib

    train = dataset.train
    rows = np.sort(np.random.default_rng(seed).choice(len(train), round(fraction * len(train)), replace=False))
    return dataclasses.replace(dataset, train=data_lib.Split(train.x[rows], train.y[rows]))


def run(config: dict, out_dir, progress: bool = True):
    import jax
    import optax

    from jaxnn.experiments import Result, data_folder
    from jaxnn.train.population import population_grid, train_population

    dataset = load_data(config)
    classes = dataset.num_classes
    model = paper_cnn(config, classes)
    train = lambda data, noise: train_population(  # noqa: E731
        model, optax.sgd, data, members=population_grid(label_noise=noise, seed=list(range(config["seeds"]))),
        num_steps=config["steps"], batch_size=config["batch_size"],
        optimizer_kwargs={"learning_rate": config["lr"], "momentum": config["momentum"]}, progress=progress)
    result = train(dataset, list(config["noise"]))
    subset = None
    if config["subset_fraction"] and 0.5 in config["noise"]:
        subset = training_subset(dataset, config["subset_fraction"], config["split_seed"])
        subset_errors = np.asarray([1 - row["test_accuracy"] for row in train(subset, [0.5]).members])
    noise = np.asarray(config["noise"], float)
    seeds = config["seeds"]
    errors = np.asarray([[1 - row["test_accuracy"] for row in result.members if row["label_noise"] == p]
                         for p in noise])  # (noise levels, seeds)
    train_fit = np.asarray([[np.nanmean(result.accuracies[-50:, i]) for i, row in enumerate(result.members)
                             if row["label_noise"] == p] for p in noise])  # accuracy on the labels it trained on
    mean, spread = errors.mean(axis=1), errors.std(axis=1)
    threshold = (classes - 1) / classes
    breakdown = breakdown_point(noise, mean)
    per_seed = np.asarray([breakdown_point(noise, errors[:, s]) for s in range(seeds)])
    rows = [{"p": float(p), "test_error": float(m), "test_error_std": float(s), "test_errors": e.tolist(),
             "seeds": seeds, "fit_of_noisy_labels": float(f)}
            for p, m, s, e, f in zip(noise, mean, spread, errors, train_fit.mean(axis=1))]
    level = lambda p: list(noise).index(p)  # noqa: E731
    sizes = f"{len(dataset.train)} training images vs the paper's {PAPER_TRAIN_IMAGES:,}"
    seeds_text = f"mean ± sd over {seeds} seed(s)"
    checks, reported = [], []
    if 0.5 in noise:
        half = errors[level(0.5)]
        clean = f"; p = 0: {_pm(errors[level(0.0)])}%" if 0.0 in noise else ""
        checks.append((f"at p = 0.5 the clean test error is within {100 * ERROR_MARGIN:.0f} points of the paper's "
                       f"{100 * PAPER_ERROR_AT_HALF:.2f}% ({PAPER}); {sizes}",
                       f"test error at p = 0.5: {_pm(half)}% ({seeds_text}; seeds "
                       f"{', '.join(f'{100 * e:.2f}' for e in half)}{clean}) vs the paper's "
                       f"{100 * PAPER_ERROR_AT_HALF:.2f}%",
                       abs(float(half.mean()) - PAPER_ERROR_AT_HALF) <= ERROR_MARGIN))
    finite = np.isfinite(per_seed)
    crossings = (f"p* = {_pm(per_seed, 1, 3)} ({seeds_text}: {', '.join(f'{b:.3f}' for b in per_seed)})"
                 if finite.all() else f"p* per seed: {', '.join(f'{b:.3f}' for b in per_seed)} (inf: never crossed)")
    checks.append((f"training fails (clean test error crosses {100 * BREAKDOWN_LEVEL:.0f}%) within "
                   f"{BREAKDOWN_MARGIN} of the paper's p ≈ {PAPER_BREAKDOWN}",
                   f"{crossings}; mean curve {breakdown:.3f}; the paper's {PAPER_BREAKDOWN}, the theory's "
                   f"(C−1)/C = {threshold:.2f}",
                   bool(finite.all()) and abs(float(per_seed.mean()) - PAPER_BREAKDOWN) <= BREAKDOWN_MARGIN))
    beyond = noise > threshold + 1e-9
    if beyond.any():
        first = int(np.nonzero(beyond)[0][0])
        checks.append((f"above p = (C−1)/C = {threshold:.2f} the most frequent label is wrong: the clean test error "
                       f"is at or above chance ({100 * threshold:.0f}%, within 2 points) in every seed",
                       f"test error at p = {noise[first]:g}: {_pm(errors[first], 100, 1)}% ({seeds_text}; lowest "
                       f"{100 * errors[first].min():.1f}%)", bool(errors[first].min() >= threshold - 0.02)))
    memorised = [f"p = {r['p']:g}: {r['fit_of_noisy_labels']:.2f} vs 1 − p = {1 - r['p']:.2f}" for r in rows
                 if 0 < r["p"] < threshold and r["fit_of_noisy_labels"] > 1 - r["p"] + 0.01]
    reported.append(("accuracy on the noisy training labels (last 50 steps) vs the share of true labels 1 − p",
                     "; ".join(f"p = {r['p']:g}: {r['fit_of_noisy_labels']:.2f} vs {1 - r['p']:.2f}" for r in rows)))
    reported.append(("clean test error per p", "; ".join(f"p = {r['p']:g}: {_pm(e)}%" for r, e in zip(rows, errors))))
    if subset is not None:
        reported.append((f"clean test error at p = 0.5 against the number of training images (same {config['steps']} "
                         f"steps; {seeds_text})", f"{len(subset.train)} images: {_pm(subset_errors)}%; "
                         f"{len(dataset.train)} images: {_pm(errors[level(0.5)])}%; the paper's "
                         f"{PAPER_TRAIN_IMAGES:,}: {100 * PAPER_ERROR_AT_HALF:.2f}%"))
    _plot(noise, errors, train_fit, per_seed, threshold, result.losses, out_dir / "label_noise.png",
          None if subset is None else (len(subset.train), len(dataset.train), subset_errors))
    epochs = config["steps"] * config["batch_size"] / len(dataset.train)
    why = (f" Differences from the paper: {sizes} (MNIST's training set is not available here; clean test error at "
           f"p = {noise[0]:g}: {_pm(errors[0])}%), conv widths, learning rate and schedule not known here (the paper's minibatch of 200 is used; LeNet's "
           f"{'-'.join(str(c) for c in config['conv_features'])} channels and a fixed budget without early stopping "
           f"instead)")
    if memorised:
        why += (f"; within that budget the members fit their noisy training labels beyond the share of true labels "
                f"({'; '.join(memorised)}): they start to memorise the noise")
    why += "."
    channels = "-".join(str(c) for c in config["conv_features"])
    return Result(
        measured={"rows": rows, "breakdown": breakdown,
                  "subset": None if subset is None else {"p": 0.5, "train_examples": len(subset.train),
                                                         "test_errors": subset_errors.tolist()},
                  "breakdown_per_seed": per_seed.tolist(),
                  "theoretical_threshold": threshold, "paper_breakdown": PAPER_BREAKDOWN,
                  "paper_error_at_half": PAPER_ERROR_AT_HALF, "train_examples": len(dataset.train),
                  "test_examples": len(dataset.test),
                  "parameters": int(sum(np.size(leaf) for leaf in jax.tree.leaves(result.member_state(0).params))),
                  "epochs": epochs, "compile_s": result.compile_s, "train_s": result.run_s},
        checks=checks, reported=reported, figures=["label_noise.png"],
        data=(f"MNIST from {data_folder(config, 'mnist')} ({dataset.info.get('layout', '')}; here without a "
              f"validation split): {len(dataset.train)} training images with noisy labels and {len(dataset.test)} "
              f"clean test images; the paper's architecture, two conv layers and one fully connected layer "
              f"(conv5x5-{channels} each with ReLU and 2x2 max pooling, then dense to {classes} logits); SGD lr "
              f"{config['lr']} momentum {config['momentum']}, batch {config['batch_size']}, {config['steps']} steps "
              f"({epochs:.1f} epochs), no early stopping; symmetric noise (each label replaced with probability p by "
              f"a uniformly drawn other class, drawn once); {seeds} seed(s) per p (initialisation and noise draw), "
              f"all in one population.{why}"),
    )


def _plot(noise, errors, train_fit, per_seed, threshold, losses, path, subset=None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.5))
    FigureCanvasAgg(fig)
    left, middle, right = fig.subplots(1, 3)
    seeds = errors.shape[1]
    left.errorbar(noise, 100 * errors.mean(axis=1), yerr=100 * errors.std(axis=1), marker="o", capsize=3,
                  label=f"jaxnn, paper's CNN (mean ± sd, {seeds} seed(s))")
    left.plot(noise, 100 * errors, ".", color="C0", alpha=0.4)
    if subset is not None:
        small, full, subset_errors = subset
        left.errorbar([0.5], [100 * subset_errors.mean()], yerr=[100 * subset_errors.std()], marker="s", color="C1",
                      capsize=3, linestyle="none", label=f"p = 0.5 on {small} instead of {full} training images")
    left.plot([0.5], [100 * PAPER_ERROR_AT_HALF], "*", color="C3", markersize=12,
              label=f"paper: {100 * PAPER_ERROR_AT_HALF:.2f}% at p = 0.5")
    left.axvline(PAPER_BREAKDOWN, color="C3", linestyle=":", label=f"paper: fails above p ≈ {PAPER_BREAKDOWN}")
    left.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"(C−1)/C = {threshold:.2f}")
    if np.isfinite(per_seed).all():
        left.axvline(per_seed.mean(), color="C2", linestyle="-.", linewidth=1,
                     label=f"measured p* = {per_seed.mean():.3f} ({100 * BREAKDOWN_LEVEL:.0f}% crossing)")
    left.axhline(100 * threshold, color="gray", linewidth=0.8, label=f"chance ({100 * threshold:.0f}%)")
    left.set_xlabel("label noise p"), left.set_ylabel("clean test error (%)"), left.set_ylim(0, 100)
    left.set_title("clean test error vs label noise")
    left.legend(fontsize=7), left.grid(alpha=0.3)
    middle.errorbar(noise, train_fit.mean(axis=1), yerr=train_fit.std(axis=1), marker="o", capsize=3,
                    label="accuracy on the noisy training labels (last 50 steps)")
    middle.plot(noise, 1 - noise, "k--", linewidth=1, label="1 − p (share of true labels)")
    middle.set_xlabel("label noise p"), middle.set_ylabel("training accuracy on the labels trained on")
    middle.set_title(f"fit of the noisy labels (above 1 − p for p < {threshold:.2f}: memorising noise)")
    middle.legend(fontsize=7), middle.grid(alpha=0.3)
    per_level = losses.reshape(losses.shape[0], len(noise), -1)
    window = max(1, losses.shape[0] // 50)
    kernel = np.ones(window) / window
    for i, p in enumerate(noise):
        curve = np.convolve(np.nanmean(per_level[:, i], axis=1), kernel, mode="valid")
        right.plot(np.arange(len(curve)) + window, curve, label=f"p = {p:g}")
    right.set_xlabel("step"), right.set_ylabel(f"training loss on the noisy labels (mean of {window} steps)")
    right.set_title("training loss (seed mean)")
    right.legend(fontsize=7, ncol=2), right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
