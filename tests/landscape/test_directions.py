"""Directions: filter/layer normalisation against per-filter norms computed with numpy, scale invariance,
checkpoint differences, Hessian eigenvectors against numpy.linalg.eigh, and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.landscape import (
    checkpoint_difference_direction,
    direction_description,
    eigenvector_directions,
    filter_normalized_direction,
    layer_normalized_direction,
    normalize_direction,
    plane_surface,
    random_direction,
)


def _net_params(key):
    """Flax-layout parameters: Conv kernel HWIO, Dense kernel (in, out), biases and a norm scale (1-D)."""
    k = jax.random.split(key, 5)
    return {
        "conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4)), "bias": jax.random.normal(k[1], (4,))},
        "norm": {"scale": 1.0 + 0.1 * jax.random.normal(k[2], (4,))},
        "dense": {"kernel": jax.random.normal(k[3], (16, 3)), "bias": jax.random.normal(k[4], (3,))},
    }


def test_random_direction_is_gaussian_deterministic_and_shaped_like_params(x64):
    params = {"w": jnp.zeros((300, 200)), "b": jnp.zeros(7, jnp.float32)}
    d = random_direction(jax.random.key(3), params)
    again = random_direction(jax.random.key(3), params)
    other = random_direction(jax.random.key(4), params)
    assert d["w"].shape == (300, 200) and d["w"].dtype == jnp.float64 and d["b"].dtype == jnp.float32
    np.testing.assert_array_equal(d["w"], again["w"])
    assert not np.allclose(d["w"], other["w"])
    # N(0, 1): 60 000 samples, mean within 5 standard errors, variance within 2 %
    assert abs(float(d["w"].mean())) < 5 / np.sqrt(60_000)
    assert abs(float(d["w"].var()) - 1.0) < 0.02


def test_filter_normalized_direction_has_the_filter_norms_of_theta(x64):
    params = _net_params(jax.random.key(0))
    d = filter_normalized_direction(jax.random.key(1), params)
    # Conv HWIO: filter o is kernel[..., o]; Dense (in, out): filter j is the column kernel[:, j]
    conv_theta, conv_d = np.asarray(params["conv"]["kernel"]), np.asarray(d["conv"]["kernel"])
    for o in range(4):
        np.testing.assert_allclose(np.linalg.norm(conv_d[..., o]), np.linalg.norm(conv_theta[..., o]), rtol=1e-13)
    dense_theta, dense_d = np.asarray(params["dense"]["kernel"]), np.asarray(d["dense"]["kernel"])
    for j in range(3):
        np.testing.assert_allclose(np.linalg.norm(dense_d[:, j]), np.linalg.norm(dense_theta[:, j]), rtol=1e-13)
    # rows of the Dense kernel are NOT the filters: their norms differ from θ's
    row_ratio = np.linalg.norm(dense_d, axis=1) / np.linalg.norm(dense_theta, axis=1)
    assert np.ptp(row_ratio) > 0.1
    # the direction within each filter is the Gaussian draw's (only rescaled)
    raw = random_direction(jax.random.key(1), params)["dense"]["kernel"]
    cosines = np.sum(np.asarray(raw) * dense_d, axis=0) / (np.linalg.norm(raw, axis=0) * np.linalg.norm(dense_d, axis=0))
    np.testing.assert_allclose(cosines, 1.0, rtol=1e-13)
    # biasbn: every 1-D leaf (biases, norm scale) is zero
    for leaf in (d["conv"]["bias"], d["norm"]["scale"], d["dense"]["bias"]):
        np.testing.assert_array_equal(leaf, 0.0)


def test_ignore_none_keeps_one_dimensional_leaves_normalised_as_a_whole(x64):
    params = _net_params(jax.random.key(0))
    d = filter_normalized_direction(jax.random.key(1), params, ignore=None)
    for path in (("conv", "bias"), ("norm", "scale"), ("dense", "bias")):
        leaf, theta = d[path[0]][path[1]], params[path[0]][path[1]]
        np.testing.assert_allclose(np.linalg.norm(leaf), np.linalg.norm(theta), rtol=1e-13)
        assert not np.allclose(leaf / np.linalg.norm(leaf), theta / np.linalg.norm(theta))  # not a copy of θ


def test_filter_axis_zero_for_pytorch_layout(x64):
    weight = jax.random.normal(jax.random.key(0), (5, 3))  # (out, in) as in torch.nn.Linear
    d = normalize_direction(random_direction(jax.random.key(1), {"w": weight}), {"w": weight}, filter_axis=0)["w"]
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), np.linalg.norm(weight, axis=1), rtol=1e-13)


def test_zero_filter_of_theta_gives_zero_filter_of_direction(x64):
    kernel = jnp.ones((4, 3)).at[:, 1].set(0.0)
    d = filter_normalized_direction(jax.random.key(0), {"k": kernel})["k"]
    np.testing.assert_array_equal(d[:, 1], 0.0)
    np.testing.assert_allclose(np.linalg.norm(d[:, 0]), 2.0, rtol=1e-13)


def test_layer_normalized_direction_has_the_layer_norms_of_theta(x64):
    params = _net_params(jax.random.key(0))
    d = layer_normalized_direction(jax.random.key(1), params)
    for layer in ("conv", "dense"):
        np.testing.assert_allclose(np.linalg.norm(d[layer]["kernel"]), np.linalg.norm(params[layer]["kernel"]),
                                   rtol=1e-13)
    dense_ratio = np.linalg.norm(d["dense"]["kernel"], axis=0) / np.linalg.norm(params["dense"]["kernel"], axis=0)
    assert np.ptp(dense_ratio) > 0.05  # per layer, not per filter
    np.testing.assert_array_equal(d["dense"]["bias"], 0.0)


def _relu_net(params, batch):
    x, y = batch
    h = jax.nn.relu(x @ params["l1"]["kernel"] + params["l1"]["bias"])
    out = h @ params["l2"]["kernel"] + params["l2"]["bias"]
    return jnp.mean((out - y) ** 2)


def test_filter_normalized_surface_is_invariant_to_relu_rescaling(x64):
    """θ' = (c·W1, c·b1, W2/c, b2) computes the same function; with the same key, the filter-normalised surfaces of
    θ and θ' coincide (d scales with θ filter by filter), while raw Gaussian directions give different surfaces."""
    k = jax.random.split(jax.random.key(0), 6)
    params = {"l1": {"kernel": jax.random.normal(k[0], (3, 5)), "bias": 0.1 * jax.random.normal(k[1], (5,))},
              "l2": {"kernel": jax.random.normal(k[2], (5, 2)), "bias": 0.1 * jax.random.normal(k[3], (2,))}}
    c = 7.5
    rescaled = {"l1": {"kernel": c * params["l1"]["kernel"], "bias": c * params["l1"]["bias"]},
                "l2": {"kernel": params["l2"]["kernel"] / c, "bias": params["l2"]["bias"]}}
    batch = (jax.random.normal(k[4], (16, 3)), jax.random.normal(k[5], (16, 2)))
    np.testing.assert_allclose(_relu_net(params, batch), _relu_net(rescaled, batch), rtol=1e-12)
    grid = np.linspace(-1, 1, 5)

    def surface(p, make_direction):
        d1, d2 = make_direction(jax.random.key(11), p), make_direction(jax.random.key(12), p)
        return plane_surface(_relu_net, p, d1, d2, grid, grid, batch, progress=False).losses

    np.testing.assert_allclose(surface(rescaled, filter_normalized_direction), surface(params, filter_normalized_direction),
                               rtol=1e-10)
    np.testing.assert_allclose(surface(rescaled, layer_normalized_direction), surface(params, layer_normalized_direction),
                               rtol=1e-10)
    raw_original, raw_rescaled = surface(params, random_direction), surface(rescaled, random_direction)
    assert np.max(np.abs(raw_original - raw_rescaled) / raw_original) > 0.1


