"""LeNet and VGGSmall: closed-form parameter counts for several input sizes, shapes, modes and errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.models import LeNet, VGGSmall, count_params, get_model


def conv_count(k, c_in, c_out):
    return k * k * c_in * c_out + c_out


def dense_count(fan_in, fan_out):
    return fan_in * fan_out + fan_out


def lenet_count(side, channels, classes=10, padding="SAME"):
    """6 and 16 5x5 filters, 2x2 pools (sizes round up), dense 120-84-classes."""
    for _ in range(2):
        side = side if padding == "SAME" else side - 4
        side = math.ceil(side / 2)
    flat = side * side * 16
    return (conv_count(5, channels, 6) + conv_count(5, 6, 16) + dense_count(flat, 120) + dense_count(120, 84)
            + dense_count(84, classes))


def test_original_lenet5_geometry_has_61706_parameters(abstract_init):
    """LeCun et al. (1998): 32x32 input, valid 5x5 convs: 32 -> 28 -> 14 -> 10 -> 5, flatten 400."""
    assert lenet_count(32, 1, padding="VALID") == 156 + 2416 + 48120 + 10164 + 850 == 61_706
    params, _ = abstract_init(get_model("lenet", num_classes=10, padding="VALID"), (32, 32, 1))
    assert count_params(params) == 61_706
    assert params["dense_0"]["kernel"].shape == (400, 120)


@pytest.mark.parametrize("side, channels", [(28, 1), (8, 1), (32, 3), (7, 1)])
def test_lenet_parameter_count_matches_the_closed_form(side, channels, abstract_init):
    params, state = abstract_init(get_model("lenet", num_classes=10), (side, side, channels))
    assert count_params(params) == lenet_count(side, channels)
    assert state == {}


def test_lenet_norm_adds_a_scale_and_a_bias_per_channel_and_hidden_unit(abstract_init):
    params, state = abstract_init(get_model("lenet", num_classes=10, norm="batch"), (28, 28, 1))
    assert count_params(params) == lenet_count(28, 1) + 2 * (6 + 16 + 120 + 84)
    assert count_params(state) == 2 * (6 + 16 + 120 + 84)


def vgg_count(side, channels, stages=(32, 64, 128), convs=2, dense=(128,), classes=10):
    count = 0
    for width in stages:
        for _ in range(convs):
            count += conv_count(3, channels, width)
            channels = width
        side = math.ceil(side / 2)
    fan_in = side * side * channels
    for width in (*dense, classes):
        count += dense_count(fan_in, width)
        fan_in = width
    return count


@pytest.mark.parametrize("side, channels", [(8, 1), (32, 3), (7, 1)])
def test_vgg_small_parameter_count_matches_the_closed_form(side, channels, abstract_init):
    params, _ = abstract_init(get_model("vgg_small", num_classes=10), (side, side, channels))
    assert count_params(params) == vgg_count(side, channels)


def test_vgg_small_custom_stages_and_batch_norm(abstract_init):
    model = get_model("vgg_small", num_classes=5, stage_features=[8, 16], convs_per_stage=1, dense_features=[],
                      norm="batch")
    params, state = abstract_init(model, (8, 8, 3))
    assert count_params(params) == vgg_count(8, 3, stages=(8, 16), convs=1, dense=(), classes=5) + 2 * (8 + 16)
    assert count_params(state) == 2 * (8 + 16)


@pytest.mark.parametrize("name", ["lenet", "vgg_small"])
def test_conv_nets_run_on_digits_in_both_modes(name, abstract_init, he_filled):
    model = get_model(name, num_classes=10, norm="batch", dropout=0.5)
    params, state = he_filled(abstract_init(model, (8, 8, 1)))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))

    @jax.jit
    def forward(variables, x, key):
        eval_logits = model.apply(variables, x)
        train_logits, new_state = model.apply(variables, x, train=True, rngs={"dropout": key},
                                              mutable=["batch_stats"])
        return eval_logits, train_logits, new_state

    eval_logits, train_logits, new_state = forward({"params": params, **state}, x, jax.random.key(2))
    assert eval_logits.shape == train_logits.shape == (2, 10)
    assert np.all(np.isfinite(np.asarray(eval_logits))) and np.all(np.isfinite(np.asarray(train_logits)))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert not np.allclose(np.asarray(eval_logits), np.asarray(train_logits))


def test_valid_padding_on_too_small_images_raises_a_clear_error(abstract_init):
    with pytest.raises(ValueError, match=r"input_shape=\(8, 8, 1\).*padding='VALID' conv layer 1 needs inputs of "
                                         r"at least 5x5; its input has shape \(1, 2, 2, 6\).*padding='SAME'"):
        abstract_init(get_model("lenet", num_classes=10, padding="VALID"), (8, 8, 1))


@pytest.mark.parametrize("cls", [LeNet, VGGSmall])
def test_conv_nets_reject_vectors(cls):
    model = cls(num_classes=10)
    with pytest.raises(ValueError, match=rf"{cls.__name__}: x must be a batch of NHWC images .* got shape \(2, 64\)"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((2, 64))))


@pytest.mark.parametrize(
    "name, kwargs, pattern",
    [
        ("lenet", {"padding": "same"}, r"LeNet: padding: expected one of \['SAME', 'VALID'\], got 'same'"),
        ("lenet", {"pool": "min"}, r"LeNet: pool: expected one of \['max', 'avg'\], got 'min'"),
        ("lenet", {"conv_features": []},
         r"LeNet: conv_features: expected a non-empty sequence of integers >= 1, got \[\]"),
        ("lenet", {"kernel_size": 0}, "LeNet: kernel_size: expected an integer >= 1, got 0"),
        ("lenet", {"dropout": -0.1}, r"LeNet: dropout: expected a finite number in \[0, 1\), got -0.1"),
        ("vgg_small", {"convs_per_stage": 0}, "VGGSmall: convs_per_stage: expected an integer >= 1, got 0"),
        ("vgg_small", {"stage_features": [32, -1]},
         r"VGGSmall: stage_features: expected a sequence of integers >= 1, got \[32, -1\] \(entry 1 is -1\)"),
    ],
)
def test_invalid_conv_net_arguments_raise_naming_the_argument(name, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_model(name, num_classes=10, **kwargs)
