"""K-FAC / EKFAC against dense curvature (float64): one example through one Dense layer is the exact GGN block, EKFAC's
Frobenius error never exceeds K-FAC's, damped inverses equal dense solves, a convolution's patches give autodiff's
per-example gradients, layers it cannot factor get the exact diagonal, and the factors equal curvlinops' on identical
weights (when curvlinops is installed)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxnn import curvature, losses
from jaxnn.curvature.kfac import _batch_statistics, _statistics, _unrolled, discover_layers


def cross_entropy(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


class OneDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(x)


class NormOnly(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm()(x)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(6)(x)))


class ConvNet(nn.Module):
    strides: int = 1
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(3, (3, 3), strides=self.strides, padding=self.padding)(x))
        return nn.Dense(4)(h.reshape(h.shape[0], -1))


class NormNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=True)(nn.Dense(5)(x))
        return nn.Dense(3)(jnp.tanh(h))


def setup(model, input_shape, count, classes, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(keys[0], (count, *input_shape), jnp.float64)
    y = jax.random.randint(keys[1], (count,), 0, classes)
    variables = jax.tree.map(lambda v: v.astype(jnp.float64), model.init(keys[2], x))
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    predict = lambda p, inputs: model.apply({"params": p, **state}, inputs)  # noqa: E731
    return params, predict, (x, y)


def dense(op):
    return np.asarray(curvature.dense_matrix(op))


def exact_ggn(predict, params, batch):
    return dense(curvature.ggn(predict, cross_entropy, params, batch))


def check_output_gram(operator, matrix, predict, params, x, damping=0.01):
    """K-FAC's output Gram J_b (K + δI)⁻¹ J_bᵀ (the Laplace predictive's covariance) against the dense K-FAC matrix
    and jax.jacrev's per-example Jacobians."""
    flat, unravel = ravel_pytree(params)
    jacobians = jax.vmap(lambda xi: jax.jacrev(lambda t: predict(unravel(t), xi[None])[0].reshape(-1))(flat))(x)
    expected = np.einsum("bci,ij,bdj->bcd", jacobians, np.linalg.inv(matrix + damping * np.eye(flat.size)), jacobians)
    np.testing.assert_allclose(operator.output_gram(predict, x, damping), expected, rtol=1e-8, atol=1e-12)


def test_one_example_through_one_dense_layer_is_the_exact_ggn(x64):
    params, predict, batch = setup(OneDense(), (5,), 1, 4)
    factored = curvature.kfac(predict, cross_entropy, params, batch)
    np.testing.assert_allclose(dense(factored.operator()), exact_ggn(predict, params, batch), atol=1e-12)
    assert factored.fallback == () and factored.report()["factored"] == {"Dense_0": {"type": "dense", "A": 6, "G": 4}}


def test_one_example_through_a_convolution_covering_its_input_is_the_exact_ggn(x64):
    """A 3x3 VALID convolution of a 3x3 image has one position (T = 1): K-FAC is exact there too (with the Dense
    head's block and the zero cross-layer blocks as the only approximation: compare the conv block alone)."""
    params, predict, batch = setup(ConvNet(padding="VALID"), (3, 3, 2), 1, 4)
    factored = curvature.kfac(predict, cross_entropy, params, batch)
    conv_size = ravel_pytree(params["Conv_0"])[0].size
    order = ravel_pytree(params)[0]
    exact = exact_ggn(predict, params, batch)
    kfac_dense = dense(factored.operator())
    # ravel order: Conv_0 (bias, kernel) first, then Dense_0
    assert order.size == conv_size + ravel_pytree(params["Dense_0"])[0].size
    np.testing.assert_allclose(kfac_dense[:conv_size, :conv_size], exact[:conv_size, :conv_size], atol=1e-12)
    np.testing.assert_allclose(kfac_dense[conv_size:, conv_size:], exact[conv_size:, conv_size:], atol=1e-12)
    strided = setup(ConvNet(strides=2), (6, 5, 2), 5, 4)  # a convolution over many positions (T > 1)
    operator = curvature.kfac(strided[1], cross_entropy, strided[0], strided[2])
    check_output_gram(operator, dense(operator.operator()), strided[1], strided[0], strided[2][0][:3])


