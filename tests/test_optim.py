"""Optimizer chains against hand-written update rules (the seeds' correct forms)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnn import optim
from jaxnn.config import OptimizerConfig

GRADS = [np.array([0.5, -1.0, 2.0]), np.array([0.1, 0.3, -0.2]), np.array([-0.4, 0.0, 1.5])]
THETA0 = np.array([1.0, 2.0, -3.0])


def run(cfg, steps=3, total=100):
    tx, _ = optim.build_optimizer(cfg, total)
    params = jnp.asarray(THETA0)
    state = tx.init(params)
    for g in GRADS[:steps]:
        updates, state = tx.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params)


def test_adam_bias_correction_divides_by_one_minus_beta2_power_t(x64):
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    theta, m, v = THETA0.copy(), np.zeros(3), np.zeros(3)
    for t, g in enumerate(GRADS, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
    np.testing.assert_allclose(run(OptimizerConfig(name="adam", lr=lr, b1=b1, b2=b2, eps=eps)), theta, rtol=1e-12)


def test_rmsprop_cache_is_assigned_not_accumulated(x64):
    lr, decay, eps = 0.01, 0.9, 1e-8
    theta, cache = THETA0.copy(), np.zeros(3)
    for g in GRADS:
        cache = decay * cache + (1 - decay) * g * g   # assigned (exponential average), not cache += g²
        theta = theta - lr * g / (np.sqrt(cache) + eps)
    got = run(OptimizerConfig(name="rmsprop", lr=lr, rms_decay=decay, eps=eps))
    np.testing.assert_allclose(got, theta, rtol=1e-6)


def test_sgd_momentum_nesterov_and_weight_decay(x64):
    lr, mu, wd = 0.1, 0.9, 0.01
    theta, vel = THETA0.copy(), np.zeros(3)
    for g in GRADS:
        g = g + wd * theta            # L2 term added before the optimizer
        vel = mu * vel + g
        theta = theta - lr * vel
    np.testing.assert_allclose(run(OptimizerConfig(name="momentum", lr=lr, momentum=mu, weight_decay=wd)), theta, rtol=1e-12)
    theta, vel = THETA0.copy(), np.zeros(3)
    for g in GRADS:
        vel = mu * vel + g
        theta = theta - lr * (g + mu * vel)
    np.testing.assert_allclose(run(OptimizerConfig(name="nesterov", lr=lr, momentum=mu)), theta, rtol=1e-12)


def test_adamw_decay_is_decoupled(x64):
    lr, wd = 0.1, 0.5
    theta = THETA0.copy()
    g = GRADS[0]
    m, v = 0.1 * g, 0.001 * g * g
    step = (m / 0.1) / (np.sqrt(v / 0.001) + 1e-8)
    expected = theta - lr * (step + wd * theta)
    np.testing.assert_allclose(run(OptimizerConfig(name="adamw", lr=lr, weight_decay=wd), steps=1), expected, rtol=1e-10)


def test_global_norm_clipping(x64):
    g = GRADS[0]  # norm sqrt(5.25)
    got = run(OptimizerConfig(name="sgd", lr=1.0, clip_norm=1.0), steps=1)
    np.testing.assert_allclose(got, THETA0 - g / np.linalg.norm(g), rtol=1e-12)


def test_adagrad_accumulates(x64):
    lr, eps = 0.1, 1e-7
    theta, acc = THETA0.copy(), np.full(3, 0.1)  # optax's initial_accumulator_value
    for g in GRADS:
        acc = acc + g * g
        theta = theta - lr * g / np.sqrt(acc + eps)
    np.testing.assert_allclose(run(OptimizerConfig(name="adagrad", lr=lr, eps=eps)), theta, rtol=1e-6)


@pytest.mark.parametrize("name", ["constant", "step", "exponential", "cosine", "warmup_cosine", "warm_restarts"])
def test_schedules_closed_forms(name):
    total = 100
    cfg = OptimizerConfig(name="sgd", lr=1.0, schedule=name, boundaries=(0.5, 75), decay_rate=0.1,
                          warmup_steps=10 if name == "warmup_cosine" else 0, restart_period=25)
    s = optim.build_schedule(cfg, total)
    if name == "constant":
        assert float(s(0)) == float(s(99)) == 1.0
    elif name == "step":  # boundary 0.5 -> step 50; 75 is a step number
        assert [float(s(t)) for t in (49, 50, 74, 75)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    elif name == "exponential":
        assert float(s(50)) == pytest.approx(0.1 ** 0.5, rel=1e-5)
    elif name == "cosine":
        assert float(s(50)) == pytest.approx(0.5, abs=1e-6) and float(s(100)) == pytest.approx(0.0, abs=1e-6)
    elif name == "warmup_cosine":
        assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
        assert float(s(55)) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)), abs=1e-5)
    else:  # cosine cycles of 25 steps restart at the peak
        assert float(s(0)) == float(s(25)) == float(s(50)) == pytest.approx(1.0)
        assert float(s(12)) == pytest.approx(0.5 * (1 + math.cos(math.pi * 12 / 25)), abs=1e-5)


@pytest.mark.parametrize("name", ["constant", "step", "exponential", "cosine", "warmup_cosine", "warm_restarts"])
def test_every_schedule_takes_a_traced_learning_rate(name, x64):
    """A sweep over optimizer.lr builds each member's schedule inside a vmap: a traced lr. Its values equal the
    schedule of the float lr; warmup_cosine and warm_restarts equal optax's own schedules, which refuse a traced lr
    (their end / peak division sits behind a Python ``if``). Float64 throughout: the int32 step count of an
    optimizer state gives float64 rates (optax's count / steps alone computes in float32)."""
    cfg = dict(name="sgd", schedule=name, boundaries=(0.5, 75), decay_rate=0.1, warmup_steps=10, restart_period=25,
               end_lr_fraction=0.05)
    steps = jnp.arange(0, 101, 3)
    traced = jax.jit(jax.vmap(lambda lr: jax.vmap(optim.build_schedule(OptimizerConfig(lr=lr, **cfg), 100))(steps)))
    lrs = [0.3, 2.0]
    plain = [np.asarray([optim.build_schedule(OptimizerConfig(lr=lr, **cfg), 100)(int(t)) for t in steps])
             for lr in lrs]
    np.testing.assert_allclose(np.asarray(traced(jnp.asarray(lrs))), np.stack(plain), rtol=1e-14, atol=1e-16)
    counted = optim.build_schedule(OptimizerConfig(lr=0.3, **cfg), 100)(jnp.asarray(9, jnp.int32))
    assert counted.dtype == jnp.float64 and float(counted) == pytest.approx(plain[0][steps.tolist().index(9)],
                                                                            rel=1e-15)
    for lr, values in zip(lrs, plain):
        if name == "warmup_cosine":
            reference = optax.warmup_cosine_decay_schedule(0.0, lr, 10, 100, end_value=0.05 * lr)
        elif name == "warm_restarts":
            reference = optax.sgdr_schedule([dict(init_value=0.0, peak_value=lr, warmup_steps=10, decay_steps=25,
                                                  end_value=0.05 * lr)] * 4)
        else:
            continue
        np.testing.assert_allclose(values, [float(reference(float(t))) for t in steps], rtol=1e-14, atol=1e-16)


def test_linear_warmup_prepended():
    s = optim.build_schedule(OptimizerConfig(lr=2.0, warmup_steps=4), 100)
    assert [float(s(t)) for t in (0, 2, 4, 50)] == pytest.approx([0.0, 1.0, 2.0, 2.0])


def test_lbfgs_solves_a_quadratic(x64):
    a = jnp.diag(jnp.array([1.0, 10.0, 100.0]))
    b = jnp.array([1.0, -2.0, 3.0])
    value_fn = lambda p: 0.5 * p @ a @ p - b @ p
    tx, _ = optim.build_optimizer(OptimizerConfig(name="lbfgs", lr=1.0), 50)
    params, state = jnp.zeros(3), tx.init(jnp.zeros(3))

    @jax.jit  # as the train step runs it (eager, the line search's loops took 24 s for 20 steps)
    def step(params, state):
        value, grad = jax.value_and_grad(value_fn)(params)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=value_fn)
        return optax.apply_updates(params, updates), state

    for _ in range(20):
        params, state = step(params, state)
    np.testing.assert_allclose(params, jnp.linalg.solve(a, b), rtol=1e-6)


def test_unknown_optimizer_lists_valid():
    with pytest.raises(ValueError, match="adamw"):
        optim.build_optimizer(OptimizerConfig(name="adamax"), 10)
