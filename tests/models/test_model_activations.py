"""Activations against their closed forms, evaluated in numpy float64."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.models import ACTIVATIONS, MLP, get_activation

POINTS = np.array([-3.0, -0.5, 0.0, 0.7, 2.5])
_erf = np.vectorize(math.erf)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


CLOSED_FORMS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
    "sigmoid": _sigmoid,
    "elu": lambda x: np.where(x > 0, x, np.expm1(x)),
    "swish": lambda x: x * _sigmoid(x),
    "silu": lambda x: x * _sigmoid(x),
    "softplus": lambda x: np.log1p(np.exp(x)),
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.01 * x),
    "identity": lambda x: x,
}


def test_every_registered_activation_has_a_closed_form_here():
    assert set(ACTIVATIONS) == set(CLOSED_FORMS)
    assert {"relu", "tanh", "gelu", "sigmoid", "elu", "swish", "identity"} <= set(ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_activation_matches_closed_form(name, x64):
    got = np.asarray(get_activation(name)(jnp.asarray(POINTS, jnp.float64)))
    np.testing.assert_allclose(got, CLOSED_FORMS[name](POINTS), rtol=1e-12, atol=1e-15)


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown activation name 'rellu'; valid names: \[.*'relu'.*'tanh'"):
        get_activation("rellu")
    with pytest.raises(ValueError, match=r"MLP: activation='rellu'"):
        MLP(features=(3,), num_classes=2, activation="rellu")
    with pytest.raises(TypeError, match="activation must be a name"):
        MLP(features=(3,), num_classes=2, activation=3)
