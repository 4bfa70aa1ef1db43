"""The compiled train and eval steps. One jit at the outer boundary; buffers of the old state are donated.

The train step splits the batch into ``grad_accum_steps`` micro-batches and accumulates their gradients in a
``lax.scan`` inside the same compiled program, so accumulation costs no extra dispatch.

Device-resident training (:func:`make_resident_train_steps`): the whole training split lives on the device and each
step gathers its batch there from the epoch's permutation and the step counter, so a step needs no host work and no
transfer; ``num_steps`` steps run per call in a ``lax.scan`` (bit-identical to one step per call).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from jaxnn import losses
from jaxnn.config import check_choice
from jaxnn.models.layers import batch_norm_axis
from jaxnn.parallel import DATA_AXIS, MODES
from jaxnn.train.state import TrainState


def _tree_norm(tree):
    return optax.tree.norm(tree)


@functools.lru_cache(maxsize=32)
def make_train_step(loss: Callable | str, schedule: Callable | None = None, *, grad_accum_steps: int = 1,
                    classification: bool = True, needs_value_fn: bool = False, needs_batch: bool = False,
                    donate: bool = True, mode: str = "jit", mesh=None) -> Callable:
    """``train_step(state, batch, full_metrics=True) -> (state, metrics)``, jitted.

    metrics: ``loss``, ``accuracy`` (classification), ``lr``, and when ``full_metrics`` (a static bool: one
    compilation per value) also ``grad_norm`` ‖g‖ and ``update_ratio`` ‖Δθ‖/‖θ‖. The norms are three extra
    passes over the parameters that also keep XLA from fusing the update (~15% of a small MLP's step on CPU,
    measured), so ``fit`` asks for them only on the steps it logs (on every step of a short run, where compiling the
    second variant costs more than it saves: see ``jaxnn.train.fit.ALWAYS_FULL_METRICS_STEPS``).
    Cached on its arguments, so repeated ``fit`` calls with the same loss and schedule reuse one compilation.

    ``mode`` (see :mod:`jaxnn.parallel`): ``"jit"`` follows the arrays' shardings (XLA inserts the all-reduce);
    ``"shard_map"`` and ``"pmap"`` run the per-device step over the ``data`` axis of ``mesh`` with an explicit
    ``lax.pmean``. All three give the same parameters.

    ``donate``: hand the old state's buffers to the new one (no second copy of the parameters and optimizer state
    in device memory). On CPU it is faster for some models and slower for others, one step per call, medians of 9
    interleaved rounds: digits MLP 64-256-256-10 0.41 ms with it, 0.53 ms without; LSTM of 128 units over 32 steps
    12.6 / 11.8 ms; the Transformer of ``benchmarks/bench_sequence.py`` 12.9 / 12.3 ms; LeNet 9.65 / 9.47 ms.
    ``fit(..., donate=False)`` turns it off.
    """
    check_choice("parallel.mode", mode, MODES, "mode")
    donated = (0,) if donate else ()
    if mode == "jit":
        step = step_function(loss, schedule, grad_accum_steps, classification, needs_value_fn, needs_batch=needs_batch)
        return jax.jit(step, donate_argnums=donated, static_argnums=(2,))
    per_device = step_function(loss, schedule, grad_accum_steps, classification, needs_value_fn, DATA_AXIS,
                               needs_batch=needs_batch)
    if mode == "shard_map":
        def step(state, batch, full_metrics=True):
            return _shard_mapped(per_device, mesh, full_metrics)(state, batch)

        return jax.jit(step, donate_argnums=donated, static_argnums=(2,))
    devices = list(mesh.devices.ravel())  # pmap
    pmapped = {full: jax.pmap(functools.partial(_pmap_body, per_device, full), axis_name=DATA_AXIS,
                              in_axes=(None, 0), out_axes=(None, None), devices=devices)
               for full in (False, True)}

    def step(state, batch, full_metrics=True):
        per_device_batch = jax.tree.map(
            lambda a: np.asarray(a).reshape((len(devices), a.shape[0] // len(devices)) + a.shape[1:]), batch)
        return pmapped[bool(full_metrics)](state, per_device_batch)

    return step


def _pmap_body(per_device, full_metrics, state, batch):
    return per_device(state, batch, full_metrics)


def _shard_mapped(per_device, mesh, full_metrics) -> Callable:
    """The per-device step as one SPMD program over the mesh: state replicated in and out, batch split."""
    return jax.shard_map(lambda s, b: per_device(s, b, full_metrics), mesh=mesh,
                         in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS)),
                         out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)


def _resident_batch(state: TrainState, data, permutations, first_epoch, batch_size: int, steps_per_epoch: int,
                    batch_sharding):
    """The batch of global step ``state.step``: rows ``perm_e[(s mod S)·B : (s mod S + 1)·B]`` of the split on the
    device, with ``perm_e`` row ``e − first_epoch`` of ``permutations`` (the same batches as ``batch_iterator``)."""
    epoch, position = jnp.divmod(state.step, steps_per_epoch)
    rows = jax.lax.dynamic_slice_in_dim(permutations[epoch - first_epoch], position * batch_size, batch_size)
    batch = jax.tree.map(lambda a: jnp.take(a, rows, axis=0), data)
    if batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return batch


@functools.lru_cache(maxsize=32)
def make_resident_train_steps(loss: Callable | str, schedule: Callable | None = None, *, grad_accum_steps: int = 1,
                              classification: bool = True, needs_value_fn: bool = False, needs_batch: bool = False, batch_size: int,
                              steps_per_epoch: int, batch_sharding=None, mode: str = "jit",
                              mesh=None, donate: bool = True) -> Callable:
    """``train_steps(state, data, permutations, num_steps, full_last) -> (state, metrics)``, jitted, the state
    donated (unless ``donate=False``; see ``make_train_step``).

    ``data``: the training split ``(x, y)`` on the device; ``permutations``: (W, ≥ S·B) int32, the example order of
    epochs ``e0 .. e0+W−1`` with ``e0 = state.step // S`` at the call. Runs ``num_steps`` (static) optimizer steps,
    each gathering its batch on the device: one ``lax.scan`` over the first ``num_steps − 1`` (loss, accuracy, lr
    per step, stacked) and a last step with the full metrics when ``full_last`` (static). Results are bit-identical
    to ``num_steps`` calls of one step (the same step computation, scanned). ``mode``: "jit" or "shard_map" (the
    batch is gathered globally, then each device steps on its slice); pmap takes host batches (``make_train_step``).
    """
    if mode == "jit":
        step = step_function(loss, schedule, grad_accum_steps, classification, needs_value_fn, needs_batch=needs_batch)
    elif mode == "shard_map":
        per_device = step_function(loss, schedule, grad_accum_steps, classification, needs_value_fn, DATA_AXIS,
                                   needs_batch=needs_batch)
        step = lambda state, batch, full: _shard_mapped(per_device, mesh, full)(state, batch)  # noqa: E731
    else:
        raise ValueError(f"device-resident training runs with parallel.mode 'jit' or 'shard_map', got {mode!r}")

    def steps(state: TrainState, data, permutations, num_steps: int, full_last: bool):
        first_epoch = state.step // steps_per_epoch

        def one(state, full):
            batch = _resident_batch(state, data, permutations, first_epoch, batch_size, steps_per_epoch,
                                    batch_sharding)
            return step(state, batch, full)

        scanned = None
        if num_steps > 1:
            state, scanned = jax.lax.scan(lambda s, _: one(s, False), state, None, length=num_steps - 1)
        state, last = one(state, full_last)
        return state, (scanned, last)

    return jax.jit(steps, donate_argnums=(0,) if donate else (), static_argnums=(3, 4))


def step_function(loss, schedule, grad_accum_steps, classification, needs_value_fn,
                   axis_name: str | None = None, *, needs_batch: bool = False) -> Callable:
    """The un-jitted ``step(state, batch, full_metrics)`` shared by every compiled form.

    With ``axis_name`` it is the per-device step of explicit SPMD (``shard_map``/``pmap``): ``batch`` is this
    device's slice, batch norm averages its statistics over the axis, and the gradients, loss and accuracy are
    averaged with an explicit ``lax.pmean`` before the (replicated) optimizer update. Dropout keys differ per device.
    """
    per_example = losses.resolve_loss(loss)

    def step(state: TrainState, batch, full_metrics=True):
        with batch_norm_axis(axis_name):
            return _step(state, batch, full_metrics)

    def _step(state: TrainState, batch, full_metrics):
        rng, dropout_rng = jax.random.split(state.rng)
        if axis_name is not None:
            dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
        mutable = list(state.model_state)

        def micro_loss(params, model_state, micro_batch, key):
            x, y = micro_batch
            variables = {"params": params, **model_state}
            if mutable:
                outputs, new_model_state = state.apply_fn(variables, x, train=True, rngs={"dropout": key},
                                                          mutable=mutable)
            else:
                outputs, new_model_state = state.apply_fn(variables, x, train=True, rngs={"dropout": key}), {}
            value = jnp.mean(per_example(outputs, y))
            acc = losses.accuracy(outputs, y) if classification else jnp.zeros((), value.dtype)
            return value, (acc, dict(new_model_state))

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if grad_accum_steps == 1:
            (value, (acc, new_model_state)), grads = grad_fn(state.params, state.model_state, batch, dropout_rng)
        else:
            micro = jax.tree.map(lambda a: a.reshape((grad_accum_steps, a.shape[0] // grad_accum_steps) + a.shape[1:]),
                                 batch)
            keys = jax.random.split(dropout_rng, grad_accum_steps)

            def body(carry, inputs):
                grads_sum, value_sum, acc_sum, model_state = carry
                micro_batch, key = inputs
                (value, (acc, model_state)), grads = grad_fn(state.params, model_state, micro_batch, key)
                grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
                return (grads_sum, value_sum + value, acc_sum + acc, model_state), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            zero = jnp.zeros((), jnp.result_type(float))
            (grads, value, acc, new_model_state), _ = jax.lax.scan(
                body, (zeros, zero, zero, state.model_state), (micro, keys))
            grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
            value, acc = value / grad_accum_steps, acc / grad_accum_steps
        if axis_name is not None:
            grads, value, acc = jax.lax.pmean((grads, value, acc), axis_name)

        if needs_batch:  # K-FAC: its statistics come from this batch (all devices') through the eval-mode model
            def predict_fn(params, x):
                return state.apply_fn({"params": params, **state.model_state}, x)

            if isinstance(loss, str):  # the named losses carry their output-Hessian root in closed form
                output_loss = losses.batch_mean(loss)
            else:
                def output_loss(outputs, y):
                    return jnp.mean(per_example(outputs, y))

            updates, opt_state = state.tx.update(grads, state.opt_state, state.params, batch=batch,
                                                 predict_fn=predict_fn, output_loss=output_loss, axis_name=axis_name)
        elif needs_value_fn:
            def value_fn(params):
                local = micro_loss(params, state.model_state, batch, dropout_rng)[0]
                return local if axis_name is None else jax.lax.pmean(local, axis_name)
            updates, opt_state = state.tx.update(grads, state.opt_state, state.params, value=value, grad=grads,
                                                 value_fn=value_fn)
        else:
            updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": value,
                   "lr": jnp.asarray(schedule(state.step) if schedule is not None else jnp.nan, jnp.float32)}
        if full_metrics:
            metrics["grad_norm"] = _tree_norm(grads)
            metrics["update_ratio"] = _tree_norm(updates) / jnp.maximum(_tree_norm(state.params), 1e-12)
        if classification:
            metrics["accuracy"] = acc
        new_state = state.replace(step=state.step + 1, params=params, model_state=new_model_state or state.model_state,
                                  opt_state=opt_state, rng=rng)
        return new_state, metrics

    return step


@functools.lru_cache(maxsize=32)
def make_eval_step(loss: Callable | str, *, classification: bool = True) -> Callable:
    """``eval_step(state, batch, mask=None) -> sums``: summed loss, correct count and example count (eval mode),
    jitted. Sums (not means) so a split averages exactly; ``mask`` (B,) marks the real rows of a padded batch, so
    every batch of every split can have one shape (one compilation)."""
    per_example = losses.resolve_loss(loss)

    def step(state: TrainState, batch, mask=None):
        x, y = batch
        outputs = state.apply_fn({"params": state.params, **state.model_state}, x, train=False)
        values = per_example(outputs, y)
        weight = jnp.ones(values.shape[0], values.dtype) if mask is None else mask.astype(values.dtype)
        sums = {"loss_sum": jnp.sum(jnp.where(weight > 0, values, 0)), "count": jnp.sum(weight)}
        if classification:
            sums["correct"] = jnp.sum(losses.example_accuracy(outputs, y) * weight)
        return sums

    return jax.jit(step)