def test_checkpoint_difference_direction(x64):
    a = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(2)}
    b = {"w": jnp.arange(6.0).reshape(2, 3) * 2, "b": jnp.zeros(2)}
    d = checkpoint_difference_direction(a, b)
    np.testing.assert_array_equal(d["w"], np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(d["b"], -np.ones(2))
    with pytest.raises(ValueError, match="params_b: expected a checkpoint different from params_a"):
        checkpoint_difference_direction(a, a)
    with pytest.raises(ValueError,
                       match=r"params_b: leaf \['w'\] expected shape \(2, 3\) \(that of params_a\), got \(3, 2\)"):
        checkpoint_difference_direction(a, {"w": jnp.ones((3, 2)), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match="params_b: expected a pytree with the structure of params_a"):
        checkpoint_difference_direction(a, {"w": jnp.ones((2, 3))})


def test_eigenvector_directions_match_numpy_eigh_of_the_dense_hessian(x64):
    """Small MLP: the dense Hessian from jax.hessian on the flattened parameters, eigh's top-2 eigenvectors."""
    k = jax.random.split(jax.random.key(0), 4)
    params = {"w1": 0.8 * jax.random.normal(k[0], (3, 4)), "w2": 0.8 * jax.random.normal(k[1], (4, 2))}
    batch = (jax.random.normal(k[2], (10, 3)), jax.random.normal(k[3], (10, 2)))

    def loss(p, b):
        return jnp.mean((jnp.tanh(b[0] @ p["w1"]) @ p["w2"] - b[1]) ** 2)

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    dense = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f), batch)))(flat))
    values, vectors = np.linalg.eigh(dense)
    directions, eigenvalues = eigenvector_directions(loss, params, batch, k=2, key=jax.random.key(5), progress=False,
                                                     tol=1e-6)
    np.testing.assert_allclose(eigenvalues, values[::-1][:2], rtol=1e-8)
    for i, d in enumerate(directions):
        v = np.asarray(jax.flatten_util.ravel_pytree(d)[0])
        np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-10)
        np.testing.assert_allclose(abs(v @ vectors[:, -1 - i]), 1.0, rtol=1e-7)
    # the second difference of the loss along each is its eigenvalue (h small: quadratic + O(h²))
    h = 1e-3
    plane = plane_surface(loss, params, *directions, [-h, 0.0, h], [-h, 0.0, h], batch, progress=False).losses
    np.testing.assert_allclose((plane[0, 1] - 2 * plane[1, 1] + plane[2, 1]) / h**2, values[-1], rtol=1e-4)
    np.testing.assert_allclose((plane[1, 0] - 2 * plane[1, 1] + plane[1, 2]) / h**2, values[-2], rtol=1e-4)


