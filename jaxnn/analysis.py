"""Run-folder analysis: read a trained run (config, data, checkpoint) and write the curvature and landscape
reports beside its metrics. This is the only place that joins training artefacts to the analysis packages;
``curvature`` and ``landscape`` themselves see nothing but ``loss_fn(params, batch)``.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np

from jaxnn.parallel import is_primary
from jaxnn.train.run import LoadedRun, load_run


def _loaded(run: str | pathlib.Path | LoadedRun, step: Any = "latest", devices: int | None = None,
            optimizer_state: bool = False) -> LoadedRun:
    if isinstance(run, LoadedRun):
        return run
    return load_run(run, step=_parse_step(step), devices=devices, optimizer_state=optimizer_state)


def _parse_step(step: Any) -> Any:
    if isinstance(step, str) and step.isdigit():
        return int(step)
    if step not in ("latest", "best") and not isinstance(step, int):
        raise ValueError(f"--step must be 'latest', 'best' or a step number, got {step!r}")
    return step


MERGE_LIMIT = 1024  # examples: eval-mode analysis batches up to this many in all are evaluated as one batch


def analysis_batches(loaded: LoadedRun, num_batches: int, batch_size: int | None,
                     mode: str = "eval") -> tuple[list, dict]:
    """The run's first ``num_batches`` training batches, as one concatenated batch when that changes nothing.

    In eval mode the loss is a per-example mean, so K equal batches weighted 1/K each and their concatenation have
    the same loss, gradient and Hessian; one batch of up to :data:`MERGE_LIMIT` examples gives a simpler program
    (no loop over batches) and lets the estimators linearise the product once. Train-mode batch norm depends on
    the batch, so batches stay separate there. Returns the batches and what they are (for the report).
    """
    if num_batches < 1:
        raise ValueError(f"data_batches must be >= 1, got {num_batches}")
    batches = loaded.batches("train", num_batches, batch_size)
    described = {"batch_size": int(len(batches[0][1])), "data_batches": len(batches),
                 "evaluated_as_batches": len(batches)}
    if mode == "eval" and len(batches) > 1 and sum(len(b[1]) for b in batches) <= MERGE_LIMIT:
        batches = [tuple(np.concatenate(parts) for parts in zip(*batches))]
        described["evaluated_as_batches"] = 1
    return batches, described


def curvature_for_run(run: str | pathlib.Path | LoadedRun, *, k: int = 5, density: bool = False,
                      data_batches: int = 4, batch_size: int | None = None, step: Any = "latest",
                      mode: str = "eval", seed: int = 0, out_dir: str | pathlib.Path | None = None,
                      progress: bool = True, draw: Any = None, devices: int | None = None,
                      blocks: str | None = None) -> dict:
    """Hessian report of a run's checkpoint over ``data_batches`` training batches -> curvature.json, spectrum.png
    (and, with ``blocks="layer"``, every layer's block in curvature.json's "blocks" section and blocks.png).

    ``devices``: the data of every product is split over that many devices (default: all of them, or the mesh
    the run was loaded onto); the numbers are those of one device."""
    from jaxnn import curvature

    loaded = _loaded(run, step, devices)
    batches, described = analysis_batches(loaded, data_batches, batch_size, mode)
    report = curvature.curvature_report(loaded.loss_fn(mode), loaded.state.params, batches, k=k, density=density,
                                        key=jax.random.PRNGKey(seed), progress=progress, blocks=blocks)
    report["run"] = {"run_dir": str(loaded.run_dir), "step": loaded.step, "batch_norm_mode": mode, **described}
    if is_primary():  # with several processes, process 0 alone writes files
        curvature.write_curvature_report(report, out_dir or loaded.run_dir, draw=draw)
    return report


def influence_for_run(run: str | pathlib.Path | LoadedRun, *, test_indices: tuple[int, ...] = (0,), top: int = 5,
                      damping: float = 0.01, method: str = "minres", tol: float = 1e-3, max_iters: int | None = 1000,
                      train_limit: int | None = None, data_batches: int = 4, batch_size: int | None = None, step: Any = "latest",
                      out_dir: str | pathlib.Path | None = None, draw: Any = None) -> dict:
    """Influence of every training example on the loss of each test example ``test_indices`` (Koh & Liang, through
    :func:`jaxnn.curvature.influence`) -> influence.json (+ influence.png for image data): per test example the
    ``top`` most helpful training examples (removing them raises its loss most) and the most harmful ones, with the
    solve's residual and converged flag. The Hessian is the eval-mode loss's over the run's first ``data_batches``
    training batches (as ``jaxnn curvature``), damped by ``damping`` (a network's Hessian is indefinite: MINRES by
    default), to a relative residual ``tol`` in at most ``max_iters`` iterations (None: the parameter count). A
    network's damped Hessian converges slowly: on the README's digits MLP (84k parameters, damping 0.01) 1,000
    iterations (10 s) reach a residual of ~0.06, float32 or float64, and the parameter count of them (5 minutes)
    ~0.008; the answer is marked not converged either way, and its ranking can change with the residual (a larger
    ``damping`` converges faster). ``train_limit``: the first that many training examples are scored (default
    all)."""
    from jaxnn import curvature

    loaded = _loaded(run, step)
    train = loaded.dataset.train
    count = len(train) if train_limit is None else min(int(train_limit), len(train))
    test = loaded.dataset.test
    bad = [i for i in test_indices if not 0 <= int(i) < len(test)]
    if bad:
        raise ValueError(f"--test-index: {bad} outside the test split's {len(test)} examples (0..{len(test) - 1})")
    top = max(1, min(int(top), count))
    batches, described = analysis_batches(loaded, data_batches, batch_size)
    loss_fn = loaded.loss_fn()
    train_batch = (np.asarray(train.x[:count]), np.asarray(train.y[:count]))
    entries = []
    for index in test_indices:
        index = int(index)
        example = (np.asarray(test.x[index:index + 1]), np.asarray(test.y[index:index + 1]))
        result = curvature.influence(loss_fn, loaded.state.params, train_batch, example, damping=damping,
                                     method=method, tol=tol, max_iters=max_iters, hessian_data=batches)
        effect = result.removal_effect
        order = np.argsort(effect)
        entries.append({
            "test_index": index, "label": int(np.asarray(example[1])[0]),
            "test_loss": float(loss_fn(loaded.state.params, example)),
            "solve": {"method": method, "damping": damping, "tol": tol, "max_iters": max_iters,
                      "relative_residual": result.solve.relative_residual,
                      "converged": result.solve.converged, "message": result.solve.message},
            "helpful": [{"train_index": int(i), "label": int(train_batch[1][i]), "removal_effect": float(effect[i])}
                        for i in order[::-1][:top]],
            "harmful": [{"train_index": int(i), "label": int(train_batch[1][i]), "removal_effect": float(effect[i])}
                        for i in order[:top]],
        })
    report = {"run": {"run_dir": str(loaded.run_dir), "step": loaded.step, **described},
              "num_train_scored": count, "hessian": "eval-mode loss over the run's first training batches",
              "removal_effect": "first-order change of the test example's loss if the training example were removed "
                                "(Koh & Liang 2017): > 0 it helped, < 0 it hurt",
              "tests": entries}
    if is_primary():
        import json

        out = pathlib.Path(out_dir or loaded.run_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "influence.json").write_text(json.dumps(report, indent=2, allow_nan=False))
        if np.ndim(train.x) >= 3:
            from jaxnn.plotting import FigureFunction

            draw = draw or (lambda function, *args: function(*args))
            draw(FigureFunction("jaxnn.curvature.plots", "plot_influence"), report, np.asarray(test.x),
                 np.asarray(train.x[:count]), str(out / "influence.png"))
    return report


def laplace_for_run(run: str | pathlib.Path | LoadedRun, *, structure: str = "kfac", train_limit: int | None = None,
                    prior_precision: float | None = None, tune: str = "marglik", step: Any = "latest",
                    out_dir: str | pathlib.Path | None = None, draw: Any = None) -> dict:
    """The Laplace approximation of a classification run (:func:`jaxnn.laplace.laplace`, GGN of the eval-mode model
    on its training split, the first ``train_limit`` examples) -> laplace.json + laplace.png: the structure, the prior
    precision (given, or tuned: ``tune="marglik"`` maximises the marginal likelihood, ``"val_nll"`` minimises the
    predictive's NLL on the run's validation split), the log marginal likelihood, and on the test split the NLL,
    accuracy and expected calibration error of the MAP network and of the Laplace (probit) predictive, with a
    reliability diagram of both. The run's weight decay is recorded: without it the weights are no posterior mode
    under a Gaussian prior and the marginal likelihood's δ tends to give underconfident predictions."""
    from jaxnn import laplace as laplace_lib

    loaded = _loaded(run, step)
    if loaded.config.train.loss != "softmax_cross_entropy":
        raise ValueError(f"jaxnn laplace: needs a classification run trained with softmax_cross_entropy; this run's "
                         f"loss is {loaded.config.train.loss!r}")
    train, test, val = loaded.dataset.train, loaded.dataset.test, loaded.dataset.val
    if tune not in laplace_lib.PRIOR_METHODS:
        raise ValueError(f"tune: expected one of {', '.join(laplace_lib.PRIOR_METHODS)}, got {tune!r}")
    if prior_precision is None and tune == "val_nll" and len(val) == 0:
        raise ValueError("jaxnn laplace --tune val_nll: this run has no validation split (data.val_fraction = 0); "
                         "use --tune marglik or --prior-precision")
    count = len(train) if train_limit is None else min(int(train_limit), len(train))
    state = loaded.state

    def predict(params, x):
        return state.apply_fn({"params": params, **state.model_state}, x)

    fitted = laplace_lib.laplace(predict, state.params, (np.asarray(train.x[:count]), np.asarray(train.y[:count])),
                                 structure=structure, prior_precision=prior_precision or 1.0)
    if prior_precision is None:
        fitted.optimize_prior_precision(method=tune, val=(np.asarray(val.x), np.asarray(val.y)) if tune == "val_nll"
                                        else None)
    x_test, y_test = np.asarray(test.x), np.asarray(test.y)
    map_probabilities = np.asarray(jax.nn.softmax(predict(state.params, x_test), axis=-1))
    laplace_probabilities = np.asarray(fitted.predictive(x_test))
    report = {"run": {"run_dir": str(loaded.run_dir), "step": loaded.step}, "structure": structure,
              "num_train": count, "num_params": fitted.num_params, "subset": fitted.subset,
              "prior_precision": fitted.prior_precision, "prior_precision_tuned": prior_precision is None,
              "tune": None if prior_precision is not None else tune, "tuned_range": [1e-4, 1e4],
              "weight_decay": float(loaded.config.optimizer.weight_decay),
              "log_marginal_likelihood": fitted.log_marginal_likelihood(), "num_test": int(len(y_test)),
              "map": laplace_lib.calibration(map_probabilities, y_test),
              "laplace": laplace_lib.calibration(laplace_probabilities, y_test)}
    if structure == "kfac":
        report["kfac"] = fitted.curvature.report()
    if is_primary():
        import json

        out = pathlib.Path(out_dir or loaded.run_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "laplace.json").write_text(json.dumps(report, indent=2, allow_nan=False))
        from jaxnn.plotting import FigureFunction

        draw = draw or (lambda function, *args: function(*args))
        draw(FigureFunction("jaxnn.plotting", "plot_reliability"), report, str(out / "laplace.png"))
    return report