@pytest.mark.parametrize("name", ["softmax_cross_entropy", "mse"])
def test_closed_form_hessian_roots_give_the_same_factors_as_eigendecompositions(x64, name):
    """jaxnn.losses.batch_mean carries each example's output-Hessian root in closed form; the same loss written as a
    plain function goes through jax.hessian + eigh: the factors agree (float64)."""
    params, predict, (x, y) = setup(MLP(), (5,), 12, 3)
    if name == "mse":
        y = jax.random.normal(jax.random.PRNGKey(3), (12, 3), jnp.float64)
    plain = lambda f, t: jnp.mean(losses.get_loss(name)(f, t))  # noqa: E731
    closed = curvature.kfac(predict, losses.batch_mean(name), params, (x, y))
    general = curvature.kfac(predict, plain, params, (x, y))
    for layer in ("Dense_0", "Dense_1"):
        for mine, theirs in zip(closed.factors[layer], general.factors[layer]):
            np.testing.assert_allclose(mine, theirs, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("strides, padding", [(1, "SAME"), (2, "SAME")])  # VALID: the exact-GGN test above
def test_conv_patches_give_autodiffs_per_example_gradients(x64, strides, padding):
    """Σ_t a_t g_tᵀ from the patches and the output gradients (empirical kind: one column) is each example's
    gradient of its loss in the conv kernel and bias (jax.grad on a batch of one)."""
    params, predict, (x, y) = setup(ConvNet(strides=strides, padding=padding), (6, 5, 2), 3, 4)
    layers, skipped, shapes = discover_layers(predict, params, x)
    assert [layer.kind for layer in layers] == ["conv", "dense"] and skipped == ()
    _, _, per_example, _ = _batch_statistics(predict, cross_entropy, params, (x, y), layers, tuple(shapes.items()),
                                             "empirical", None, ())
    a, g = per_example["Conv_0"]
    joint = jnp.einsum("bti,cbto->bio", a, g)
    for n in range(3):
        grads = jax.grad(lambda p: cross_entropy(predict(p, x[n:n + 1]), y[n:n + 1]))(params)["Conv_0"]
        expected = jnp.concatenate([grads["kernel"].reshape(-1, 3), grads["bias"][None]], axis=0)
        np.testing.assert_allclose(joint[n], expected, rtol=1e-10, atol=1e-12)


def test_ekfac_never_worse_than_kfac_and_inverse_products_equal_dense_solves(x64):
    """A tanh MLP (5-6-3, 57 parameters) on 40 examples: the relative Frobenius error of K-FAC and EKFAC vs the
    dense GGN, per block and whole (EKFAC ≤ K-FAC; measured whole: 0.675 vs 0.699); (K + δI)⁻¹v, the eigenvalues
    per block and the trace against the dense K-FAC matrix."""
    params, predict, batch = setup(MLP(), (5,), 40, 3)
    exact = exact_ggn(predict, params, batch)
    kfac_op = curvature.kfac(predict, cross_entropy, params, batch)
    ekfac_op = curvature.kfac(predict, cross_entropy, params, batch, ekfac=True)
    kfac_dense, ekfac_dense = dense(kfac_op.operator()), dense(ekfac_op.operator())
    error = lambda m: np.linalg.norm(m - exact) / np.linalg.norm(exact)  # noqa: E731
    assert error(ekfac_dense) <= error(kfac_dense) + 1e-12 and error(kfac_dense) < 1
    sizes = [ravel_pytree(params[name])[0].size for name in sorted(params)]
    start = 0
    for size in sizes:
        block = slice(start, start + size)
        block_error = lambda m: np.linalg.norm(m[block, block] - exact[block, block])  # noqa: E731
        assert block_error(ekfac_dense) <= block_error(kfac_dense) + 1e-12
        start += size
    for operator, matrix in ((kfac_op, kfac_dense), (ekfac_op, ekfac_dense)):
        v = jax.random.normal(jax.random.PRNGKey(3), (matrix.shape[0],), jnp.float64)
        unravel = ravel_pytree(params)[1]
        solved = ravel_pytree(operator.inverse_matvec(unravel(v), 0.01))[0]
        np.testing.assert_allclose(solved, np.linalg.solve(matrix + 0.01 * np.eye(matrix.shape[0]), v), rtol=1e-8)
        check_output_gram(operator, matrix, predict, params, batch[0][:4])
        assert operator.trace() == pytest.approx(np.trace(matrix), rel=1e-10)
        values = np.sort(np.concatenate(list(operator.eigenvalues().values())))
        np.testing.assert_allclose(values, np.linalg.eigvalsh(matrix), atol=1e-10)
    top = curvature.top_eigenvalues(kfac_op.operator(), k=1, progress=False)[0][0]  # an operator for every estimator
    assert float(top) == pytest.approx(np.linalg.eigvalsh(kfac_dense)[-1], rel=1e-6)


def test_a_population_of_kfac_operators_vmaps(x64):
    """K-FAC is a pytree: the operators of three members (different weights) stack into one, and one vmapped, jitted
    damped inverse product with a per-member (traced) damping equals each member's dense solve."""
    members = [setup(MLP(), (5,), 30, 3, seed=seed) for seed in range(3)]
    predict, batch = members[0][1], members[0][2]
    operators = [curvature.kfac(predict, cross_entropy, params, batch) for params, _, _ in members]
    population = jax.tree.map(lambda *leaves: jnp.stack(leaves), *operators)
    unravel = ravel_pytree(members[0][0])[1]
    size = ravel_pytree(members[0][0])[0].size
    v = jax.random.normal(jax.random.PRNGKey(4), (3, size), jnp.float64)
    damping = jnp.asarray([0.01, 0.1, 1.0])
    solve = jax.jit(jax.vmap(lambda op, w, d: ravel_pytree(op.inverse_matvec(unravel(w), d))[0]))
    solved = solve(population, v, damping)
    for i, operator in enumerate(operators):
        matrix = dense(operator.operator())
        np.testing.assert_allclose(solved[i], np.linalg.solve(matrix + float(damping[i]) * np.eye(size), v[i]),
                                   rtol=1e-8)


def test_layers_it_cannot_factor_get_the_exact_diagonal(x64):
    params, predict, batch = setup(NormNet(), (4,), 30, 3)
    factored = curvature.kfac(predict, cross_entropy, params, batch)
    assert factored.fallback == ("BatchNorm_0",) and factored.report()["fallback_diagonal"] == ["BatchNorm_0"]
    exact = exact_ggn(predict, params, batch)
    flat_diagonal = ravel_pytree(factored.diagonal)[0]
    mask = ravel_pytree(jax.tree.map(jnp.zeros_like, params) | {
        "BatchNorm_0": jax.tree.map(jnp.ones_like, params["BatchNorm_0"])})[0] > 0
    np.testing.assert_allclose(flat_diagonal[mask], np.diag(exact)[mask], rtol=1e-10)
    assert not np.any(np.asarray(flat_diagonal[~mask]))
    check_output_gram(factored, dense(factored.operator()), predict, params, batch[0][:3])  # + fallback diagonal


class ConvNormNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=True)(nn.Conv(3, (3, 3))(x))
        return nn.Dense(4)(jnp.tanh(h).reshape(h.shape[0], -1))


