"""Config-driven runs: ``config -> data, model, optimizer -> TrainState -> fit -> run folder``.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``curves.png`` and ``checkpoints/``;
:func:`load_run` reads it back for analysis (curvature, landscape).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable

import jax
import numpy as np

from jaxnn import config as config_lib
from jaxnn import data as data_lib
from jaxnn import losses, models, optim, parallel, runfolders
from jaxnn.runfolders import RunFolderError  # noqa: F401  (jaxnn.train's name for it)
from jaxnn.train import record
from jaxnn.train.callbacks import Callback, EarlyStopping
from jaxnn.train.checkpoint import Checkpointer, CheckpointError
from jaxnn.train.fit import (FitResult, LogOptions, NonFiniteLossError, StepOptions, create_train_state,
                             eval_batch_size_for, evaluate, fit)
from jaxnn.train.state import TrainState
from jaxnn.train.step import make_eval_step


def total_steps(cfg: config_lib.Config, num_train: int) -> int:
    t = cfg.train
    if t.steps is not None:
        return t.steps
    return max(1, int(round(t.epochs * data_lib.steps_per_epoch(num_train, t.batch_size, True))))


def check_config(cfg: config_lib.Config) -> config_lib.Config:
    """The checks ``config.validate`` leaves to the registries, which own the names: the dataset, model, optimizer,
    schedule and loss of ``cfg`` must be registered (ConfigError naming the field and the valid names). Called
    before anything is loaded by every path that uses a config (:func:`load_dataset` is their first step);
    returns ``cfg``."""
    config_lib.check_choice("data.name", cfg.data.name, data_lib.dataset_names(), "dataset")
    config_lib.check_choice("model.name", cfg.model.name, models.model_names(), "model")
    config_lib.check_choice("optimizer.name", cfg.optimizer.name, optim.OPTIMIZERS, "optimizer")
    config_lib.check_choice("optimizer.schedule", cfg.optimizer.schedule, optim.SCHEDULES, "schedule")
    config_lib.check_choice("train.loss", cfg.train.loss, losses.LOSSES, "loss")
    return cfg


def load_dataset(cfg: config_lib.Config) -> data_lib.Dataset:
    """``cfg``'s dataset, after :func:`check_config`."""
    d = check_config(cfg).data
    return data_lib.load_dataset(d.name, data_dir=d.data_dir, seed=d.seed, val_fraction=d.val_fraction,
                                 test_fraction=d.test_fraction, standardize=d.standardize, download=d.download,
                                 limit=d.limit, **d.kwargs)


def build_model(cfg: config_lib.Config, dataset: data_lib.Dataset):
    out = dataset.num_classes if dataset.num_classes is not None else int(np.prod(dataset.train.y.shape[1:]) or 1)
    return models.get_model(cfg.model.name, num_classes=out, **cfg.model.kwargs)


def build_state(cfg: config_lib.Config, dataset: data_lib.Dataset, mesh=None) -> tuple[TrainState, Callable, Any]:
    """Model, optimizer and freshly initialised TrainState for ``cfg``; returns (state, schedule, model)."""
    model = build_model(cfg, dataset)
    tx, schedule = optim.build_optimizer(cfg.optimizer, total_steps(cfg, len(dataset.train)))
    state = create_train_state(model, tx, dataset.input_shape, jax.random.PRNGKey(cfg.train.seed), mesh=mesh)
    return state, schedule, model


def abstract_state(cfg: config_lib.Config, dataset: data_lib.Dataset, mesh=None) -> tuple[TrainState, Any]:
    """The TrainState of ``cfg`` with shapes, dtypes and shardings but no values (nothing computed or compiled): the
    template a checkpoint is restored into."""
    model = build_model(cfg, dataset)
    tx, _ = optim.build_optimizer(cfg.optimizer, total_steps(cfg, len(dataset.train)))
    mesh = mesh or parallel.make_mesh()
    state = jax.eval_shape(lambda key: create_train_state(model, tx, dataset.input_shape, key, mesh=mesh),
                           jax.random.PRNGKey(cfg.train.seed))
    shardings = parallel.state_shardings(state, mesh, "replicated")  # where the restored arrays go (any saved layout)
    state = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                         state, shardings)
    return state, model


def make_checkpointer(cfg: config_lib.Config, run_dir: pathlib.Path, read_only: bool = False) -> Checkpointer:
    c = cfg.checkpoint
    return Checkpointer(run_dir / "checkpoints", keep_last=c.keep_last, keep_best=c.keep_best,
                        best_metric=c.best_metric, best_mode=c.best_mode, read_only=read_only)


