"""Sharpness vs learning rate and batch size (Keskar et al. 2017, "On large-batch training for deep learning:
generalization gap and sharp minima"; Jastrzębski et al. 2018, "Three factors influencing minima in SGD").

SGD (no momentum) on the embedded digits, an MLP, every (η, seed) of a grid as one population per batch size B (the
batch size fixes the shapes of the compiled step, so it cannot vary inside a population; η and the seed can).
Members are compared at matched training, not at equal epochs: equal epochs give batch 256 sixteen times fewer steps
than batch 16, so η/B would also measure how far each member trained. Every ``eval_every`` steps each member's loss
on the whole training split (eval mode) is measured, and a member is frozen at the first evaluation where it is at or
below ``target_loss`` (``max_steps``: the budget; a member that never gets there is left out and counted). At its stop,
λmax on a fixed set of training examples (``population_sharpness``: one vmapped Lanczos), and the generalisation gap
(train − test accuracy). The papers' claims, tested over ``seeds`` seeds:

1. the sharpness of the minimum SGD finds falls as the ratio η/B grows (Jastrzębski et al.): Spearman's ρ over all
   members, with its p-value, and in every seed on its own;
2. at a fixed η, large batches end in sharper minima (Keskar et al.) ...
3. ... and generalise worse: both as sign tests over the (η, seed) pairs of the largest and the smallest batch (the
   two members of a pair share their initial weights), a pair counting only beyond a stated margin.

Not checked: that no member ends above the gradient-descent stability limit 2/η. On the digits every member stays
well inside it (largest λmax·η/2 under 0.4 at full size), so as a check it could not fail; the largest λmax·η/2 is
reported instead.
Data: the embedded digits by default (``data``: "digits", "mnist" or "cifar10" from ``data_dir``).
"""

from __future__ import annotations

import numpy as np

CLAIM = ("The sharpness λmax of the minimum SGD reaches falls as η/B grows; at a fixed learning rate large batches "
         "end sharper and generalise worse (Keskar et al. 2017; Jastrzębski et al. 2018).")
CONFIG = {"width": 128, "depth": 2, "lrs": [0.01, 0.03, 0.1, 0.3], "batch_sizes": [16, 64, 256], "seeds": 3,
          "target_loss": 0.05, "eval_every": 2, "max_steps": 20000, "sharper_margin": 1.1, "gap_margin": 0.005,
          "alpha": 0.05, "analysis_examples": 1024, "split_seed": 0, "data": "digits", "data_dir": ""}
SMOKE = {"width": 16, "lrs": [0.03, 0.3], "batch_sizes": [16, 128], "seeds": 1, "target_loss": 1.0,
         "max_steps": 600, "analysis_examples": 256}


def rank_correlation(a, b) -> tuple[float, float]:
    """Spearman's ρ (ties get their average rank) and its two-sided p-value (scipy's t approximation)."""
    import scipy.stats

    test = scipy.stats.spearmanr(a, b)
    return float(test.statistic), float(test.pvalue)


def sign_test(wins: int, pairs: int) -> float:
    """One-sided p-value of ``wins`` successes in ``pairs`` fair coin flips: P(Binomial(pairs, ½) ≥ wins)."""
    import scipy.stats

    return float(scipy.stats.binomtest(wins, pairs, 0.5, alternative="greater").pvalue) if pairs else float("nan")