def test_unrolled_statistics_equal_the_looped_ones(x64):
    """A convolutional model on CPU gets its statistics' loops written out (the columns' backward passes, the
    fallback diagonal's per-example passes: XLA:CPU runs backward convolutions slower inside loops); the sums are
    the looped program's, and the diagonal is still the exact GGN's."""
    params, predict, batch = setup(ConvNormNet(), (5, 4, 2), 7, 4)
    layers, _, shapes = discover_layers(predict, params, batch[0])
    assert _unrolled(layers) == (jax.default_backend() == "cpu")
    shapes = tuple((name, shapes[name]) for name in ("Conv_0", "Dense_0"))
    looped, unrolled = (_statistics(predict, cross_entropy, params, batch, layers, shapes, "ggn", None,
                                    ("BatchNorm_0",), False, flag) for flag in (False, True))
    for one, two in zip(looped[:2], unrolled[:2]):
        for name in ("Conv_0", "Dense_0"):
            np.testing.assert_allclose(two[name], one[name], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ravel_pytree(unrolled[3])[0], ravel_pytree(looped[3])[0], rtol=1e-12, atol=1e-14)
    factored = curvature.kfac(predict, cross_entropy, params, batch)
    assert factored.fallback == ("BatchNorm_0",)
    mask = ravel_pytree(jax.tree.map(jnp.zeros_like, params) | {
        "BatchNorm_0": jax.tree.map(jnp.ones_like, params["BatchNorm_0"])})[0] > 0
    exact = np.diag(exact_ggn(predict, params, batch))
    np.testing.assert_allclose(ravel_pytree(factored.diagonal)[0][mask], exact[mask], rtol=1e-10)


