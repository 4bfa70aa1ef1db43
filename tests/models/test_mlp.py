"""MLP: parameter counts by closed form, the forward pass against numpy, dtypes, shapes and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.models import MLP, count_params, get_model, init_model

KEY = jax.random.key(0)


def dense_count(widths):
    """Σ (fan_in·fan_out + fan_out) over consecutive widths."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def test_mlp_64_32_10_has_the_closed_form_parameter_count():
    params, state = init_model(get_model("mlp", num_classes=10, features=[32]), KEY, (64,))
    assert count_params(params) == 64 * 32 + 32 + 32 * 10 + 10 == 2410
    assert state == {}
    assert params["dense_0"]["kernel"].shape == (64, 32)
    assert params["head"]["kernel"].shape == (32, 10)


@pytest.mark.parametrize("width, depth", [(16, 2), (7, 3), (5, 0)])
def test_width_and_depth_give_depth_hidden_layers_of_width(width, depth, abstract_init):
    model = get_model("mlp", num_classes=10, width=width, depth=depth)
    assert model.features == (width,) * depth
    params, _ = abstract_init(model, (8, 8, 1))
    assert count_params(params) == dense_count([64] + [width] * depth + [10])


@pytest.mark.parametrize("norm, state_count", [("batch", 2 * (32 + 16)), ("layer", 0)])
def test_norm_adds_a_scale_and_a_bias_per_hidden_feature(norm, state_count, abstract_init):
    params, state = abstract_init(get_model("mlp", num_classes=10, features=[32, 16], norm=norm), (64,))
    assert count_params(params) == dense_count([64, 32, 16, 10]) + 2 * (32 + 16)
    assert count_params(state) == state_count
    assert set(state) == ({"batch_stats"} if norm == "batch" else set())


@pytest.mark.parametrize("activation, np_activation", [("tanh", np.tanh), ("relu", lambda h: np.maximum(h, 0))])
def test_forward_pass_matches_numpy(activation, np_activation, x64):
    model = MLP(features=(5, 4), num_classes=3, activation=activation, bias_init="small_normal",
                bias_init_kwargs={"sigma": 0.5})
    params, _ = init_model(model, KEY, (2, 2, 2))
    x = np.asarray(jax.random.normal(jax.random.key(1), (6, 2, 2, 2), jnp.float64))
    got = np.asarray(model.apply({"params": params}, jnp.asarray(x)))

    p = jax.tree.map(np.asarray, params)
    h = x.reshape(6, -1)  # NHWC flattened row-major
    for layer in ("dense_0", "dense_1"):
        h = np_activation(h @ p[layer]["kernel"] + p[layer]["bias"])
    expected = h @ p["head"]["kernel"] + p["head"]["bias"]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_float32_by_default_and_float64_under_x64():
    params, _ = init_model(MLP(features=(3,), num_classes=2), KEY, (4,))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    with jax.enable_x64(True):
        model = MLP(features=(3,), num_classes=2, norm="batch")
        params, state = init_model(model, KEY, (4,))
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves((params, state)))
        logits, new_state = model.apply(
            {"params": params, **state}, jnp.ones((5, 4)), train=True, mutable=["batch_stats"]
        )
        assert logits.dtype == jnp.float64
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(new_state))
    params, _ = init_model(MLP(features=(3,), num_classes=2, param_dtype=jnp.float32), KEY, (4,))
    assert params["head"]["kernel"].dtype == jnp.float32


def test_images_and_vectors_give_logits_of_shape_batch_by_classes():
    model = MLP(features=(8,), num_classes=10)
    params, _ = init_model(model, KEY, (8, 8, 1))
    assert model.apply({"params": params}, jnp.ones((2, 8, 8, 1))).shape == (2, 10)
    assert model.apply({"params": params}, jnp.ones((2, 64))).shape == (2, 10)


def test_a_one_dimensional_input_is_rejected_naming_x(abstract_init):
    model = MLP(features=(8,), num_classes=10)
    params, _ = abstract_init(model, (4,))
    with pytest.raises(ValueError, match=r"MLP: x must have a leading batch axis .* got shape \(4,\)"):
        jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, jnp.ones((4,)))


def test_models_are_hashable_and_equal_by_configuration():
    a = MLP(features=[8, 4], num_classes=3, kernel_init_kwargs={"mode": "fan_out"})
    b = MLP(features=(8, 4), num_classes=3, kernel_init_kwargs={"mode": "fan_out"})
    assert a.features == (8, 4)
    assert a == b and hash(a) == hash(b)
    assert a != MLP(features=(8, 5), num_classes=3)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"features": [32], "width": 32}, ValueError, "either features=.* or width/depth, not both"),
        ({"depth": -1}, ValueError, r"depth \(number of hidden layers\) must be an int >= 0; got -1"),
        ({"width": 0}, ValueError, r"get_model\('mlp'\): width: expected an integer >= 1, got 0"),
        ({"features": [32, 0]}, ValueError,
         r"MLP: features: expected a sequence of integers >= 1, got \[32, 0\] \(entry 1 is 0\)"),
        ({"features": 32}, ValueError, "MLP: features: expected a sequence of integers >= 1, got int 32"),
        ({"norm": "group"}, ValueError, r"MLP: norm: expected one of \[None, 'batch', 'layer'\], got 'group'"),
        ({"dropout": 1.0}, ValueError, r"MLP: dropout: expected a finite number in \[0, 1\), got 1.0"),
        ({"dropout": float("nan")}, ValueError, r"MLP: dropout: expected a finite number in \[0, 1\), got nan"),
        ({"param_dtype": "int32"}, ValueError, "param_dtype must be None .* or a floating dtype; got 'int32'"),
    ],
)
def test_invalid_mlp_arguments_raise_naming_the_argument(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        get_model("mlp", num_classes=10, **kwargs)
