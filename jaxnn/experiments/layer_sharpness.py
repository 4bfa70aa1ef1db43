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
layerwise) reduce as training of the network progresses". Checked per model, for the whole network and for every
layer's block, in every seed, two ways: lower at the end than at initialisation, and never rising between consecutive
measurements from the end of the first epoch on (the first epoch may sharpen: its change is reported). A difference
counts only beyond the uncertainty: for λmax both values' Lanczos residual bounds (an unconverged value shows no
fall), for traces Student's t (95 %, probes − 1 degrees of freedom) times the combined standard error, each
measurement drawing its own probes. Reported beside: the sharpest layer at every measurement, and the layers' weight
norms (with batch norm and no weight decay a convolution before it is scale-invariant, so its curvature falls as
1/‖w‖² when its weights grow: part of what is measured there is that growth). The digits stand in for the paper's
MNIST / CIFAR; the ResNet's "layers" include its batch-norm scale/bias blocks.
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
    import jax

    from jaxnn import curvature

    op = curvature.hessian(loss_fn, params, batch)
    spectra = curvature.block_spectra(op, "layer", k=1, key=key, num_iters=config["iters"],
                                      num_probes=config["probes"])
    whole = curvature.lanczos(op, key, 200, k=1, tol=1e-3, which="top", progress=False)
    norms = {name: float(np.sqrt(sum(np.sum(np.square(np.asarray(leaf))) for leaf in jax.tree.leaves(
        curvature.restrict(op, name).params)))) for name in curvature.layer_names(params)}
    layers = {b.name: {"num_params": b.num_params, "lambda_max": float(b.top[0]), "bound": float(b.residuals[0]),
                       "converged": bool(b.converged[0]), "trace": float(b.trace),
                       "trace_se": float(b.trace_standard_error), "weight_norm": norms[b.name]}
              for b in spectra.blocks}
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
        key = jax.random.fold_in(jax.random.PRNGKey(1000 + seed), int(epoch))  # independent probes per measurement
        row, spectra = measure(loss_fn, state.params, batch, config, key)
        row.update(epoch=int(epoch), step=step, loss=float(loss_fn(state.params, batch)))
        out.append(row)
    return out, spectra


T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)


def _margin(a: dict, b: dict, key: str, probes: int) -> float:
    """How far apart two measurements must be to differ: λmax, the sum of both residual bounds; a trace, Student's
    t (two-sided 95 %, probes − 1 degrees of freedom) times the combined standard error of independent estimates."""
    if key == "lambda_max":
        return a["bound"] + b["bound"]
    t = T_975[probes - 2] if 2 <= probes <= len(T_975) + 1 else 2.0
    return t * float(np.hypot(a["trace_se"], b["trace_se"]))


def _falls(a: dict, b: dict, key: str, probes: int) -> bool:
    """b is below a beyond the uncertainty (an unconverged λmax at either end shows nothing)."""
    if key == "lambda_max" and not (a.get("converged", True) and b.get("converged", True)):
        return False
    return b[key] + _margin(a, b, key, probes) < a[key]


def _rises(a: dict, b: dict, key: str, probes: int) -> bool:
    return b[key] > a[key] + _margin(a, b, key, probes)


def run(config: dict, out_dir, progress: bool = True):
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from jaxnn.experiments import Result, image_data

    if 0 not in config["epochs"] or 1 not in config["epochs"] or len(config["epochs"]) < 3:
        raise ValueError("layer_sharpness: epochs must include 0 (initialisation), 1 and at least one later epoch")
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
    first_index, probes = epochs.index(1), config["probes"]
    span = f"epoch 0 → {epochs[-1]}"
    for name, trajectories in runs.items():
        layers = list(trajectories[0][0]["layers"])
        for key, label in (("lambda_max", "λmax"), ("trace", "trace")):
            for scope in ("whole", "layers"):
                series = ([[row for row in t] for t in trajectories] if scope == "whole" else
                          [[row["layers"][layer] for row in t] for t in trajectories for layer in layers])
                owners = (["whole network"] * len(trajectories) if scope == "whole" else
                          [layer for _ in trajectories for layer in layers])
                what = "the whole network's" if scope == "whole" else f"every layer's block ({len(layers)} layers)"
                fell = [_falls(s[0], s[-1], key, probes) for s in series]
                steady = [not any(_rises(s[i], s[i + 1], key, probes) for i in range(first_index, len(s) - 1))
                          for s in series]
                unit = "seeds" if scope == "whole" else "(layer, seed) pairs"
                exceptions = lambda flags: sorted({o for o, f in zip(owners, flags) if not f}, key=owners.index)  # noqa: E731
                text = lambda flags: (f"{sum(flags)}/{len(flags)} {unit}" + (  # noqa: E731
                    f"; not in: {', '.join(exceptions(flags))}" if scope == "layers" and not all(flags) else ""))
                values = ("; ".join(f"{s[0][key]:.4g} → {s[-1][key]:.4g}" for s in series)
                          if scope == "whole" else "")
                checks.append((f"{name}: {what} {label} is lower at the end of training than at initialisation "
                               f"({span}, beyond the uncertainty), every seed",
                               f"{values + ' (' if values else ''}{text(fell)}{')' if values else ''}", all(fell)))
                checks.append((f"{name}: {what} {label} never rises between consecutive measurements from epoch 1 "
                               f"on (epochs {', '.join(map(str, epochs[first_index:]))}; beyond the uncertainty), "
                               "every seed", text(steady), all(steady)))
        sharpest = [", ".join(f"{row['epoch']}: {max(row['layers'], key=lambda l: row['layers'][l]['lambda_max'])}"
                              for row in t) for t in trajectories]
        reported.append((f"{name}: the sharpest layer (largest block λmax) at each epoch, seed 0", sharpest[0]))
        rose = {key: sum(_rises(t[0]["layers"][layer], t[first_index]["layers"][layer], key, probes)
                         for t in trajectories for layer in layers) for key in ("lambda_max", "trace")}
        reported.append((f"{name}: initialisation → epoch 1 (the first epoch may sharpen)",
                         "whole λmax " + "; ".join(f"{t[0]['lambda_max']:.4g} → {t[first_index]['lambda_max']:.4g}"
                                                   for t in trajectories)
                         + f"; blocks rising beyond the uncertainty: λmax {rose['lambda_max']}, trace {rose['trace']} "
                         f"of {len(layers) * len(trajectories)}"))
        growth = [t[-1]["layers"][layer]["weight_norm"] / t[0]["layers"][layer]["weight_norm"]
                  for t in trajectories for layer in layers if t[0]["layers"][layer]["weight_norm"] > 0]
        reported.append((f"{name}: weight norm end / initialisation per layer (median, range; without weight decay a "
                         "layer before batch norm is scale-invariant: its curvature falls as 1/‖w‖² when ‖w‖ grows)",
                         f"{np.median(growth):.3g} ({min(growth):.3g}–{max(growth):.3g})"))
        reported.append((f"{name}: training loss on the analysis images, epoch 0 → {epochs[-1]} (per seed)",
                         "; ".join(f"{t[0]['loss']:.4g} → {t[-1]['loss']:.4g}" for t in trajectories)))
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
