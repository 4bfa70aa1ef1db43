"""Gradient check: a correct model passes in float64 (and float32 within its bands), a deliberately wrong
custom_vjp is caught and the parameters it feeds are named, the bands and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn import data as data_lib, losses, models
from jaxnn.diagnostics import gradient_check, verdict_for


@jax.custom_vjp
def wrong_tanh(x):
    return jnp.tanh(x)


def _forward(x):
    return jnp.tanh(x), x


def _backward(x, g):
    return (g * 1.5 * (1 - jnp.tanh(x) ** 2),)  # deliberately 1.5x the true derivative


wrong_tanh.defvjp(_forward, _backward)


def _mlp_case(dtype):
    digits = data_lib.load_dataset("digits", seed=0)
    model = models.get_model("mlp", num_classes=10, width=8, depth=2, activation="tanh")
    params, state = models.init_model(model, jax.random.PRNGKey(0), digits.input_shape)
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    batch = (jnp.asarray(digits.train.x[:32], dtype), jnp.asarray(digits.train.y[:32]))
    return losses.make_loss_fn(model.apply, "softmax_cross_entropy", state), params, batch


def test_a_correct_model_passes(x64):
    loss_fn, params, batch = _mlp_case(jnp.float64)
    report = gradient_check(loss_fn, params, batch, num_coordinates=30, num_directions=4)
    assert report.verdict == "good" and report.max_relative_error < 1e-7, str(report)
    assert {p["parameter"] for p in report.coordinates} == {
        "['dense_0']['bias']", "['dense_0']['kernel']", "['dense_1']['bias']", "['dense_1']['kernel']",
        "['head']['bias']", "['head']['kernel']"}  # every leaf probed
    assert report.worst_parameters == [] and "good" in str(report)


def test_float32_stays_within_its_bands():
    loss_fn, params, batch = _mlp_case(jnp.float32)
    report = gradient_check(loss_fn, params, batch, num_coordinates=20, num_directions=3)
    assert report.dtype == "float32" and report.verdict in ("good", "acceptable"), str(report)


def test_a_wrong_custom_vjp_is_caught_and_named(x64):
    """Two dense layers, the hidden one through wrong_tanh: the gradients of the first layer's parameters (which
    the wrong backward feeds) disagree by 1.5x; the second layer's agree."""
    key1, key2 = jax.random.split(jax.random.PRNGKey(1))
    params = {"hidden": {"kernel": jax.random.normal(key1, (6, 5), jnp.float64), "bias": jnp.full(5, 0.1)},
              "out": {"kernel": jax.random.normal(key2, (5, 3), jnp.float64), "bias": jnp.zeros(3)}}
    x = jax.random.normal(jax.random.PRNGKey(2), (16, 6), jnp.float64)
    y = jnp.arange(16) % 3

    def loss_fn(p, batch):
        inputs, labels = batch
        hidden = wrong_tanh(inputs @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        logits = hidden @ p["out"]["kernel"] + p["out"]["bias"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])

    report = gradient_check(loss_fn, params, (x, y), num_coordinates=30, num_directions=3)
    assert report.verdict == "wrong", str(report)
    assert set(report.worst_parameters) == {"['hidden']['bias']", "['hidden']['kernel']"}
    hidden = [p for p in report.coordinates if p["parameter"].startswith("['hidden']") and abs(p["numeric"]) > 1e-8]
    assert hidden and all(p["analytic"] / p["numeric"] == pytest.approx(1.5, rel=1e-6) for p in hidden)
    assert all(p["verdict"] == "good" for p in report.coordinates if p["parameter"].startswith("['out']"))
    assert "disagreeing parameters: ['hidden']" in str(report)


def test_bands_and_bad_input():
    assert [verdict_for(e) for e in (1e-9, 1e-5, 1e-3, 0.5, float("nan"))] == [
        "good", "acceptable", "suspicious", "wrong", "wrong"]
    assert verdict_for(5e-3, "float32") == "good" and verdict_for(0.1, "float32") == "suspicious"
    with pytest.raises(ValueError, match="floating-point"):
        gradient_check(lambda p, b: 0.0, {"w": jnp.arange(3)})
    with pytest.raises(ValueError, match="at least one probe"):
        gradient_check(lambda p, b: jnp.sum(p["w"]), {"w": jnp.ones(3)}, num_coordinates=0, num_directions=0)
    with pytest.raises(FloatingPointError, match="not finite"):
        gradient_check(lambda p, b: jnp.sum(jnp.sqrt(p["w"])), {"w": jnp.zeros(3)})


def test_a_dead_relu_unit_is_not_flagged_for_rounding_noise(x64):
    """The main job's MLP at init (width 256, `jaxnn doctor`'s 8 examples): a head weight behind a unit dead on the
    batch has gradient exactly 0 while the difference sees ~1e-13 of rounding; it read "suspicious" (1.9e-3)
    before the noise floor was scaled to the "good" band."""
    digits = data_lib.load_dataset("digits", seed=0)
    model = models.get_model("mlp", num_classes=10, width=256, depth=2, activation="relu", kernel_init="he")
    init_key, _ = jax.random.split(jax.random.PRNGKey(0))  # as create_train_state draws it for train.seed 0
    params, state = models.init_model(model, init_key, digits.input_shape)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    batch = (jnp.asarray(digits.train.x[:8], jnp.float64), jnp.asarray(digits.train.y[:8]))
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", state)
    report = gradient_check(loss_fn, params, batch, key=jax.random.PRNGKey(0))
    noise = [p for p in report.coordinates if p["analytic"] == 0 and p["numeric"] != 0]
    assert noise and all(abs(p["numeric"]) < 1e-11 for p in noise)
    assert report.verdict == "good", str(report)


def test_a_relu_kink_inside_the_stencil_is_measured_again_at_a_smaller_step(x64):
    """Width-32 ReLU MLP at init on 8 examples (what `jaxnn doctor` checks): one coordinate's stencil (±2h, h=7.4e-4)
    crosses a ReLU kink and read "suspicious" (8.4e-3); at h/30 the same coordinate agrees to ~1e-9."""
    digits = data_lib.load_dataset("digits", seed=0)
    model = models.get_model("mlp", num_classes=10, width=32, depth=2, activation="relu", kernel_init="he")
    init_key, _ = jax.random.split(jax.random.PRNGKey(0))
    params, state = models.init_model(model, init_key, digits.input_shape)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    batch = (jnp.asarray(digits.train.x[:8], jnp.float64), jnp.asarray(digits.train.y[:8]))
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", state)
    report = gradient_check(loss_fn, params, batch, key=jax.random.PRNGKey(0))
    retried = [p for p in report.coordinates if p["step"] < report.step]
    assert retried and all(p["verdict"] == "good" for p in retried) and report.verdict == "good"