def test_fisher_kinds_and_bad_input(x64):
    params, predict, batch = setup(MLP(), (5,), 20, 3)
    one = (batch[0][:1], batch[1][:1])  # one example: each block of the empirical Fisher is exactly A ⊗ G
    empirical = curvature.kfac(predict, cross_entropy, params, one, kind="empirical")
    exact = dense(curvature.fisher(predict, cross_entropy, params, one, kind="empirical"))
    approximate, start = dense(empirical.operator()), 0
    for name in sorted(params):
        block = slice(start, start + ravel_pytree(params[name])[0].size)
        np.testing.assert_allclose(approximate[block, block], exact[block, block], atol=1e-12)
        start = block.stop
    sampled = curvature.kfac(predict, cross_entropy, params, batch, kind="fisher", key=jax.random.PRNGKey(0))
    assert sampled.kind == "fisher"
    with pytest.raises(ValueError, match="key"):
        curvature.kfac(predict, cross_entropy, params, batch, kind="fisher")
    with pytest.raises(ValueError, match="kind"):
        curvature.kfac(predict, cross_entropy, params, batch, kind="hessian")
    norm_only = NormOnly()
    variables = norm_only.init(jax.random.PRNGKey(0), batch[0])
    with pytest.raises(ValueError, match="no Dense or 2-D Conv layer.*LayerNorm"):
        curvature.kfac(lambda p, x: norm_only.apply({"params": p}, x), lambda o, y: jnp.mean(o**2),
                       variables["params"], batch)


class PooledConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(3, (3, 3), padding="SAME")(x)).mean(axis=(1, 2))
        return nn.Dense(4)(h)


