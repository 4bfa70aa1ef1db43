"""Why Transformers need Adam: block heterogeneity of the Hessian (Zhang et al. 2024, "Why Transformers Need Adam: A
Hessian Perspective").

Two models learn the same task, the embedded digits: a small pre-LN Transformer reading each image as 8 tokens of 8
pixels (:class:`jaxnn.models.TransformerClassifier`) and a LeNet. At initialisation (the paper's setting), for every
weight matrix of each model (kernels, the embedding and the positional table: Zhang et al.'s parameter blocks less
the biases; Flax stores the attention's biases as (heads, head_dim) arrays, and the key bias's Hessian is exactly zero
because softmax ignores a shift shared by every score), the Hessian of the training loss on
``analysis_examples`` images restricted to that block gets an SLQ spectral density from
:func:`jaxnn.curvature.block_spectra` (``probes`` Lanczos runs of ``iterations`` steps), blurred by a Gaussian of
width ``blur`` × the model's own eigenvalue range onto one grid per model (so each model's densities are normalised
by its own range). Block heterogeneity is the mean Jensen–Shannon distance (base 2, in [0, 1]) between the densities
of every pair of blocks; Zhang et al. find it large for Transformers and small for CNNs. Its noise floor is the mean
over blocks of the JS distance between a block's density from the first half of the probes and from the second half
(the same estimator, the same block). Then each model trains ``train_steps`` steps from the same initialisation with
SGD (momentum 0.9) and with Adam, each at the best learning rate of its grid (lowest final training loss, chosen per
seed), and the gap is SGD's final training loss minus Adam's; the mean minibatch loss over the run is reported
beside it (the final losses of these small models on the digits are close to zero).

A small-scale stand-in for the paper's setting: a 2-block Transformer of width 32 on 1,257 digits, 300 steps, no
warmup or schedule.
"""

from __future__ import annotations

import itertools

import numpy as np

CLAIM = ("The Hessian's parameter blocks have heterogeneous spectra in a Transformer and similar spectra in a CNN, "
         "and SGD falls behind Adam on the Transformer but not on the CNN (Zhang et al. 2024).")
CONFIG = {"dim": 32, "depth": 2, "num_heads": 4, "mlp_dim": 64, "analysis_examples": 512, "iterations": 30,
          "probes": 4, "blur": 0.01, "grid_points": 2000, "heterogeneity_factor": 1.5, "train_steps": 300,
          "batch_size": 64, "sgd_lrs": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
          "adam_lrs": [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03], "blur_variants": [0.003, 0.03], "floor_factor": 2.0,
          "seeds": [0, 1, 2]}
SMOKE = {"dim": 16, "depth": 1, "mlp_dim": 32, "analysis_examples": 64, "iterations": 6, "probes": 2,
         "grid_points": 400, "train_steps": 20, "sgd_lrs": [0.1], "adam_lrs": [0.001], "seeds": [0]}


def models_for(config: dict) -> dict:
    from jaxnn import models

    return {"Transformer": models.get_model("transformer", num_classes=10, dim=config["dim"], depth=config["depth"],
                                            num_heads=config["num_heads"], mlp_dim=config["mlp_dim"], max_len=8),
            "LeNet": models.get_model("lenet", num_classes=10)}


def weight_blocks(params) -> list[str]:
    """The paths of the weight matrices (parameters with two or more axes that are not biases): the blocks
    compared."""
    import jax

    from jaxnn import curvature

    return [path for path, leaf in zip(curvature.parameter_paths(params), jax.tree.leaves(params))
            if leaf.ndim >= 2 and not path.endswith("bias")]


