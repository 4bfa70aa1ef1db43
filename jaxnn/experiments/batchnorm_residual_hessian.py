"""Batch norm and residual connections through the Hessian (Yao et al. 2020, "PyHessian: neural networks through the
lens of the Hessian").

CIFAR-style ResNets — with and without batch norm, with and without the shortcuts — trained identically, then at
the end of training on a fixed set of training examples (eval mode): the top Hessian eigenvalue (Lanczos), the trace
(Hutchinson) and the spectral density (stochastic Lanczos quadrature). The paper's findings: removing batch norm
makes the landscape sharper (larger λmax and trace) and residual connections make a deep network's landscape
smoother; for shallow networks this need not hold. Data: the embedded 8x8 digits by default (``data``: "digits",
"mnist" or "cifar10" from ``data_dir``).
"""

from __future__ import annotations

import numpy as np

CLAIM = ("Batch norm and residual connections give a deep network a smoother, lower-curvature landscape at the end of "
         "training — smaller top eigenvalue and trace (Yao et al. 2020) — and the effect grows with depth.")
CONFIG = {"data": "digits", "data_dir": "", "depths": [8, 20], "width": 16, "epochs": 20,
          "batch_size": 128,
          "lr": 0.05, "momentum": 0.9, "analysis_examples": 512, "trace_samples": 30, "density_probes": 2,
          "density_iters": 50, "seed": 0}
# density_iters 20 = the first basis size of top_eigenvalues' adaptive Lanczos (krylov.FIRST_STAGE_ITERS): the
# density's Lanczos reuses that program (compiling a ResNet's Lanczos iteration takes several seconds on XLA:CPU,
# more than running it).
SMOKE = {"depths": [8], "width": 4, "epochs": 1, "analysis_examples": 64, "trace_samples": 4, "density_probes": 1,
         "density_iters": 20}
VARIANTS = (("batch", False, "BN + residual"), ("batch", True, "BN, plain"), (None, False, "residual, no BN"),
            (None, True, "plain, no BN"))


def run(config: dict, out_dir, progress: bool = True):
    import jax
    import jax.numpy as jnp
    import optax

    from jaxnn import curvature, losses, models
    from jaxnn.experiments import Result, image_data
    from jaxnn.train import NonFiniteLossError, create_train_state, fit

    dataset = image_data(config, "batchnorm_residual_hessian", seed=config["seed"])
    count = min(config["analysis_examples"], len(dataset.train))
    batch = (jnp.asarray(dataset.train.x[:count]), jnp.asarray(dataset.train.y[:count]))
    steps = max(1, round(config["epochs"] * len(dataset.train) / config["batch_size"]))
    rows, densities = [], {}
    for depth in config["depths"]:
        for norm, plain, label in VARIANTS:
            model = models.get_model("plain" if plain else "resnet", num_classes=dataset.num_classes, depth=depth,
                                     norm=norm, base_width=config["width"])
            state = create_train_state(model, optax.sgd(config["lr"], momentum=config["momentum"]),
                                       dataset.input_shape, jax.random.PRNGKey(config["seed"]))
            row = {"depth": depth, "variant": label, "batch_norm": norm is not None, "residual": not plain}
            try:
                result = fit(state, dataset, batch_size=config["batch_size"], num_steps=steps, log_every=steps,
                             eval_every=steps, progress=progress)
            except NonFiniteLossError as error:
                rows.append({**row, "status": f"diverged at step {error.step}"})
                continue
            trained = result.state
            loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", trained.model_state)
            op = curvature.hessian(loss_fn, trained.params, batch)
            key = jax.random.PRNGKey(depth)
            top = float(curvature.top_eigenvalues(op, key=key, progress=False)[0][0])
            trace = curvature.trace(op, key, num_samples=config["trace_samples"], progress=False)
            density = curvature.spectral_density(op, key, num_probes=config["density_probes"],
                                                 num_iters=config["density_iters"], progress=False)
            densities[(depth, label)] = density
            logits = model.apply({"params": trained.params, **trained.model_state}, jnp.asarray(dataset.test.x))
            train_loss = float(loss_fn(trained.params, (jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y))))
            learned = train_loss < 0.5 * np.log(dataset.num_classes)
            rows.append({**row, "status": "completed" if learned else f"did not learn (train loss {train_loss:.2f})",
                         "learned": bool(learned), "lambda_max": top, "trace": trace.estimate,
                         "trace_se": trace.standard_error,
                         "test_accuracy": float(np.mean(np.argmax(np.asarray(logits), -1) == dataset.test.y)),
                         "train_loss": train_loss,
                         "parameters": int(sum(p.size for p in jax.tree.leaves(trained.params)))})
    checks = _checks(rows, config["depths"])
    _plot(rows, densities, config, out_dir / "batchnorm_residual_hessian.png")
    return Result(measured={"rows": rows, "steps": steps, "analysis_examples": count}, checks=checks,
                  figures=["batchnorm_residual_hessian.png"],
                  data=(f"{config['data']} ({len(dataset.train)} training images {dataset.input_shape}); CIFAR "
                        f"ResNet-(6n+2) with {config['width']}-{2 * config['width']}-{4 * config['width']} filters, depths {config['depths']}, He init, SGD lr {config['lr']} momentum "
                        f"{config['momentum']}, batch {config['batch_size']}, {config['epochs']} epochs ({steps} "
                        f"steps) for every variant; Hessian in eval mode on {count} training examples: λmax by "
                        f"Lanczos, trace by Hutchinson ({config['trace_samples']} probes), density by SLQ "
                        f"({config['density_probes']} probes × {config['density_iters']} steps); a variant whose "
                        f"final training loss stays above ½ ln C did not learn and is left out of the comparisons"))