def train_to_target(model, dataset, learning_rates, seeds, batch_size: int, config: dict):
    """SGD members (one per (η, seed)) trained together on one data order (``data_seed`` 0, as ``fit``'s default),
    each frozen at the first evaluation (every ``eval_every`` steps) where its training-split loss is ≤
    ``target_loss``. Returns the stacked final state (each member as it was at its stop) and one dict per member:
    steps trained, status, train/test loss and accuracy at the stop. Member i equals ``fit`` for its stop steps."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxnn.data import batch_rows
    from jaxnn.data.pipeline import device_dtypes
    from jaxnn.train.population import evaluate_members, init_members, make_steps

    loss, count, real = "softmax_cross_entropy", len(seeds), jnp.result_type(float)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=float(learning_rates[0]))
    state = init_members(model, tx, dataset.input_shape, np.asarray(seeds, np.uint32), np.ones(count, real),
                          {"learning_rate": np.asarray(learning_rates, real)})
    steps = make_steps(loss, True, shared_batches=True, dropout=False, member_labels=False)
    x_dtype, y_dtype = device_dtypes(dataset.train)
    data = jax.device_put((np.asarray(dataset.train.x, x_dtype), np.asarray(dataset.train.y, y_dtype)))
    alive, rates = jnp.ones(count, bool), jnp.zeros(count, real)
    stop = np.full(count, -1)
    status = ["not reached"] * count
    done, size = 0, len(dataset.train)
    while done < config["max_steps"] and (stop < 0).any():
        length = min(config["eval_every"], config["max_steps"] - done)
        state, alive, values, _ = steps(state, alive, rates, data, None, batch_rows(size, batch_size, 0, done, length))
        done += length
        train = evaluate_members(state, dataset.train, loss, True, size, "train")["train_loss"]
        finite = np.asarray(jax.device_get(alive))
        for i in np.flatnonzero(stop < 0):
            if not finite[i]:
                stop[i], status[i] = done - length + int(np.argmin(np.isfinite(np.asarray(values)[:, i]))), "diverged"
            elif train[i] <= config["target_loss"]:
                stop[i], status[i] = done, "reached"
        alive = jnp.asarray(stop < 0)
    metrics = {}
    for split in ("train", "test"):
        metrics.update(evaluate_members(state, getattr(dataset, split), loss, True, size, split))
    members = [{"steps": int(stop[i]) if stop[i] >= 0 else done, "status": status[i],
                **{name: float(value[i]) for name, value in metrics.items()}} for i in range(count)]
    return state, members


def run(config: dict, out_dir, progress: bool = True):
    import jax.numpy as jnp

    from jaxnn import curvature, models
    from jaxnn.experiments import Result, image_data
    from jaxnn.train.population import population_grid

    digits = image_data(config, "sharpness_lr_batch", seed=config["split_seed"])
    count = min(config["analysis_examples"], len(digits.train))
    batch = (jnp.asarray(digits.train.x[:count]), jnp.asarray(digits.train.y[:count]))
    model = models.get_model("mlp", num_classes=10, width=config["width"], depth=config["depth"])
    grid = population_grid(learning_rate=list(config["lrs"]), seed=list(range(config["seeds"])))
    rows = []
    for size in config["batch_sizes"]:
        state, members = train_to_target(model, digits, grid["learning_rate"], grid["seed"], size, config)
        sharpness = curvature.population_sharpness(state, batch)[:, 0]
        for lr, seed, member, value in zip(grid["learning_rate"], grid["seed"], members, sharpness):
            rows.append({"batch_size": size, "learning_rate": lr, "seed": seed, "lambda_max": float(value),
                         "ratio": lr / size, **member,
                         "gap": member["train_accuracy"] - member["test_accuracy"]})
        if progress:
            print(f"batch {size}: steps to train loss ≤ {config['target_loss']:g}: "
                  + ", ".join(f"η={r['learning_rate']:g}/s{r['seed']}: {r['steps']} ({r['status']})"
                              for r in rows if r["batch_size"] == size))
    trained = [r for r in rows if r["status"] == "reached"]
    small, large = min(config["batch_sizes"]), max(config["batch_sizes"])
    alpha, target = config["alpha"], config["target_loss"]

    def pick(key, **where):
        return np.asarray([r[key] for r in trained if all(r[k] == v for k, v in where.items())])

    def spread(values, scale=1.0, digits=3):
        return (f"{scale * np.mean(values):.{digits}g} ± {scale * np.std(values):.2g}" if len(values)
                else "none reached")

    rho, p_rho = (rank_correlation([r["ratio"] for r in trained], [r["lambda_max"] for r in trained])
                  if len(trained) > 2 else (float("nan"), float("nan")))
    per_seed = [rank_correlation(pick("ratio", seed=s), pick("lambda_max", seed=s))[0]
                for s in range(config["seeds"]) if len(pick("ratio", seed=s)) > 2]
    pairs = []  # (η, seed, small member, large member), both reached the target
    for lr in config["lrs"]:
        for seed in range(config["seeds"]):
            at = {b: [r for r in trained if r["learning_rate"] == lr and r["seed"] == seed and r["batch_size"] == b]
                  for b in (small, large)}
            if at[small] and at[large]:
                pairs.append((lr, seed, at[small][0], at[large][0]))
    sharper = sum(big["lambda_max"] > config["sharper_margin"] * little["lambda_max"] for *_, little, big in pairs)
    worse = sum(big["gap"] - little["gap"] >= config["gap_margin"] for *_, little, big in pairs)
    p_sharper, p_worse = sign_test(sharper, len(pairs)), sign_test(worse, len(pairs))
    per_lr = lambda key, scale, digits: "; ".join(  # noqa: E731
        f"η={lr:g}: B={small} {spread(pick(key, learning_rate=lr, batch_size=small), scale, digits)} vs "
        f"B={large} {spread(pick(key, learning_rate=lr, batch_size=large), scale, digits)}" for lr in config["lrs"])
    checks = [
        (f"λmax falls as η/B grows: Spearman ρ(η/B, λmax) ≤ −0.5 over the members at matched training with p < "
         f"{alpha:g}, and ρ ≤ −0.5 in every seed",
         f"pooled ρ = {rho:.2f} (p = {p_rho:.1e}, {len(trained)} members); per seed ρ = "
         + ", ".join(f"{value:.2f}" for value in per_seed),
         bool(rho <= -0.5 and p_rho < alpha and per_seed and max(per_seed) <= -0.5)),
        (f"at a fixed η, batch {large} ends sharper than batch {small}: λmax(B={large}) > "
         f"{config['sharper_margin']:g} × λmax(B={small}) in the (η, seed) pairs, sign test p < {alpha:g}",
         f"{sharper} of {len(pairs)} pairs (p = {p_sharper:.2g}); λmax mean ± sd over seeds: "
         + per_lr("lambda_max", 1.0, 3), bool(pairs) and p_sharper < alpha),
        (f"… and generalises worse: generalisation gap (train − test accuracy) of batch {large} above batch {small}'s "
         f"by ≥ {100 * config['gap_margin']:g} points in the (η, seed) pairs, sign test p < {alpha:g}",
         f"{worse} of {len(pairs)} pairs (p = {p_worse:.2g}); gap in points, mean ± sd over seeds: "
         + per_lr("gap", 100.0, 2), bool(pairs) and p_worse < alpha),
    ]
    loss_rho, loss_p = (rank_correlation([r["train_loss"] for r in trained], [r["lambda_max"] for r in trained])
                        if len(trained) > 2 else (float("nan"), float("nan")))
    ratio_loss = (rank_correlation([r["ratio"] for r in trained], [r["train_loss"] for r in trained])[0]
                  if len(trained) > 2 else float("nan"))
    partial = (rho - ratio_loss * loss_rho) / np.sqrt((1 - ratio_loss**2) * (1 - loss_rho**2))
    stability = max((r["lambda_max"] * r["learning_rate"] / 2 for r in trained), default=float("nan"))
    reported = [
        (f"training loss at the stop (target ≤ {target:g}, measured every {config['eval_every']} steps)",
         ", ".join(f"B={b}: {np.min(losses):.4f}–{np.max(losses):.4f}" for b in config["batch_sizes"]
                  if len(losses := pick("train_loss", batch_size=b)))),
        ("how far training went vs sharpness, at matched training: Spearman ρ(training loss at the stop, λmax); "
         "partial Spearman ρ(η/B, λmax) with the training loss at the stop held fixed",
         f"ρ = {loss_rho:.2f} (p = {loss_p:.2g}) over a training-loss range of "
         + (f"{min(r['train_loss'] for r in trained):.4f}–{max(r['train_loss'] for r in trained):.4f}" if trained
            else "none") + f" (λmax {min((r['lambda_max'] for r in trained), default=float('nan')):.3g}–"
         f"{max((r['lambda_max'] for r in trained), default=float('nan')):.3g}); partial ρ(η/B, λmax | loss) = "
         f"{partial:.2f}"),
        ("training accuracy at the stop (the gap is compared at matched training accuracy)",
         ", ".join(f"B={b}: {spread(pick('train_accuracy', batch_size=b), 100.0, 4)}%" for b in config["batch_sizes"])),
        ("steps to the target (min–max over η and seeds)",
         ", ".join(f"B={b}: {np.min(pick('steps', batch_size=b))}–{np.max(pick('steps', batch_size=b))}"
                   for b in config["batch_sizes"] if len(pick("steps", batch_size=b)))),
        ("largest λmax·η/2 over the members (1 would be the gradient-descent stability limit λmax = 2/η; not a check, "
         "see the module docstring)", f"{stability:.3g}"),
    ]
    _plot(rows, config, out_dir / "sharpness_lr_batch.png")
    missed = [r for r in rows if r["status"] != "reached"]
    return Result(measured={"rows": rows, "spearman": rho, "spearman_p": p_rho, "spearman_per_seed": per_seed,
                            "sharper_pairs": sharper, "worse_pairs": worse, "pairs": len(pairs),
                            "sharper_p": p_sharper, "worse_p": p_worse, "loss_spearman": loss_rho,
                            "partial_spearman": float(partial),
                            "not_reached": len(missed)},
                  checks=checks, reported=reported, figures=["sharpness_lr_batch.png"],
                  data=(f"{config['data']} ({len(digits.train)} training, {len(digits.test)} test examples); MLP width "
                        f"{config['width']} depth {config['depth']}, plain SGD, η ∈ {config['lrs']}, B ∈ "
                        f"{config['batch_sizes']}, {config['seeds']} seed(s) (the seed sets the initial weights; one "
                        f"data order). Matched training: each member stopped at the first evaluation (every "
                        f"{config['eval_every']} steps, loss on the whole training split) at or below {target:g}, "
                        f"budget {config['max_steps']} steps; {len(missed)} member(s) did not reach it ("
                        + (", ".join(f"B={r['batch_size']} η={r['learning_rate']:g} seed {r['seed']}: {r['status']}"
                                     for r in missed) or "none") +
                        f") and are left out. λmax on {count} training examples."))


def _plot(rows, config, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.5))
    FigureCanvasAgg(fig)
    left, middle, right = fig.subplots(1, 3)
    markers = "osD^v<>"
    reached = [r for r in rows if r["status"] == "reached"]
    hidden = sum(r["lambda_max"] <= 0 for r in reached)  # a log axis cannot show them
    for i, size in enumerate(config["batch_sizes"]):
        mine = [r for r in reached if r["batch_size"] == size]
        style = {"marker": markers[i % len(markers)], "color": f"C{i}", "label": f"B = {size}"}
        shown = [r for r in mine if r["lambda_max"] > 0]
        left.scatter([r["ratio"] for r in shown], [r["lambda_max"] for r in shown], **style)
        middle.scatter([r["ratio"] for r in mine], [100 * r["gap"] for r in mine], **style)
        right.scatter([r["lambda_max"] for r in mine], [r["train_loss"] for r in mine], **style)
    left.set_xscale("log"), left.set_yscale("log"), left.set_xlabel("η / B"), left.set_ylabel("λmax at the stop")
    left.set_title(f"sharpness at training loss ≤ {config['target_loss']:g}"
                   + (f" ({hidden} member(s) with λmax ≤ 0 not shown)" if hidden else ""))
    middle.set_xscale("log"), middle.set_xlabel("η / B"), middle.set_ylabel("train − test accuracy (points)")
    middle.set_title("generalisation gap at the stop")
    right.set_xlabel("λmax at the stop"), right.set_ylabel("training loss at the stop")
    right.axhline(config["target_loss"], color="gray", linestyle=":", linewidth=0.8, label="target")
    right.set_title("matched training: loss at the stop vs λmax")
    for ax in (left, middle, right):
        ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
