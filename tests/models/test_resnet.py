"""CIFAR ResNet-(6n+2): closed-form parameter counts, option-A shortcuts, plain/no-norm variants, modes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.models import (
    CifarResNet,
    count_params,
    get_model,
    option_a_shortcut,
    resnet_blocks_per_stage,
)


def resnet_param_count(n, width=16, in_channels=3, classes=10, norm=True):
    """Closed form: stem 3x3 conv, 3 stages of n blocks (two bias-free 3x3 convs each), a dense head,
    plus 2 per channel (γ, β) for each of the 1 + 6n normalisation layers when norm."""
    norm_params = (lambda c: 2 * c) if norm else (lambda c: 0)
    count = 9 * in_channels * width + norm_params(width)
    for channels in (width, 2 * width, 4 * width):
        previous = width if channels == width else channels // 2
        count += 9 * previous * channels + 9 * channels * channels + 2 * norm_params(channels)
        count += (n - 1) * (2 * 9 * channels * channels + 2 * norm_params(channels))
    return count + 4 * width * classes + classes


def test_resnet20_has_269722_parameters():
    """He et al. (2016), Table 6: ResNet-20 has 0.27M parameters."""
    assert resnet_param_count(3) == 269_722


@pytest.mark.parametrize("depth", [8, 20, 56, 110])
def test_parameter_count_matches_the_closed_form(depth, abstract_init):
    n = (depth - 2) // 6
    params, state = abstract_init(get_model("resnet", depth=depth, num_classes=10), (32, 32, 3))
    assert count_params(params) == resnet_param_count(n)
    assert count_params(state) == 2 * 16 * (1 + 14 * n)  # running mean and variance per BN channel


def test_digits_sized_inputs_and_other_widths(abstract_init):
    model = get_model("resnet20", num_classes=7, base_width=8)
    params, _ = abstract_init(model, (8, 8, 1))
    assert count_params(params) == resnet_param_count(3, width=8, in_channels=1, classes=7)


def test_plain_network_has_the_same_parameters_as_the_residual_one(abstract_init):
    residual, _ = abstract_init(get_model("resnet20", num_classes=10), (32, 32, 3))
    plain, _ = abstract_init(get_model("plain20", num_classes=10), (32, 32, 3))
    assert jax.tree.structure(plain) == jax.tree.structure(residual)
    assert jax.tree.map(lambda a: a.shape, plain) == jax.tree.map(lambda a: a.shape, residual)


def test_no_norm_removes_exactly_the_batch_norm_parameters(abstract_init):
    with_bn, bn_state = abstract_init(get_model("resnet20", num_classes=10), (32, 32, 3))
    without, state = abstract_init(get_model("resnet20", num_classes=10, norm=None), (32, 32, 3))
    n, width = 3, 16
    bn_params = 2 * width * (1 + 2 * n) + 2 * 2 * width * 2 * n + 2 * 4 * width * 2 * n
    assert bn_params == 2 * width * (1 + 14 * n) == 1376
    assert count_params(with_bn) - count_params(without) == bn_params
    assert count_params(without) == resnet_param_count(3, norm=False)
    assert state == {} and count_params(bn_state) == bn_params
    norm_leaves = [
        path for path, _ in jax.tree_util.tree_leaves_with_path(with_bn) if "norm" in jax.tree_util.keystr(path)
    ]
    assert len(norm_leaves) == 2 * (1 + 6 * n)
    layer_norm, layer_state = abstract_init(get_model("resnet20", num_classes=10, norm="layer"), (32, 32, 3))
    assert count_params(layer_norm) == count_params(with_bn) and layer_state == {}


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    x = np.arange(1 * 4 * 4 * 2, dtype=np.float32).reshape(1, 4, 4, 2)
    got = np.asarray(option_a_shortcut(jnp.asarray(x), 4, 2))
    expected = np.zeros((1, 2, 2, 4), np.float32)
    for i in range(2):
        for j in range(2):
            expected[0, i, j, 1:3] = x[0, 2 * i, 2 * j, :]
    np.testing.assert_array_equal(got, expected)

    odd = np.asarray(option_a_shortcut(jnp.asarray(x), 5, 2))
    np.testing.assert_array_equal(odd[..., 1:3], expected[..., 1:3])
    assert odd.shape == (1, 2, 2, 5) and np.all(odd[..., [0, 3, 4]] == 0)
    np.testing.assert_array_equal(np.asarray(option_a_shortcut(jnp.asarray(x), 2, 1)), x)
    with pytest.raises(ValueError, match="features must be >= the input channels 2; got 1"):
        option_a_shortcut(jnp.asarray(x), 1, 1)


def test_resnet20_on_cifar_sized_images_trains_and_evaluates(abstract_init, he_filled):
    model = get_model("resnet20", num_classes=10)
    params, state = he_filled(abstract_init(model, (32, 32, 3)))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

    @jax.jit
    def forward(params, state, x):
        eval_logits = model.apply({"params": params, **state}, x)
        train_logits, new_state = model.apply({"params": params, **state}, x, train=True, mutable=["batch_stats"])
        return eval_logits, train_logits, new_state

    eval_logits, train_logits, new_state = forward(params, state, x)
    assert eval_logits.shape == train_logits.shape == (2, 10)
    assert np.all(np.isfinite(np.asarray(eval_logits))) and np.all(np.isfinite(np.asarray(train_logits)))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    stem = new_state["batch_stats"]["stem_norm"]
    assert not np.allclose(np.asarray(stem["mean"]), 0.0)  # train mode updated the running statistics
    assert not np.allclose(np.asarray(eval_logits), np.asarray(train_logits))


def test_residual_and_plain_differ_given_the_same_params_and_run_in_float64(x64, abstract_init, he_filled):
    residual = get_model("resnet", depth=8, num_classes=10)
    plain = get_model("plain", depth=8, num_classes=10)
    params, state = he_filled(abstract_init(residual, (8, 8, 1)))
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves((params, state)))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1), jnp.float64)

    @jax.jit
    def forward(variables, x):
        out_residual, new_state = residual.apply(variables, x, train=True, mutable=["batch_stats"])
        out_plain, _ = plain.apply(variables, x, train=True, mutable=["batch_stats"])
        return out_residual, out_plain, new_state

    out_residual, out_plain, new_state = forward({"params": params, **state}, x)
    assert out_residual.shape == out_plain.shape == (2, 10)
    assert out_residual.dtype == jnp.float64
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(new_state))
    assert not np.allclose(np.asarray(out_residual), np.asarray(out_plain))


def test_registry_entries_fix_depth_and_shortcuts():
    for depth in (20, 32, 44, 56, 110):
        residual = get_model(f"resnet{depth}", num_classes=10)
        plain = get_model(f"plain{depth}", num_classes=10)
        assert isinstance(residual, CifarResNet) and (residual.depth, residual.plain) == (depth, False)
        assert (plain.depth, plain.plain) == (depth, True)
    assert resnet_blocks_per_stage(20) == 3 and resnet_blocks_per_stage(110) == 18


@pytest.mark.parametrize("depth", [21, 7, 2, 0, -4, 20.0, "20", True])
def test_depth_not_of_the_form_6n_plus_2_is_rejected(depth):
    pattern = rf"depth must be an int of the form 6n\+2 .*; got {depth!r}"
    with pytest.raises(ValueError, match=pattern):
        get_model("resnet", depth=depth, num_classes=10)
    with pytest.raises(ValueError, match=pattern):
        CifarResNet(num_classes=10, depth=depth)


def test_resnet_needs_nhwc_images(abstract_init):
    model = get_model("resnet", depth=8, num_classes=10)
    with pytest.raises(ValueError, match=r"CifarResNet: x must be a batch of NHWC images .* got shape \(1, 64\)"):
        abstract_init(model, (64,))


def test_invalid_resnet_fields_are_rejected():
    with pytest.raises(ValueError, match="plain must be a bool; got 1"):
        CifarResNet(num_classes=10, plain=1)
    with pytest.raises(ValueError, match="CifarResNet: base_width: expected an integer >= 1, got 0"):
        get_model("resnet20", num_classes=10, base_width=0)
    with pytest.raises(ValueError, match=r"CifarResNet: norm: expected one of \[None, 'batch', 'layer'\], got 'bn'"):
        get_model("resnet20", num_classes=10, norm="bn")
