"""Which layer is sharp, and does it change during training? (Sankar et al. 2021, "A deeper look at the Hessian
eigenspectrum of deep neural networks and its applications to regularization", AAAI.)

Three nets on the embedded digits — an MLP (64-64-64-10, tanh), a LeNet and a ResNet-20 (batch norm, base width
``resnet_width``) — train by minibatch SGD with momentum, ``seeds`` initialisations and data orders each. At epochs
``epochs`` (0 = initialisation) the Hessian of the training loss on ``analysis_examples`` fixed training images (batch
norm in eval mode, its running statistics) is measured by ``jaxnn.curvature.block_spectra``: every layer's block
(the loss as a function of that layer's parameters alone) gets its λmax (Lanczos, with its residual bound), its trace
(Hutchinson over ``probes`` Rademacher probes, with a standard error) and an SLQ density; the whole network's λmax
comes from ``top_eigenvalues`` and its trace is the sum of the block traces (the trace of H is the sum of its diagonal
blocks' traces).

The claim, in Sankar et al.'s words: "the maximum eigenvalue and the trace of the Hessian (both full network and
layerwise) reduce as training of the network progresses". Checked from the end of the first epoch (the first
measurement of a network that has trained; λmax often rises from its initial value first) to the end of training,
in every seed, a decrease counting only beyond the measurement's uncertainty: for λmax both values' residual bounds
(block λmax: the Lanczos bound), for traces two combined standard errors. The sharpest layer at every measurement and
the change from initialisation to the first epoch are reported beside the checks.
"""

from __future__ import annotations

import numpy as np

CLAIM = ("\"The maximum eigenvalue and the trace of the Hessian (both full network and layerwise) reduce as training "
         "of the network progresses\" (Sankar et al. 2021).")
CONFIG = {"models": ["mlp", "lenet", "resnet20"], "seeds": 3, "epochs": [0, 1, 2, 5, 10, 20], "batch_size": 64,
          "lr": 0.02, "momentum": 0.9, "resnet_width": 8, "analysis_examples": 256, "probes": 4, "iters": 20,
          "data": "digits", "data_dir": ""}
SMOKE = {"models": ["mlp", "lenet"], "seeds": 1, "epochs": [0, 1, 2], "analysis_examples": 64, "probes": 2,
         "iters": 8}


def build_model(name: str, classes: int, config: dict):
    from jaxnn import models

    if name == "mlp":
        return models.get_model("mlp", num_classes=classes, width=64, depth=2, activation="tanh")
    if name == "lenet":
        return models.get_model("lenet", num_classes=classes)
    if name == "resnet20":
        return models.get_model("resnet", num_classes=classes, depth=20, base_width=config["resnet_width"])
    raise ValueError(f"layer_sharpness: models must be among mlp, lenet, resnet20; got {name!r}")


def measure(loss_fn, params, batch, config, key):
    """Every layer's block spectrum and the whole network's λmax at ``params``: a dict of JSON-able numbers, and the
    BlockSpectra (for the density figure)."""
    from jaxnn import curvature

    op = curvature.hessian(loss_fn, params, batch)
    spectra = curvature.block_spectra(op, "layer", k=1, key=key, num_iters=config["iters"],
                                      num_probes=config["probes"])
    whole = curvature.lanczos(op, key, 200, k=1, tol=1e-3, which="top", progress=False)
    layers = {b.name: {"num_params": b.num_params, "lambda_max": float(b.top[0]), "bound": float(b.residuals[0]),
                       "converged": bool(b.converged[0]), "trace": float(b.trace),
                       "trace_se": float(b.trace_standard_error)} for b in spectra.blocks}
    return {"lambda_max": float(whole.top_eigenvalues[0]), "bound": float(whole.ritz_residual_bounds[-1]),
            "converged": bool(whole.converged), "trace": sum(v["trace"] for v in layers.values()),
            "trace_se": float(np.sqrt(sum(v["trace_se"] ** 2 for v in layers.values()))), "layers": layers}, spectra


