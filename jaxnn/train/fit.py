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
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxnn import data as data_lib
from jaxnn import losses, parallel, runfolders, runtime
from jaxnn.validation import merge_options
from jaxnn.train.callbacks import Callback, FitContext
from jaxnn.train import record
from jaxnn.train.checkpoint import CheckpointError, Checkpointer
from jaxnn.train.state import TrainState
from jaxnn.train.step import make_eval_step, make_resident_train_steps, make_train_step


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss; ``step`` is the first optimizer step that did."""

    def __init__(self, step: int, value: float, last_checkpoint: int | None, detail: str | None = None):
        self.step, self.value, self.last_checkpoint, self.detail = step, value, last_checkpoint, detail
        kept = f"; the last good checkpoint (step {last_checkpoint}) is untouched" if last_checkpoint else ""
        super().__init__(f"non-finite loss ({value}) at step {step}: training stopped{kept}. "
                         "Lower the learning rate or enable clipping (optimizer.clip_norm)."
                         + (f"\n{detail}" if detail else ""))


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
    sequence_loss = loss_name == "sequence_cross_entropy"
    if isinstance(loss_name, str) and dataset.task == "classification" and sequence_loss != dataset.sequence_labels:
        raise ValueError(f"loss {loss_name!r} does not fit dataset {dataset.name!r}: "
                         + ("sequence labels (a label per position) need loss 'sequence_cross_entropy'"
                            if dataset.sequence_labels else
                            "'sequence_cross_entropy' needs sequence labels (a label per position), the data set has "
                            "one label per example"))
    vocab = getattr(getattr(state.apply_fn, "__self__", None), "input_vocab_size", None)
    if vocab is not None and np.issubdtype(dataset.train.x.dtype, np.integer):
        rows = [(f" (row {row} of each example)", vocab[row], lambda x, row=row: x[:, row])
                for row in range(len(vocab))] if isinstance(vocab, tuple) else [("", vocab, lambda x: x)]
        for split_name in ("train", "val", "test"):
            for where, size, part in rows:
                x = part(getattr(dataset, split_name).x)
                if x.size and (x.min() < 0 or x.max() >= size):
                    raise ValueError(f"token ids out of range in the {split_name} split{where}: found ids in "
                                     f"[{int(x.min())}, {int(x.max())}], the model reads {size} tokens there (valid: "
                                     f"0..{size - 1})")
    if dataset.task == "classification" and loss_name in losses.CLASSIFICATION_LOSSES:
        classes = num_outputs(state, dataset.input_shape)
        for split_name in ("train", "val", "test"):
            y = getattr(dataset, split_name).y
            low = data_lib.IGNORE_LABEL if y.ndim == 2 else 0
            if len(y) and (y.min() < low or y.max() >= classes):
                raise ValueError(f"labels out of range in the {split_name} split: found labels in "
                                 f"[{int(y.min())}, {int(y.max())}], the model has {classes} outputs (valid: 0..{classes - 1})")


def padded_batches(split: data_lib.Split, batch_size: int):
    """``(x, y, mask)`` numpy batches of exactly ``batch_size`` rows covering ``split`` in order: the last one
    zero-padded, ``mask`` 1 on real rows. One shape for every batch and split: one compiled eval program."""
    x_dtype, y_dtype = data_lib.pipeline.device_dtypes(split)
    for begin in range(0, len(split), batch_size):
        x = np.asarray(split.x[begin:begin + batch_size], x_dtype)
        y = np.asarray(split.y[begin:begin + batch_size], y_dtype)
        valid = len(x)
        mask = np.zeros(batch_size, x_dtype)
        mask[:valid] = 1
        if valid < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - valid,) + x.shape[1:], x_dtype)])
            y = np.concatenate([y, np.zeros((batch_size - valid,) + y.shape[1:], y_dtype)])
        yield x, y, mask


def mean_metrics(totals: dict, classification: bool, prefix: str) -> dict:
    """``{prefix}_loss`` (and ``_accuracy``) from an eval step's summed totals (scalars, or one per member)."""
    out = {f"{prefix}_loss": totals["loss_sum"] / totals["count"]}
    if classification:
        out[f"{prefix}_accuracy"] = totals["correct"] / totals["count"]
    return out


