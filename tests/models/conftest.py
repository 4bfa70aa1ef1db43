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


@pytest.fixture
def assert_top_hessian_eigenvalues_match_dense():
    """``check(model, input_shape, batch)``: the top-2 eigenvalues of the cross-entropy Hessian from jaxnn's Lanczos
    (``curvature.hessian``, ``top_eigenvalues`` to 1e-10) equal a dense ``jax.hessian`` + ``eigvalsh`` (1e-8);
    call it under float64."""
    from jaxnn import curvature, losses

    def check(model, input_shape, batch):
        params, _ = init_model(model, jax.random.PRNGKey(0), input_shape)
        loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", {})
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        dense = np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), batch)))(flat)))
        top = curvature.top_eigenvalues(curvature.hessian(loss_fn, params, batch), k=2, key=jax.random.PRNGKey(2),
                                        tol=1e-10, progress=False)[0]
        np.testing.assert_allclose(np.asarray(top), dense[::-1][:2], rtol=1e-8)

    return check
