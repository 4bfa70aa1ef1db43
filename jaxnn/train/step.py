"""The compiled train and eval steps. One jit at the outer boundary; buffers of the old state are donated.

The train step splits the batch into ``grad_accum_steps`` micro-batches and accumulates their gradients in a
``lax.scan`` inside the same compiled program, so accumulation costs no extra dispatch.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxnn import losses
from jaxnn.train.state import TrainState


def _tree_norm(tree):
    return optax.tree.norm(tree)


@functools.lru_cache(maxsize=32)
def make_train_step(loss: Callable | str, schedule: Callable | None = None, *, grad_accum_steps: int = 1,
                    classification: bool = True, needs_value_fn: bool = False, donate: bool = True) -> Callable:
    """``train_step(state, batch, full_metrics=True) -> (state, metrics)``, jitted.

    metrics: ``loss``, ``accuracy`` (classification), ``lr``, and when ``full_metrics`` (a static bool: one
    compilation per value) also ``grad_norm`` ‖g‖ and ``update_ratio`` ‖Δθ‖/‖θ‖. The norms are three extra
    passes over the parameters that also keep XLA from fusing the update (~15% of a small MLP's step on CPU,
    measured), so ``fit`` asks for them only on the steps it logs.
    Cached on its arguments, so repeated ``fit`` calls with the same loss and schedule reuse one compilation.
    """
    per_example = losses.get_loss(loss) if isinstance(loss, str) else loss

    def step(state: TrainState, batch, full_metrics=True):
        rng, dropout_rng = jax.random.split(state.rng)
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

        if needs_value_fn:
            def value_fn(params):
                return micro_loss(params, state.model_state, batch, dropout_rng)[0]
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

    return jax.jit(step, donate_argnums=(0,) if donate else (), static_argnums=(2,))


@functools.lru_cache(maxsize=32)
def make_eval_step(loss: Callable | str, *, classification: bool = True) -> Callable:
    """``eval_step(state, batch) -> sums``: summed loss, correct count and example count (eval mode), jitted.
    Sums (not means) so a split with a ragged last batch averages exactly."""
    per_example = losses.get_loss(loss) if isinstance(loss, str) else loss

    def step(state: TrainState, batch, full_metrics=True):
        x, y = batch
        outputs = state.apply_fn({"params": state.params, **state.model_state}, x, train=False)
        values = per_example(outputs, y)
        sums = {"loss_sum": jnp.sum(values), "count": jnp.asarray(values.shape[0], values.dtype)}
        if classification:
            sums["correct"] = jnp.sum(jnp.argmax(outputs, -1) == y).astype(values.dtype)
        return sums

    return jax.jit(step)