def train_and_measure(name, dataset, batch, config, seed, progress):
    """One net, one seed: train to each of ``config["epochs"]`` and measure there. Returns (measurements in epoch
    order, the last BlockSpectra)."""
    import jax
    import optax

    from jaxnn import data as data_lib, losses
    from jaxnn.train import create_train_state, fit

    model = build_model(name, dataset.num_classes, config)
    state = create_train_state(model, optax.sgd(config["lr"], momentum=config["momentum"]), dataset.input_shape,
                               jax.random.PRNGKey(seed))
    per_epoch = data_lib.steps_per_epoch(len(dataset.train), config["batch_size"], True)
    step, out, spectra = 0, [], None
    for epoch in sorted(config["epochs"]):
        target = int(epoch) * per_epoch
        if target > step:
            state = fit(state, dataset, batch_size=config["batch_size"], num_steps=target, start_step=step,
                        seed=seed, log_every=target, eval_every=target, progress=False).state
            step = target
        loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", state.model_state)
        row, spectra = measure(loss_fn, state.params, batch, config, jax.random.PRNGKey(1000 + seed))
        row.update(epoch=int(epoch), step=step, loss=float(loss_fn(state.params, batch)))
        out.append(row)
    return out, spectra


def _falls(first, last, uncertainty):
    return last + uncertainty < first


