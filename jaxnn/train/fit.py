"""The fit loop: compiled step, batches prefetched to device, metrics flushed to host only when logging.

    state = create_train_state(model, tx, ds.input_shape, jax.random.key(0))
    result = fit(state, ds, loss="softmax_cross_entropy", batch_size=64, num_steps=500)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxnn import data as data_lib
from jaxnn import losses, parallel
from jaxnn.train.callbacks import Callback, FitContext
from jaxnn.train.checkpoint import Checkpointer
from jaxnn.train.state import TrainState
from jaxnn.train.step import make_eval_step, make_train_step


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss; ``step`` is the first optimizer step that did."""

    def __init__(self, step: int, value: float, last_checkpoint: int | None):
        self.step, self.value, self.last_checkpoint = step, value, last_checkpoint
        kept = f"; the last good checkpoint (step {last_checkpoint}) is untouched" if last_checkpoint else ""
        super().__init__(f"non-finite loss ({value}) at step {step}: training stopped{kept}. "
                         "Lower the learning rate or enable clipping (optimizer.clip_norm).")


def create_train_state(model, tx, input_shape: Sequence[int], key: jax.Array, *, mesh=None) -> TrainState:
    """Initialise ``model`` for inputs of ``input_shape`` (no batch axis) and wrap it with ``tx``."""
    from jaxnn import models as models_lib

    init_key, rng = jax.random.split(key)
    params, model_state = models_lib.init_model(model, init_key, tuple(input_shape))
    state = TrainState.create(apply_fn=model.apply, params=params, model_state=model_state, tx=tx, rng=rng)
    state = state.replace(input_shape=tuple(input_shape))
    return parallel.replicate(state, mesh or parallel.make_mesh())


@dataclasses.dataclass
class FitResult:
    state: TrainState
    history: list[dict]          # the logged records (also in metrics.jsonl when run_dir is given)
    stop_reason: str
    steps_done: int
    wall_time_s: float
    best_step: int | None = None


def num_outputs(state: TrainState, input_shape: Sequence[int]) -> int:
    """The model's output width, from shapes only (no compute)."""
    x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
    out = jax.eval_shape(lambda p, s, x: state.apply_fn({"params": p, **s}, x, train=False),
                         state.params, state.model_state, x)
    return int(out.shape[-1])


def check_inputs(state: TrainState, dataset: data_lib.Dataset, loss_name: str | None) -> None:
    """Fail before compiling when the data cannot feed the model: input shape and label range (NaN inputs and
    labels outside the data set's own classes are refused when a ``Split``/``Dataset`` is built)."""
    expected = getattr(state, "input_shape", None)
    if expected is not None and tuple(dataset.input_shape) != tuple(expected):
        raise ValueError(f"wrong input shape for the model: it was initialised for inputs of shape {tuple(expected)}, "
                         f"but dataset {dataset.name!r} has inputs of shape {tuple(dataset.input_shape)}")
    if dataset.task == "classification" and loss_name in losses.CLASSIFICATION_LOSSES:
        classes = num_outputs(state, dataset.input_shape)
        for split_name in ("train", "val", "test"):
            y = getattr(dataset, split_name).y
            if len(y) and (y.min() < 0 or y.max() >= classes):
                raise ValueError(f"labels out of range in the {split_name} split: found labels in "
                                 f"[{int(y.min())}, {int(y.max())}], the model has {classes} outputs (valid: 0..{classes - 1})")


