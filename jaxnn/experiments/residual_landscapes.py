"""Residual vs plain loss landscapes (Li et al. 2018, "Visualizing the loss landscape of neural nets").

A CIFAR-style ResNet and the same network without its shortcuts (both with batch norm) are trained identically
on the same images. Around each trained minimum θ*, in eval mode on a fixed set of training examples:

- the loss on the plane θ* + α d₁ + β d₂ spanned by two filter-normalised random directions (Li et al.'s
  normalisation: each filter of d scaled to the norm of the same filter of θ*; biases and batch-norm parameters
  left out), both nets on one colour scale;
- a non-convexity map |λmin/λmax| of the Hessian on a coarse grid of the same plane: one Lanczos per grid point
  (both ends of its spectrum), every grid point a member of one population program
  (``jaxnn.curvature.population_extreme_eigenvalues``);
- the optimiser's trajectory (parameters after every ``snapshot_every`` steps) in the plane of its first two
  principal components (``trajectory_pca_directions``), over the loss on that plane.

The paper's findings: without shortcuts the landscape turns chaotic and non-convex as depth grows (ResNet-56 vs
plain-56 on CIFAR-10), while the residual net's stays smooth and nearly convex around the minimum; at depth 20 both
are still smooth. The trajectory lies in a very low-dimensional space: the first two components explain 40-90 % of
its variation. Data: the embedded 8x8 digits by default (``data``: "digits", "mnist" or "cifar10" from
``data_dir``).
"""

from __future__ import annotations

import numpy as np

CLAIM = ("Skip connections keep a deep network's loss landscape smooth and nearly convex around the minimum, where "
         "the plain network's is more non-convex (Li et al. 2018); the optimiser's trajectory lies in a "
         "low-dimensional space: its first two principal components explain most (40-90 %) of its variation.")
CONFIG = {"data": "digits", "data_dir": "", "depth": 20, "width": 16, "epochs": 20,
          "batch_size": 128, "lr": 0.05, "momentum": 0.9, "analysis_examples": 512, "grid": 25, "span": 1.0,
          "map_grid": 5, "map_iters": 20, "pca_grid": 15, "snapshot_every": 20, "convex_ratio": 0.1, "seed": 0}