def block_densities(spectra, blur: float, points: int, probes: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """(grid, masses (blocks, points)): each block's SLQ nodes and weights of ``probes``, averaged over those probes
    and blurred by a Gaussian of width ``blur`` × the range of every block's nodes (all probes: one grid whatever
    ``probes``), normalised to sum to 1 on the grid."""
    nodes = np.concatenate([b.nodes.ravel() for b in spectra.blocks])
    low, high = nodes.min(), nodes.max()
    width = blur * max(high - low, 1e-12)
    grid = np.linspace(low - 4 * width, high + 4 * width, points)
    densities = []
    for block in spectra.blocks:
        nodes, weights = block.nodes[probes].ravel(), block.weights[probes].ravel()
        mass = np.exp(-0.5 * ((grid[:, None] - nodes[None]) / width) ** 2) @ weights
        densities.append(mass / mass.sum())
    return grid, np.array(densities)


def noise_floor(spectra, blur: float, points: int) -> float:
    """The mean over blocks of the JS distance between a block's density from the first half of the probes and from
    the second half: what the estimator alone puts between two densities of the same block."""
    half = spectra.num_probes // 2
    _, first = block_densities(spectra, blur, points, slice(0, half))
    _, second = block_densities(spectra, blur, points, slice(half, None))
    return float(np.mean([js_distance(a, b) for a, b in zip(first, second)]))


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """√(JS divergence) in base 2 of two distributions on the same grid (0 equal, 1 disjoint)."""
    m = 0.5 * (p + q)

    def kl(a):
        keep = (a > 0) & (m > 0)
        return float(np.sum(a[keep] * np.log2(a[keep] / m[keep])))

    return float(np.sqrt(max(0.5 * kl(p) + 0.5 * kl(q), 0.0)))


def heterogeneity(densities: np.ndarray) -> float:
    """The mean JS distance over every pair of blocks."""
    return float(np.mean([js_distance(a, b) for a, b in itertools.combinations(densities, 2)]))


def _train(model, dataset, tx, seed, config, progress) -> tuple[float, float]:
    """(final training loss on the whole train split, mean minibatch loss over the run); inf for a diverged run."""
    import jax

    from jaxnn.train import create_train_state, evaluate, fit, make_eval_step

    state = create_train_state(model, tx, dataset.input_shape, jax.random.PRNGKey(seed))
    result = fit(state, dataset, batch_size=config["batch_size"], num_steps=config["train_steps"], seed=seed,
                 log_every=config["train_steps"], eval_every=config["train_steps"], nan_guard=False,
                 progress=progress)
    loss = evaluate(result.state, dataset.train, make_eval_step("softmax_cross_entropy"), 512, True, "train")
    mean = result.history[-1]["loss_mean"]
    # Each learning rate compiles its own programs, and XLA:CPU keeps every cached program's code mapped: a full run
    # (6 × 12 trainings and 42 per-block Hessian programs) passed Linux's 65,530 memory mappings and crashed in
    # LLVM ("Cannot allocate memory"). The programs of a finished training are not used again.
    jax.clear_caches()
    finite = np.isfinite(loss["train_loss"]) and np.isfinite(mean)
    return (loss["train_loss"], mean) if finite else (float("inf"), float("inf"))  # a diverged rate loses


def run(config: dict, out_dir, progress: bool = True):
    import jax
    import optax

    from jaxnn import curvature, data, losses
    from jaxnn.experiments import Result
    from jaxnn.train import create_train_state

    dataset = data.load_dataset("digits", seed=0)
    batch = (dataset.train.x[:config["analysis_examples"]], dataset.train.y[:config["analysis_examples"]])
    measured = {name: {"heterogeneity": [], "noise_floor": [], "heterogeneity_by_blur": [], "blocks": None,
                       "block_lambda_max": [], "block_lambda_max_converged": [], "gap": [], "mean_loss_gap": [],
                       "sgd": [], "adam": []} for name in ("Transformer", "LeNet")}
    plotted = {}
    for seed in config["seeds"]:
        for name, model in models_for(config).items():
            state = create_train_state(model, optax.sgd(0.0), dataset.input_shape, jax.random.PRNGKey(seed))
            loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", state.model_state)
            op = curvature.hessian(loss_fn, state.params, batch, loops="python")  # one small program per block
            blocks = weight_blocks(state.params)
            spectra = curvature.block_spectra(op, blocks, key=jax.random.fold_in(jax.random.PRNGKey(seed), 1),
                                              num_iters=config["iterations"], num_probes=config["probes"])
            grid, densities = block_densities(spectra, config["blur"], config["grid_points"])
            row = measured[name]
            row["blocks"] = blocks
            row["heterogeneity"].append(heterogeneity(densities))
            row["noise_floor"].append(noise_floor(spectra, config["blur"], config["grid_points"]))
            row["heterogeneity_by_blur"].append(
                {str(b): heterogeneity(block_densities(spectra, b, config["grid_points"])[1])
                 for b in config["blur_variants"]})
            row["block_lambda_max"].append([float(b.top[0]) for b in spectra.blocks])
            row["block_lambda_max_converged"].append([bool(b.converged[0]) for b in spectra.blocks])
            jax.clear_caches()  # the per-block Hessian programs (see _train)
            if seed == config["seeds"][0]:
                plotted[name] = (blocks, spectra)
            best = {}
            for optimizer, rates in (("sgd", config["sgd_lrs"]), ("adam", config["adam_lrs"])):
                runs = {lr: _train(model, dataset, optax.sgd(lr, momentum=0.9) if optimizer == "sgd"
                                   else optax.adam(lr), seed, config, progress) for lr in rates}
                lr = min(runs, key=lambda rate: runs[rate][0])
                best[optimizer] = runs[lr]
                row[optimizer].append({"lr": lr, "final_train_loss": runs[lr][0], "mean_train_loss": runs[lr][1],
                                       "grid": {str(k): v[0] for k, v in runs.items()}})
            row["gap"].append(best["sgd"][0] - best["adam"][0])
            row["mean_loss_gap"].append(best["sgd"][1] - best["adam"][1])
    t, c = measured["Transformer"], measured["LeNet"]
    factor, seeds, floor = config["heterogeneity_factor"], len(config["seeds"]), config["floor_factor"]
    checks = [
        (f"block heterogeneity at initialisation: the Transformer's mean JS distance between block spectra is "
         f"above {factor:g} × the LeNet's, in each of {seeds} seeds (each model's densities blurred by "
         f"{config['blur']:g} × its own eigenvalue range)",
         "; ".join(f"seed {s}: {a:.3f} vs {b:.3f}" for s, a, b in zip(config["seeds"], t["heterogeneity"],
                                                                      c["heterogeneity"])),
         all(a > factor * b for a, b in zip(t["heterogeneity"], c["heterogeneity"]))),
        (f"the Transformer's heterogeneity is above {floor:g} × its estimator's noise floor (JS between the halves of "
         f"the probes, same block), in each seed",
         "; ".join(f"seed {s}: {a:.3f} vs floor {b:.3f}" for s, a, b in zip(config["seeds"], t["heterogeneity"],
                                                                            t["noise_floor"])),
         all(a > floor * b for a, b in zip(t["heterogeneity"], t["noise_floor"]))),
        ("SGD falls behind Adam on the Transformer (final training loss of SGD minus Adam's, best learning rate of "
         "each, above 0) and more than on the LeNet, in each seed",
         "; ".join(f"seed {s}: Transformer {a:+.4f}, LeNet {b:+.4f}" for s, a, b in zip(config["seeds"], t["gap"],
                                                                                       c["gap"])),
         all(a > 0 and a > b for a, b in zip(t["gap"], c["gap"]))),
    ]
    worst = max(max(r[o][i]["final_train_loss"] for o in ("sgd", "adam")) for r in measured.values()
                for i in range(seeds))
    reported = [(f"{name}: best learning rates and final training losses (SGD / Adam)",
                 "; ".join(f"seed {s}: {r['sgd'][i]['final_train_loss']:.4f} at {r['sgd'][i]['lr']:g} / "
                           f"{r['adam'][i]['final_train_loss']:.4f} at {r['adam'][i]['lr']:g}"
                           for i, s in enumerate(config["seeds"]))) for name, r in measured.items()]
    edges = [f"{name} {optimizer} seed {s} ({r[optimizer][i]['lr']:g})" for name, r in measured.items()
             for optimizer, rates in (("sgd", config["sgd_lrs"]), ("adam", config["adam_lrs"]))
             for i, s in enumerate(config["seeds"])
             if len(rates) > 1 and r[optimizer][i]["lr"] in (min(rates), max(rates))]
    reported.append(("best learning rates at an edge of their grid (the optimum may lie outside it)",
                     "; ".join(edges) or "none"))
    reported.append((f"the best final training losses compared above are all at most {worst:.4f}: both optimizers "
                     f"nearly fit the training split, so the final-loss gap compares small numbers",
                     "; ".join(f"{name} mean minibatch loss over the run, SGD minus Adam: "
                               + ", ".join(f"seed {s}: {g:+.4f}" for s, g in zip(config["seeds"], r["mean_loss_gap"]))
                               for name, r in measured.items())))
    reported.append(("each model's estimator noise floor and its heterogeneity at other blurs (mean over seeds)", "; ".join(
                         f"{name}: floor {np.mean(r['noise_floor']):.3f}, " + ", ".join(
                             f"blur {b:g}: {np.mean([h[str(b)] for h in r['heterogeneity_by_blur']]):.3f}"
                             for b in config["blur_variants"]) for name, r in measured.items())))
    reported.append(("smallest and largest block λmax (first seed; all Lanczos Ritz values converged: "
                     + ", ".join(f"{name} {all(r['block_lambda_max_converged'][0])}" for name, r in measured.items())
                     + ")", "; ".join(f"{name}: {min(r['block_lambda_max'][0]):.3g} to "
                                      f"{max(r['block_lambda_max'][0]):.3g}" for name, r in measured.items())))
    _plot(plotted, config, out_dir / "transformer_block_hessian.png")
    return Result(measured=measured, checks=checks, reported=reported, figures=["transformer_block_hessian.png"],
                  data=f"the embedded digits (8 tokens of 8 pixels for the Transformer); Hessians on "
                       f"{config['analysis_examples']} training images at initialisation")


def _plot(plotted, config, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.2))
    FigureCanvasAgg(fig)
    for ax, (name, (blocks, spectra)) in zip(fig.subplots(1, 2), plotted.items()):
        grid, densities = block_densities(spectra, config["blur"], config["grid_points"])
        for block, density in zip(blocks, densities):
            ax.semilogy(grid, density + 1e-12, linewidth=0.9, label=block)
        ax.set_ylim(1e-8, 1)
        ax.set_title(f"{name}: Hessian spectrum of each weight matrix (init)", fontsize=10)
        ax.set_xlabel(f"eigenvalue (blur {config['blur']:g} × this model's range)")
        ax.set_ylabel("mass per grid point (blurred SLQ)"), ax.grid(alpha=0.3)
        ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