def evaluate(state: TrainState, split: data_lib.Split, eval_step: Callable, batch_size: int,
             classification: bool, prefix: str) -> dict:
    """Mean loss (and accuracy) over a whole split, eval mode."""
    if len(split) == 0:
        return {}
    totals = None
    for batch in data_lib.batch_iterator(split, batch_size, shuffle=False, drop_remainder=False, epochs=1):
        sums = eval_step(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    out = {f"{prefix}_loss": float(totals["loss_sum"] / totals["count"])}
    if classification:
        out[f"{prefix}_accuracy"] = float(totals["correct"] / totals["count"])
    return out


class MetricsWriter:
    """Appends one JSON line per logged step to ``metrics.jsonl``; on resume drops lines past the restart."""

    def __init__(self, path: pathlib.Path | None, resume_from_step: int | None = None):
        self.path = path
        if path is None:
            return
        if resume_from_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_from_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        elif resume_from_step is None and path.exists():
            path.unlink()

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def fit(state: TrainState, dataset: data_lib.Dataset, *, loss: str | Callable = "softmax_cross_entropy",
        batch_size: int = 64, num_steps: int, schedule: Callable | None = None, seed: int = 0,
        grad_accum_steps: int = 1, log_every: int = 10, eval_every: int | None = None,
        eval_batch_size: int = 512, callbacks: Sequence[Callback] = (), checkpointer: Checkpointer | None = None,
        checkpoint_every: int | None = None, run_dir: str | pathlib.Path | None = None, start_step: int = 0,
        nan_guard: bool = True, progress: bool = True, mesh=None, needs_value_fn: bool = False) -> FitResult:
    """Train ``state`` for ``num_steps`` optimizer steps on ``dataset.train``; evaluate on ``dataset.val``.

    Per step: one compiled call, no host sync. Every ``log_every`` steps (and at every eval/checkpoint) the
    queued step metrics come to the host in one transfer, are checked for NaN/Inf (``nan_guard``: stop and
    name the step; no checkpoint is written after it) and one record per logged step goes to metrics.jsonl.
    ``start_step`` resumes: the batch stream continues exactly where step ``start_step`` left it.
    """
    mesh = mesh or parallel.make_mesh()
    parallel.check_batch_divisible(batch_size // grad_accum_steps, mesh, "batch_size / grad_accum_steps")
    if batch_size % grad_accum_steps:
        raise ValueError(f"grad_accum_steps={grad_accum_steps} must divide batch_size={batch_size}")
    loss_name = loss if isinstance(loss, str) else None
    classification = dataset.task == "classification"
    check_inputs(state, dataset, loss_name)
    if num_steps < start_step:
        raise ValueError(f"num_steps={num_steps} is less than the step to resume from ({start_step})")
    steps_per_epoch = data_lib.steps_per_epoch(len(dataset.train), batch_size, True)
    eval_every = eval_every or steps_per_epoch
    checkpoint_every = checkpoint_every or eval_every

    train_step = make_train_step(loss, schedule, grad_accum_steps=grad_accum_steps, classification=classification,
                                 needs_value_fn=needs_value_fn)
    eval_step = make_eval_step(loss, classification=classification)
    run_dir = pathlib.Path(run_dir) if run_dir is not None else None
    writer = MetricsWriter(run_dir / "metrics.jsonl" if run_dir else None,
                           resume_from_step=start_step if start_step else None)
    batches = data_lib.batch_iterator(dataset.train, batch_size, seed=seed, start_step=start_step,
                                      sharding=parallel.batch_sharding(mesh))
    analysis_batch = next(iter(data_lib.batch_iterator(dataset.train, min(batch_size, len(dataset.train)),
                                                       seed=seed + 1, epochs=1)))
    per_example = losses.get_loss(loss) if isinstance(loss, str) else loss
    ctx = FitContext(state=state, analysis_batch=analysis_batch, run_dir=run_dir, step=start_step,
                     make_loss_fn=lambda s: losses.make_loss_fn(s.apply_fn, per_example, s.model_state))
    def notify(hook: str) -> None:
        """Callbacks are duck-typed: any object with some of the hooks (the base class has them all)."""
        for cb in callbacks:
            method = getattr(cb, hook, None)
            if method is not None:
                method(ctx)

    notify("on_train_begin")

    history: list[dict] = []
    queued: list[tuple[int, dict]] = []
    last_checkpoint = checkpointer.latest_step() if checkpointer else None
    best_step = checkpointer.best_step() if checkpointer else None
    stop_reason = "completed"
    started = time.perf_counter()
    bar = tqdm(total=num_steps, initial=start_step, disable=not progress, desc="train", unit="step", dynamic_ncols=True)

    window: list[dict] = []   # host metrics of the steps since the last record

    def drain() -> None:
        """Bring queued step metrics to the host in one transfer; the NaN guard sees every step."""
        host = jax.device_get([m for _, m in queued])
        for (s, _), m in zip(queued, host):
            if nan_guard and not math.isfinite(float(m["loss"])):
                queued.clear()
                raise NonFiniteLossError(s, float(m["loss"]), last_checkpoint)
        queued.clear()
        window.extend(host)

    def record(step: int, extra: dict) -> dict:
        drain()
        rec = {"step": step, "epoch": round(step / steps_per_epoch, 4)}
        if window:
            # Norms are computed only on steps known in advance to be logged; an unknown lr (NaN) is left out.
            rec.update({k: float(v) for k, v in window[-1].items() if math.isfinite(float(v)) or k == "loss"})
            rec["loss_mean"] = float(np.mean([float(m["loss"]) for m in window]))
        window.clear()
        rec.update(extra)
        rec["time_s"] = round(time.perf_counter() - started, 3)
        history.append(rec)
        writer.write(rec)
        return rec

    try:
        for step in range(start_step + 1, num_steps + 1):
            will_log = step % log_every == 0 or step % eval_every == 0 or step == num_steps or (
                checkpointer is not None and step % checkpoint_every == 0)
            state, metrics = train_step(state, next(batches), will_log)
            queued.append((step, metrics))
            ctx.state, ctx.step = state, step
            bar.update(1)
            is_eval = step % eval_every == 0 or step == num_steps
            is_ckpt = checkpointer is not None and (step % checkpoint_every == 0 or step == num_steps)
            extra: dict = {}
            if is_eval:
                drain()  # no evaluation (and no checkpoint) of a state whose loss went non-finite
                ctx.eval_metrics = evaluate(state, dataset.val, eval_step, eval_batch_size, classification, "val")
                extra.update(ctx.eval_metrics)
            notify("on_step_end")
            if is_eval:
                notify("on_eval_end")
            pending = ctx.pop_pending()
            if step % log_every == 0 or is_eval or is_ckpt or pending or ctx.stop_reason:
                rec = record(step, {**extra, **pending})
                ctx.metrics = rec
                postfix = {"loss": f"{rec.get('loss', float('nan')):.4f}"}
                if "accuracy" in rec:
                    postfix["acc"] = f"{rec['accuracy']:.3f}"
                if "val_accuracy" in rec:
                    postfix["val_acc"] = f"{rec['val_accuracy']:.3f}"
                bar.set_postfix(postfix, refresh=False)
            if is_ckpt:
                checkpointer.save(step, state.checkpoint_tree(),
                                  {k: v for k, v in ctx.eval_metrics.items() if k == checkpointer.best_metric})
                last_checkpoint = step
                best_step = checkpointer.best_step()
            if ctx.stop_reason:
                stop_reason = ctx.stop_reason
                break
    finally:
        bar.close()
    notify("on_train_end")
    return FitResult(state=state, history=history, stop_reason=stop_reason, steps_done=ctx.step,
                     wall_time_s=time.perf_counter() - started, best_step=best_step)

