"""Curvature blocks against dense sub-blocks of jax.hessian (float64): one layer's block (restrict, wrt=), every
layer at once (block_spectra: top-k with residual bounds, Hutchinson trace on the drawn probes), GGN blocks, plain
matvec blocks, a block of a convolutional net, and the errors that name the layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxnn import curvature, losses


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.tanh(nn.Dense(6, param_dtype=jnp.float64)(x))
        x = nn.tanh(nn.Dense(5, param_dtype=jnp.float64)(x))
        return nn.Dense(3, param_dtype=jnp.float64)(x)


def setup():
    model = MLP()
    x = jax.random.normal(jax.random.PRNGKey(0), (40, 4), jnp.float64)
    y = jnp.arange(40) % 3
    params = model.init(jax.random.PRNGKey(1), x)["params"]
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy")
    return model, params, loss_fn, (x, y)


def dense_hessian(loss_fn, params, batch):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.hessian(lambda v: loss_fn(unravel(v), batch))(flat))


def block_indices(params, paths):
    """Positions in ravel_pytree(params) of the leaves ``paths``, in the block dict's own flattening order."""
    leaves = jax.tree.leaves(params)
    offsets = np.cumsum([0] + [leaf.size for leaf in leaves])
    all_paths = curvature.parameter_paths(params)
    index = []
    for path in sorted(paths):  # a dict flattens in key order
        position = all_paths.index(path)
        index.extend(range(offsets[position], offsets[position + 1]))
    return np.asarray(index)


def test_layer_names_and_paths(x64):
    _, params, _, _ = setup()
    assert curvature.layer_names(params) == ["Dense_0", "Dense_1", "Dense_2"]
    assert curvature.parameter_paths(params)[:2] == ["Dense_0/bias", "Dense_0/kernel"]


def test_one_layer_block_equals_the_dense_sub_block(x64):
    _, params, loss_fn, batch = setup()
    dense = dense_hessian(loss_fn, params, batch)
    for wrt, paths in [("Dense_1", ["Dense_1/bias", "Dense_1/kernel"]), ("*/kernel", ["Dense_0/kernel",
                       "Dense_1/kernel", "Dense_2/kernel"]), (["Dense_0/bias", "Dense_2"], ["Dense_0/bias",
                       "Dense_2/bias", "Dense_2/kernel"])]:
        index = block_indices(params, paths)
        sub = dense[np.ix_(index, index)]
        block = curvature.hessian(loss_fn, params, batch, wrt=wrt)
        assert block.num_params == index.size and sorted(block.params) == sorted(paths)
        v = jax.random.normal(jax.random.PRNGKey(2), (index.size,), jnp.float64)
        unravel = ravel_pytree(block.params)[1]
        np.testing.assert_allclose(ravel_pytree(block(unravel(v)))[0], sub @ np.asarray(v), rtol=1e-10, atol=1e-12)
        if wrt == "Dense_1":  # an estimator on a block (the others: products and gradients)
            values = curvature.top_eigenvalues(block, k=2, num_iters=index.size, tol=None, progress=False).values
            np.testing.assert_allclose(values, np.linalg.eigvalsh(sub)[::-1][:2], rtol=1e-9)
        # the block's gradient is the full gradient's block
        _, gradient = block.loss_and_gradient()
        full = ravel_pytree(jax.grad(loss_fn)(params, batch))[0]
        np.testing.assert_allclose(ravel_pytree(gradient)[0], np.asarray(full)[index], rtol=1e-10, atol=1e-14)


def test_every_layer_at_once_against_dense_blocks(x64):
    """block_spectra: each layer's top-2 (every Ritz pair's residual bound honest: an eigenvalue of the dense block
    within it; full Krylov space where the layer is small), and its trace estimate is the mean of zᵀH_BBz over the
    drawn probes (recomputed with the dense block); with many probes near the exact block trace. Exact block traces
    sum to the full trace."""
    _, params, loss_fn, batch = setup()
    dense = dense_hessian(loss_fn, params, batch)
    H = curvature.hessian(loss_fn, params, batch)
    key = jax.random.key(3)
    spectra = curvature.block_spectra(H, k=2, key=key, num_iters=24, num_probes=3)
    assert [b.name for b in spectra.blocks] == ["Dense_0", "Dense_1", "Dense_2"]
    total = 0.0
    for index_b, block in enumerate(spectra.blocks):
        paths = [p for p in curvature.parameter_paths(params) if p.startswith(block.name + "/")]
        index = block_indices(params, paths)
        sub = dense[np.ix_(index, index)]
        exact = np.linalg.eigvalsh(sub)
        distance = np.min(np.abs(exact[None, :] - block.top[:, None]), axis=1)
        assert np.all(distance <= block.residuals * (1 + 1e-6) + 1e-10), block.name
        if block.num_params <= 24:  # a full Krylov space: exact
            np.testing.assert_allclose(block.top, exact[::-1][:2], rtol=1e-9)
            assert block.converged.all()
        probes = np.asarray(jax.random.rademacher(jax.random.fold_in(key, index_b), (3, index.size), jnp.float64))
        expected = np.mean(np.einsum("pi,ij,pj->p", probes, sub, probes))
        assert block.trace == pytest.approx(expected, rel=1e-10)
        assert block.weights.sum(axis=1) == pytest.approx(np.ones(3), rel=1e-10)
        total += np.trace(sub)
    assert total == pytest.approx(np.trace(dense), rel=1e-12)
    report = spectra.as_dict()
    assert set(report["Dense_1"]) == {"num_params", "top", "residuals", "converged", "trace", "trace_standard_error"}


