"""Sweeps: the variants of one config trained together as a population (``jaxnn sweep CONFIG``).

A config's ``sweep`` section names the swept fields and their values::

    sweep:
      optimizer.lr: {log_uniform: [1.0e-3, 1.0e-1], n: 4}   # grid: 4 log-spaced values
      seed: [0, 1, 2]                                        # a list is an axis of the grid
      # method: random, samples: 8, draw_seed: 0            # random: 8 joint draws of the distributions

``method: grid`` (default) crosses every axis; a distribution (``uniform`` / ``log_uniform`` with ``n``) is ``n``
evenly (log-)spaced values. ``method: random`` draws ``samples`` points from the distributions (``draw_seed``)
and crosses them with the list axes (e.g. seeds). Only fields a population can vary in one compiled program are
sweepable (:data:`SWEEPABLE`); every member's config is validated like a single run's.

Member ``i`` is the run ``jaxnn train`` would do with its config (its values set, ``train.data_seed`` fixed to the
batch order it trained on), for ``train.steps`` steps. :func:`run_sweep` trains the members ``population.chunk`` at
a time into the sweep folder (default a fresh ``OUTPUT_DIR/NAME-sweep/version_N``; ``--out`` pins one; with
``--resume`` the latest one), writes each finished chunk to ``chunks/`` (``--resume`` skips those), then ``sweep.csv`` (one row per member:
its values, status, final train/val/test metrics [, λmax, Hessian trace and gᵀHg/gᵀg]), ``sweep.json`` (the same plus the
ensemble metrics), figures, and the best member (by validation accuracy, else validation loss) as an ordinary run
folder ``best/`` that ``jaxnn curvature`` and ``jaxnn landscape`` accept.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import math
import os
import pathlib
import shutil
import time
from typing import Any, Callable

import numpy as np

from jaxnn.config import (  # the sweep grammar (sweep_members, member_config) is the config's: it lives there
    SWEEPABLE, Config, ConfigError, OptimizerConfig, SweepPlan, member_config, shared_data_seed, sweep_members,
)

DROPOUT_PLACEHOLDER = 0.5  # the population's model is built with dropout layers; each member's rate replaces it


def optimizer_factory(o: OptimizerConfig, total_steps: int, swept: tuple[str, ...]) -> Callable:
    """An optax optimizer factory whose keyword arguments are the swept optimizer fields (what
    ``train_population`` varies with ``optax.inject_hyperparams``); the rest comes from ``o``."""
    from jaxnn import optim

    def factory(**values):
        return optim.build_optimizer(dataclasses.replace(o, **values), total_steps)[0]

    factory.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=getattr(o, name)) for name in swept])
    factory.__name__ = o.name
    return factory


# ----------------------------------------------------------------------------------------------------- running


def run_sweep(cfg: Config, out_dir: str | pathlib.Path | None = None, *, curvature: bool = False,
              resume: bool = False, progress: bool | None = None, draw: Callable | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Train every member of ``cfg.sweep`` and write the sweep folder (see the module docstring); returns the
    summary also written to ``sweep.json``."""
    import jax

    from jaxnn import config as config_lib, plotting
    from jaxnn.train.population import ensemble_metrics, format_table
    from jaxnn import runfolders
    from jaxnn.train.run import build_model, check_config, load_dataset, total_steps, write_json

    if not cfg.sweep:
        raise ConfigError("sweep", "the config has no sweep section; add one, or e.g. "
                                   "--set 'sweep.optimizer.lr=[0.1, 0.01]' --set 'sweep.seed=[0, 1]'")
    plan = sweep_members(cfg)
    check_config(cfg)  # the swept fields are numbers: the names are the same for every member
    progress = cfg.train.progress if progress is None else progress
    draw = draw or plotting.draw_now
    if out_dir is None and jax.process_count() > 1:
        raise runfolders.RunFolderError("with several processes, name the sweep folder with --out (out_dir=): every "
                                        "process must write the same one (`jaxnn launch` names it for you)")
    out = runfolders.prepare(cfg, out_dir, resume, sweep=True)
    dataset = load_dataset(cfg)
    if "model.kwargs.dropout" in plan.fields:  # dropout layers in the program; each member runs at its own rate
        try:
            model = build_model(cfg.replace(**{"model.kwargs.dropout": DROPOUT_PLACEHOLDER}), dataset)
        except TypeError as error:
            if isinstance(error, ValueError):  # validation.WrongTypeError: another argument's wrong type, as it is
                raise
            raise ConfigError("sweep.model.kwargs.dropout", f"model {cfg.model.name} takes no dropout rate ({error})")
    else:
        model = build_model(cfg, dataset)
    steps = total_steps(cfg, len(dataset.train))
    t = cfg.train
    if t.grad_accum_steps != 1:
        raise ConfigError("train.grad_accum_steps", "a sweep trains each member with whole batches; set it to 1")
    swept_optimizer = tuple(SWEEPABLE[f] for f in plan.fields if f.startswith("optimizer."))
    factory = optimizer_factory(cfg.optimizer, steps, swept_optimizer)
    columns = {SWEEPABLE[f]: plan.values[f] for f in plan.fields}
    columns.setdefault("seed", [cfg.train.seed] * plan.count)
    chunk = cfg.population.chunk or plan.count
    devices = len(jax.devices()) if cfg.parallel.devices == -1 else cfg.parallel.devices
    log(f"sweep: {plan.count} members ({plan.method}: {', '.join(plan.fields)}), {steps} steps each, "
        f"{chunk} at a time" + (f" over {devices} devices" if devices > 1 else "")
        + (f", early stopping on {t.early_stop_metric} (patience {t.early_stop_patience})"
           if t.early_stop_patience else ""))

    template = _chunk_template(model, factory, dataset, columns)
    # Only now: a config, data or model that fails to load leaves nothing behind (nothing --resume would pick).
    out = runfolders.claim(out, fresh=out_dir is None and not resume)
    chunks_dir = out / "chunks"
    if not resume:
        config_lib.save_config(cfg, out / "config.yaml")
    rows, histories, states, compile_s, run_s = [], [], [], 0.0, 0.0
    started = time.perf_counter()
    for begin in range(0, plan.count, chunk):
        end = min(plan.count, begin + chunk)
        folder = chunks_dir / f"{begin:05d}-{end - 1:05d}"
        if resume and (folder / "done").exists():
            chunk_rows, losses, state = _read_chunk(folder, template)
            log(f"members {begin}-{end - 1}: read from {folder} (finished before)")
        else:
            from jaxnn.optim import NEEDS_BATCH
            from jaxnn.train.population import PopulationOptions, train_population

            options = PopulationOptions(
                steps_per_call=cfg.population.steps_per_call, progress=progress,
                early_stop_patience=t.early_stop_patience, early_stop_metric=t.early_stop_metric,
                eval_every=t.eval_every, devices=cfg.parallel.devices, needs_batch=cfg.optimizer.name in NEEDS_BATCH)
            result = train_population(
                model, factory, dataset, members={name: values[begin:end] for name, values in columns.items()},
                num_steps=steps, loss=t.loss, batch_size=t.batch_size, data_seed=shared_data_seed(cfg),
                shuffle_per_member=cfg.population.shuffle_per_member, options=options)
            chunk_rows, losses, state = result.members, result.losses, result.state
            compile_s, run_s = compile_s + result.compile_s, run_s + result.run_s
            _write_chunk(folder, chunk_rows, losses, state)
        for offset, row in enumerate(chunk_rows):
            rows.append({"member": begin + offset, **plan.member(begin + offset),
                         **{k: v for k, v in row.items() if k not in columns and k != "member"}})  # chunk's own
        histories.append(losses)
        states.append(jax.tree.leaves(state))  # every chunk's optimizer is its own object: keep the arrays only
    state = jax.tree.unflatten(jax.tree.structure(template),
                               [np.concatenate(leaves) for leaves in zip(*states)])
    losses = np.concatenate(histories, axis=1)

    classification = dataset.task == "classification"
    if curvature:
        _add_curvature(rows, state, cfg, dataset, log)
    metric = "val_accuracy" if classification and len(dataset.val) else ("val_loss" if len(dataset.val)
                                                                          else "train_loss")
    finite = [r for r in rows if _trained(r) and math.isfinite(r.get(metric, float("nan")))]
    best = None
    if finite:
        best = (max if "accuracy" in metric else min)(finite, key=lambda r: r[metric])["member"]
    summary: dict[str, Any] = {
        "name": cfg.name, "optimizer": cfg.optimizer.name, "members": plan.count, "method": plan.method,
        "fields": list(plan.fields),
        "steps": steps, "chunk": chunk, "devices": devices, "selection_metric": metric, "best_member": best,
        "compile_s": round(compile_s, 3), "train_s": round(run_s, 3),
        "wall_time_s": round(time.perf_counter() - started, 3), "rows": rows,
    }
    if classification and len(dataset.test):
        alive = [r["member"] for r in rows if _trained(r)]
        if alive:
            from jaxnn.train.population import PopulationResult

            kept = jax.tree.map(lambda leaf: leaf[np.asarray(alive)], state)
            ensemble = ensemble_metrics(PopulationResult(kept, [], losses, None, 0.0, 0.0), dataset.test)
            ensemble["best_member"] = alive[ensemble["best_member"]]
            summary["ensemble_test"] = ensemble
    _write_csv(out / "sweep.csv", rows)
    write_json(out / "sweep.json", summary)
    np.save(out / "losses.npy", losses)
    draw(plotting.plot_sweep, out / "sweep.json", out / "losses.npy", out)
    log(format_table(rows, metric))
    if "ensemble_test" in summary:
        e = summary["ensemble_test"]
        log(f"test accuracy: ensemble of {len(alive)} {e['ensemble_accuracy']:.4f} (NLL {e['ensemble_nll']:.4f}), "
            f"mean member {e['mean_member_accuracy']:.4f} ({e['mean_member_nll']:.4f}), best member "
            f"#{e['best_member']} {e['best_member_accuracy']:.4f} ({e['best_member_nll']:.4f})")
    if best is not None:
        export_member(cfg, plan, best, jax.tree.map(lambda leaf: leaf[best], state), rows[best], losses[:, best],
                      steps, out / "best", draw)
        log(f"best member #{best} ({', '.join(f'{f}={rows[best][f]:g}' for f in plan.fields)}; {metric} "
            f"{rows[best][metric]:.4f}) exported as the run folder {out / 'best'}")
    else:
        log("no member finished with a finite validation metric: nothing exported")
    log(f"sweep folder: {out}")
    return summary


