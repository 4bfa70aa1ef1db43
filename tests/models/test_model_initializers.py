"""Initializers: sample statistics against the closed-form variances and bounds, exact constants, errors."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxnn.models import INITIALIZERS, MLP, get_initializer, init_model

FAN_IN, FAN_OUT = 400, 300  # a (400, 300) dense kernel: 120,000 draws, std error of the sample std ≈ 0.2%
KEY = jax.random.key(0)


def draw(name, shape=(FAN_IN, FAN_OUT), key=KEY, **kwargs):
    return np.asarray(get_initializer(name, **kwargs)(key, shape, jnp.float32), dtype=np.float64)


@pytest.mark.parametrize(
    "name, kwargs, std",
    [
        ("lecun", {}, math.sqrt(1 / FAN_IN)),
        ("lecun_normal", {}, math.sqrt(1 / FAN_IN)),
        ("glorot_normal", {}, math.sqrt(2 / (FAN_IN + FAN_OUT))),
        ("he", {}, math.sqrt(2 / FAN_IN)),
        ("he_normal", {}, math.sqrt(2 / FAN_IN)),
        ("he", {"mode": "fan_out"}, math.sqrt(2 / FAN_OUT)),
        ("small_normal", {"sigma": 0.05}, 0.05),
        ("small_normal", {}, 0.01),
    ],
)
def test_normal_initializers_draw_an_untruncated_gaussian_with_the_closed_form_std(name, kwargs, std):
    w = draw(name, **kwargs)
    n = w.size
    assert abs(w.mean()) < 4 * std / math.sqrt(n)
    assert w.std() == pytest.approx(std, rel=0.01)
    # Gaussian shape (not truncated): Kolmogorov-Smirnov against N(0, std²).
    assert scipy.stats.kstest(w.ravel() / std, "norm").pvalue > 1e-3
    assert np.abs(w).max() > 3.5 * std


def test_the_gaussian_shape_check_rejects_a_truncated_normal():
    """Control for the KS check above: jax's own he_normal truncates at 2σ and fails it."""
    w = np.asarray(jax.nn.initializers.he_normal()(KEY, (FAN_IN, FAN_OUT)), dtype=np.float64)
    std = math.sqrt(2 / FAN_IN)
    assert w.std() == pytest.approx(std, rel=0.01)
    assert scipy.stats.kstest(w.ravel() / std, "norm").pvalue < 1e-6


@pytest.mark.parametrize(
    "name, kwargs, bound",
    [
        ("glorot_uniform", {}, math.sqrt(6 / (FAN_IN + FAN_OUT))),
        ("he_uniform", {}, math.sqrt(6 / FAN_IN)),
        ("he_uniform", {"mode": "fan_out"}, math.sqrt(6 / FAN_OUT)),
        ("lecun_uniform", {}, math.sqrt(3 / FAN_IN)),
    ],
)
def test_uniform_initializers_fill_the_closed_form_interval(name, kwargs, bound):
    w = draw(name, **kwargs)
    assert np.abs(w).max() <= bound * (1 + 1e-6)
    assert np.abs(w).max() > 0.999 * bound
    assert w.var() == pytest.approx(bound**2 / 3, rel=0.02)
    assert scipy.stats.kstest(w.ravel(), "uniform", args=(-bound, 2 * bound)).pvalue > 1e-3


def test_conv_kernel_fans_count_the_receptive_field():
    """A (3, 3, 16, 32) HWIO kernel has fan_in = 3·3·16 = 144 and fan_out = 3·3·32 = 288."""
    shape = (3, 3, 16, 32)
    he = draw("he", shape)
    assert he.std() == pytest.approx(math.sqrt(2 / 144), rel=0.03)
    glorot = draw("glorot_uniform", shape)
    bound = math.sqrt(6 / (144 + 288))
    assert np.abs(glorot).max() <= bound * (1 + 1e-6)
    assert np.abs(glorot).max() > 0.99 * bound


def test_orthogonal_has_orthonormal_columns_times_scale(x64):
    w = np.asarray(get_initializer("orthogonal", scale=2.0)(KEY, (50, 30), jnp.float64))
    np.testing.assert_allclose(w.T @ w, 4.0 * np.eye(30), atol=1e-12)