def write_json(path: pathlib.Path, value: Any) -> None:
    """Atomic JSON write (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def train_from_config(cfg: config_lib.Config, *, run_dir: str | pathlib.Path | None = None, resume: bool = False,
                      callbacks: list[Callback] | None = None, mesh=None) -> dict:
    """Train as ``cfg`` says and write the run folder (default: a fresh ``OUTPUT_DIR/NAME/version_N``; with
    ``resume`` the latest version with checkpoints; see :mod:`jaxnn.runfolders`); returns the summary dict (also in
    summary.json, with the folder as ``run_dir``)."""
    return train_run(cfg, run_dir=run_dir, resume=resume, callbacks=callbacks, mesh=mesh)[0]


def train_run(cfg: config_lib.Config, *, run_dir: str | pathlib.Path | None = None, resume: bool = False,
              callbacks: list[Callback] | None = None, mesh=None, draw: Callable | None = None,
              echo: Callable[[str], None] | None = None) -> tuple[dict, "LoadedRun"]:
    """:func:`train_from_config`, also returning the trained run as :func:`load_run` would read it back (its final
    state, which the last checkpoint holds), so analysis can follow without reading the folder again.
    ``draw(function, *args)`` draws curves.png (default: now); ``echo(line)`` is told the run folder and the data
    split before training starts (the CLI passes ``print``)."""
    check_config(cfg)  # before the run folder is made
    if run_dir is None and jax.process_count() > 1:
        raise RunFolderError("with several processes, name the run folder with --run-dir (run_dir=): every process "
                             "must write the same one (`jaxnn launch` names it for you)")
    primary, pinned = parallel.is_primary(), run_dir is not None
    if resume and not cfg.checkpoint.enabled:
        raise RunFolderError("nothing to resume: the config turns checkpoints off (checkpoint.enabled: false)")
    run_dir = runfolders.resolve(cfg, run_dir, resume)
    if primary:
        runfolders.check(cfg, run_dir, resume, pinned=pinned)
    mesh = mesh or parallel.make_mesh(cfg.parallel.devices)
    parallel.check_mode(cfg.parallel.mode, cfg.parallel.params)
    parallel.check_batch_divisible(cfg.train.batch_size // cfg.train.grad_accum_steps, mesh,
                                   "train.batch_size / train.grad_accum_steps")
    dataset = load_dataset(cfg)
    state, schedule, model = build_state(cfg, dataset, mesh)
    state = parallel.place_state(state, mesh, cfg.parallel.params)
    if primary:  # only now: a config, data or model that fails to load leaves no folder behind
        run_dir = runfolders.claim(run_dir, fresh=not (pinned or resume))
        if echo is not None:
            echo(f"{'resuming' if resume else 'training'} {cfg.name} in {run_dir}; data: {dataset.describe()}")
    checkpointer = make_checkpointer(cfg, run_dir) if cfg.checkpoint.enabled else None
    start_step = 0
    if resume:
        tree = checkpointer.restore(state.checkpoint_tree())  # into this mesh and layout, whatever it was saved on
        state = state.replace_from_checkpoint(tree)
        start_step = int(tree["step"])
    elif primary:
        config_lib.save_config(cfg, run_dir / "config.yaml")
        (run_dir / record.RECORD).unlink(missing_ok=True)  # an earlier fit()'s record no longer describes it
    callbacks = list(callbacks or [])
    t = cfg.train
    if t.early_stop_patience:
        callbacks.append(EarlyStopping(monitor=t.early_stop_metric, patience=t.early_stop_patience,
                                       mode="max" if "accuracy" in t.early_stop_metric else "min"))
    if cfg.analysis.hessian_every:
        from jaxnn import curvature
        rule = cfg.optimizer.name if cfg.optimizer.name in curvature.STABILITY_RULES else None
        callbacks.append(curvature.HessianCallback(every_k_steps=cfg.analysis.hessian_every,
                                                   examples=cfg.analysis.hessian_examples, optimizer=rule,
                                                   momentum=cfg.optimizer.momentum if rule != "sgd" else 0.0))
    if cfg.analysis.diagnostics_every:
        from jaxnn.diagnostics import LayerStatisticsCallback
        callbacks.append(LayerStatisticsCallback(cfg.analysis.diagnostics_every, loss=t.loss))
    steps = total_steps(cfg, len(dataset.train))
    started = time.perf_counter()
    try:
        log_options = LogOptions(log_every=t.log_every, eval_every=t.eval_every,
                                 checkpoint_every=cfg.checkpoint.every_steps, run_dir=run_dir, nan_guard=t.nan_guard,
                                 progress=t.progress, save_final=False)  # the config says what is checkpointed
        result = fit(state, dataset, loss=t.loss, batch_size=t.batch_size, num_steps=steps, schedule=schedule,
                     seed=_data_seed(cfg), start_step=start_step, callbacks=callbacks, checkpointer=checkpointer,
                     step_options=step_options(cfg, steps_per_call=t.steps_per_call, mode=cfg.parallel.mode, mesh=mesh),
                     log_options=log_options)
    except NonFiniteLossError as error:
        if checkpointer is not None:
            checkpointer.close()
        if not t.nan_hunt or jax.process_count() > 1:
            raise
        report = hunt_nonfinite(cfg, dataset, run_dir, error.step, error.last_checkpoint)
        raise NonFiniteLossError(error.step, error.value, error.last_checkpoint, detail=str(report)) from None
    summary = summarize(cfg, dataset, model, result, time.perf_counter() - started, resumed_from=start_step or None)
    summary["run_dir"] = str(run_dir)
    if checkpointer is not None:
        checkpointer.close()
    if primary:  # with several processes, process 0 alone writes the run folder's files
        write_json(run_dir / "summary.json", summary)
        from jaxnn import plotting
        (draw or plotting.draw_now)(plotting.plot_training_curves, run_dir / "metrics.jsonl", run_dir / "curves.png",
                                    cfg.name)
    trained = LoadedRun(run_dir=run_dir, config=cfg, dataset=dataset, model=model, state=result.state,
                        step=result.steps_done)
    return summary, trained


def step_options(cfg: config_lib.Config, **dispatch: Any) -> StepOptions:
    """How ``cfg``'s optimizer steps run: its gradient accumulation and what its optimizer's update needs, with
    ``dispatch`` (``steps_per_call``, ``mode``, ``mesh``) as given (default: one step per call, ``jit``, every
    device)."""
    return StepOptions(grad_accum_steps=cfg.train.grad_accum_steps,
                       needs_value_fn=cfg.optimizer.name in optim.NEEDS_VALUE_FN,
                       needs_batch=cfg.optimizer.name in optim.NEEDS_BATCH, **dispatch)


def _data_seed(cfg: config_lib.Config) -> int:
    return cfg.train.seed if cfg.train.data_seed is None else cfg.train.data_seed


def hunt_nonfinite(cfg: config_lib.Config, dataset: data_lib.Dataset, run_dir: pathlib.Path, step: int,
                   last_checkpoint: int | None):
    """Replay a run (on one device) from its last checkpoint, or from the start, to the step before ``step`` (the
    first with a non-finite loss) and hunt the NaN/Inf on that step's batch
    (:func:`jaxnn.diagnostics.nonfinite.find_nonfinite`)."""
    from jaxnn.diagnostics.nonfinite import find_nonfinite
    from jaxnn.data import batch_rows

    t = cfg.train
    state, schedule, _ = build_state(cfg, dataset)
    start = 0
    if last_checkpoint:
        checkpointer = make_checkpointer(cfg, run_dir, read_only=True)
        try:
            state = state.replace_from_checkpoint(checkpointer.restore(state.checkpoint_tree(), step=last_checkpoint))
        finally:
            checkpointer.close()
        start = last_checkpoint
    if step - 1 > start:
        state = fit(state, dataset, loss=t.loss, batch_size=t.batch_size, num_steps=step - 1, schedule=schedule,
                    seed=_data_seed(cfg), start_step=start, step_options=step_options(cfg),
                    log_options=LogOptions(log_every=step, eval_every=step, nan_guard=False, progress=False)).state
    rows = batch_rows(len(dataset.train), t.batch_size, _data_seed(cfg), step - 1, 1)[0]
    return find_nonfinite(state, (dataset.train.x[rows], dataset.train.y[rows]), loss=t.loss, step=step)


def decoded_accuracy(model, state: TrainState, split: data_lib.Split, prefix: str, batch_size: int = 512) -> dict:
    """``{prefix}_sequence_accuracy``: the fraction of ``split``'s examples a sequence-to-sequence model answers
    exactly when it decodes greedily (each step feeds back its own most likely token)."""
    if len(split) == 0:
        return {}
    batch_size = min(batch_size, len(split))
    answers = []
    for begin in range(0, len(split), batch_size):  # every batch batch_size rows (the last one padded): one compile
        x = split.x[begin:begin + batch_size]
        padded = np.concatenate([x, np.repeat(x[:1], batch_size - len(x), axis=0)])
        answers.append(np.asarray(models.greedy_decode(model, state.params, padded, state.model_state))[:len(x)])
    return {f"{prefix}_sequence_accuracy": models.sequence_accuracy(np.concatenate(answers), split.y)}


def language_model_perplexities(dataset: data_lib.Dataset, final: dict) -> dict:
    """Per-token perplexity exp(loss) of every evaluated split, and on the test split (val when there is none) the
    unigram and bigram perplexities fitted on the train split (:func:`jaxnn.data.text.ngram_perplexities`), the
    numbers a language model has to beat."""
    out = {f"{split}_perplexity": float(np.exp(final[f"{split}_loss"]))
           for split in ("train", "val", "test") if f"{split}_loss" in final}
    held_out = "test" if len(dataset.test) else "val"
    if len(dataset.split(held_out)):
        baselines = data_lib.text.ngram_perplexities(dataset.train, dataset.split(held_out), dataset.num_classes)
        out.update({f"{held_out}_{name}_perplexity": value for name, value in baselines.items()})
    return out


def summarize(cfg, dataset, model, result: FitResult, wall_time_s: float, resumed_from: int | None) -> dict:
    classification = dataset.task == "classification"
    eval_step = make_eval_step(cfg.train.loss, classification=classification)
    final = {}
    mesh = parallel.mesh_of(result.state.params)
    size = eval_batch_size_for(dataset, 512, mesh)  # the shape and placement fit evaluated with: no new compile
    sharding = parallel.batch_sharding(mesh) if mesh is not None else None
    for split in ("train", "val", "test"):
        final.update(evaluate(result.state, getattr(dataset, split), eval_step, size, classification, split, sharding))
    if isinstance(model, models.Seq2Seq):  # the model's own answers, not the teacher-forced tokens
        for split in ("val", "test"):
            final.update(decoded_accuracy(model, result.state, getattr(dataset, split), split))
    if dataset.info.get("language_model") and cfg.train.loss == "sequence_cross_entropy":
        final.update(language_model_perplexities(dataset, final))
    return {
        "name": cfg.name, "dataset": dataset.name, "model": cfg.model.name,
        "num_params": int(models.count_params(result.state.params)),
        "steps": result.steps_done, "stop_reason": result.stop_reason, "best_step": result.best_step,
        "resumed_from_step": resumed_from, "wall_time_s": round(wall_time_s, 3),
        "train_loop_time_s": round(result.wall_time_s, 3),
        "devices": [str(d) for d in jax.devices()], "processes": jax.process_count(), "final": final,
        "split_sizes": {s: len(getattr(dataset, s)) for s in ("train", "val", "test")},
    }


@dataclasses.dataclass
class LoadedRun:
    """A trained run read back for analysis."""

    run_dir: pathlib.Path
    config: config_lib.Config
    dataset: data_lib.Dataset
    model: Any
    state: TrainState
    step: int

    def loss_fn(self, mode: str = "eval") -> Callable:
        """Pure ``loss_fn(params, batch)``; eval-mode batch norm by default, ``mode="train"`` for batch statistics."""
        return losses.make_loss_fn(self.state.apply_fn, self.config.train.loss, self.state.model_state, mode=mode)

    def accuracy_fn(self) -> Callable | None:
        if self.dataset.task != "classification":
            return None
        return losses.make_metric_fn(self.state.apply_fn, self.state.model_state)

    def batches(self, split: str = "train", num_batches: int = 4, batch_size: int | None = None) -> list:
        """The first ``num_batches`` equal-size batches of ``split`` in a fixed order (for analysis)."""
        data = getattr(self.dataset, split)
        batch_size = batch_size or self.config.train.batch_size
        batch_size = min(batch_size, len(data))
        num_batches = max(1, min(num_batches, len(data) // batch_size))
        x, y = data_lib.host_stacked_batches(data, batch_size, num_batches, seed=self.config.train.seed,
                                                      shuffle=True)
        return list(zip(x, y))  # host arrays: the analysis stacks and places them once

    def params_at(self, step: int) -> Any:
        ckpt = make_checkpointer(self.config, self.run_dir, read_only=True)
        try:
            return ckpt.restore({"params": self.state.params}, step=step, partial=True)["params"]
        finally:
            ckpt.close()

    def checkpoint_steps(self) -> list[int]:
        ckpt = make_checkpointer(self.config, self.run_dir, read_only=True)
        try:
            return ckpt.all_steps()
        finally:
            ckpt.close()


def load_run(run_dir: str | pathlib.Path, step: int | str = "latest", devices: int | None = None,
             optimizer_state: bool = False) -> LoadedRun:
    """Read a run folder: its config, data, model and the checkpoint ``step`` ("latest", "best" or a number),
    restored onto ``devices`` devices (default: all; replicated), whatever device count it was saved from. Only the
    parameters, model state, step and key are restored, not the optimizer's state (``state.opt_state`` is None), so
    a folder whose optimizer is not recorded (one ``fit(run_dir=...)`` wrote) reads too; ``optimizer_state``: also
    the optimizer's state where the config records the optimizer. ``run_dir`` may be the
    parent of ``version_N`` folders (``runs/NAME``): its latest run is read."""
    run_dir = runfolders.latest_run(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    if not (run_dir / "config.yaml").exists():
        fit_record = record.read_fit_record(run_dir)
        if fit_record is not None and not fit_record["config"]:
            raise FileNotFoundError(
                f"{run_dir} was written by fit() without a config.yaml, which jaxnn needs to rebuild the run: "
                f"{'; '.join(fit_record['why_no_config'])}. Read its weights in your script with "
                f"jaxnn.train.restore_state(run_dir, state)")
        raise FileNotFoundError(f"{run_dir} is not a jaxnn run folder: config.yaml is missing")
    cfg = config_lib.load_config(run_dir / "config.yaml")
    dataset = load_dataset(cfg)
    fit_record = record.read_fit_record(run_dir)
    if fit_record is not None and fit_record["train_data_sha256"] != record.data_fingerprint(dataset.train):
        raise CheckpointError(f"{run_dir}: the training data config.yaml loads differ from those fit() trained on "
                              "(changed after load_dataset, e.g. noisy labels, or the files changed); analyse it "
                              "from your script with jaxnn.train.restore_state(run_dir, state)")
    state, model = abstract_state(cfg, dataset, parallel.make_mesh(devices))
    ckpt = make_checkpointer(cfg, run_dir, read_only=True)
    try:
        step = _step_number(ckpt, step, run_dir)
        with_optimizer = optimizer_state and fit_record is None  # fit() records no optimizer
        tree = ckpt.restore(state.checkpoint_tree() if with_optimizer else _analysis_tree(state), step=int(step),
                            partial=True)
    finally:
        ckpt.close()
    state = state.replace(**{"opt_state": None, **tree})
    return LoadedRun(run_dir=run_dir, config=cfg, dataset=dataset, model=model, state=state, step=int(step))


def _step_number(ckpt: Checkpointer, step: int | str, run_dir: pathlib.Path) -> int:
    """The checkpoint ``step`` names: "best" (the latest when none is marked best), "latest" or a number."""
    if step == "best":
        best = ckpt.best_step()
        step = ckpt.latest_step() if best is None else best
    elif step == "latest":
        step = ckpt.latest_step()
    if step is None:
        raise CheckpointError(f"no checkpoint found in {run_dir / 'checkpoints'}")
    return int(step)


def _analysis_tree(state: TrainState) -> dict:
    """The checkpoint entries analysis reads: no optimizer state."""
    return {key: value for key, value in state.checkpoint_tree().items() if key != "opt_state"}


def restore_state(run_dir: str | pathlib.Path, state: TrainState, step: int | str = "latest") -> TrainState:
    """``state`` (any TrainState of the same model, e.g. a fresh ``create_train_state``) with the parameters, model
    state, step and key of ``run_dir``'s checkpoint ``step`` ("latest", "best" or a number); its optimizer state is
    kept as it is (the checkpoint's may come from another optimizer). For a script's run that ``load_run`` cannot
    rebuild (a model or data set of the script's own)."""
    run_dir = runfolders.latest_run(run_dir, is_run=runfolders.has_checkpoints)
    if (run_dir / "config.yaml").exists():  # its checkpoint settings say which metric ranks "best"
        ckpt = make_checkpointer(config_lib.load_config(run_dir / "config.yaml"), run_dir, read_only=True)
    else:  # fit() saved only the final state: "best" is the latest
        ckpt = Checkpointer(run_dir / "checkpoints", read_only=True, keep_best=False)
    try:
        return state.replace(**ckpt.restore(_analysis_tree(state), step=_step_number(ckpt, step, run_dir),
                                            partial=True))
    finally:
        ckpt.close()