def _checks(rows, depths):
    def at(depth, label, field="lambda_max"):
        """The value of a variant that trained; NaN (a failed check) for one that diverged or did not learn: the
        curvature of an untrained network says nothing about the minimum the paper compares."""
        row = next((r for r in rows if r["depth"] == depth and r["variant"] == label), None)
        return row.get(field, float("nan")) if row and row["status"] == "completed" else float("nan")

    def text(depth, labels, field="lambda_max"):
        return ", ".join(f"{label} {at(depth, label, field):.4g}" if np.isfinite(at(depth, label, field))
                         else f"{label} {next(r['status'] for r in rows if r['depth'] == depth and r['variant'] == label)}"
                         for label in labels)

    deep, shallow = max(depths), min(depths)
    best, worst = "BN + residual", "plain, no BN"
    checks = [
        (f"depth {deep}: batch norm lowers λmax (with the shortcuts)", text(deep, (best, "residual, no BN")),
         at(deep, best) < at(deep, "residual, no BN")),
        (f"depth {deep}: the shortcuts lower λmax (with batch norm)", text(deep, (best, "BN, plain")),
         at(deep, best) < at(deep, "BN, plain")),
        (f"depth {deep}: BN + residual has a smaller Hessian trace than the plain net without BN",
         text(deep, (best, worst), "trace"), at(deep, "BN + residual", "trace") < at(deep, worst, "trace")),
    ]
    if shallow != deep:
        ratios = {d: at(d, worst) / at(d, best) for d in (shallow, deep)}
        checks.append((f"the effect grows with depth: λmax(plain, no BN) / λmax(BN + residual) larger at depth {deep} "
                       f"than at {shallow}", f"{ratios[shallow]:.3g} at {shallow}, {ratios[deep]:.3g} at {deep}",
                       ratios[deep] > ratios[shallow]))
    return checks


def _plot(rows, densities, config, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    depths = config["depths"]
    fig = Figure(figsize=(6 * len(depths), 4.5))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(depths)))
    for ax, depth in zip(axes, depths):
        for i, (_, _, label) in enumerate(VARIANTS):
            density = densities.get((depth, label))
            row = next(r for r in rows if r["depth"] == depth and r["variant"] == label)
            if density is None:
                ax.plot([], [], color=f"C{i}", label=f"{label}: {row['status']}")
                continue
            ax.semilogy(density.grid, np.maximum(density.density, 1e-12), color=f"C{i}",
                        label=f"{label}: λmax {row['lambda_max']:.3g}, tr {row['trace']:.3g}, "
                              f"test {100 * row['test_accuracy']:.1f}%" + ("" if row["learned"] else " (did not learn)"))
        ax.set_ylim(1e-8, None)
        ax.set_xlabel("eigenvalue"), ax.set_ylabel("density (SLQ)"), ax.set_title(f"ResNet-{depth} variants")
        ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