def test_direction_description_is_json_and_names_the_seed():
    description = direction_description("filter_normalized", key=jax.random.key(7), ignore="biasbn",
                                        scale=np.float32(2.0))
    assert json.loads(json.dumps(description)) == description
    assert description["kind"] == "filter_normalized"
    assert description["seed"] == [0, 7]
    assert description["options"] == {"ignore": "biasbn", "scale": 2.0}
    assert direction_description("checkpoint")["seed"] is None


def test_bad_input_errors_name_the_argument():
    params = _net_params(jax.random.key(0))
    with pytest.raises(ValueError, match="ignore: expected one of"):
        filter_normalized_direction(jax.random.key(0), params, ignore="bias")
    with pytest.raises(ValueError, match="norm: expected one of"):
        normalize_direction(params, params, norm="weight")
    with pytest.raises(ValueError, match="direction: expected a pytree with the structure of params"):
        normalize_direction({"conv": params["conv"]}, params)
    with pytest.raises(ValueError, match="filter_axis: expected an axis of leaf"):
        filter_normalized_direction(jax.random.key(0), params, filter_axis=4)
    with pytest.raises(ValueError, match="direction: leaf .* expected finite values"):
        normalize_direction(jax.tree.map(lambda v: v * jnp.nan, params), params)
    with pytest.raises(ValueError, match="key: expected a PRNG key"):
        random_direction(None, params)
    with pytest.raises(ValueError, match="key: expected a PRNG key"):
        random_direction(jnp.zeros(3, jnp.uint32), params)
    with pytest.raises(TypeError, match=r"params: leaf \['i'\] expected a floating-point dtype"):
        random_direction(jax.random.key(0), {"i": jnp.arange(3)})
    with pytest.raises(ValueError, match="params: expected a pytree with at least one"):
        random_direction(jax.random.key(0), {})
    with pytest.raises(ValueError, match="k: expected an integer >= 1"):
        eigenvector_directions(lambda p, b: jnp.sum(p["w"] ** 2), {"w": jnp.ones(3)}, None, k=0, key=0)