SMOKE = {"depth": 8, "width": 4, "epochs": 2, "analysis_examples": 64, "grid": 5, "map_grid": 3, "map_iters": 20,
         "pca_grid": 5, "snapshot_every": 5}
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
    steps = max(1, round(config["epochs"] * len(dataset.train) / config["batch_size"]))
    grid = np.linspace(-config["span"], config["span"], config["grid"])
    coarse = np.linspace(-config["span"], config["span"], config["map_grid"])
    rows, planes, maps, pca_planes = [], {}, {}, {}
    for name, plain in VARIANTS:
        model = models.get_model("plain" if plain else "resnet", num_classes=dataset.num_classes,
                                 depth=config["depth"], norm="batch", base_width=config["width"])
        state = create_train_state(model, optax.sgd(config["lr"], momentum=config["momentum"]), dataset.input_shape,
                                   jax.random.PRNGKey(config["seed"]))
        snapshots = Snapshots(config["snapshot_every"])
        result = fit(state, dataset, batch_size=config["batch_size"], num_steps=steps, log_every=steps,
                     eval_every=steps, callbacks=[snapshots], progress=progress)
        trained = result.state
        params = trained.params
        loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", trained.model_state)
        accuracy_fn = losses.make_metric_fn(model.apply, trained.model_state)
        # The same two random draws for both nets (the same keys), each filter-normalised to its own net.
        d1 = landscape.filter_normalized_direction(jax.random.PRNGKey(101), params)
        d2 = landscape.filter_normalized_direction(jax.random.PRNGKey(202), params)
        planes[name] = landscape.plane_surface(loss_fn, params, d1, d2, grid, grid, batch, accuracy_fn=accuracy_fn,
                                               progress=progress)
        maps[name] = _nonconvexity_map(curvature, losses, model, trained.model_state, params, d1, d2, coarse, batch,
                                       config["map_iters"])
        directions, explained = landscape.trajectory_pca_directions(snapshots.params, params, 2)
        alphas, betas = landscape.project_trajectory(snapshots.params, params, *directions)
        pca_planes[name] = (landscape.plane_surface(loss_fn, params, *directions, _covering(alphas, config),
                                                    _covering(betas, config), batch, progress=progress),
                            (alphas, betas))
        values = planes[name].metrics["loss"]
        ratio = maps[name]["ratio"]
        rows.append({
            "variant": name, "train_loss": float(loss_fn(params, (jnp.asarray(dataset.train.x),
                                                                  jnp.asarray(dataset.train.y)))),
            "test_accuracy": float(accuracy_fn(params, (jnp.asarray(dataset.test.x), jnp.asarray(dataset.test.y)))),
            "center_loss": float(values[len(grid) // 2, len(grid) // 2]), "plane_min": float(np.nanmin(values)),
            "plane_max": float(np.nanmax(values)), "local_minima": _local_minima(values),
            "mean_nonconvexity": float(np.mean(ratio)), "center_nonconvexity": float(ratio[len(coarse) // 2,
                                                                                           len(coarse) // 2]),
            "convex_share": float(np.mean(ratio < config["convex_ratio"])),
            "lambda_max": maps[name]["lambda_max"].tolist(), "lambda_min": maps[name]["lambda_min"].tolist(),
            "pca_explained": [float(v) for v in explained], "snapshots": len(snapshots.params),
            "parameters": int(sum(p.size for p in jax.tree.leaves(params))),
        })
    checks = _checks({row["variant"]: row for row in rows}, config)
    _plot(planes, maps, pca_planes, rows, coarse, config, out_dir / "residual_landscapes.png")
    return Result(measured={"rows": rows, "steps": steps, "analysis_examples": count, "grid": grid.tolist(),
                            "map_grid": coarse.tolist()},
                  checks=checks, figures=["residual_landscapes.png"],
                  data=(f"{config['data']} ({len(dataset.train)} training images {dataset.input_shape}); CIFAR "
                        f"ResNet-{config['depth']} and its plain variant (no shortcuts), both with batch norm, "
                        f"{config['width']}-{2 * config['width']}-{4 * config['width']} filters, He init, SGD lr "
                        f"{config['lr']} momentum {config['momentum']}, batch {config['batch_size']}, "
                        f"{config['epochs']} epochs ({steps} steps); landscapes in eval mode on {count} training "
                        f"examples: {config['grid']}² filter-normalised plane over ±{config['span']}, "
                        f"|λmin/λmax| on a {config['map_grid']}² grid of the same plane ({config['map_iters']} "
                        f"Lanczos steps per point and end), trajectory of {steps // config['snapshot_every'] + 1} "
                        f"snapshots in its PCA plane"))


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


def _checks(by_name, config):
    residual, plain = by_name["residual"], by_name["plain"]
    depth = config["depth"]
    return [
        (f"depth {depth}: the residual net is less non-convex around its minimum (mean |λmin/λmax| over the map)",
         f"residual {residual['mean_nonconvexity']:.3g}, plain {plain['mean_nonconvexity']:.3g}",
         residual["mean_nonconvexity"] < plain["mean_nonconvexity"]),
        (f"depth {depth}: the residual net is nearly convex in at least as large a share of the map "
         f"(|λmin/λmax| < {config['convex_ratio']})",
         f"residual {100 * residual['convex_share']:.0f} %, plain {100 * plain['convex_share']:.0f} %",
         residual["convex_share"] >= plain["convex_share"]),
        (f"depth {depth}: the plain net's surface has at least as many local minima on the grid (chaotic "
         "landscapes have many)", f"residual {residual['local_minima']}, plain {plain['local_minima']}",
         plain["local_minima"] >= residual["local_minima"]),
        ("the trajectory's first two principal components explain ≥ 40 % of its variation (both nets)",
         ", ".join(f"{row['variant']} {100 * sum(row['pca_explained']):.0f} %" for row in (residual, plain)),
         all(sum(row["pca_explained"]) >= 0.4 for row in (residual, plain))),
    ]


def _plot(planes, maps, pca_planes, rows, coarse, config, path):
    from matplotlib import ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from jaxnn.landscape import shared_color_limits

    names = [name for name, _ in VARIANTS]
    fig = Figure(figsize=(16, 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    vmin, vmax = shared_color_limits([planes[name] for name in names], "loss", log_scale=True)
    levels = np.geomspace(vmin, vmax, 25)
    by_name = {row["variant"]: row for row in rows}
    for column, name in enumerate(names):
        surface, ax = planes[name], axes[0, column]
        filled = ax.contourf(surface.alphas, surface.betas, np.asarray(surface.metrics["loss"]).T, levels=levels,
                             norm=_log_norm(vmin, vmax), cmap="viridis", extend="both")
        ax.contour(surface.alphas, surface.betas, np.asarray(surface.metrics["loss"]).T, levels=levels[::3],
                   colors="white", linewidths=0.5)
        ax.set_title(f"{name}-{config['depth']}: loss on a filter-normalised plane\n(test accuracy "
                     f"{100 * by_name[name]['test_accuracy']:.1f} %)", fontsize=9)
        ax.set_xlabel("α (d₁)"), ax.set_ylabel("β (d₂)")
    fig.colorbar(filled, ax=list(axes[0, :2]), label="loss (log scale, shared)", format=ticker.FormatStrFormatter("%.3g"))
    ratio_max = max(float(np.max(maps[name]["ratio"])) for name in names)
    ax = axes[0, 2]
    for i, name in enumerate(names):
        ax.plot(np.sort(maps[name]["ratio"].ravel()), np.linspace(0, 1, maps[name]["ratio"].size), "o-",
                color=f"C{i}", label=f"{name}: mean {by_name[name]['mean_nonconvexity']:.3g}")
    ax.axvline(config["convex_ratio"], color="gray", ls=":", label=f"|λmin/λmax| = {config['convex_ratio']}")
    ax.set_xlabel("|λmin/λmax|"), ax.set_ylabel("share of the map's points at or below")
    ax.set_title("non-convexity over the coarse grid (CDF)", fontsize=9), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    for column, name in enumerate(names):
        ax = axes[1, column]
        image = ax.imshow(maps[name]["ratio"].T, origin="lower", cmap="magma", vmin=0, vmax=max(ratio_max, 1e-6),
                          extent=(coarse[0], coarse[-1], coarse[0], coarse[-1]))
        ax.set_title(f"{name}: |λmin/λmax| on a {len(coarse)}² grid", fontsize=9)
        ax.set_xlabel("α (d₁)"), ax.set_ylabel("β (d₂)")
    fig.colorbar(image, ax=list(axes[1, :2]), label="|λmin/λmax| (shared scale)")
    ax = axes[1, 2]
    surface, (alphas, betas) = pca_planes["residual"]
    values = np.asarray(surface.metrics["loss"])
    ax.contour(surface.alphas, surface.betas, values.T, levels=np.geomspace(np.nanmin(values), np.nanmax(values), 20),
               cmap="viridis")
    for i, name in enumerate(names):
        trajectory = pca_planes[name][1]
        ax.plot(trajectory[0], trajectory[1], ".-", color=f"C{i}", ms=3,
                label=f"{name}: PC1+PC2 explain {100 * sum(by_name[name]['pca_explained']):.0f} %")
    ax.plot([0], [0], "k*", ms=10)
    ax.set_xlabel("PC1"), ax.set_ylabel("PC2"), ax.legend(fontsize=7)
    ax.set_title("trajectories in their PCA planes\n(contours: the residual net's loss in its plane)", fontsize=9)
    fig.savefig(path, dpi=100)


def _log_norm(vmin, vmax):
    from matplotlib.colors import LogNorm

    return LogNorm(vmin=vmin, vmax=vmax)