def describe_laplace(report: dict) -> str:
    m, la = report["map"], report["laplace"]
    tuned = {"marglik": "tuned by the marginal likelihood", "val_nll": "tuned by validation NLL",
             None: "given"}[report.get("tune")]
    text = (f"Laplace ({report['structure']}, {report['num_params']:,} parameters, {report['num_train']} training "
            f"examples): prior precision {report['prior_precision']:.4g} ({tuned}), log marginal likelihood "
            f"{report['log_marginal_likelihood']:.6g}\n"
            f"test ({report['num_test']}): MAP     NLL {m['nll']:.4f}  accuracy {m['accuracy']:.4f}  ECE {m['ece']:.4f}\n"
            f"            Laplace NLL {la['nll']:.4f}  accuracy {la['accuracy']:.4f}  ECE {la['ece']:.4f}")
    low, high = report.get("tuned_range", (None, None))
    if report.get("tune") and report["prior_precision"] in (low, high):
        text += (f"\nnote: the tuned prior precision sits at the {'top' if report['prior_precision'] == high else 'bottom'}"
                 f" of its range [{low:g}, {high:g}]"
                 + (": the predictive is best with (almost) no posterior spread, i.e. as the MAP network"
                    if report["prior_precision"] == high else "") + ".")
    if report.get("tune") == "marglik" and la["nll"] > m["nll"]:
        cause = (" The run was trained without weight decay, so its weights are no posterior mode under a Gaussian "
                 "prior and the marginal likelihood's δ is known to make the predictive underconfident."
                 if not report.get("weight_decay") else "")
        text += (f"\nnote: the Laplace predictive's test NLL is worse than the MAP's.{cause} Try --tune val_nll (δ "
                 f"by validation NLL), or train with weight decay.")
    return text