def _trained(row: dict) -> bool:
    """Completed or early-stopped: not diverged."""
    return not row["status"].startswith("diverged")


def _add_curvature(rows: list[dict], state: Any, cfg: Config, dataset, log) -> None:
    """λmax (population Lanczos), the Hessian trace (Hutchinson) and gᵀHg/gᵀg of every member on the analysis
    batches."""
    from jaxnn import data as data_lib
    from jaxnn.train.population import member_curvature

    a = cfg.analysis
    batch_size = min(cfg.train.batch_size, len(dataset.train))
    x, y = data_lib.host_stacked_batches(dataset.train, batch_size, a.curvature_batches, seed=cfg.train.seed,
                                         shuffle=True)
    started = time.perf_counter()
    member_curvature(rows, state, list(zip(x, y)), cfg.train.loss)
    log(f"curvature of {sum(_trained(r) for r in rows)} members (lambda_max: Lanczos, 40 steps; trace: Hutchinson, "
        f"20 probes; gradient_curvature: gᵀHg/gᵀg) on {len(x)} batches of {batch_size} in "
        f"{time.perf_counter() - started:.1f}s")


def _chunk_template(model, factory, dataset, columns) -> Any:
    """The stacked state of one member, shapes only: the structure a chunk's arrays are read back into."""
    import jax
    import optax

    from jaxnn.train.population import MEMBER_FIELDS, init_members

    swept = [name for name in columns if name not in MEMBER_FIELDS]
    tx = optax.inject_hyperparams(factory)(**{name: float(columns[name][0]) for name in swept})
    return jax.eval_shape(lambda: init_members(model, tx, dataset.input_shape, np.asarray(columns["seed"][:1]),
                                                np.ones(1), {}))


