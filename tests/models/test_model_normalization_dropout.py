"""Batch norm, layer norm and dropout against hand-computed numpy oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.models import (
    BATCH_NORM_MOMENTUM,
    MLP,
    NORM_EPSILON,
    init_model,
    normalization_layer,
)

KEY = jax.random.key(0)
GAMMA = np.array([0.5, 2.0, -1.0])
BETA = np.array([0.1, -0.2, 0.3])


def test_batch_norm_uses_momentum_0_9_and_epsilon_1e_5():
    assert BATCH_NORM_MOMENTUM == 0.9
    assert NORM_EPSILON == 1e-5


def _tiny_batch_norm_mlp():
    """2 -> dense(3) -> batch norm -> identity -> dense(2), with a non-trivial γ, β."""
    model = MLP(features=(3,), num_classes=2, norm="batch", activation="identity",
                bias_init="small_normal", bias_init_kwargs={"sigma": 1.0})
    params, state = init_model(model, KEY, (2,))
    params = {**params, "norm_0": {"scale": jnp.asarray(GAMMA), "bias": jnp.asarray(BETA)}}
    x = np.asarray(jax.random.normal(jax.random.key(1), (5, 2), jnp.float64)) * 3.0 + 1.0
    p = jax.tree.map(np.asarray, params)
    hidden = x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"]
    return model, params, state, x, hidden, p["head"]


def test_batch_norm_train_mode_normalises_over_the_batch_axis_per_feature(x64):
    model, params, state, x, hidden, head = _tiny_batch_norm_mlp()
    logits, new_state = model.apply(
        {"params": params, **state}, jnp.asarray(x), train=True, mutable=["batch_stats"]
    )
    mean = hidden.mean(axis=0)
    var = ((hidden - mean) ** 2).mean(axis=0)  # biased: divide by the batch size
    normalised = (hidden - mean) / np.sqrt(var + 1e-5) * GAMMA + BETA
    np.testing.assert_allclose(np.asarray(logits), normalised @ head["kernel"] + head["bias"], rtol=1e-10)

    stats = new_state["batch_stats"]["norm_0"]
    np.testing.assert_allclose(np.asarray(stats["mean"]), 0.9 * 0.0 + 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(stats["var"]), 0.9 * 1.0 + 0.1 * var, rtol=1e-12)

    # A second step continues the running averages r <- 0.9 r + 0.1 statistic.
    x2 = x[::-1][:3] * 0.5
    _, newer_state = model.apply(
        {"params": params, **new_state}, jnp.asarray(x2), train=True, mutable=["batch_stats"]
    )
    hidden2 = hidden[::-1][:3] * 0.5 + 0.5 * np.asarray(params["dense_0"]["bias"])
    mean2 = hidden2.mean(axis=0)
    var2 = ((hidden2 - mean2) ** 2).mean(axis=0)
    newer = newer_state["batch_stats"]["norm_0"]
    np.testing.assert_allclose(np.asarray(newer["mean"]), 0.9 * 0.1 * mean + 0.1 * mean2, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(newer["var"]), 0.9 * (0.9 + 0.1 * var) + 0.1 * var2, rtol=1e-10)


def test_batch_norm_eval_mode_uses_the_running_averages_and_leaves_them_unchanged(x64):
    model, params, state, x, hidden, head = _tiny_batch_norm_mlp()
    running_mean = np.array([0.3, -1.0, 2.0])
    running_var = np.array([0.5, 4.0, 1.5])
    state = {"batch_stats": {"norm_0": {"mean": jnp.asarray(running_mean), "var": jnp.asarray(running_var)}}}
    logits, returned_state = model.apply(
        {"params": params, **state}, jnp.asarray(x), train=False, mutable=["batch_stats"]
    )
    normalised = (hidden - running_mean) / np.sqrt(running_var + 1e-5) * GAMMA + BETA
    np.testing.assert_allclose(np.asarray(logits), normalised @ head["kernel"] + head["bias"], rtol=1e-10)
    jax.tree.map(np.testing.assert_array_equal, returned_state, state)

    # Eval mode treats examples independently; train mode does not.
    single = model.apply({"params": params, **state}, jnp.asarray(x[:1]))
    np.testing.assert_allclose(np.asarray(single), np.asarray(logits[:1]), rtol=1e-12)
    train_pair, _ = model.apply(
        {"params": params, **state}, jnp.asarray(x[:2]), train=True, mutable=["batch_stats"]
    )
    train_all, _ = model.apply({"params": params, **state}, jnp.asarray(x), train=True, mutable=["batch_stats"])
    assert not np.allclose(np.asarray(train_pair[0]), np.asarray(train_all[0]))


def test_conv_batch_norm_pools_statistics_over_batch_and_spatial_axes(x64):
    x = np.asarray(jax.random.normal(KEY, (4, 3, 3, 2), jnp.float64)) * np.array([1.0, 5.0]) + np.array([2.0, -3.0])
    layer = normalization_layer("batch", train=True, input_ndim=4, param_dtype=jnp.float64)
    variables = layer.init(KEY, jnp.asarray(x))
    y, new_state = layer.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(y), (x - mean) / np.sqrt(var + 1e-5), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(new_state["batch_stats"]["mean"]), 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(new_state["batch_stats"]["var"]), 0.9 + 0.1 * var, rtol=1e-12)


def test_layer_norm_normalises_each_example_over_its_features(x64):
    images = np.asarray(jax.random.normal(KEY, (3, 2, 2, 4), jnp.float64)) * 3.0 + 1.0
    layer = normalization_layer("layer", train=True, input_ndim=4, param_dtype=jnp.float64)
    variables = layer.init(KEY, jnp.asarray(images))
    assert variables["params"]["scale"].shape == (4,)  # per-channel affine
    variables = {"params": {"scale": jnp.arange(1.0, 5.0), "bias": jnp.full((4,), 0.5)}}
    y = np.asarray(layer.apply(variables, jnp.asarray(images)))
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    var = images.var(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(y, (images - mean) / np.sqrt(var + 1e-5) * np.arange(1.0, 5.0) + 0.5, rtol=1e-10)

    vectors = images.reshape(3, 16)
    layer = normalization_layer("layer", train=False, input_ndim=2, param_dtype=jnp.float64)
    y = np.asarray(layer.apply(layer.init(KEY, jnp.asarray(vectors)), jnp.asarray(vectors)))
    mean = vectors.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(y, (vectors - mean) / np.sqrt(vectors.var(axis=1, keepdims=True) + 1e-5), rtol=1e-10)


def test_no_norm_means_no_layer_and_unknown_norm_raises():
    assert normalization_layer(None, train=True, input_ndim=2, param_dtype=jnp.float32) is None
    with pytest.raises(ValueError, match=r"norm must be one of \[None, 'batch', 'layer'\]; got 'instance'"):
        normalization_layer("instance", train=True, input_ndim=2, param_dtype=jnp.float32)


KEEP = 0.75


@pytest.fixture(scope="module")
def dropout_model():
    model = MLP(features=(256,), num_classes=3, dropout=1 - KEEP, bias_init="constant",
                bias_init_kwargs={"value": 0.1})
    params, _ = init_model(model, KEY, (16,))
    x = jax.random.normal(jax.random.key(2), (64, 16))
    return model, params, x


def _dropout_input_and_output(model, params, x, **apply_kwargs):
    _, captured = model.apply({"params": params}, x, capture_intermediates=True, mutable=["intermediates"],
                              **apply_kwargs)
    hidden = np.asarray(jax.nn.relu(captured["intermediates"]["dense_0"]["__call__"][0]))
    dropped = np.asarray(captured["intermediates"]["dropout_0"]["__call__"][0])
    return hidden, dropped


def test_inverted_dropout_zeroes_units_and_scales_the_kept_ones_by_one_over_keep(dropout_model):
    model, params, x = dropout_model
    hidden, dropped = _dropout_input_and_output(model, params, x, train=True, rngs={"dropout": jax.random.key(3)})
    kept = dropped != 0
    assert np.all(hidden[kept] > 0)
    np.testing.assert_allclose(dropped[kept], hidden[kept] / np.float32(KEEP), rtol=1e-6)
    active = hidden > 0
    assert kept[active].mean() == pytest.approx(KEEP, abs=0.02)
    # Scaling by 1/keep preserves the mean activation.
    assert dropped.mean() == pytest.approx(hidden.mean(), rel=0.03)
    assert not np.allclose(dropped, hidden)


def test_dropout_is_off_in_eval_mode_and_reproducible_with_a_fixed_key(dropout_model):
    model, params, x = dropout_model
    hidden, dropped = _dropout_input_and_output(model, params, x, train=False)
    np.testing.assert_array_equal(dropped, hidden)

    def run(seed):
        return np.asarray(model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(seed)}))

    np.testing.assert_array_equal(run(5), run(5))
    assert not np.allclose(run(5), run(6))
    np.testing.assert_array_equal(
        np.asarray(model.apply({"params": params}, x)), np.asarray(model.apply({"params": params}, x))
    )
    with pytest.raises(Exception, match="dropout"):
        model.apply({"params": params}, x, train=True)