def test_factors_equal_curvlinops_on_identical_weights(x64):
    """curvlinops' KFACLinearOperator (type-2, K-FAC expand, weight and bias joined) on the same float64 weights: an
    MLP and a convolution (torch's patch features are ordered (c_in, kh, kw), the Flax kernel's (kh, kw, c_in): A is
    compared after that permutation). Needs torch and curvlinops (../shared/PEERS.md: pip install --no-deps)."""
    torch = pytest.importorskip("torch")
    curvlinops = pytest.importorskip("curvlinops")

    def torch_factors(model, x, y):
        model = model.double()
        operator = curvlinops.KFACLinearOperator(
            model, torch.nn.CrossEntropyLoss(), [p for p in model.parameters()], [(x, y)], fisher_type="type-2",
            separate_weight_and_bias=False, check_deterministic=False)
        operator.compute_kronecker_factors()
        return operator._input_covariances, operator._gradient_covariances

    def copy(layer, leaf, conv=False):
        kernel = np.asarray(leaf["kernel"])
        weight = kernel.transpose(3, 2, 0, 1) if conv else kernel.T  # (out, in, kh, kw) / (out, in)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weight.copy()))
            layer.bias.copy_(torch.from_numpy(np.asarray(leaf["bias"])))

    params, predict, (x, y) = setup(MLP(), (5,), 30, 3)
    ours = curvature.kfac(predict, cross_entropy, params, (x, y))
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    copy(model[0], params["Dense_1"]), copy(model[2], params["Dense_0"])  # Flax named the outer call first
    a, g = torch_factors(model, torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(y)).long())
    for torch_name, name in (("0", "Dense_1"), ("2", "Dense_0")):
        np.testing.assert_allclose(ours.factors[name][0], a[torch_name].numpy(), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(ours.factors[name][1], g[torch_name].numpy(), rtol=1e-6, atol=1e-12)

    params, predict, (x, y) = setup(PooledConvNet(), (5, 4, 2), 6, 4)
    ours = curvature.kfac(predict, cross_entropy, params, (x, y))

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Linear(3, 4)

        def forward(self, inputs):
            return self.head(torch.tanh(self.conv(inputs)).mean(dim=(2, 3)))

    model = Pooled().double()
    copy(model.conv, params["Conv_0"], conv=True), copy(model.head, params["Dense_0"])
    a, g = torch_factors(model, torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
                         torch.from_numpy(np.asarray(y)).long())
    order = np.arange(18).reshape(2, 3, 3).transpose(1, 2, 0).ravel()  # ours (kh, kw, c_in) -> torch (c_in, kh, kw)
    order = np.concatenate([order, [18]])  # the bias row stays last
    np.testing.assert_allclose(ours.factors["Conv_0"][0], a["conv"].numpy()[np.ix_(order, order)], rtol=1e-6,
                               atol=1e-12)
    np.testing.assert_allclose(ours.factors["Conv_0"][1], g["conv"].numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(ours.factors["Dense_0"][0], a["head"].numpy(), rtol=1e-6, atol=1e-12)


def test_preconditioner_steps_equal_the_kfac_operator_and_train(x64, tmp_path):
    """optax transformation: the first update is (K + δI)⁻¹g with K = curvature.kfac on that batch (empirical kind,
    deterministic); the second uses the running average decay·A₁ + (1 − decay)·A₂ (and G alike) of the two batches'
    factors; a config run with optimizer.name kfac trains (the loss falls) and refuses several devices."""
    import optax

    from jaxnn.cli import main
    from jaxnn.curvature.kfac import kfac_preconditioner

    params, predict, (x, y) = setup(MLP(), (5,), 60, 3)
    first, second = (x[:30], y[:30]), (x[30:], y[30:])
    tx = kfac_preconditioner(damping=0.01, decay=0.5, inverse_every=1, kind="empirical")
    state = tx.init(params)
    extra = dict(predict_fn=predict, output_loss=cross_entropy)
    grads = jax.grad(lambda p: cross_entropy(predict(p, first[0]), first[1]))(params)
    step, state = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b, **extra))(grads, state, params, first)
    expected = curvature.kfac(predict, cross_entropy, params, first, kind="empirical").inverse_matvec(grads, 0.01)
    np.testing.assert_allclose(ravel_pytree(step)[0], ravel_pytree(expected)[0], rtol=1e-9)
    step, state = tx.update(grads, state, params, batch=second, **extra)
    one = curvature.kfac(predict, cross_entropy, params, first, kind="empirical")
    two = curvature.kfac(predict, cross_entropy, params, second, kind="empirical")
    for name in one.names:
        one.factors[name] = tuple(0.5 * a + 0.5 * b for a, b in zip(one.factors[name], two.factors[name]))
        s_a, u_a = jnp.linalg.eigh(one.factors[name][0])
        s_g, u_g = jnp.linalg.eigh(one.factors[name][1])
        one.eigen[name] = (jnp.clip(s_a, 0.0), u_a, jnp.clip(s_g, 0.0), u_g)
    np.testing.assert_allclose(ravel_pytree(step)[0], ravel_pytree(one.inverse_matvec(grads, 0.01))[0], rtol=1e-9)
    with pytest.raises(ValueError, match="batch="):
        tx.update(grads, state, params)
    assert isinstance(optax.chain(tx, optax.sgd(0.1)), optax.GradientTransformationExtraArgs)

    run = tmp_path / "kfac_run"
    assert main(["train", "digits_mlp", "--run-dir", str(run), "--set", "train.steps=40", "--set", "train.progress=false",
                 "--set", "optimizer.name=kfac", "--set", "optimizer.lr=0.3", "--set", "optimizer.kfac_damping=1.0",
                 "--set", "model.kwargs={width: 16, depth: 1}"]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < 0.5 * losses[0]