def test_constant_zeros_and_ones_are_exact_in_both_precisions(x64):
    w64 = get_initializer("constant", value=0.37)(KEY, (3, 4), jnp.float64)
    assert w64.dtype == jnp.float64 and np.all(np.asarray(w64) == 0.37)
    w32 = get_initializer("constant", value=0.37)(KEY, (3, 4), jnp.float32)
    assert w32.dtype == jnp.float32 and np.all(np.asarray(w32) == np.float32(0.37))
    assert np.all(np.asarray(get_initializer("zeros")(KEY, (5,), jnp.float64)) == 0.0)
    assert np.all(np.asarray(get_initializer("ones")(KEY, (5,), jnp.float64)) == 1.0)


def test_same_key_same_draw_and_different_key_different_draw():
    np.testing.assert_array_equal(draw("he", (20, 10)), draw("he", (20, 10)))
    assert not np.array_equal(draw("he", (20, 10)), draw("he", (20, 10), key=jax.random.key(1)))


def test_models_use_the_named_initializers_with_their_kwargs():
    model = MLP(
        features=(4,),
        num_classes=3,
        kernel_init="constant",
        kernel_init_kwargs={"value": 0.25},
        bias_init="constant",
        bias_init_kwargs={"value": -1.5},
    )
    params, _ = init_model(model, KEY, (5,))
    for layer in ("dense_0", "head"):
        assert np.all(np.asarray(params[layer]["kernel"]) == 0.25)
        assert np.all(np.asarray(params[layer]["bias"]) == -1.5)


def test_models_accept_an_initializer_callable():
    model = MLP(features=(4,), num_classes=3, kernel_init=jax.nn.initializers.ones)
    params, _ = init_model(model, KEY, (5,))
    assert np.all(np.asarray(params["dense_0"]["kernel"]) == 1.0)
    with pytest.raises(TypeError, match="kernel_init_kwargs can only be given with a named kernel_init"):
        MLP(features=(4,), num_classes=3, kernel_init=jax.nn.initializers.ones, kernel_init_kwargs={"a": 1})


def test_registry_holds_the_documented_names():
    expected = {"lecun", "glorot_normal", "glorot_uniform", "he", "he_uniform", "small_normal", "constant", "zeros"}
    assert expected <= set(INITIALIZERS)


def test_unknown_initializer_name_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown initializer name 'kaiming'.*'glorot_uniform'.*'he'"):
        get_initializer("kaiming")
    with pytest.raises(ValueError, match=r"kernel_init='kaiming'.*valid names"):
        MLP(features=(4,), num_classes=3, kernel_init="kaiming")
    with pytest.raises(TypeError, match="name must be a str"):
        get_initializer(3)


def test_bad_initializer_kwargs_name_the_argument_and_the_accepted_ones():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['std'\]; accepted: \['sigma'\]"):
        get_initializer("small_normal", std=0.1)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['value'\]; accepted: none"):
        get_initializer("zeros", value=1.0)
    with pytest.raises(TypeError, match=r"missing required keyword argument\(s\) \['value'\]"):
        get_initializer("constant")
    with pytest.raises(TypeError, match=r"MLP: bias_init_kwargs: expected a mapping of keyword arguments \(str keys\) "
                                        r"or None, got \[1.0\]"):
        MLP(features=(4,), num_classes=3, bias_init="constant", bias_init_kwargs=[1.0])


@pytest.mark.parametrize("sigma, got", [(0.0, "0.0"), (-0.1, "-0.1"), (float("nan"), "nan"), (float("inf"), "inf"),
                                        ("0.1", "str '0.1'"), (True, "bool True")])
def test_invalid_sigma_is_rejected(sigma, got):
    # a wrong type is a ValueError too (validation.WrongTypeError): the models' API has always raised ValueError
    message = f"get_initializer('small_normal'): sigma: expected a finite number > 0, got {got}"
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        get_initializer("small_normal", sigma=sigma)


def test_invalid_values_are_rejected():
    with pytest.raises(ValueError, match=r"value: expected a finite number, got nan"):
        get_initializer("constant", value=float("nan"))
    with pytest.raises(ValueError, match=r"mode: expected one of \['fan_in', 'fan_out'\], got 'fan_avg'"):
        get_initializer("he", mode="fan_avg")
    with pytest.raises(ValueError, match=r"scale: expected a finite number > 0, got -1.0"):
        get_initializer("orthogonal", scale=-1.0)
