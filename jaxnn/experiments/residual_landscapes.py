"""Residual vs plain loss landscapes (Li et al. 2018, "Visualizing the loss landscape of neural nets").

A CIFAR-style ResNet and the same network without its shortcuts (both with batch norm) are trained identically
on the same images, once per seed (the seed sets the initialisation and the data order). Around each trained
minimum θ*, in eval mode on a fixed set of training examples:

- the loss on the plane θ* + α d₁ + β d₂ spanned by two filter-normalised random directions (Li et al.'s
  normalisation: each filter of d scaled to the norm of the same filter of θ*; biases and batch-norm parameters
  left out; the same two draws for both nets of a seed, other draws for other seeds), and on it the share of grid
  points where the descent direction -∇L (finite differences on the grid) does not point towards the minimiser at
  the centre (r·∇L ≤ 0, r the point's offset from the centre): Li et al.'s description of a chaotic landscape;
- a non-convexity map |λmin/λmax| of the Hessian on a coarse grid of the same plane: one Lanczos per grid point
  (both ends of its spectrum), every grid point a member of one population program
  (``jaxnn.curvature.population_extreme_eigenvalues``);
- the optimiser's trajectory (parameters after every ``snapshot_every`` steps) in the plane of its first two
  principal components (``trajectory_pca_directions``), over the loss on that plane (each net in its own plane).

What Li et al. report (§5-§7, CIFAR-10): ResNet-20-noshort "has a fairly benign landscape dominated by a region
with convex contours in the center, and no dramatic non-convexity", but as depth grows the landscape without
shortcuts "spontaneously transitions from (nearly) convex to chaotic": "ResNet-56-noshort has dramatic
non-convexities and large regions where the gradient directions ... do not point towards the minimizer at the
center", while the ResNets' stay smooth. The |λmin/λmax| maps show the same. Of the optimisation paths they report
that 40% to 90% of the variation in the descent paths lies in a space of only 2 dimensions (their numbers; the
sentence around them is paraphrased here, not quoted).

The residual-vs-plain comparison ("the plain net is more chaotic and non-convex") is a check only at the depth
where the paper shows the effect (``PAPER_DEPTH``, 56); at depth ≤ 20 it is reported as not tested, and what the
paper says of depth 20 is checked instead: the plain net's landscape is benign (few points where -∇L does not point
to the centre) and not markedly more non-convex than the residual net's. The full size is depth 20: depth 56 does
not fit the 15-minute budget of a 2-core CPU here. Measured while sizing it (digits, 8-16-32 filters, 20 epochs,
seed 0): plain-56 did not train (test accuracy 13-38 % for lr 0.002-0.1, where ResNet-56 reached 98 %), so its
landscape is not one around a minimum, and Li et al. train for 300 epochs; one seed of both depth-56 nets took
5 minutes. ``--set depth=56`` runs it. Data: the embedded 8x8 digits by default (``data``: "digits", "mnist" or
"cifar10" from ``data_dir``).
"""

from __future__ import annotations

import numpy as np

CLAIM = ("Skip connections keep a deep network's loss landscape smooth and nearly convex around the minimum, where "
         "the plain network's turns chaotic and non-convex (Li et al. 2018: ResNet-56 vs ResNet-56-noshort; at depth "
         "20 both are benign); 40% to 90% of the variation in the descent paths lies in a space of only 2 dimensions "
         "(Li et al.'s numbers, paraphrased).")
PAPER_DEPTH = 56  # the depth at which Li et al. show the plain net's landscape turning chaotic
SHALLOW_DEPTH = 20  # the depth at which they find both landscapes benign
CONFIG = {"data": "digits", "data_dir": "", "depth": 20, "width": 16, "epochs": 20,
          "batch_size": 128, "lr": 0.05, "momentum": 0.9, "analysis_examples": 256, "grid": 11, "span": 1.0,
          "map_grid": 3, "map_iters": 20, "pca_grid": 11, "snapshot_every": 10, "convex_ratio": 0.1, "seed": 0,
          "seeds": 3, "nonconvexity_margin": 0.1, "chaos_margin": 0.05, "benign_share": 0.05, "trained_loss": 0.1,
          "pca_band": [0.4, 0.9]}
