"""The Laplace approximation against closed forms (float64): on Bayesian linear regression it is exact (posterior,
marginal likelihood, predictive variance); the tuned prior precision is a grid search's optimum; the diagonal and
last-layer structures equal the dense GGN's diagonal and block; calibration numbers by hand; bad input named."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn import laplace as laplace_lib
from jaxnn import losses
from jaxnn.laplace import calibration, laplace

cross_entropy = losses.batch_mean("softmax_cross_entropy")  # what jaxnn.laplace fits with


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(x)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(5)(x)))


def test_bayesian_linear_regression_is_exact(x64):
    rng = np.random.default_rng(0)
    n, sigma, delta = 40, 0.3, 2.0
    x = rng.normal(size=(n, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.7 + sigma * rng.normal(size=n)
    features = np.concatenate([np.ones((n, 1)), x], axis=1)  # ravel order: bias, then kernel
    precision = features.T @ features / sigma**2 + delta * np.eye(4)
    w_map = np.linalg.solve(precision, features.T @ y / sigma**2)
    params = {"Dense_0": {"bias": jnp.asarray(w_map[:1]), "kernel": jnp.asarray(w_map[1:, None])}}
    model = Linear()
    predict = lambda p, inputs: model.apply({"params": p}, inputs)  # noqa: E731
    data = (jnp.asarray(x), jnp.asarray(y[:, None]))
    exact_evidence = _gaussian_log_density(y, sigma**2 * np.eye(n) + features @ features.T / delta)
    for structure in ("full", "kfac"):  # one Dense layer, outputs of dimension 1: K-FAC is exact here too
        fitted = laplace(predict, params, data, likelihood="regression", structure=structure, prior_precision=delta,
                         sigma_noise=sigma)
        assert fitted.log_det_precision() == pytest.approx(np.linalg.slogdet(precision)[1], rel=1e-10)
        assert fitted.log_marginal_likelihood() == pytest.approx(exact_evidence, rel=1e-10)
        x_test = rng.normal(size=(4, 3))
        mean, variance = fitted.predictive(jnp.asarray(x_test))
        test_features = np.concatenate([np.ones((4, 1)), x_test], axis=1)
        expected = np.einsum("bi,ij,bj->b", test_features, np.linalg.inv(precision), test_features) + sigma**2
        np.testing.assert_allclose(np.asarray(variance)[:, 0], expected, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(mean)[:, 0], test_features @ w_map, rtol=1e-10)
    grid = np.geomspace(1e-3, 1e3, 20001)
    best = grid[np.argmax([fitted.log_marginal_likelihood(d) for d in grid])]
    assert fitted.optimize_prior_precision() == pytest.approx(best, rel=2e-3)


def _gaussian_log_density(y, covariance):
    sign, logdet = np.linalg.slogdet(covariance)
    return float(-0.5 * (y @ np.linalg.solve(covariance, y) + logdet + len(y) * np.log(2 * np.pi)))


def test_diag_and_last_layer_equal_the_dense_ggn(x64):
    from jaxnn import curvature

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (30, 4), jnp.float64)
    y = jax.random.randint(keys[1], (30,), 0, 3)
    model = MLP()
    params = jax.tree.map(lambda v: v.astype(jnp.float64), model.init(keys[2], x)["params"])
    predict = lambda p, inputs: model.apply({"params": p}, inputs)  # noqa: E731
    dense = np.asarray(curvature.dense_matrix(curvature.ggn(predict, cross_entropy, params, (x, y))))
    diag = laplace(predict, params, (x, y), structure="diag", prior_precision=0.5)
    assert diag.log_det_precision() == pytest.approx(np.sum(np.log(30 * np.diag(dense) + 0.5)), rel=1e-10)
    # Flax names the outer call first: Dense_0 is the 5 -> 3 head, called last
    last = laplace(predict, params, (x, y), structure="last_layer", prior_precision=0.5)
    assert last.subset == "Dense_0" and last.num_params == 18
    from jaxnn.curvature.kfac import discover_layers

    head_layer = [layer for layer in discover_layers(predict, params, x)[0] if layer.path == ("Dense_0",)][0]
    head_block = laplace_lib._head_ggn(predict, cross_entropy, params, x, y, head_layer)
    np.testing.assert_allclose(head_block, dense[:18, :18], atol=1e-13)  # the one-pass route (φ̃φ̃ᵀ ⊗ H) was taken
    head = slice(0, 18)  # ravel order: Dense_0 (bias, kernel) first
    assert last.log_det_precision() == pytest.approx(np.linalg.slogdet(30 * dense[head, head] + 0.5 * np.eye(18))[1],
                                                     rel=1e-10)
    full = laplace(predict, params, (x, y), structure="full", prior_precision=0.5)
    probabilities = full.predictive(x[:5])
    assert probabilities.shape == (5, 3) and np.allclose(np.asarray(probabilities).sum(axis=1), 1)
    mc = full.predictive(x[:5], method="mc", samples=4000, key=jax.random.PRNGKey(1))
    np.testing.assert_allclose(mc, probabilities, atol=0.05)  # probit vs Monte Carlo: close, not equal
    kfac = laplace(predict, params, (x, y), structure="kfac", prior_precision=0.5)
    assert len(kfac._precision_eigenvalues(0.5)) == full.num_params


def test_val_nll_tuning_is_the_optimum_of_a_predictive_by_hand(x64):
    """δ tuned on held-out NLL equals the argmin over a fine grid of a probit predictive computed here from the dense
    GGN and per-example Jacobians (numpy), and the predictive at another δ needs no refit."""
    from jax.flatten_util import ravel_pytree

    from jaxnn import curvature

    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    x = jax.random.normal(keys[0], (40, 4), jnp.float64)
    y = jax.random.randint(keys[1], (40,), 0, 3)
    x_val = 2.0 * jax.random.normal(keys[2], (25, 4), jnp.float64)  # shifted: the MAP is overconfident there
    model = MLP()
    params = jax.tree.map(lambda v: 3 * v.astype(jnp.float64), model.init(keys[4], x)["params"])
    predict = lambda p, inputs: model.apply({"params": p}, inputs)  # noqa: E731
    # the MAP's own class for 20 of 25, another for 5: more uncertainty helps up to a point, not without end
    y_val = jnp.argmax(predict(params, x_val), -1).at[:5].add(1) % 3
    ggn = np.asarray(curvature.dense_matrix(curvature.ggn(predict, cross_entropy, params, (x, y))))
    theta, unravel = ravel_pytree(params)
    jacobians = np.asarray(jax.vmap(lambda xi: jax.jacrev(lambda t: predict(unravel(t), xi[None])[0])(theta))(x_val))
    logits = np.asarray(predict(params, x_val))

    def val_nll(delta):
        covariance = np.linalg.inv(40 * ggn + delta * np.eye(theta.size))
        variance = np.einsum("bci,ij,bcj->bc", jacobians, covariance, jacobians)
        scaled = logits / np.sqrt(1 + np.pi / 8 * variance)
        log_p = scaled - np.log(np.sum(np.exp(scaled), axis=1, keepdims=True))
        return -np.mean(log_p[np.arange(25), np.asarray(y_val)])

    fitted = laplace(predict, params, (x, y), structure="full", prior_precision=1.0)
    np.testing.assert_allclose(-np.mean(np.log(np.asarray(fitted.predictive(x_val, prior_precision=7.0))[
        np.arange(25), np.asarray(y_val)])), val_nll(7.0), rtol=1e-10)
    grid = np.geomspace(1e-2, 1e2, 2001)
    by_hand = grid[np.argmin([val_nll(d) for d in grid])]
    assert 2e-2 < by_hand < 50  # an interior optimum, or the test proves nothing
    tuned = fitted.optimize_prior_precision(1e-2, 1e2, method="val_nll", val=(x_val, y_val))
    assert tuned == pytest.approx(by_hand, rel=2e-2) and fitted.prior_precision == tuned
    with pytest.raises(ValueError, match="val="):
        fitted.optimize_prior_precision(method="val_nll")
    with pytest.raises(ValueError, match="method"):
        fitted.optimize_prior_precision(method="grid")


class NormMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.LayerNorm()(nn.Dense(5)(x))))


@pytest.mark.parametrize("model", [MLP(), NormMLP()], ids=["dense", "with_layernorm"])
def test_diag_and_kfac_predictive_covariances_equal_explicit_jacobians(x64, model):
    """The diagonal and K-FAC predictives build J P⁻¹ Jᵀ from each layer's inputs and output gradients (and, for a
    LayerNorm, its per-example Jacobian): equal to jax.jacrev's Jacobians against the dense precision (the exact GGN
    diagonal; the dense K-FAC matrix)."""
    from jax.flatten_util import ravel_pytree

    from jaxnn import curvature

    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    x = jax.random.normal(keys[0], (30, 4), jnp.float64)
    y = jax.random.randint(keys[1], (30,), 0, 3)
    params = jax.tree.map(lambda v: v.astype(jnp.float64), model.init(keys[2], x)["params"])
    predict = lambda p, inputs: model.apply({"params": p}, inputs)  # noqa: E731
    theta, unravel = ravel_pytree(params)
    jacobians = np.asarray(jax.vmap(lambda xi: jax.jacrev(lambda t: predict(unravel(t), xi[None])[0])(theta))(x[:6]))
    ggn = np.asarray(curvature.dense_matrix(curvature.ggn(predict, cross_entropy, params, (x, y))))
    diag = laplace(predict, params, (x, y), structure="diag", prior_precision=0.7)
    assert diag.layers and (diag.fallback == ("LayerNorm_0",)) == isinstance(model, NormMLP)
    kfac = laplace(predict, params, (x, y), structure="kfac", prior_precision=0.7)
    kfac_matrix = np.asarray(curvature.dense_matrix(kfac.curvature.operator()))
    for fitted, precision in ((diag, np.diag(30 * np.diag(ggn) + 0.7)), (kfac, 30 * kfac_matrix + 0.7 * np.eye(
            theta.size))):
        expected = np.einsum("bci,ij,bdj->bcd", jacobians, np.linalg.inv(precision), jacobians)
        np.testing.assert_allclose(fitted.output_covariance(x[:6])[1], expected, rtol=1e-9, atol=1e-13)


class NoBiasMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(6, use_bias=False)(x))
        return nn.Dense(3)(jnp.tanh(nn.Dense(5, name="middle")(h)))


@pytest.mark.parametrize("model", [MLP(), NoBiasMLP(), NormMLP()], ids=["mlp", "no_bias_three_layers", "layernorm"])
def test_the_full_ggn_of_a_dense_network_in_one_pass_equals_ggn_products(x64, model):
    """The full structure's one-pass GGN ((ããᵀ) ⊗ (Σ_c g gᵀ) per pair of layers, summed over examples) against n
    GGN products (curvature.dense_matrix), in ravel order, cross-layer blocks included; a model with a LayerNorm
    takes the product route (None)."""
    from jaxnn import curvature

    keys = jax.random.split(jax.random.PRNGKey(6), 3)
    x = jax.random.normal(keys[0], (25, 4), jnp.float64)
    y = jax.random.randint(keys[1], (25,), 0, 3)
    params = jax.tree.map(lambda v: v.astype(jnp.float64), model.init(keys[2], x)["params"])
    predict = lambda p, inputs: model.apply({"params": p}, inputs)  # noqa: E731
    one_pass = laplace_lib._dense_network_ggn(predict, cross_entropy, params, x, y, budget=200)
    if isinstance(model, NormMLP):
        assert one_pass is None
        return
    products = curvature.dense_matrix(curvature.ggn(predict, cross_entropy, params, (x, y)))
    np.testing.assert_allclose(one_pass, products, atol=1e-14)  # budget=200: several chunks of examples


def test_calibration_by_hand_and_bad_input():
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 1])
    result = calibration(p, labels, bins=2)  # bins [0, .5), [.5, 1]: all four in the upper one
    assert result["accuracy"] == 0.75
    assert result["ece"] == pytest.approx(abs(0.75 - np.mean([0.9, 0.6, 0.7, 0.8])))
    assert result["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.7, 0.8])))
    assert result["confidence"] == pytest.approx(np.mean([0.9, 0.6, 0.7, 0.8]))  # 0.75 accurate: overconfident
    predict = lambda p, x: x @ p["Dense_0"]["kernel"]  # noqa: E731
    params = {"Dense_0": {"kernel": jnp.ones((2, 2))}}
    data = (jnp.ones((4, 2)), jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="prior_precision"):
        laplace(predict, params, data, structure="full", prior_precision=0.0)
    with pytest.raises(ValueError, match="structure"):
        laplace(predict, params, data, structure="block")
    with pytest.raises(ValueError, match="likelihood"):
        laplace(predict, params, data, likelihood="poisson")


def test_marginal_likelihood_and_predictive_equal_laplace_torch(x64):
    """laplace-torch 0.3 (full GGN, classification) on identical float64 weights of a tanh MLP: the log marginal
    likelihood at two prior precisions and the probit GLM predictive equal jaxnn's. Needs torch and laplace-torch
    (../shared/PEERS.md: pip install --no-deps)."""
    torch = pytest.importorskip("torch")
    laplace_torch = pytest.importorskip("laplace")
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (50, 4), jnp.float64)
    y = jax.random.randint(keys[1], (50,), 0, 3)
    model = MLP()
    params = jax.tree.map(lambda v: v.astype(jnp.float64), model.init(keys[2], x)["params"])
    predict = lambda p, inputs: model.apply({"params": p}, inputs)  # noqa: E731
    ours = laplace(predict, params, (x, y), structure="full", prior_precision=0.7)

    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    with torch.no_grad():  # Flax named the outer (5 -> 3) call Dense_0; kernels are (in, out)
        for layer, name in ((net[0], "Dense_1"), (net[2], "Dense_0")):
            layer.weight.copy_(torch.from_numpy(np.asarray(params[name]["kernel"]).T.copy()))
            layer.bias.copy_(torch.from_numpy(np.asarray(params[name]["bias"])))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(y)).long()), batch_size=50)
    theirs = laplace_torch.Laplace(net, "classification", subset_of_weights="all", hessian_structure="full",
                                   prior_precision=0.7)
    theirs.fit(loader)
    for delta in (0.7, 3.0):
        expected = float(theirs.log_marginal_likelihood(prior_precision=torch.tensor([delta], dtype=torch.float64)))
        assert ours.log_marginal_likelihood(delta) == pytest.approx(expected, rel=1e-8)
    theirs.prior_precision = torch.tensor([0.7], dtype=torch.float64)
    expected = theirs(torch.from_numpy(np.asarray(x[:6])), pred_type="glm", link_approx="probit").detach().numpy()
    np.testing.assert_allclose(np.asarray(ours.predictive(x[:6])), expected, rtol=1e-6)  # measured: 2e-8
