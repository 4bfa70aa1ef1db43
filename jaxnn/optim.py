"""Config -> optax chain: ``clip -> weight decay -> optimizer(schedule)``.

    tx, schedule = build_optimizer(cfg.optimizer, total_steps=1000)
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax

from jaxnn.config import OptimizerConfig


def _sgd(o, lr):
    return optax.sgd(lr)


def _momentum(o, lr):
    return optax.sgd(lr, momentum=o.momentum)


def _nesterov(o, lr):
    return optax.sgd(lr, momentum=o.momentum, nesterov=True)


def _adagrad(o, lr):
    return optax.adagrad(lr, eps=o.eps)


def _rmsprop(o, lr):
    return optax.rmsprop(lr, decay=o.rms_decay, eps=o.eps)


def _adam(o, lr):
    return optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)


def _adamw(o, lr):
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)


def _lbfgs(o, lr):
    # optax.lbfgs scales by a zoom line search; lr scales its steps (1.0 is the textbook method).
    return optax.lbfgs(learning_rate=lr)


def _kfac(o, lr):
    # K-FAC preconditioning (its update receives the batch and the model from the train step), then momentum SGD.
    from jaxnn.curvature.kfac import kfac_preconditioner

    return optax.chain(kfac_preconditioner(damping=o.kfac_damping, decay=o.kfac_decay,
                                           inverse_every=o.kfac_inverse_every),
                       optax.sgd(lr, momentum=o.momentum))


OPTIMIZERS: dict[str, Callable] = {
    "sgd": _sgd, "momentum": _momentum, "nesterov": _nesterov, "adagrad": _adagrad,
    "rmsprop": _rmsprop, "adam": _adam, "adamw": _adamw, "lbfgs": _lbfgs, "kfac": _kfac,
}
# Optimizers whose update needs the loss value and a value_fn (line search).
NEEDS_VALUE_FN = ("lbfgs",)
# Optimizers whose update needs the batch, the model and the loss (curvature statistics).
NEEDS_BATCH = ("kfac",)


def _resolve_boundary(b: float, total_steps: int) -> int:
    return int(round(b * total_steps)) if b < 1 else int(b)


def _constant(o, total):
    return optax.constant_schedule(o.lr)


def _step(o, total):
    bounds = {_resolve_boundary(b, total): o.decay_rate for b in o.boundaries}
    return optax.piecewise_constant_schedule(o.lr, bounds)


def _exponential(o, total):
    return optax.exponential_decay(o.lr, transition_steps=o.decay_steps or total, decay_rate=o.decay_rate)


def _cosine(o, total):
    return optax.cosine_decay_schedule(o.lr, decay_steps=o.decay_steps or total, alpha=o.end_lr_fraction)


def _warmup_then_cosine(init, lr, warmup_steps, decay_steps, end_fraction):
    """``optax.warmup_cosine_decay_schedule(init, lr, warmup_steps, decay_steps, lr * end_fraction)``, built from the
    same two optax pieces but given the end as a fraction of the peak: optax recovers that fraction as end / peak
    behind a Python ``if peak == 0``, which a traced learning rate (a sweep member's) cannot pass."""
    return optax.join_schedules([optax.linear_schedule(init, lr, warmup_steps),
                                 optax.cosine_decay_schedule(lr, decay_steps - warmup_steps, alpha=end_fraction)],
                                [warmup_steps])


def _warmup_cosine(o, total):
    decay = max(o.decay_steps or total, o.warmup_steps + 1)
    return _warmup_then_cosine(0.0, o.lr, o.warmup_steps, decay, o.end_lr_fraction)


def _warm_restarts(o, total):
    """optax.sgdr_schedule's cycles (each a warmup then a cosine decay over ``restart_period`` steps)."""
    period = o.restart_period
    cycles = max(1, -(-total // period))
    cycle = _warmup_then_cosine(0.0 if o.warmup_steps else o.lr, o.lr, o.warmup_steps, period, o.end_lr_fraction)
    return optax.join_schedules([cycle] * cycles, [period * (i + 1) for i in range(cycles - 1)])


SCHEDULES: dict[str, Callable] = {
    "constant": _constant, "step": _step, "exponential": _exponential, "cosine": _cosine,
    "warmup_cosine": _warmup_cosine, "warm_restarts": _warm_restarts,
}


def build_schedule(o: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the step. A linear warmup is prepended when ``warmup_steps > 0``
    (built into warmup_cosine and warm_restarts)."""
    if o.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {o.schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    schedule = SCHEDULES[o.schedule](o, total_steps)
    if o.warmup_steps and o.schedule not in ("warmup_cosine", "warm_restarts"):
        warmup = optax.linear_schedule(0.0, o.lr, o.warmup_steps)
        schedule = optax.join_schedules([warmup, schedule], [o.warmup_steps])
    return _float_count(schedule)


def _float_count(schedule: optax.Schedule) -> optax.Schedule:
    """Under x64, ``schedule`` with the step count cast to float64 first. optax's schedules divide the int32 count
    (``count / steps``), which JAX computes in float32 even under x64, so a float64 run's learning rate was rounded
    to float32 (~1e-10 relative; a sweep member's traced float64 rate was not, and the two drifted apart). Without
    x64 the count stays an integer (a float32 count would round step boundaries past 2^24)."""
    if jnp.result_type(float) != jnp.float64:
        return schedule
    return lambda count: schedule(jnp.asarray(count, jnp.float64))


def build_optimizer(o: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain and its learning-rate schedule.

    Order: global-norm clipping, then (for every optimizer but adamw, whose decay is decoupled inside it)
    ``add_decayed_weights`` i.e. an L2 gradient term ``wd·θ``, then the optimizer scaled by the schedule.
    """
    if o.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {o.name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    schedule = build_schedule(o, total_steps)
    parts = []
    if o.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    # A traced weight_decay (a swept hyper-parameter in a population) always gets its term.
    if o.name != "adamw" and (not isinstance(o.weight_decay, (int, float)) or o.weight_decay):
        parts.append(optax.add_decayed_weights(o.weight_decay))
    parts.append(OPTIMIZERS[o.name](o, schedule))
    return optax.chain(*parts), schedule