def run(config: dict, out_dir, progress: bool = True):
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from jaxnn.experiments import Result, image_data

    if 1 not in config["epochs"] or len(config["epochs"]) < 3:
        raise ValueError("layer_sharpness: epochs must include 1 (the reference) and at least one later epoch")
    dataset = image_data(config, "layer_sharpness", seed=0)
    count = min(config["analysis_examples"], len(dataset.train))
    batch = (jnp.asarray(dataset.train.x[:count]), jnp.asarray(dataset.train.y[:count]))
    seeds = list(range(config["seeds"]))
    runs, last_spectra = {}, {}
    bar = tqdm(total=len(config["models"]) * len(seeds), desc="layer_sharpness", disable=not progress, leave=False)
    for name in config["models"]:
        runs[name] = []
        for seed in seeds:
            trajectory, spectra = train_and_measure(name, dataset, batch, config, seed, progress)
            runs[name].append(trajectory)
            if seed == 0:
                last_spectra[name] = spectra
            bar.update()
    bar.close()
    checks, reported = [], []
    epochs = sorted(config["epochs"])
    first_index = epochs.index(1)
    for name, trajectories in runs.items():
        first, last = [t[first_index] for t in trajectories], [t[-1] for t in trajectories]
        whole_max = [_falls(a["lambda_max"], b["lambda_max"], a["bound"] + b["bound"]) for a, b in zip(first, last)]
        whole_trace = [_falls(a["trace"], b["trace"], 2 * np.hypot(a["trace_se"], b["trace_se"]))
                       for a, b in zip(first, last)]
        pairs = lambda key: "; ".join(f"{a[key]:.4g} → {b[key]:.4g}" for a, b in zip(first, last))  # noqa: E731
        span = f"epoch 1 → {epochs[-1]}"
        checks.append((f"{name}: the whole network's λmax falls from {span} (beyond the residual bounds), every seed",
                       f"{pairs('lambda_max')} ({sum(whole_max)}/{len(seeds)} seeds)", all(whole_max)))
        checks.append((f"{name}: the whole network's trace falls from {span} (beyond 2 standard errors), every seed",
                       f"{pairs('trace')} ({sum(whole_trace)}/{len(seeds)} seeds)", all(whole_trace)))
        layers = list(first[0]["layers"])
        for key, label in (("lambda_max", "λmax"), ("trace", "trace")):
            falling, rising = [], []
            for a, b in zip(first, last):
                for layer in layers:
                    x, y = a["layers"][layer], b["layers"][layer]
                    margin = (x["bound"] + y["bound"] if key == "lambda_max"
                              else 2 * np.hypot(x["trace_se"], y["trace_se"]))
                    (falling if _falls(x[key], y[key], margin) else rising).append(layer)
            not_falling = sorted(set(rising), key=layers.index)
            checks.append((f"{name}: every layer's block {label} falls from {span} (beyond the uncertainty), every "
                           f"seed ({len(layers)} layers)",
                           f"{len(falling)}/{len(falling) + len(rising)} (layer, seed) pairs fall"
                           + (f"; not in: {', '.join(not_falling)}" if not_falling else ""), not rising))
        sharpest = [", ".join(f"{row['epoch']}: {max(row['layers'], key=lambda l: row['layers'][l]['lambda_max'])}"
                              for row in t) for t in trajectories]
        reported.append((f"{name}: the sharpest layer (largest block λmax) at each epoch, seed 0", sharpest[0]))
        reported.append((f"{name}: whole-network λmax at initialisation → epoch 1 (per seed)",
                         "; ".join(f"{t[0]['lambda_max']:.4g} → {t[first_index]['lambda_max']:.4g}"
                                   for t in trajectories)))
        reported.append((f"{name}: training loss on the analysis images, epoch 1 → {epochs[-1]} (per seed)",
                         pairs("loss")))
    figures = ["layer_sharpness.png"]
    _plot(runs, epochs, out_dir / figures[0])
    from jaxnn.curvature.plots import plot_blocks

    final_blocks = {}  # seed 0 at the last epoch, with every probe's quadrature: the blocks figures redraw from it
    for name, spectra in last_spectra.items():
        final_blocks[name] = {b.name: {"num_params": b.num_params, "top": [float(v) for v in b.top],
                                       "converged": [bool(c) for c in b.converged], "trace": float(b.trace),
                                       "nodes": np.asarray(b.nodes).tolist(), "weights": np.asarray(b.weights).tolist()}
                              for b in spectra.blocks}
        plot_blocks(final_blocks[name], out_dir / f"blocks_{name}.png")
        figures.append(f"blocks_{name}.png")
    return Result(measured={"runs": runs, "epochs": epochs, "analysis_examples": count,
                            "final_blocks_seed0": final_blocks}, checks=checks,
                  reported=reported, figures=figures,
                  data=f"embedded digits, {len(dataset.train)} training images; Hessians on {count} of them; "
                       f"SGD lr {config['lr']}, momentum {config['momentum']}, batch {config['batch_size']}; "
                       f"{len(seeds)} seeds; blocks: {config['iters']} Lanczos steps, {config['probes']} probes. "
                       f"Sankar et al.: CIFAR-10/100 and MNIST, larger nets")


def _plot(runs, epochs, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(runs), 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(runs), squeeze=False)
    x = np.asarray(epochs, float)
    for column, (name, trajectories) in enumerate(runs.items()):
        layers = list(trajectories[0][0]["layers"])
        for row, (key, label) in enumerate((("lambda_max", "λmax"), ("trace", "trace"))):
            ax = axes[row, column]
            for index, layer in enumerate(layers):
                values = np.asarray([[m["layers"][layer][key] for m in t] for t in trajectories])
                ax.plot(x, np.median(values, axis=0), color=f"C{index % 10}", lw=1,
                        label=layer if len(layers) <= 10 else None)
            whole = np.asarray([[m[key] for m in t] for t in trajectories])
            ax.plot(x, np.median(whole, axis=0), "k-", lw=2.5, label="whole network")
            ax.set_yscale("symlog", linthresh=1e-3), ax.set_xscale("symlog", linthresh=1)
            ax.set_title(f"{name}: {label} per layer (median of {len(trajectories)} seeds)", fontsize="medium")
            ax.set_xlabel("epoch"), ax.grid(alpha=0.3)
            if column == 0:
                ax.set_ylabel(label)
            if len(layers) <= 10:
                ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
