"""Gradient noise statistics against a per-example loop (float64) and a closed form; McCandlish et al.'s two-batch
estimator; the fit callback."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jaxnn import data as data_lib, losses, models
from jaxnn.diagnostics import GradientNoiseCallback, gradient_noise, two_batch_noise_scale
from jaxnn.train import create_train_state, fit


@pytest.mark.parametrize("name, kwargs, count", [("mlp", dict(width=8, depth=1), 40), ("lenet", {}, 12)])
def test_statistics_equal_a_per_example_loop(x64, name, kwargs, count):
    """An MLP (every parameter in a Dense layer: per-example norms ‖a‖²‖g‖², no per-example gradient formed) and
    LeNet (convolutions: per-example gradients by vmap) against a loop of jax.grad per example."""
    digits = data_lib.load_dataset("digits", seed=0)
    model = models.get_model(name, num_classes=10, **kwargs)
    params, state = models.init_model(model, jax.random.PRNGKey(0), (8, 8, 1))
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", state)
    x, y = jnp.asarray(digits.train.x[:count], jnp.float64), jnp.asarray(digits.train.y[:count])
    noise = gradient_noise(loss_fn, params, (x, y), chunk_size=16)
    grads = [jax.grad(loss_fn)(params, (x[i:i + 1], y[i:i + 1])) for i in range(count)]

    def expected(select):
        g = np.stack([np.concatenate([np.ravel(leaf) for leaf in select(tree)]) for tree in grads])
        mean = g.mean(axis=0)
        trace = np.sum((g - mean) ** 2) / (count - 1)
        return mean @ mean - trace / count, trace

    norm_sq, trace = expected(lambda tree: jax.tree.leaves(tree))
    assert noise.gradient_norm_sq == pytest.approx(norm_sq, rel=1e-10)
    assert noise.trace_covariance == pytest.approx(trace, rel=1e-10)
    assert noise.noise_scale == pytest.approx(trace / norm_sq, rel=1e-10)
    for layer, row in noise.layers.items():
        norm_sq, trace = expected(lambda tree: jax.tree.leaves(_subtree(tree, layer)))
        assert row["gradient_norm_sq"] == pytest.approx(norm_sq, rel=1e-9, abs=1e-14)
        assert row["trace_covariance"] == pytest.approx(trace, rel=1e-9)
    # the two-batch estimator with batch sizes 1 and n gives the same numbers
    flat = np.stack([ravel_pytree(tree)[0] for tree in grads])
    small, big = np.mean(np.sum(flat**2, axis=1)), np.sum(flat.mean(axis=0) ** 2)
    two = two_batch_noise_scale(small, big, 1, count)
    np.testing.assert_allclose(two, (noise.gradient_norm_sq, noise.trace_covariance, noise.noise_scale), rtol=1e-10)


def _subtree(tree, name):
    for key in name.split("/"):
        tree = tree[key]
    return tree


def test_closed_form_of_a_quadratic(x64):
    """ℓ_i(θ) = ½‖θ − x_i‖²: g_i = θ − x_i, so tr Σ is the sample variance of the x_i summed over coordinates and
    |G|² = ‖θ − x̄‖² − tr Σ / n."""
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 5), jnp.float64) * jnp.arange(1.0, 6.0)
    theta = {"layer": {"w": jnp.ones(5, jnp.float64)}}
    noise = gradient_noise(lambda p, batch: 0.5 * jnp.mean(jnp.sum((p["layer"]["w"] - batch) ** 2, axis=1)), theta, x)
    trace = float(np.sum(np.var(np.asarray(x), axis=0, ddof=1)))
    assert noise.trace_covariance == pytest.approx(trace, rel=1e-12)
    assert noise.gradient_norm_sq == pytest.approx(float(np.sum((1 - np.asarray(x).mean(0)) ** 2)) - trace / 64,
                                                   rel=1e-12)


def test_callback_and_bad_input():
    digits = data_lib.load_dataset("digits", seed=0)
    state = create_train_state(models.get_model("mlp", num_classes=10, width=8, depth=1), optax.sgd(0.1),
                               digits.input_shape, jax.random.PRNGKey(0))
    callback = GradientNoiseCallback(every_k_steps=5)
    fit(state, digits, batch_size=32, num_steps=10, callbacks=[callback], progress=False, log_every=5)
    assert [h["step"] for h in callback.history] == [5, 10]
    assert {"grad_noise/scale", "grad_noise/trace_cov", "grad_snr/head"} <= set(callback.history[0])
    with pytest.raises(ValueError, match="every_k_steps"):
        GradientNoiseCallback(every_k_steps=0)
    loss_fn = lambda p, batch: jnp.mean((batch - p) ** 2)  # noqa: E731
    with pytest.raises(ValueError, match="at least 2 examples"):
        gradient_noise(loss_fn, jnp.zeros(3), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="batch_small < batch_big"):
        two_batch_noise_scale(1.0, 0.5, 8, 8)
