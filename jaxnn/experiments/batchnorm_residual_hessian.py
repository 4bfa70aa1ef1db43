"""Batch norm and residual connections through the Hessian (Yao et al. 2020, "PyHessian: neural networks through the
lens of the Hessian").

CIFAR-style ResNets — with and without batch norm, with and without the shortcuts — trained identically from several
seeds (each seed its own initialisation and data order), then at the end of training on a fixed set of training
examples (eval mode): the top Hessian eigenvalue (Lanczos), the trace (Hutchinson) and, for the first seed, the
spectral density (stochastic Lanczos quadrature). The paper's abstract: "we find that Batch Normalization does not
necessarily make the loss landscape smoother, especially for shallower networks"; "the claimed smoother loss
landscape only becomes evident for deep neural networks". So the claim is tested at the deepest depth (every pair
that differs in batch norm or in the shortcuts, λmax and trace) and, between depths, as the growth of the effect;
the shallow nets' own comparisons are reported beside the checks. A comparison is a check only when every seed of
both nets trained (final training loss below ``trained_loss``); otherwise it is reported as not tested.

Training: the paper (PyHessian's training.py) trains every variant with SGD lr 0.1, momentum 0.9, weight decay
5e-4 for 180 CIFAR-10 epochs. Without batch norm, a ResNet-20 at lr 0.05 and no warm-up collapsed to the uniform
prediction here (train loss 2.30), so every variant trains at lr 0.01 after a linear warm-up (the same schedule for
all). Data: the embedded 8x8 digits by default (``data``: "digits", "mnist" or "cifar10" from ``data_dir``).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

CLAIM = ("Batch norm and residual connections give a deep network a smoother, lower-curvature landscape at the end of "
         "training — smaller top eigenvalue and trace — and the effect grows with depth: \"Batch Normalization "
         "does not necessarily make the loss landscape smoother, especially for shallower networks\" (Yao et al. "
         "2020).")
CONFIG = {"data": "digits", "data_dir": "", "depths": [8, 20], "width": 8, "epochs": 40, "batch_size": 128,
          "lr": 0.01, "warmup_steps": 100, "momentum": 0.9, "seeds": [0, 1, 2], "split_seed": 0,
          "analysis_examples": 256, "trace_samples": 10, "density_probes": 1, "density_iters": 20,
          "trained_loss": 0.1, "margin": 1.2}
# density_iters 20 = the first basis size of top_eigenvalues' adaptive Lanczos (krylov.FIRST_STAGE_ITERS): the
# density's Lanczos reuses that program (compiling a ResNet's Lanczos iteration takes seconds on XLA:CPU).
# trained_loss: at smoke size (10 steps) no net gets near a minimum; the looser bound only exercises the checks.
SMOKE = {"depths": [8], "width": 4, "epochs": 1, "warmup_steps": 5, "analysis_examples": 32, "trace_samples": 2,
         "trained_loss": 2.5}
VARIANTS = (("batch", False, "BN + residual"), ("batch", True, "BN, plain"), (None, False, "residual, no BN"),
            (None, True, "plain, no BN"))
# (better, worse, what differs): each pair differs in one ingredient; the claim: the better one has the lower value.
PAIRS = (("BN + residual", "residual, no BN", "batch norm lowers {q} (with the shortcuts)"),
         ("BN, plain", "plain, no BN", "batch norm lowers {q} (without the shortcuts)"),
         ("BN + residual", "BN, plain", "the shortcuts lower {q} (with batch norm)"),
         ("residual, no BN", "plain, no BN", "the shortcuts lower {q} (without batch norm)"))
QUANTITIES = (("lambda_max", "λmax"), ("trace", "the Hessian trace"))


def schedule(config: dict):
    """The learning rate of every variant: linear warm-up from 0 over ``warmup_steps``, then ``lr``."""
    import optax

    return optax.linear_schedule(0.0, config["lr"], config["warmup_steps"]) if config["warmup_steps"] else config["lr"]


def run(config: dict, out_dir, progress: bool = True):
    import jax
    import jax.numpy as jnp
    import optax

    from jaxnn import curvature, losses, models
    from jaxnn.experiments import Result, image_data
    from jaxnn.train import train_population

    dataset = image_data(config, "batchnorm_residual_hessian", seed=config["split_seed"])
    count = min(config["analysis_examples"], len(dataset.train))
    batch = (jnp.asarray(dataset.train.x[:count]), jnp.asarray(dataset.train.y[:count]))
    steps = max(1, round(config["epochs"] * len(dataset.train) / config["batch_size"]))
    seeds = [int(s) for s in config["seeds"]]
    rows, densities = [], {}
    for depth in config["depths"]:
        for norm, plain, label in VARIANTS:
            model = models.get_model("plain" if plain else "resnet", num_classes=dataset.num_classes, depth=depth,
                                     norm=norm, base_width=config["width"])
            population = train_population(model, optax.sgd, dataset, members={"seed": seeds}, num_steps=steps,
                                          batch_size=config["batch_size"], shuffle_per_member=True,
                                          optimizer_kwargs={"learning_rate": schedule(config),
                                                            "momentum": config["momentum"]}, progress=progress)
            row = {"depth": depth, "variant": label, "batch_norm": norm is not None, "residual": not plain,
                   "seeds": seeds, "status": [m["status"] for m in population.members],
                   "train_loss": [m["train_loss"] for m in population.members],
                   "test_accuracy": [m["test_accuracy"] for m in population.members],
                   "lambda_max": [], "lanczos_iters": [], "trace": [], "trace_se": []}
            for index, member in enumerate(population.members):
                if member["status"] != "completed":  # diverged: frozen at its last finite state, not a minimum
                    for field in ("lambda_max", "lanczos_iters", "trace", "trace_se"):
                        row[field].append(float("nan"))
                    continue
                trained = population.member_state(index)
                loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", trained.model_state)
                op = curvature.hessian(loss_fn, trained.params, batch)
                key = jax.random.PRNGKey(depth)
                top = curvature.top_eigenvalues(op, key=key, progress=False)
                trace = curvature.trace(op, key, num_samples=config["trace_samples"], progress=False)
                row["lambda_max"].append(float(top[0][0]))
                row["lanczos_iters"].append(int(top.num_iters))
                row["trace"].append(trace.estimate)
                row["trace_se"].append(trace.standard_error)
                if index == 0:
                    densities[(depth, label)] = curvature.spectral_density(
                        op, key, num_probes=config["density_probes"], num_iters=config["density_iters"],
                        progress=False)
            row["trained"] = [s == "completed" and loss < config["trained_loss"]
                              for s, loss in zip(row["status"], row["train_loss"])]
            row["parameters"] = int(sum(p.size for p in jax.tree.leaves(population.member_state(0).params)))
            rows.append(row)
    checks, reported = _checks(rows, config)
    _plot(rows, densities, config, out_dir / "batchnorm_residual_hessian.png")
    return Result(measured={"rows": rows, "steps": steps, "analysis_examples": count}, checks=checks,
                  reported=reported, figures=["batchnorm_residual_hessian.png"],
                  data=(f"{config['data']} ({len(dataset.train)} training images {dataset.input_shape}); CIFAR "
                        f"ResNet-(6n+2) with {config['width']}-{2 * config['width']}-{4 * config['width']} filters "
                        f"(the paper: 16-32-64), depths {config['depths']}, He init; every variant trained alike "
                        f"from seeds {seeds} (initialisation and data order): SGD momentum {config['momentum']}, lr "
                        f"linear warm-up 0 → {config['lr']} over {config['warmup_steps']} steps then constant, batch "
                        f"{config['batch_size']}, {config['epochs']} epochs ({steps} steps), no weight decay (the "
                        f"paper: lr 0.1 with step decay, weight decay 5e-4, 180 CIFAR-10 epochs); Hessian in eval "
                        f"mode on {count} training examples: λmax by Lanczos (to relative residual 1e-3), trace by "
                        f"Hutchinson ({config['trace_samples']} probes), density of the first seed by SLQ "
                        f"({config['density_probes']} probe(s) × {config['density_iters']} steps). A net trained "
                        f"when its final training loss (eval mode, whole training split) is below "
                        f"{config['trained_loss']}; a comparison is tested only when every seed of both nets "
                        f"trained. 'A lower than B' agrees when a one-sided rank-sum test over the seeds gives "
                        f"p ≤ 0.05 (with 3 seeds: every seed of A below every seed of B) and mean(B) ≥ "
                        f"{config['margin']} × mean(A)"))


def _mean_sd(values) -> str:
    values = np.asarray(values, float)
    return f"{np.mean(values):.3g} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.2g}"


def rank_sum_p(low, high) -> float:
    """One-sided exact rank-sum (Mann-Whitney) p-value that ``low`` tends to lie below ``high``: the fraction of the
    C(n+m, n) equally likely splits of the pooled values under the null whose count of ordered pairs (a < b) is at
    least the observed one."""
    low, high = list(map(float, low)), list(map(float, high))
    pooled = low + high

    def ordered(indices):
        chosen = set(indices)
        a = [pooled[i] for i in chosen]
        b = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        return sum((x < y) + 0.5 * (x == y) for x in a for y in b)

    observed = ordered(range(len(low)))
    splits = list(itertools.combinations(range(len(pooled)), len(low)))
    return sum(ordered(split) >= observed for split in splits) / math.comb(len(pooled), len(low))


def lower(low, high, margin: float, ordered: str = "lower") -> tuple[bool, str]:
    """Is ``low`` below ``high`` across seeds: rank-sum p ≤ 0.05 and mean(high) ≥ margin · mean(low); the text
    states the seed pairs ordered (``ordered``: how the text says it), p and the ratio of the means."""
    low, high = np.asarray(low, float), np.asarray(high, float)
    pairs = int(sum(a < b for a in low for b in high))
    p, ratio = rank_sum_p(low, high), float(np.mean(high) / np.mean(low))
    return (p <= 0.05 and ratio >= margin,
            f"{ordered} in {pairs}/{low.size * high.size} seed pairs, one-sided rank-sum p = {p:.2g}, ratio of means "
            f"×{ratio:.3g} (needed p ≤ 0.05 and ×{margin:g})")


def _checks(rows, config):
    margin, bound = config["margin"], config["trained_loss"]
    row = {(r["depth"], r["variant"]): r for r in rows}

    def untrained(depth, labels):
        """'not tested: …' naming the nets of ``labels`` at ``depth`` with a seed that did not train, else None."""
        def seed_text(r):
            return ", ".join(f"{loss:.3g}" if status == "completed" else status
                             for loss, status in zip(r["train_loss"], r["status"]))

        failed = [f"{label} did not train (train loss {seed_text(row[depth, label])}; needed < {bound:g} for every "
                  f"seed)" for label in labels if not all(row[depth, label]["trained"])]
        return "not tested: " + "; ".join(failed) if failed else None

    def values(depth, label, field):
        return f"{label} {_mean_sd(row[depth, label][field])}"

    def highest_loss(depth, labels):
        return ", ".join(f"{label} {max(row[depth, label]['train_loss']):.2g}" for label in labels)

    checks, reported = [], []
    deep, seeds = max(config["depths"]), len(config["seeds"])
    for depth in config["depths"]:
        for better, worse, what in PAIRS:
            for field, name in QUANTITIES:
                shallow_note = "" if depth == deep else " (shallow: the claim does not bound it)"
                label = f"depth {depth}{shallow_note}: {what.format(q=name)}"
                skipped = untrained(depth, (better, worse))
                if skipped:
                    reported.append((label, skipped))
                    continue
                agrees, verdict = lower(row[depth, better][field], row[depth, worse][field], margin)
                text = (f"{name} {values(depth, better, field)} vs {values(depth, worse, field)} (mean ± sd, "
                        f"{seeds} seeds; highest train loss {highest_loss(depth, (better, worse))}): {verdict}")
                if depth == deep:
                    checks.append((label, text, agrees))
                else:
                    reported.append((label, text))
    shallow = min(config["depths"])
    if shallow != deep:
        for better, worse, what in (PAIRS[0], PAIRS[2]):
            label = (f"the effect grows with depth: λmax({worse}) / λmax({better}) per seed larger at depth {deep} "
                     f"than at {shallow} ({what.format(q='λmax')})")
            skipped = untrained(shallow, (better, worse)) or untrained(deep, (better, worse))
            if skipped:
                reported.append((label, skipped))
                continue
            ratios = {d: np.asarray(row[d, worse]["lambda_max"]) / np.asarray(row[d, better]["lambda_max"])
                      for d in (shallow, deep)}
            agrees, verdict = lower(ratios[shallow], ratios[deep], margin, f"smaller at {shallow}")
            pair = (better, worse)
            checks.append((label, f"ratio {_mean_sd(ratios[shallow])} at depth {shallow} vs {_mean_sd(ratios[deep])} "
                                  f"at depth {deep} (mean ± sd, {seeds} seeds; highest train loss at {shallow}: "
                                  f"{highest_loss(shallow, pair)}; at {deep}: {highest_loss(deep, pair)}): {verdict}",
                           agrees))
    if not checks:  # nothing could be tested: the verdict says so rather than leaving the claim unjudged
        checks.append(("the nets trained, so the claim could be tested", "not tested: " + "; ".join(
            text for _, text in reported if text.startswith("not tested")), False))
    return checks, reported


def _plot(rows, densities, config, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    depths = config["depths"]
    fig = Figure(figsize=(6 * len(depths), 12))
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(3, len(depths), squeeze=False))
    for column, depth in enumerate(depths):
        for i, (_, _, label) in enumerate(VARIANTS):
            row = next(r for r in rows if r["depth"] == depth and r["variant"] == label)
            trained = np.asarray(row["trained"])
            for ax, field in zip(axes[:2, column], ("lambda_max", "trace")):
                value = np.asarray(row[field], float)
                x = i + np.linspace(-0.15, 0.15, len(value))
                ax.scatter(x[trained], value[trained], color=f"C{i}", zorder=3)
                ax.scatter(x[~trained], value[~trained], facecolors="none", edgecolors=f"C{i}", zorder=3)
                if np.isfinite(value).any():
                    ax.hlines(np.nanmean(value), i - 0.3, i + 0.3, color=f"C{i}")
            density = densities.get((depth, label))
            if density is not None:
                axes[2, column].semilogy(density.grid, np.maximum(density.density, 1e-8), color=f"C{i}",
                                         label=f"{label} (seed {row['seeds'][0]}, train loss "
                                               f"{row['train_loss'][0]:.2g})")
        for ax, name in zip(axes[:2, column], ("λmax", "Hessian trace (Hutchinson)")):
            ax.set_yscale("log")
            ax.set_xticks(range(len(VARIANTS)), [label for _, _, label in VARIANTS], fontsize=8)
            ax.set_xlabel("variant"), ax.set_ylabel(name), ax.grid(alpha=0.3)
            ax.set_title(f"ResNet-{depth}: {name}, one point per seed, bar = mean\n(hollow: did not train, train "
                         f"loss ≥ {config['trained_loss']:g})", fontsize=9)
        ax = axes[2, column]
        ax.set_ylim(1e-8, None)
        ax.set_xlabel("eigenvalue"), ax.set_ylabel("density (SLQ)")
        ax.set_title(f"ResNet-{depth}: spectral density, first seed (values below 1e-8 drawn at 1e-8)", fontsize=9)
        ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