def test_ggn_and_plain_matvec_blocks(x64):
    model, params, _, batch = setup()
    predict = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    output_loss = lambda o, y: jnp.mean(losses.get_loss("softmax_cross_entropy")(o, y))  # noqa: E731
    G = curvature.ggn(predict, output_loss, params, batch)
    flat, unravel = ravel_pytree(params)
    dense_g = np.asarray(jax.vmap(lambda e: ravel_pytree(G(unravel(e)))[0])(jnp.eye(flat.size)))
    index = block_indices(params, ["Dense_2/bias", "Dense_2/kernel"])
    block = curvature.ggn(predict, output_loss, params, batch, wrt="Dense_2")
    block_dense = np.asarray(jax.vmap(lambda e: ravel_pytree(block(ravel_pytree(block.params)[1](e)))[0])(
        jnp.eye(index.size)))
    np.testing.assert_allclose(block_dense, dense_g[np.ix_(index, index)], rtol=1e-10, atol=1e-13)
    matrix = jnp.asarray(dense_g)
    linear = curvature.restrict(lambda v: unravel(matrix @ ravel_pytree(v)[0]), "Dense_2", like=params)
    v = jax.random.normal(jax.random.PRNGKey(4), (index.size,), jnp.float64)
    np.testing.assert_allclose(ravel_pytree(linear(ravel_pytree(linear.params)[1](v)))[0],
                               np.asarray(dense_g)[np.ix_(index, index)] @ np.asarray(v), rtol=1e-10, atol=1e-13)


def test_a_convolutional_layer_block(x64):
    from _curvature_models import tiny_conv_net

    model = tiny_conv_net()
    x = jax.random.normal(jax.random.PRNGKey(5), (6, 4, 4, 1), jnp.float64)
    batch = (x, jnp.arange(6) % 3)
    params = model.init(jax.random.PRNGKey(6), x)["params"]
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy")
    dense = dense_hessian(loss_fn, params, batch)
    index = block_indices(params, ["Conv_0/bias", "Conv_0/kernel"])
    H = curvature.hessian(loss_fn, params, batch)
    spectra = curvature.block_spectra(H, ["Conv_0"], k=1, num_iters=20, num_probes=2, key=jax.random.key(7))
    np.testing.assert_allclose(spectra.blocks[0].top, np.linalg.eigvalsh(dense[np.ix_(index, index)])[-1:],
                               rtol=1e-9)
    # on CPU the iterations run from Python (the convolution rule), else compiled: the same numbers either way
    compiled = curvature.block_spectra(curvature.hessian(loss_fn, params, batch, loops="scan"), ["Conv_0"], k=1,
                                       num_iters=20, num_probes=2, key=jax.random.key(7))
    assert H.loop_mode == ("python" if jax.default_backend() == "cpu" else "scan")
    np.testing.assert_allclose(spectra.blocks[0].trace, compiled.blocks[0].trace, rtol=1e-10)
    np.testing.assert_allclose(spectra.blocks[0].nodes, compiled.blocks[0].nodes, rtol=1e-8, atol=1e-12)


def test_bad_blocks_name_the_layers(x64):
    _, params, loss_fn, batch = setup()
    H = curvature.hessian(loss_fn, params, batch)
    with pytest.raises(ValueError, match=r"wrt: 'Dense_9' matches no parameter; the layers are Dense_0, Dense_1, "
                                         r"Dense_2"):
        curvature.restrict(H, "Dense_9")
    with pytest.raises(ValueError, match="wrt: expected a non-empty path pattern"):
        curvature.restrict(H, [])
    with pytest.raises(ValueError, match="blocks: expected 'layer'"):
        curvature.block_spectra(H, "layers")
    with pytest.raises(ValueError, match="k: block 'Dense_2' has 18 parameters"):
        curvature.block_spectra(H, k=19, num_iters=40)