def describe_influence(report: dict) -> str:
    lines = []
    for entry in report["tests"]:
        helpful, harmful = entry["helpful"][0], entry["harmful"][0]
        solve = entry["solve"]
        status = "" if solve["converged"] else f" (solve NOT converged: residual {solve['relative_residual']:.2g})"
        lines.append(f"test {entry['test_index']} (label {entry['label']}, loss {entry['test_loss']:.4g}): most helpful "
                     f"train {helpful['train_index']} (label {helpful['label']}, {helpful['removal_effect']:+.3g}), "
                     f"most harmful train {harmful['train_index']} (label {harmful['label']}, "
                     f"{harmful['removal_effect']:+.3g}){status}")
    return "\n".join(lines)


def describe_curvature(report: dict) -> str:
    c = report["conditioning"]
    t = report["trace"]
    g = report["gradient_direction"]
    e = report["eigenvalues"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731

    def honest(value, residuals, converged):
        """A value whose residual is not small against it is printed as an estimate with its residual."""
        if converged is None or converged[0]:
            return fmt(value)
        return f"{fmt(value)} (NOT converged: residual {fmt(residuals[0])})"

    line = (f"Hessian at step {report.get('run', {}).get('step', '?')}: "
            f"lambda_max={honest(c['lambda_max'], e['top_residuals'], e.get('top_converged'))} "
            f"lambda_min={honest(c['lambda_min'], e['bottom_residuals'], e.get('bottom_converged'))} "
            f"kappa={fmt(c['condition_number'])} "
            f"|lambda_min|/lambda_max={fmt(c['nonconvexity_ratio'])} ({c['verdict']}); "
            f"trace={fmt(t['estimate'])}±{fmt(t['standard_error'])}; 2/lambda_max={fmt(g['stable_lr_bound'])}; "
            f"{report['num_hvps']} HVPs in {report['timing_seconds']['total']:.1f}s")
    if report.get("blocks"):
        parts = [f"{name} {honest(b['top'][0], b['residuals'], b['converged'])}" for name, b in report["blocks"].items()]
        line += "\nlambda_max per layer: " + ", ".join(parts)
    return line


def describe_landscape(report: dict) -> str:
    """One line for the terminal; the whole summary is in ``landscape.json``."""
    s = report["summary"]
    plane, span = s["plane"], s["config"]["span"]
    loss, at = plane["metrics"]["loss"], plane["metrics"]["loss"]["argmin"]
    parts = [f"Landscape at step {s.get('run', {}).get('step', '?')}, {s['config']['dirs']} directions, "
             f"{plane['shape'][0]}x{plane['shape'][1]} plane over ±{span:.3g} on {plane['num_examples']} examples: "
             f"loss at the checkpoint {loss['at_origin']:.4g}, plane min {loss['min']:.4g} at "
             f"(alpha, beta)=({at['alpha']:.3g}, {at['beta']:.3g}), max {loss['max']:.4g}"]
    if plane["nonfinite_points"]:
        parts.append(f"{plane['nonfinite_points']} non-finite points")
    if s.get("interpolation"):
        line = s["interpolation"]["metrics"]["loss"]
        parts.append(f"interpolation to the other run: loss {line['min']:.4g} to {line['max']:.4g}")
    if s.get("trajectory"):
        t = s["trajectory"]
        parts.append(f"{t['num_checkpoints']} checkpoints projected (off-plane residual up to "
                     f"{t['max_relative_residual']:.2g})")
    return "; ".join(parts) + f"; {s['seconds']:.1f}s"


def landscape_for_run(run: str | pathlib.Path | LoadedRun, *, dirs: str = "filter", grid: int = 51,
                      span: float = 1.0, other: str | pathlib.Path | None = None, trajectory: bool = False,
                      data_batches: int = 2, batch_size: int | None = None, step: Any = "latest",
                      log_scale: bool = False, seed: int = 0, out_dir: str | pathlib.Path | None = None,
                      progress: bool = True, draw: Any = None, devices: int | None = None,
                      split: str = "data") -> dict:
    """1-D and 2-D loss slices around a run's checkpoint (plus interpolation to ``other``, trajectory overlay),
    with the data (``split="data"``) or the grid points (``"points"``) split over ``devices`` (default: all)."""
    from jaxnn import landscape

    loaded = _loaded(run, step, devices)
    batches, _ = analysis_batches(loaded, data_batches, batch_size)
    other_params = None
    if other is not None:
        other_run = load_run(other, devices=devices)
        other_params = other_run.state.params
    trajectory_params = None
    if trajectory or dirs == "pca":
        steps = loaded.checkpoint_steps()
        if len(steps) < 3:
            raise ValueError(f"a trajectory needs at least 3 checkpoints; {loaded.run_dir} has {len(steps)} "
                             "(raise checkpoint.keep_last when training)")
        trajectory_params = [loaded.params_at(s) for s in steps]
    report = landscape.landscape_report(
        loaded.loss_fn(), loaded.state.params, batches, dirs=dirs, grid=grid, span=span, key=jax.random.PRNGKey(seed),
        other_params=other_params, trajectory=trajectory_params, accuracy_fn=loaded.accuracy_fn(), progress=progress,
        split=split)
    report.setdefault("summary", {})["run"] = {"run_dir": str(loaded.run_dir), "step": loaded.step,
                                               "other": str(other) if other else None}
    if is_primary():
        landscape.write_landscape_report(report, out_dir or loaded.run_dir, log_scale=log_scale, draw=draw)
    return report


def diagnose_run(run: str | pathlib.Path | LoadedRun, *, batch_size: int = 256, layers: Any = None,
                 step: Any = "latest", out_dir: str | pathlib.Path | None = None, draw: Any = None):
    """Per-layer statistics of a run's checkpoint on one training batch -> diagnostics.json + diagnostics.png
    (histograms of every layer's activations, pre-activations and weight gradients), with the gradient noise of that
    batch (``stats.gradient_noise``: the noise scale and per-layer signal-to-noise). Returns the statistics. The
    update/weight ratios are those of the checkpoint's optimizer state (none for a run whose optimizer is not
    recorded); only ratios far above ~1e-3 are flagged."""
    from jaxnn import losses, plotting
    from jaxnn.diagnostics.gradient_noise import gradient_noise
    from jaxnn.diagnostics.layers import layer_statistics
    from jaxnn.train.run import write_json

    loaded = _loaded(run, step, optimizer_state=True)  # the update/weight ratios need the optimizer's state
    (x, y), = loaded.batches("train", 1, batch_size)
    # A saved run's updates are those of its last learning rate (a schedule's end: small by design), so only too
    # large an update is flagged here; too small ones are judged during training (LayerStatisticsCallback).
    stats = layer_statistics(loaded.state, (x, y), loss=loaded.config.train.loss, layers=layers,
                             flag_small_updates=False)
    loss_fn = losses.make_loss_fn(loaded.state.apply_fn, loaded.config.train.loss, loaded.state.model_state)
    stats.gradient_noise = gradient_noise(loss_fn, loaded.state.params, (x, y))
    if is_primary():
        out = pathlib.Path(out_dir or loaded.run_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "diagnostics.json", {"run_dir": str(loaded.run_dir), "step": loaded.step,
                                              "batch_size": int(len(y)), **stats.to_json(),
                                              "gradient_noise": stats.gradient_noise.to_json()})
        (draw or plotting.draw_now)(plotting.plot_layer_statistics, out / "diagnostics.json", out / "diagnostics.png",
                                    f"{loaded.config.name} at step {loaded.step}: one batch of {len(y)}")
    return stats


def run_report(cfg: Any, *, run_dir: str | pathlib.Path | None = None, resume: bool = False, analyse: bool = True,
               draw: Any = None, progress: bool = False, echo: Any = None) -> dict:
    """What ``jaxnn run`` does, callable from a script or a notebook: train the config ``cfg`` (a
    :class:`jaxnn.config.Config`, e.g. from ``config.load_config``) into ``run_dir`` (default: a fresh
    ``output_dir/name/version_N``; with ``resume`` the latest one), then, when ``analyse`` and the config's ``analysis`` section ask for them, the curvature
    report and the filter-normalised landscape of the trained run, written beside its metrics.

    Returns {"run_dir", "summary" (summary.json's content), "curvature" and "landscape" (their reports, or None)}.
    ``echo(line)`` is told each stage's one-line result as it ends (the CLI passes ``print``); ``draw`` draws the
    figures (default: now, in this process); ``progress``: progress bars."""
    from jaxnn.train import train_run

    say = echo or (lambda line: None)
    summary, trained = train_run(cfg, run_dir=run_dir, resume=resume, draw=draw, echo=say)
    run_dir = trained.run_dir
    final = ", ".join(f"{k}={v:.4f}" for k, v in summary["final"].items())
    say(f"trained {summary['steps']} steps in {summary['wall_time_s']:.1f}s ({summary['stop_reason']}): {final}")
    result = {"run_dir": run_dir, "summary": summary, "curvature": None, "landscape": None}
    a = cfg.analysis
    if analyse and a.curvature:
        result["curvature"] = curvature_for_run(trained, k=a.curvature_k, density=a.density,
                                                data_batches=a.curvature_batches, draw=draw, progress=progress)
        say(describe_curvature(result["curvature"]))
    if analyse and a.landscape:
        result["landscape"] = landscape_for_run(trained, dirs="filter", grid=a.landscape_grid, span=a.landscape_span,
                                                data_batches=a.landscape_batches, draw=draw, progress=progress)
    return result
