"""Fixtures for the model tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.models import init_model


@pytest.fixture
def abstract_init():
    """``abstract_init(model, input_shape) -> (params, model_state)`` as ``jax.ShapeDtypeStruct`` trees.

    Traces :func:`init_model` with ``jax.eval_shape``: shapes and counts without compiling or drawing any
    random numbers (compiling the RNG is most of the cost of a real init on CPU).
    """

    def run(model, input_shape):
        return jax.eval_shape(lambda key: init_model(model, key, input_shape), jax.random.key(0))

    return run


@pytest.fixture
def he_filled():
    """``he_filled(abstract_tree, seed=0)``: concrete arrays for a ``ShapeDtypeStruct`` tree, drawn in numpy (no
    jax RNG program to compile): kernels N(0, 2/fan_in), norm scales and running variances 1, biases and
    running means 0."""

    def fill_tree(abstract_tree, seed=0):
        rng = np.random.default_rng(seed)

        def fill(path, leaf):
            name = jax.tree_util.keystr(path)
            if "kernel" in name:
                fan_in = int(np.prod(leaf.shape[:-1]))
                return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)
            value = 1.0 if ("scale" in name or "var" in name) else 0.0
            return jnp.full(leaf.shape, value, leaf.dtype)

        return jax.tree_util.tree_map_with_path(fill, abstract_tree)

    return fill_tree