def _write_chunk(folder: pathlib.Path, rows: list[dict], losses: np.ndarray, state: Any) -> None:
    """A finished chunk, written to a temporary folder and renamed: a chunk folder is whole or absent."""
    import jax

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    np.savez(tmp / "state.npz", **{f"leaf{i}": np.asarray(leaf) for i, (_, leaf) in enumerate(leaves)})
    (tmp / "paths.json").write_text(json.dumps([jax.tree_util.keystr(path) for path, _ in leaves]))
    np.save(tmp / "losses.npy", losses)
    (tmp / "members.json").write_text(json.dumps(rows))
    (tmp / "done").write_text("")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _read_chunk(folder: pathlib.Path, template: Any) -> tuple[list[dict], np.ndarray, Any]:
    import jax

    from jaxnn.train.checkpoint import CheckpointError

    try:
        paths = json.loads((folder / "paths.json").read_text())
        with np.load(folder / "state.npz") as arrays:
            leaves = [arrays[f"leaf{i}"] for i in range(len(paths))]
        rows = json.loads((folder / "members.json").read_text())
        losses = np.load(folder / "losses.npy")
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"sweep chunk {folder} is unreadable ({error}); delete it to retrain those members")
    expected = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(template)]
    if paths != expected:
        raise CheckpointError(f"sweep chunk {folder} holds a different state structure than this config trains")
    return rows, losses, jax.tree.unflatten(jax.tree.structure(template), leaves)


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def export_member(cfg: Config, plan: SweepPlan, index: int, state: Any, row: dict, losses: np.ndarray, steps: int,
                  run_dir: pathlib.Path, draw: Callable) -> pathlib.Path:
    """Member ``index`` as an ordinary run folder (config.yaml, checkpoints/, summary.json, metrics.jsonl,
    curves.png): what ``jaxnn train`` with its config writes, so ``jaxnn curvature`` / ``landscape`` accept it."""
    import jax

    from jaxnn import config as config_lib, optim, plotting
    from jaxnn.train.run import make_checkpointer, write_json

    member_cfg = member_config(cfg, plan, index).replace(**{"train.steps": steps})
    tmp = run_dir.with_name(run_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config_lib.save_config(member_cfg, tmp / "config.yaml")
    tx, _ = optim.build_optimizer(member_cfg.optimizer, steps)
    fresh = tx.init(state.params)
    inner = state.opt_state.inner_state  # the population's optimizer state wraps the config's chain
    same = jax.tree.structure(inner) == jax.tree.structure(fresh)
    tree = {"step": np.asarray(steps, np.int32), "params": state.params, "model_state": state.model_state,
            "opt_state": inner if same else fresh, "rng": state.rng}
    checkpointer = make_checkpointer(member_cfg, tmp)
    try:
        metrics = {k: row[k] for k in ("val_loss", "val_accuracy") if isinstance(row.get(k), float)}
        checkpointer.save(steps, tree, metrics)
    finally:
        checkpointer.close()
    log_every = member_cfg.train.log_every
    with open(tmp / "metrics.jsonl", "w") as handle:
        for end in range(log_every, steps + 1, log_every):
            window = losses[end - log_every:end]
            handle.write(json.dumps({"step": end, "loss": float(window[-1]),
                                     "loss_mean": float(np.mean(window))}) + "\n")
        handle.write(json.dumps({"step": steps, **{k: row[k] for k in ("val_loss", "val_accuracy") if k in row}})
                     + "\n")
    final = {k: v for k, v in row.items() if k.split("_")[0] in ("train", "val", "test")}
    write_json(tmp / "summary.json", {
        "name": member_cfg.name, "model": member_cfg.model.name, "steps": steps, "stop_reason": "completed",
        "final": final, "sweep_member": index, "swept": plan.member(index),
        "optimizer_state": "from the sweep" if same else
        "re-initialised (the population's optimizer chain had a different structure)",
    })
    shutil.rmtree(run_dir, ignore_errors=True)
    os.replace(tmp, run_dir)
    draw(plotting.plot_training_curves, run_dir / "metrics.jsonl", run_dir / "curves.png",
         f"{member_cfg.name}: sweep member #{index}")
    return run_dir