def evaluate(state: TrainState, split: data_lib.Split, eval_step: Callable, batch_size: int,
             classification: bool, prefix: str, sharding=None) -> dict:
    """Mean loss (and accuracy) over a whole split, eval mode.

    Every batch has ``batch_size`` rows (the last one zero-padded and masked), so all splits of a data set share
    one compiled eval step. Sums stay on the device until the end: one transfer per split.
    """
    if len(split) == 0:
        return {}
    totals = None
    for x, y, mask in padded_batches(split, batch_size):
        if sharding is not None and not sharding.is_fully_addressable:  # several processes: global arrays
            batch = (parallel.global_array(x, sharding), parallel.global_array(y, sharding))
            sums = eval_step(state, batch, parallel.global_array(mask, sharding))
        else:
            sums = eval_step(state, jax.device_put((x, y), sharding), jax.device_put(mask, sharding))
        parallel.settle(sums, getattr(sharding, "mesh", None))  # before a program is queued on it
        totals = sums if totals is None else _add_sums(totals, sums)
    return {name: float(value) for name, value in mean_metrics(parallel.to_host(totals), classification,
                                                                prefix).items()}


@jax.jit
def _add_sums(a: dict, b: dict) -> dict:
    return jax.tree.map(jnp.add, a, b)


def eval_batch_size_for(dataset: data_lib.Dataset, requested: int, mesh=None) -> int:
    """The one eval batch size for every split: ``requested``, capped by the largest split, rounded up to a
    multiple of the device count (padding fills it)."""
    largest = max(len(dataset.train), len(dataset.val), len(dataset.test), 1)
    size = max(1, min(int(requested), largest))
    devices = 1 if mesh is None else mesh.devices.size
    return -(-size // devices) * devices


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


RESIDENT_LIMIT_BYTES = 1 << 30  # training splits up to 1 GiB live on the device (auto mode)
# Runs of at most this many steps compute the full metrics (gradient norm, update ratio) on every step, so one step
# program is compiled instead of two. The cheap variant saves ~0.16 ms a step (MLP 64-256-256-10, batch 64, CPU;
# 266 vs 344 ms for 500 steps), and compiling it costs ~0.9 s for that MLP and 2-4 s for a ResNet-8 (measured): below
# a few thousand steps the second compilation costs more than it saves. 200 keeps the loss under ~40 ms where the
# persistent compilation cache makes the second program cheap. Both variants give bit-identical states (the norms
# are outputs only), and the choice depends on ``num_steps`` alone, so a resumed run picks as the original did.
ALWAYS_FULL_METRICS_STEPS = 200


def _resident_default(dataset: data_lib.Dataset) -> bool:
    return dataset.train.x.nbytes + dataset.train.y.nbytes <= RESIDENT_LIMIT_BYTES


class _ResidentData:
    """The training split on the device, and the epoch permutations the compiled steps gather batches with."""

    def __init__(self, split: data_lib.Split, batch_size: int, seed: int, steps_per_call: int, mesh):
        x_dtype, y_dtype = data_lib.pipeline.device_dtypes(split)
        replicated = parallel.replicated(mesh)
        self.data = jax.device_put((np.asarray(split.x, x_dtype), np.asarray(split.y, y_dtype)), replicated)
        self.num_examples, self.batch_size, self.seed = len(split), batch_size, seed
        self.steps_per_epoch = data_lib.steps_per_epoch(len(split), batch_size, True)
        self.window = 1 + -(-(steps_per_call - 1) // self.steps_per_epoch)  # epochs one call can touch
        self.sharding = replicated
        self._cached: tuple[int, jax.Array] | None = None

    def permutations(self, step: int) -> jax.Array:
        """(window, S·B) int32 orders of the epochs from the one containing global step ``step`` (cached)."""
        first = step // self.steps_per_epoch
        if self._cached is None or self._cached[0] != first:
            used = self.steps_per_epoch * self.batch_size
            rows = np.stack([data_lib.epoch_permutation(self.num_examples, self.seed, e)[:used]
                             for e in range(first, first + self.window)]).astype(np.int32)
            self._cached = (first, jax.device_put(rows, self.sharding))
        return self._cached[1]


def _wants_step_end(callback: Any) -> bool:
    """Whether ``callback`` does something in ``on_step_end`` (the base class's no-op does not count)."""
    method = getattr(type(callback), "on_step_end", None)
    return method is not None and method is not Callback.on_step_end


def _event_steps(step: int, num_steps: int, periods: Sequence[int]) -> int:
    """The first step after ``step`` that is a multiple of one of ``periods`` (or ``num_steps``)."""
    return min([num_steps] + [(step // p + 1) * p for p in periods if p])


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How each optimizer step is computed and dispatched: gradient accumulation (``grad_accum_steps`` micro-batches
    per step; batch-norm statistics and dropout keys are per micro-batch), what the optimizer's ``update`` needs
    (``needs_value_fn``, ``needs_batch``: see :mod:`jaxnn.optim`), ``steps_per_call`` steps per dispatch, the training
    split on the device (``device_resident``; None: when it takes at most 1 GiB), and the devices: ``mode`` (``jit``,
    ``shard_map`` or ``pmap``) over ``mesh`` (default: every device), and whether the old state's buffers are donated
    to the new one (``donate``: one copy of the state in device memory; on CPU faster for some models and slower for
    others, see ``make_train_step``). The last five do not change the result: ``steps_per_call``,
    ``device_resident`` and ``donate`` give the same bits, other devices the same numbers to rounding."""

    grad_accum_steps: int = 1
    needs_value_fn: bool = False
    needs_batch: bool = False
    steps_per_call: int = 1
    device_resident: bool | None = None
    mode: str = "jit"
    mesh: Any = None
    donate: bool = True


@dataclasses.dataclass(frozen=True)
class LogOptions:
    """What the loop records and when: a metrics record every ``log_every`` steps, an evaluation on the validation
    split every ``eval_every`` steps (None: every epoch) in batches of ``eval_batch_size``, a checkpoint every
    ``checkpoint_every`` steps (None: at every evaluation), ``metrics.jsonl`` in ``run_dir``, the NaN/Inf guard
    (``nan_guard``) and a ``progress`` bar. A ``run_dir`` given to ``fit`` without a ``checkpointer`` also gets the
    final state as a checkpoint (``save_final``; a non-finite state is not saved, with a warning), and
    ``config.yaml``/``fit.json`` (:mod:`jaxnn.train.record`), so that ``jaxnn curvature RUN_DIR`` and ``load_run``
    read it; it must not hold checkpoints already."""

    log_every: int = 10
    eval_every: int | None = None
    eval_batch_size: int = 512
    checkpoint_every: int | None = None
    run_dir: str | pathlib.Path | None = None
    nan_guard: bool = True
    progress: bool = True
    save_final: bool = True


def _use_resident(dataset: data_lib.Dataset, o: StepOptions) -> bool:
    """Whether batches are gathered from a device copy of the training split; refuses impossible combinations."""
    if isinstance(o.steps_per_call, bool) or not isinstance(o.steps_per_call, int) or o.steps_per_call < 1:
        raise ValueError(f"steps_per_call must be an integer >= 1, got {o.steps_per_call!r}")
    multi_process = jax.process_count() > 1
    resident = _resident_default(dataset) if o.device_resident is None else bool(o.device_resident)
    if resident and (o.mode == "pmap" or multi_process):
        if o.device_resident:
            raise ValueError("device_resident=True needs parallel.mode jit or shard_map in a single process "
                             f"(mode {o.mode!r}, {jax.process_count()} processes): pmap and multi-process runs take "
                             "host batches")
        resident = False
    if o.steps_per_call > 1 and not resident:
        raise ValueError(f"steps_per_call={o.steps_per_call} needs the training split on the device "
                         f"(device_resident=True; it holds {dataset.train.x.nbytes / 2**20:.0f} MiB)")
    return resident


class _Steps:
    """Runs ``count`` optimizer steps from global step ``step``: gathered on the device from the resident training
    split (several per dispatch), or one host batch per call; returns the state and the steps' metrics (device
    arrays: ``(scanned metrics or None, the last step's metrics)``)."""

    def __init__(self, dataset: data_lib.Dataset, loss, schedule, batch_size: int, seed: int, start_step: int,
                 classification: bool, o: StepOptions, mesh, resident: bool):
        common = dict(grad_accum_steps=o.grad_accum_steps, classification=classification,
                      needs_value_fn=o.needs_value_fn, needs_batch=o.needs_batch, mode=o.mode,
                      mesh=None if o.mode == "jit" else mesh, donate=bool(o.donate))
        self.mesh, self.resident = mesh, resident
        batch_sharding = parallel.batch_sharding(mesh)
        if resident:
            self.source = _ResidentData(dataset.train, batch_size, seed, o.steps_per_call, mesh)
            self.program = make_resident_train_steps(
                loss, schedule, batch_size=batch_size, steps_per_epoch=self.source.steps_per_epoch,
                batch_sharding=batch_sharding if mesh.devices.size > 1 else None, **common)
        else:
            self.program = make_train_step(loss, schedule, **common)
            self.batches = data_lib.batch_iterator(dataset.train, batch_size, seed=seed, start_step=start_step,
                                                   sharding=None if o.mode == "pmap" else batch_sharding,
                                                   prefetch=2)

    def __call__(self, state: TrainState, step: int, count: int, full_last: bool):
        if self.resident:
            return parallel.settle(self.program(state, self.source.data, self.source.permutations(step), count,
                                                full_last), self.mesh)
        state, last = parallel.settle(self.program(state, next(self.batches), full_last), self.mesh)
        return state, (None, last)


class _Recorder:
    """The step metrics between the device and metrics.jsonl: queued device arrays come to the host in one
    transfer per record (``drain``), where the NaN guard sees every step; ``record`` writes one line."""

    def __init__(self, writer: MetricsWriter, steps_per_epoch: int, nan_guard: bool, last_checkpoint: int | None):
        self.writer, self.steps_per_epoch, self.nan_guard = writer, steps_per_epoch, nan_guard
        self.last_checkpoint = last_checkpoint
        self.queued: list[tuple[int, Any]] = []   # (first step, metrics of one call: device arrays)
        self.window: list[dict] = []              # host metrics of the steps since the last record
        self.history: list[dict] = []
        self.started = time.perf_counter()

    def drain(self) -> None:
        host = parallel.to_host([m for _, m in self.queued])
        steps = []
        for (first, _), (scanned, last) in zip(self.queued, host):
            count = 0 if scanned is None else len(next(iter(scanned.values())))
            steps += [(first + i, {k: v[i] for k, v in scanned.items()}) for i in range(count)]
            steps.append((first + count, last))
        self.queued.clear()
        for number, m in steps:
            if self.nan_guard and not math.isfinite(float(m["loss"])):
                raise NonFiniteLossError(number, float(m["loss"]), self.last_checkpoint)
        self.window.extend(m for _, m in steps)

    def record(self, step: int, extra: dict) -> dict:
        self.drain()
        rec = {"step": step, "epoch": round(step / self.steps_per_epoch, 4)}
        if self.window:
            # Norms are computed only on steps known in advance to be logged; an unknown lr (NaN) is left out.
            rec.update({k: float(v) for k, v in self.window[-1].items() if math.isfinite(float(v)) or k == "loss"})
            rec["loss_mean"] = float(np.mean([float(m["loss"]) for m in self.window]))
        self.window.clear()
        rec.update(extra)
        rec["time_s"] = round(time.perf_counter() - self.started, 3)
        self.history.append(rec)
        self.writer.write(rec)
        return rec


def _progress_postfix(rec: dict) -> dict:
    postfix = {"loss": f"{rec.get('loss', float('nan')):.4f}"}
    if "accuracy" in rec:
        postfix["acc"] = f"{rec['accuracy']:.3f}"
    if "val_accuracy" in rec:
        postfix["val_acc"] = f"{rec['val_accuracy']:.3f}"
    return postfix


def fit(state: TrainState, dataset: data_lib.Dataset, *, num_steps: int, loss: str | Callable = "softmax_cross_entropy",
        batch_size: int = 64, schedule: Callable | None = None, seed: int = 0, start_step: int = 0,
        callbacks: Sequence[Callback] = (), checkpointer: Checkpointer | None = None,
        step_options: StepOptions | None = None, log_options: LogOptions | None = None, **options: Any) -> FitResult:
    """Train ``state`` for ``num_steps`` optimizer steps on ``dataset.train``; evaluate on ``dataset.val``.

    The options of :class:`StepOptions` (how a step runs) and :class:`LogOptions` (what is recorded when) are taken
    as keyword arguments (``log_every=50, progress=False``) or as ``step_options=``/``log_options=`` objects, the
    keywords on top.

    Batches: with ``device_resident`` (default: when the training split takes at most 1 GiB) the split is copied
    to the device once and every step gathers its batch there, so a step costs one dispatch and no transfer;
    otherwise batches are gathered on the host and copied ahead of use. Either way step s uses the same examples
    (``batch_iterator``'s order). ``steps_per_call`` > 1 runs that many steps per dispatch (a ``lax.scan``;
    device-resident data only), bit-identical to one step per call; calls end at every log, eval and checkpoint
    step and at the steps of callbacks that declare ``every_k_steps``, and ``on_step_end`` is called at the end of
    each call.

    No host synchronisation between logged steps: every ``log_every`` steps (and at every eval/checkpoint) the
    queued step metrics come to the host in one transfer, are checked for NaN/Inf (``nan_guard``: stop and name the
    step; no checkpoint is written after it) and one record per logged step goes to metrics.jsonl.
    ``start_step`` resumes: the batch stream continues exactly where step ``start_step`` left it.

    Devices: the batch is split over the ``data`` axis of ``mesh`` (default: every device) and ``mode`` picks how
    the step is written (``jit``, ``shard_map`` or ``pmap``; see :mod:`jaxnn.parallel`); ``state`` is used as placed
    (replicated, or sharded parameters). With several processes each one feeds its slice of every batch.
    """
    so, lo = merge_options("fit", options, (StepOptions, step_options, "step_options"),
                           (LogOptions, log_options, "log_options"))
    mesh = so.mesh or parallel.make_mesh()
    parallel.check_mode(so.mode, "replicated")
    parallel.check_batch_divisible(batch_size // so.grad_accum_steps, mesh, "batch_size / grad_accum_steps")
    if batch_size % so.grad_accum_steps:
        raise ValueError(f"grad_accum_steps={so.grad_accum_steps} must divide batch_size={batch_size}")
    resident = _use_resident(dataset, so)
    classification = dataset.task == "classification"
    check_inputs(state, dataset, loss if isinstance(loss, str) else None)
    runtime.release_programs_near_map_limit()  # many fits in one process: XLA:CPU's programs stay mapped
    if num_steps < start_step:
        raise ValueError(f"num_steps={num_steps} is less than the step to resume from ({start_step})")
    steps_per_epoch = data_lib.steps_per_epoch(len(dataset.train), batch_size, True)
    eval_every = lo.eval_every or steps_per_epoch
    checkpoint_every = lo.checkpoint_every or eval_every

    run_steps = _Steps(dataset, loss, schedule, batch_size, seed, start_step, classification, so, mesh, resident)
    eval_step = make_eval_step(loss, classification=classification)
    eval_size = eval_batch_size_for(dataset, lo.eval_batch_size, mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    run_dir = pathlib.Path(lo.run_dir) if lo.run_dir is not None else None
    primary = parallel.is_primary()  # with several processes, process 0 alone writes metrics and shows progress
    saves_final = run_dir is not None and checkpointer is None and lo.save_final
    if saves_final and runfolders.has_checkpoints(run_dir):
        raise runfolders.RunFolderError(
            f"run folder {run_dir} already holds checkpoints of an earlier run: give fit another run_dir (it saves "
            "the final state there), or pass checkpointer= and start_step= to continue that run")
    if run_dir is not None and primary:
        run_dir.mkdir(parents=True, exist_ok=True)
    if saves_final and primary:
        record.write_fit_record(run_dir, state.apply_fn, dataset, loss, batch_size=batch_size,
                                num_steps=num_steps, seed=seed)
    writer = MetricsWriter(run_dir / "metrics.jsonl" if run_dir and primary else None,
                           resume_from_step=start_step if start_step else None)
    analysis_x, analysis_y = data_lib.host_stacked_batches(dataset.train, min(batch_size, len(dataset.train)), 1,
                                                           seed=seed + 1, shuffle=True)
    analysis_batch = tuple(parallel.global_array(a[0], parallel.replicated(mesh)) for a in (analysis_x, analysis_y))
    analysis_sets: dict[int, tuple] = {}

    def analysis_examples(count: int) -> tuple:
        """The first ``count`` examples of the analysis batch's shuffle of the training split, on the devices."""
        count = min(int(count), len(dataset.train))
        if count not in analysis_sets:
            x, y = data_lib.host_stacked_batches(dataset.train, count, 1, seed=seed + 1, shuffle=True)
            analysis_sets[count] = tuple(parallel.global_array(a[0], parallel.replicated(mesh)) for a in (x, y))
        return analysis_sets[count]

    per_example = losses.resolve_loss(loss)
    ctx = FitContext(state=state, analysis_batch=analysis_batch, run_dir=run_dir, step=start_step,
                     make_loss_fn=lambda s: losses.make_loss_fn(s.apply_fn, per_example, s.model_state),
                     analysis_examples=analysis_examples,
                     learning_rate=None if schedule is None else (lambda at: float(schedule(at))))
    # Calls end where a callback's on_step_end needs the state: at its every_k_steps, or every step if it has none.
    callback_periods = [int(getattr(cb, "every_k_steps", None) or 1) for cb in callbacks if _wants_step_end(cb)]

    def notify(hook: str) -> None:
        """Callbacks are duck-typed: any object with some of the hooks (the base class has them all)."""
        for cb in callbacks:
            method = getattr(cb, hook, None)
            if method is not None:
                method(ctx)

    notify("on_train_begin")
    recorder = _Recorder(writer, steps_per_epoch, lo.nan_guard, checkpointer.latest_step() if checkpointer else None)
    if start_step == 0 and ctx._pending:  # a callback measured the initial parameters: step 0's own record
        ctx.metrics = recorder.record(0, ctx.pop_pending())
    best_step = checkpointer.best_step() if checkpointer else None
    stop_reason = "completed"
    bar = tqdm(total=num_steps, initial=start_step, disable=not (lo.progress and primary), desc="train", unit="step",
               dynamic_ncols=True)
    periods = [lo.log_every, eval_every] + ([checkpoint_every] if checkpointer is not None else []) + callback_periods
    always_full = num_steps <= ALWAYS_FULL_METRICS_STEPS
    step = start_step
    try:
        while step < num_steps:
            boundary = _event_steps(step, num_steps, periods)
            full = boundary % lo.log_every == 0 or boundary % eval_every == 0 or boundary == num_steps or (
                checkpointer is not None and boundary % checkpoint_every == 0)
            count = min(so.steps_per_call, boundary - step) if resident else 1
            if 1 < count < so.steps_per_call:
                count = 1  # the remainder runs one step per call: no compilation per remainder length
            full_last = always_full or (full and step + count == boundary)  # the call's last step computes the norms
            state, metrics = run_steps(state, step, count, full_last)
            recorder.queued.append((step + 1, metrics))
            step += count
            ctx.state, ctx.step = state, step
            bar.update(count)
            if step != boundary:
                continue
            is_eval = step % eval_every == 0 or step == num_steps
            is_ckpt = checkpointer is not None and (step % checkpoint_every == 0 or step == num_steps)
            extra: dict = {}
            if is_eval:
                recorder.drain()  # no evaluation (and no checkpoint) of a state whose loss went non-finite
                ctx.eval_metrics = evaluate(state, dataset.val, eval_step, eval_size, classification, "val",
                                            batch_sharding)
                extra.update(ctx.eval_metrics)
            notify("on_step_end")
            if is_eval:
                notify("on_eval_end")
            pending = ctx.pop_pending()
            if step % lo.log_every == 0 or is_eval or is_ckpt or pending or ctx.stop_reason:
                ctx.metrics = recorder.record(step, {**extra, **pending})
                bar.set_postfix(_progress_postfix(ctx.metrics), refresh=False)
            if is_ckpt:
                checkpointer.save(step, state.checkpoint_tree(),
                                  {k: v for k, v in ctx.eval_metrics.items() if k == checkpointer.best_metric})
                recorder.last_checkpoint = step
                best_step = checkpointer.best_step()
            if ctx.stop_reason:
                stop_reason = ctx.stop_reason
                break
    finally:
        bar.close()
    if saves_final and ctx.step > start_step:
        # The final state, so that load_run and the CLI's analyses read a script's run folder (record.py).
        final = Checkpointer(run_dir / "checkpoints", keep_last=1, keep_best=False)
        try:
            final.save(ctx.step, state.checkpoint_tree())
        except CheckpointError as error:  # a diverged state (nan_guard off): the result is returned, not saved
            warnings.warn(f"fit: the final state was not saved in {run_dir}: {error}", stacklevel=2)
        finally:
            final.close()
    notify("on_train_end")
    return FitResult(state=state, history=recorder.history, stop_reason=stop_reason, steps_done=ctx.step,
                     wall_time_s=time.perf_counter() - recorder.started, best_step=best_step)