SMOKE = {"depth": 8, "width": 4, "epochs": 2, "analysis_examples": 64, "grid": 5, "map_grid": 3, "map_iters": 20,
         "pca_grid": 5, "snapshot_every": 2}
VARIANTS = (("residual", False), ("plain", True))


def run(config: dict, out_dir, progress: bool = True):
    import jax
    import jax.numpy as jnp
    import optax

    from jaxnn import curvature, landscape, losses, models
    from jaxnn.experiments import Result, image_data
    from jaxnn.train import Callback, create_train_state, fit

    class Snapshots(Callback):
        """The parameters after every ``every`` steps (host copies), for the trajectory PCA."""

        def __init__(self, every):
            self.every, self.params = every, []

        def on_train_begin(self, ctx):
            self.params.append(jax.tree.map(np.asarray, ctx.state.params))

        def on_step_end(self, ctx):
            if ctx.step % self.every == 0:
                self.params.append(jax.tree.map(np.asarray, ctx.state.params))

    dataset = image_data(config, "residual_landscapes", seed=config["seed"])
    count = min(config["analysis_examples"], len(dataset.train))
    batch = (jnp.asarray(dataset.train.x[:count]), jnp.asarray(dataset.train.y[:count]))
    train_all = (jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y))
    test_all = (jnp.asarray(dataset.test.x), jnp.asarray(dataset.test.y))
    steps = max(1, round(config["epochs"] * len(dataset.train) / config["batch_size"]))
    grid = np.linspace(-config["span"], config["span"], config["grid"])
    coarse = np.linspace(-config["span"], config["span"], config["map_grid"])
    seeds = [config["seed"] + i for i in range(config["seeds"])]
    models_ = {name: models.get_model("plain" if plain else "resnet", num_classes=dataset.num_classes,
                                      depth=config["depth"], norm="batch", base_width=config["width"])
               for name, plain in VARIANTS}
    rows, figure = [], {}  # figure: the first seed's surfaces, maps and trajectories
    for seed in seeds:
        keys = [jax.random.fold_in(jax.random.PRNGKey(k), seed) for k in (101, 202)]
        for name, _ in VARIANTS:
            model = models_[name]
            state = create_train_state(model, optax.sgd(config["lr"], momentum=config["momentum"]),
                                       dataset.input_shape, jax.random.PRNGKey(seed))
            snapshots = Snapshots(config["snapshot_every"])
            trained = fit(state, dataset, batch_size=config["batch_size"], num_steps=steps, log_every=steps,
                          eval_every=steps, seed=seed, callbacks=[snapshots], progress=progress).state
            params = trained.params
            loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", trained.model_state)
            accuracy_fn = losses.make_metric_fn(model.apply, trained.model_state)
            # The same two random draws for both nets of a seed, each filter-normalised to its own net.
            d1, d2 = (landscape.filter_normalized_direction(key, params) for key in keys)
            plane = landscape.plane_surface(loss_fn, params, d1, d2, grid, grid, batch, progress=progress)
            values = np.asarray(plane.metrics["loss"])
            nonradial = _nonradial(values, grid)
            curvature_map = _nonconvexity_map(curvature, losses, model, trained.model_state, params, d1, d2, coarse,
                                              batch, config["map_iters"])
            directions, explained = landscape.trajectory_pca_directions(snapshots.params, params, 2)
            ratio = curvature_map["ratio"]
            rows.append({
                "variant": name, "seed": seed, "train_loss": float(loss_fn(params, train_all)),
                "test_accuracy": float(accuracy_fn(params, test_all)),
                "center_loss": float(values[len(grid) // 2, len(grid) // 2]), "plane_min": float(np.nanmin(values)),
                "plane_max": float(np.nanmax(values)), "local_minima": _local_minima(values),
                "nonradial_share": float(np.mean(nonradial[_off_center(grid)])),
                "mean_nonconvexity": float(np.mean(ratio)),
                "center_nonconvexity": float(ratio[len(coarse) // 2, len(coarse) // 2]),
                "convex_share": float(np.mean(ratio < config["convex_ratio"])),
                "lambda_max": curvature_map["lambda_max"].tolist(),
                "lambda_min": curvature_map["lambda_min"].tolist(),
                "pca_explained": [float(v) for v in explained], "snapshots": len(snapshots.params),
                "parameters": int(sum(p.size for p in jax.tree.leaves(params))),
            })
            if seed == seeds[0]:
                alphas, betas = landscape.project_trajectory(snapshots.params, params, *directions)
                pca_plane = landscape.plane_surface(loss_fn, params, *directions, _covering(alphas, config),
                                                    _covering(betas, config), batch, progress=progress)
                figure[name] = {"plane": plane, "nonradial": nonradial, "map": curvature_map, "pca": pca_plane,
                                "trajectory": (alphas, betas), "row": rows[-1]}
    checks, reported = _checks(rows, config)
    _plot(figure, rows, grid, coarse, config, out_dir / "residual_landscapes.png")
    return Result(measured={"rows": rows, "steps": steps, "analysis_examples": count, "grid": grid.tolist(),
                            "map_grid": coarse.tolist(), "seeds": seeds},
                  checks=checks, reported=reported, figures=["residual_landscapes.png"],
                  data=(f"{config['data']} ({len(dataset.train)} training images {dataset.input_shape}); CIFAR "
                        f"ResNet-{config['depth']} and its plain variant (no shortcuts), both with batch norm, "
                        f"{config['width']}-{2 * config['width']}-{4 * config['width']} filters, He init, SGD lr "
                        f"{config['lr']} momentum {config['momentum']}, batch {config['batch_size']}, "
                        f"{config['epochs']} epochs ({steps} steps), seeds {seeds} (initialisation and data order); "
                        f"landscapes in eval mode on {count} training examples: {config['grid']}² filter-normalised "
                        f"plane over ±{config['span']}, |λmin/λmax| on a {config['map_grid']}² grid of the same plane "
                        f"({config['map_iters']} Lanczos steps per point and end), trajectory of "
                        f"{steps // config['snapshot_every'] + 1} snapshots (every {config['snapshot_every']} steps) "
                        f"in its own PCA plane"))


def _nonconvexity_map(curvature, losses, model, model_state, params, d1, d2, coarse, batch, num_iters):
    """λmax, λmin and |λmin/λmax| of the Hessian at every point of the coarse grid: the points are the members of
    one population (stacked parameters, the batch-norm statistics repeated for each), both ends of each point's
    spectrum from one Lanczos run."""
    import jax
    import jax.numpy as jnp

    alphas, betas = np.meshgrid(coarse, coarse, indexing="ij")
    count = alphas.size
    a, b = jnp.asarray(alphas.ravel()), jnp.asarray(betas.ravel())
    along = lambda c, p: c.reshape((-1,) + (1,) * p.ndim).astype(p.dtype)  # noqa: E731
    points = jax.tree.map(lambda p, u, v: p[None] + along(a, p) * u[None] + along(b, p) * v[None], params, d1, d2)
    stacked_state = jax.tree.map(lambda s: jnp.broadcast_to(s, (count,) + s.shape), model_state)
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", stacked_state)
    top, bottom = curvature.population_extreme_eigenvalues(loss_fn, points, batch, num_iters=num_iters)
    top, bottom = top[:, 0].reshape(alphas.shape), bottom[:, 0].reshape(alphas.shape)
    return {"lambda_max": top, "lambda_min": bottom, "ratio": np.abs(bottom / top)}


def _nonradial(values, grid) -> np.ndarray:
    """Where on the plane (values[i, j] at (grid[i], grid[j])) the descent direction -∇L does not point towards the
    centre: r·∇L ≤ 0, ∇L by central differences (one-sided at the edges), r the offset from the centre."""
    d_alpha, d_beta = np.gradient(np.asarray(values, dtype=np.float64), grid, grid)
    alphas, betas = np.meshgrid(grid, grid, indexing="ij")
    return alphas * d_alpha + betas * d_beta <= 0


def _off_center(grid) -> np.ndarray:
    alphas, betas = np.meshgrid(grid, grid, indexing="ij")
    return np.hypot(alphas, betas) > 0


def _covering(coordinates, config):
    """A grid covering the trajectory's coordinates along one principal direction, with a 20 % margin."""
    low, high = float(np.min(coordinates)), float(np.max(coordinates))
    margin = 0.2 * max(high - low, 1e-8)
    return np.linspace(low - margin, high + margin, config["pca_grid"])


def _local_minima(values) -> int:
    """Grid points strictly below all their (up to 8) neighbours."""
    padded = np.pad(np.asarray(values, dtype=np.float64), 1, constant_values=np.inf)
    center = padded[1:-1, 1:-1]
    neighbours = [padded[1 + i:padded.shape[0] - 1 + i, 1 + j:padded.shape[1] - 1 + j]
                  for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)]
    return int(np.sum(np.all([center < n for n in neighbours], axis=0)))


def _per_seed(rows, key):
    """{variant: values in seed order}."""
    return {name: np.array([row[key] for row in rows if row["variant"] == name]) for name, _ in VARIANTS}


def _spread(values, digits=3, scale=1.0) -> str:
    values = scale * np.asarray(values)
    return f"{np.mean(values):.{digits}g} ± {np.std(values):.{digits - 1}g}"


def _checks(rows, config):
    """(checks, reported). The residual-vs-plain comparisons count only at the paper's depth; every comparison
    holds with its margin in every seed or fails."""
    depth, seeds = config["depth"], config["seeds"]
    ratio, chaos, pca = _per_seed(rows, "mean_nonconvexity"), _per_seed(rows, "nonradial_share"), {}
    pca = {name: np.array([sum(row["pca_explained"]) for row in rows if row["variant"] == name])
           for name, _ in VARIANTS}
    low, high = config["pca_band"]
    margin_ratio, margin_chaos = config["nonconvexity_margin"], config["chaos_margin"]
    per = lambda values, fmt: ", ".join(fmt.format(v) for v in values)  # noqa: E731
    comparisons = [
        (f"the plain net is more non-convex around its minimum than the residual net: its mean "
         f"|λmin/λmax| over the {config['map_grid']}² map exceeds the residual net's by ≥ {margin_ratio} in every one "
         f"of {seeds} seeds",
         f"mean |λmin/λmax| residual {_spread(ratio['residual'])} vs plain {_spread(ratio['plain'])} ({seeds} seeds); "
         f"plain − residual per seed: {per(ratio['plain'] - ratio['residual'], '{:+.3f}')}",
         bool(np.all(ratio["plain"] - ratio["residual"] >= margin_ratio))),
        (f"the plain net's landscape is more chaotic: the share of the {config['grid']}² plane where "
         f"-∇L does not point towards the minimiser (r·∇L ≤ 0) exceeds the residual net's by ≥ {margin_chaos} in "
         f"every one of {seeds} seeds",
         f"share with r·∇L ≤ 0 residual {_spread(chaos['residual'])} vs plain {_spread(chaos['plain'])} ({seeds} "
         f"seeds); plain − residual per seed: {per(chaos['plain'] - chaos['residual'], '{:+.3f}')}",
         bool(np.all(chaos["plain"] - chaos["residual"] >= margin_chaos))),
    ]
    checks = [(f"the trajectory's first two principal components explain between {100 * low:.0f} % and "
               f"{100 * high:.0f} % of its variation (Li et al.'s range), every seed and both nets",
               f"PC1+PC2 residual {_spread(pca['residual'], 3, 100)} % (per seed "
               f"{per(100 * pca['residual'], '{:.1f}')}), plain {_spread(pca['plain'], 3, 100)} % (per seed "
               f"{per(100 * pca['plain'], '{:.1f}')}) of {rows[0]['snapshots']} snapshots",
               bool(all(np.all((low <= v) & (v <= high)) for v in pca.values())))]
    convex, minima = _per_seed(rows, "convex_share"), _per_seed(rows, "local_minima")
    accuracy, train_loss = _per_seed(rows, "test_accuracy"), _per_seed(rows, "train_loss")
    reported = [
        (f"share of the map with |λmin/λmax| < {config['convex_ratio']} ({seeds} seeds)",
         f"residual {_spread(convex['residual'], 2, 100)} %, plain {_spread(convex['plain'], 2, 100)} %"),
        (f"strict local minima on the {config['grid']}² plane, per seed",
         f"residual {per(minima['residual'], '{:d}')}, plain {per(minima['plain'], '{:d}')}"),
        ("trained nets (all training images)",
         f"train loss residual {_spread(train_loss['residual'])}, plain {_spread(train_loss['plain'])}; test "
         f"accuracy residual {_spread(accuracy['residual'], 3, 100)} %, plain {_spread(accuracy['plain'], 3, 100)} %"),
    ]
    if depth >= PAPER_DEPTH:
        trained = (f"depth {depth}: both nets reach a minimum, the premise of comparing landscapes around it (train "
                   f"loss < {config['trained_loss']} in every seed)",
                   f"train loss residual {per(train_loss['residual'], '{:.3g}')}, plain "
                   f"{per(train_loss['plain'], '{:.3g}')} (per seed)",
                   bool(all(np.all(v < config["trained_loss"]) for v in train_loss.values())))
        return [trained] + [(f"depth {depth}: {text}", *rest) for text, *rest in comparisons] + checks, reported
    reported = [(f"not tested here (depth {depth}, the paper's effect is at {PAPER_DEPTH}): {text}", measured)
                for text, measured, _ in comparisons] + reported
    if depth <= SHALLOW_DEPTH:
        benign = config["benign_share"]
        checks = [
            (f"depth {depth} (≤ {SHALLOW_DEPTH}, where Li et al. find ResNet-20-noshort \"fairly benign\"): both "
             f"landscapes are benign: -∇L fails to point towards the minimiser (r·∇L ≤ 0) on at most "
             f"{100 * benign:.0f} % of the {config['grid']}² plane, every seed and both nets",
             f"share with r·∇L ≤ 0 residual {_spread(chaos['residual'])} (per seed "
             f"{per(chaos['residual'], '{:.3f}')}), plain {_spread(chaos['plain'])} (per seed "
             f"{per(chaos['plain'], '{:.3f}')})",
             bool(all(np.all(v <= benign) for v in chaos.values()))),
            (f"depth {depth}: \"no dramatic non-convexity\" without shortcuts: the plain net's mean |λmin/λmax| "
             f"exceeds the residual net's by less than {margin_ratio} (the margin the depth-{PAPER_DEPTH} check "
             f"demands) in every one of {seeds} seeds",
             f"mean |λmin/λmax| residual {_spread(ratio['residual'])} vs plain {_spread(ratio['plain'])}; plain − "
             f"residual per seed: {per(ratio['plain'] - ratio['residual'], '{:+.3f}')}",
             bool(np.all(ratio["plain"] - ratio["residual"] < margin_ratio))),
        ] + checks
    return checks, reported


def _plot(figure, rows, grid, coarse, config, path):
    from matplotlib import ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    from jaxnn.landscape import shared_color_limits

    names = [name for name, _ in VARIANTS]
    seed = rows[0]["seed"]
    fig = Figure(figsize=(17, 15), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 3)
    # Row 1: the loss planes on one log colour scale spanning every value (nothing clipped).
    vmin, vmax = shared_color_limits([figure[name]["plane"] for name in names], "loss", log_scale=True)
    levels = np.geomspace(vmin, vmax, 25)
    for column, name in enumerate(names):
        item, ax = figure[name], axes[0, column]
        values = np.asarray(item["plane"].metrics["loss"]).T
        filled = ax.contourf(grid, grid, values, levels=levels, norm=LogNorm(vmin, vmax), cmap="viridis")
        ax.contour(grid, grid, values, levels=levels[::3], colors="white", linewidths=0.5)
        alphas, betas = np.meshgrid(grid, grid, indexing="ij")
        marked = item["nonradial"] & _off_center(grid)
        ax.plot(alphas[marked], betas[marked], "rx", ms=5, label="-∇L not towards the centre (r·∇L ≤ 0)")
        ax.set_title(f"{name}-{config['depth']}, seed {seed}: loss on a filter-normalised plane\n(test accuracy "
                     f"{100 * item['row']['test_accuracy']:.1f} %, r·∇L ≤ 0 on "
                     f"{100 * item['row']['nonradial_share']:.0f} % of the plane)", fontsize=9)
        ax.set_xlabel("α (along d₁)"), ax.set_ylabel("β (along d₂)"), ax.legend(fontsize=7, loc="lower left")
    fig.colorbar(filled, ax=list(axes[0, :2]), label="loss (log scale, shared, full range)",
                 format=ticker.FormatStrFormatter("%.3g"))
    _per_seed_panel(axes[0, 2], rows, "nonradial_share", "share of the plane with r·∇L ≤ 0",
                    f"chaos: -∇L not towards the minimiser ({config['grid']}² plane)")
    # Row 2: the |λmin/λmax| maps on one linear scale from 0 to the largest value.
    ratio_max = max(float(np.max(figure[name]["map"]["ratio"])) for name in names)
    step = (coarse[1] - coarse[0]) / 2 if len(coarse) > 1 else 0.5
    for column, name in enumerate(names):
        ax = axes[1, column]
        image = ax.imshow(figure[name]["map"]["ratio"].T, origin="lower", cmap="magma", vmin=0,
                          vmax=max(ratio_max, 1e-6),
                          extent=(coarse[0] - step, coarse[-1] + step, coarse[0] - step, coarse[-1] + step))
        ax.set_title(f"{name}-{config['depth']}, seed {seed}: |λmin/λmax| on a {len(coarse)}² grid of the same plane",
                     fontsize=9)
        ax.set_xlabel("α (along d₁)"), ax.set_ylabel("β (along d₂)")
    fig.colorbar(image, ax=list(axes[1, :2]), label="|λmin/λmax| (shared linear scale, 0 to the largest value)")
    _per_seed_panel(axes[1, 2], rows, "mean_nonconvexity", "mean |λmin/λmax| over the map",
                    "non-convexity around the minimum")
    # Row 3: each trajectory in its own PCA plane, over the loss on that plane.
    for column, name in enumerate(names):
        item, ax = figure[name], axes[2, column]
        surface, (alphas, betas) = item["pca"], item["trajectory"]
        values = np.asarray(surface.metrics["loss"]).T
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        filled = ax.contourf(surface.alphas, surface.betas, values, levels=np.geomspace(low, max(high, low * 1.001),
                                                                                         20),
                             norm=LogNorm(low, max(high, low * 1.001)), cmap="viridis")
        fig.colorbar(filled, ax=ax, label="loss (log scale, this plane's full range)",
                     format=ticker.FormatStrFormatter("%.3g"))
        ax.plot(alphas, betas, "o-", color="white", mec="black", ms=3, lw=1, label="trajectory (start → θ*)")
        ax.plot([0], [0], "r*", ms=12, label="θ*")
        explained = item["row"]["pca_explained"]
        ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f} % of the variation)")
        ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f} % of the variation)")
        ax.set_title(f"{name}-{config['depth']}, seed {seed}: trajectory in its own PCA plane", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[2, 2]
    _per_seed_panel(ax, rows, "pca_explained", "PC1+PC2 share of the variation (%)",
                    "how low-dimensional the trajectory is", value=lambda row: 100 * sum(row["pca_explained"]))
    low, high = config["pca_band"]
    ax.axhspan(100 * low, 100 * high, color="gray", alpha=0.2, label=f"Li et al.: {100 * low:.0f}-{100 * high:.0f} %")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)


def _per_seed_panel(ax, rows, key, label, title, value=None):
    value = value or (lambda row: row[key])
    names = [name for name, _ in VARIANTS]
    for i, name in enumerate(names):
        points = [(row["seed"], value(row)) for row in rows if row["variant"] == name]
        offsets = i + 0.12 * (np.arange(len(points)) - (len(points) - 1) / 2)  # seeds side by side
        ax.plot(offsets, [v for _, v in points], "o", color=f"C{i}", ms=7, alpha=0.8,
                label=f"{name}: mean {np.mean([v for _, v in points]):.3g}")
        for x, (seed, v) in zip(offsets, points):
            ax.annotate(f"{seed}", (x, v), xytext=(0, 6), textcoords="offset points", fontsize=7, ha="center")
    ax.set_xticks(range(len(names)), names), ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_xlabel("network (points: seeds, labelled)"), ax.set_ylabel(label)
    ax.set_title(f"{title}\n(every seed)", fontsize=9)
    ax.grid(alpha=0.3), ax.legend(fontsize=8)
