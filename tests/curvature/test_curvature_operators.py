"""Operators: Hessian / GGN / Fisher products against dense oracles, multi-batch accumulation, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxnn.curvature as curvature
from jaxnn.curvature import operators
from _curvature_models import (
    classification_data,
    dense_hessian_of,
    cnn_loss,
    cnn_params,
    cross_entropy,
    flat,
    image_data,
    matrix_with_spectrum,
    mlp_loss,
    mlp_params,
    mlp_predict,
    quadratic,
    random_like,
)


def _dense_hessian_times(loss_fn, params, batch, v):
    """Oracle: jax.hessian of the loss on the flattened parameters, times v (numpy)."""
    return dense_hessian_of(loss_fn, params, batch) @ flat(v)


@pytest.mark.parametrize("mode", curvature.operators.HESSIAN_MODES)
def test_quadratic_hvp_is_exactly_av(x64, mode):
    matrix = matrix_with_spectrum([-3.0, -1.0, 0.0, 1e-6, 2.0, 2.0, 5.0, 1e6], seed=1)
    op = curvature.hessian(quadratic(matrix), jnp.zeros(8), None, mode=mode)
    v = np.random.default_rng(0).normal(size=8)
    np.testing.assert_allclose(np.asarray(op(jnp.asarray(v))), matrix @ v, rtol=1e-13, atol=1e-9)
    assert op.num_params == 8 and op.kind == "hessian"


@pytest.mark.parametrize(
    "loss_fn, make_params, make_data",
    [(mlp_loss, mlp_params, classification_data), (cnn_loss, cnn_params, image_data)],
    ids=["mlp", "cnn"],
)
def test_hvp_matches_jax_hessian(x64, loss_fn, make_params, make_data):
    params = make_params(0)
    batch = make_data(1)
    assert curvature.hessian(loss_fn, params, batch).num_params < 3000
    v = random_like(2, params)
    expected = _dense_hessian_times(loss_fn, params, batch, v)
    for mode in curvature.operators.HESSIAN_MODES:
        product = curvature.hessian(loss_fn, params, batch, mode=mode).matvec(v)
        assert jax.tree.structure(product) == jax.tree.structure(params)
        np.testing.assert_allclose(flat(product), expected, rtol=0, atol=1e-10 * max(1.0, np.abs(expected).max()))


def test_finite_difference_hvp_agrees(x64):
    params = mlp_params(0)
    batch = classification_data(1)
    v = random_like(2, params)
    exact = flat(curvature.hessian(mlp_loss, params, batch)(v))
    approx = flat(curvature.finite_difference_hvp(mlp_loss, params, batch, v))
    np.testing.assert_allclose(approx, exact, rtol=0, atol=1e-7 * np.abs(exact).max())
    coarse = flat(curvature.finite_difference_hvp(mlp_loss, params, batch, v, h=1e-2))
    # O(h²) truncation error: visible at h = 1e-2, and far below it at the default h.
    assert np.abs(coarse - exact).max() > 10 * np.abs(approx - exact).max()


def test_dense_matrix_of_operator_equals_dense_hessian(x64):
    params = cnn_params(3)
    batch = image_data(4)
    dense = np.asarray(curvature.dense_matrix(curvature.hessian(cnn_loss, params, batch)))
    np.testing.assert_allclose(dense, dense_hessian_of(cnn_loss, params, batch), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(curvature.dense_hessian(cnn_loss, params, batch)), dense, atol=1e-12)


def test_matmat_is_vmapped_matvec(x64):
    params = mlp_params(0)
    op = curvature.hessian(mlp_loss, params, classification_data(1))
    vectors = jax.tree.map(lambda *leaves: np.stack(leaves), *[random_like(seed, params) for seed in range(5)])
    block = op.matmat(vectors)
    chunked = op.matmat(vectors, chunk_size=2)
    for i in range(5):
        single = flat(op(jax.tree.map(lambda leaf: leaf[i], vectors)))
        np.testing.assert_allclose(flat(jax.tree.map(lambda leaf: leaf[i], block)), single, atol=1e-14)
        np.testing.assert_allclose(flat(jax.tree.map(lambda leaf: leaf[i], chunked)), single, atol=1e-14)


def test_many_batches_equal_full_data(x64):
    params = mlp_params(0)
    x, y = classification_data(1, num_examples=40)
    v = random_like(2, params)
    full = curvature.hessian(mlp_loss, params, (x, y))
    expected = flat(full(v))
    expected_loss, expected_grad = jax.value_and_grad(mlp_loss)(params, (x, y))

    equal_batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]
    uneven_batches = [(x[:12], y[:12]), (x[12:24], y[12:24]), (x[24:36], y[24:36]), (x[36:], y[36:])]
    stacked = (x.reshape(4, 10, -1), y.reshape(4, 10))
    generator = ((x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10))
    candidates = {
        "list": curvature.hessian(mlp_loss, params, equal_batches),
        "uneven list": curvature.hessian(mlp_loss, params, uneven_batches),
        "stacked": curvature.hessian(mlp_loss, params, stacked, stacked=True),
        "generator": curvature.hessian(mlp_loss, params, generator),
    }
    assert len(candidates["uneven list"].data) == 2  # 12-example batches stacked, the 4-example batch alone
    for name, op in candidates.items():
        assert op.num_examples == 40, name
        np.testing.assert_allclose(flat(op(v)), expected, rtol=0, atol=1e-13, err_msg=name)
        loss, grad = op.loss_and_gradient()
        np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-13, err_msg=name)
        np.testing.assert_allclose(flat(grad), flat(expected_grad), atol=1e-14, err_msg=name)


def test_operator_compiles_once_for_partial_with_new_arrays(x64):
    first = curvature.hessian(quadratic(np.eye(5)), jnp.zeros(5), None)
    first(jnp.ones(5))
    before = operators._apply_jit._cache_size()
    second = curvature.hessian(quadratic(2 * np.eye(5)), jnp.ones(5), None)
    np.testing.assert_allclose(np.asarray(second(jnp.ones(5))), 2 * np.ones(5))
    assert operators._apply_jit._cache_size() == before  # new arrays in the Partial: no recompilation


def test_batch_norm_eval_and_train_mode_loss_fns(x64):
    """BN state is the loss_fn's business: each mode's operator is the Hessian of that mode's loss."""
    running_mean, running_var = jnp.array([0.3, -0.2]), jnp.array([1.5, 0.7])

    def bn_loss(params, batch, mode):
        x, y = batch
        h = x @ params["w"]
        if mode == "train":  # batch statistics: per feature over the batch axis
            mean, var = h.mean(axis=0), h.var(axis=0)
        else:
            mean, var = running_mean, running_var
        h = params["scale"] * (h - mean) / jnp.sqrt(var + 1e-5)
        return jnp.mean((jnp.tanh(h).sum(axis=1) - y) ** 2)

    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 2)), "scale": np.array([1.0, 0.5])}
    x = rng.normal(size=(16, 3))
    batch = (x, np.sin(x[:, 0]))
    v = random_like(2, params)
    products = {}
    for mode in ("eval", "train"):
        loss_fn = lambda p, b, mode=mode: bn_loss(p, b, mode)
        products[mode] = flat(curvature.hessian(loss_fn, params, batch)(v))
        np.testing.assert_allclose(products[mode], _dense_hessian_times(loss_fn, params, batch, v), atol=1e-12)
    assert np.abs(products["eval"] - products["train"]).max() > 1e-3


def test_ggn_equals_hessian_for_mse_on_linear_model(x64):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 2))
    params = {"w": rng.normal(size=(4, 2)), "b": np.zeros(2)}
    predict = lambda p, inputs: inputs @ p["w"] + p["b"]
    mse = lambda outputs, targets: 0.5 * jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))
    gauss_newton = np.asarray(curvature.dense_matrix(curvature.ggn(predict, mse, params, (x, y))))
    hess = np.asarray(curvature.dense_matrix(curvature.hessian(lambda p, b: mse(predict(p, b[0]), b[1]), params, (x, y))))
    # Closed form: for θ = (vec W, b) the Hessian of ½ mean ||Wᵀx + b − y||² is E[[x;1][x;1]ᵀ] ⊗ I_2.
    features = np.concatenate([np.asarray(x), np.ones((20, 1))], axis=1)
    second_moment = features.T @ features / 20
    closed = np.zeros((10, 10))
    for out in range(2):  # ravel order: b (2), then w (4×2 row-major) -> index 2 + 2*i + out
        index = [2 + 2 * i + out for i in range(4)] + [out]
        closed[np.ix_(index, index)] = second_moment
    np.testing.assert_allclose(gauss_newton, closed, atol=1e-13)
    np.testing.assert_allclose(hess, closed, atol=1e-13)


def test_ggn_equals_dense_jacobian_product(x64):
    params = mlp_params(0)
    x, y = classification_data(1, num_examples=10)
    flat_params, unravel = ravel_pytree(jax.tree.map(jnp.asarray, params))
    jacobian = np.asarray(jax.jit(jax.jacobian(lambda f: mlp_predict(unravel(f), x).reshape(-1)))(flat_params))
    logits = mlp_predict(params, x)
    output_hessian = np.asarray(jax.jit(jax.hessian(lambda o: cross_entropy(o.reshape(logits.shape), y)))(logits.reshape(-1)))
    expected = jacobian.T @ output_hessian @ jacobian
    op = curvature.ggn(mlp_predict, cross_entropy, params, (x, y))
    np.testing.assert_allclose(np.asarray(curvature.dense_matrix(op)), expected, atol=1e-13)
    assert np.linalg.eigvalsh(expected).min() > -1e-12  # GGN of a convex loss is PSD (unlike the Hessian)


@jax.jit
def _per_example_gradient_matrix(params, x, y):
    flat_params, unravel = ravel_pytree(params)
    one = lambda xi, yi: jax.grad(lambda f: cross_entropy(mlp_predict(unravel(f), xi[None]), yi[None]))(flat_params)
    return jax.vmap(one)(x, y)


def _per_example_gradients(params, x, y):
    """Oracle rows g_i = ∇ℓ(f(θ, x_i), y_i), each from a batch of one example."""
    return np.asarray(_per_example_gradient_matrix(jax.tree.map(jnp.asarray, params), x, y))


def test_empirical_fisher_equals_mean_outer_product(x64):
    params = mlp_params(0)
    x, y = classification_data(1, num_examples=12)
    grads = _per_example_gradients(params, x, y)
    expected = grads.T @ grads / 12
    op = curvature.fisher(mlp_predict, cross_entropy, params, [(x[:6], y[:6]), (x[6:], y[6:])])
    np.testing.assert_allclose(np.asarray(curvature.dense_matrix(op)), expected, atol=1e-14)


def test_true_fisher_samples_model_labels(x64):
    params = mlp_params(0)
    x, y = classification_data(1, num_examples=6)
    flat_params, unravel = ravel_pytree(params)
    probabilities = np.asarray(jax.nn.softmax(mlp_predict(params, x)))
    # Oracle: E_{ŷ~p(·|x)} g gᵀ by enumerating the classes; for softmax cross-entropy it equals the GGN.
    exact = np.zeros((flat_params.size, flat_params.size))
    for label in range(3):
        grads = _per_example_gradients(params, x, np.full_like(y, label))
        exact += (grads * probabilities[:, label : label + 1]).T @ grads / 6
    ggn_dense = np.asarray(curvature.dense_matrix(curvature.ggn(mlp_predict, cross_entropy, params, (x, y))))
    np.testing.assert_allclose(exact, ggn_dense, atol=1e-13)
    op = curvature.fisher(
        mlp_predict, cross_entropy, params, (x, y), kind="true", key=jax.random.key(7), num_label_samples=3000
    )
    sampled = np.asarray(curvature.dense_matrix(op))
    relative_error = np.linalg.norm(sampled - exact) / np.linalg.norm(exact)
    assert relative_error < 0.05, relative_error
    again = curvature.fisher(
        mlp_predict, cross_entropy, params, (x, y), kind="true", key=jax.random.key(7), num_label_samples=3000
    )
    v = random_like(3, params)
    np.testing.assert_array_equal(flat(op(v)), flat(again(v)))  # same key, same operator


def test_float32_default_and_float64_both_run():
    params = mlp_params(0)
    x, y = classification_data(1)
    op = curvature.hessian(mlp_loss, params, (x, y))
    assert op.dtype == jnp.float32 and flat(op(params)).dtype == np.float32
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
        op64 = curvature.hessian(mlp_loss, params64, (x.astype(jnp.float64), y))
        assert flat(op64(params64)).dtype == np.float64
        np.testing.assert_allclose(flat(op(params)), flat(op64(params64)), rtol=1e-4, atol=1e-5)


def _product_precisions(jaxpr, found=None):
    """(primitive, precision) of every matrix product / convolution in a jaxpr and its sub-jaxprs."""
    found = set() if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.add((eqn.primitive.name, eqn.params["precision"]))
        for value in eqn.params.values():
            for item in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    _product_precisions(inner, found)
    return found


HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher", "hessian-cnn"])
def test_products_run_at_highest_precision_unless_asked_otherwise(kind):
    """On GPUs JAX's default float32 product is TensorFloat-32 (an H200 gave HVPs 8% off float64 in small entries):
    every product, forward and tangent, is traced at HIGHEST, whatever the caller's context; precision="default"
    asks for the platform's fastest in the user's function."""
    if kind == "hessian-cnn":
        params, batch = cnn_params(0), image_data(1)
        params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
        build = lambda **kw: curvature.hessian(cnn_loss, params, batch, **kw)
    else:
        params, batch = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), mlp_params(0)), classification_data(1)
        build = {
            "hessian": lambda **kw: curvature.hessian(mlp_loss, params, batch, **kw),
            "ggn": lambda **kw: curvature.ggn(mlp_predict, cross_entropy, params, batch, **kw),
            "fisher": lambda **kw: curvature.fisher(mlp_predict, cross_entropy, params, batch, **kw),
        }[kind]
    v = random_like(2, params)
    op = build()
    with jax.default_matmul_precision("bfloat16"):
        found = _product_precisions(jax.make_jaxpr(operators._apply_jit)(op, v).jaxpr)
        gradient_found = _product_precisions(jax.make_jaxpr(operators._loss_and_gradient)(op, params).jaxpr)
    assert found and {precision for _, precision in found | gradient_found} == {HIGHEST}
    default = _product_precisions(jax.make_jaxpr(operators._apply_jit)(build(precision="default"), v).jaxpr)
    assert {precision for _, precision in default} == {(jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT)}
    with pytest.raises(ValueError, match="precision"):
        build(precision="fastest")


# ---------------------------------------------------------------------------------------------- bad input


def test_non_scalar_loss_is_rejected():
    params = mlp_params(0)
    per_example = lambda p, b: mlp_predict(p, b[0]).sum(axis=1)
    with pytest.raises(ValueError, match=r"loss_fn: expected a scalar loss \(shape \(\)\), got output shape\(s\) \[\(32,\)\]"):
        curvature.hessian(per_example, params, classification_data(1))


def test_vector_structure_and_shape_mismatch_are_rejected():
    params = mlp_params(0)
    op = curvature.hessian(mlp_loss, params, classification_data(1))
    wrong_structure = {"dense1": params["dense1"]}
    with pytest.raises(ValueError, match="v: expected a pytree with the structure of params"):
        op(wrong_structure)
    wrong_shape = jax.tree.map(lambda p: p, params)
    wrong_shape["dense2"] = {"kernel": jnp.zeros((3, 12)), "bias": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"v: leaf \['dense2'\]\['kernel'\] expected shape \(12, 3\) "
                                         r"\(that of params\), got \(3, 12\)"):
        op(wrong_shape)
    with pytest.raises(ValueError, match=r"vectors: leaf .* expected shape \(block,\)"):
        op.matmat(params)


def test_nan_loss_is_rejected_naming_the_batch():
    params = mlp_params(0)
    x, y = classification_data(1, num_examples=30)
    x[25] = np.nan
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 30, 10)]
    with pytest.raises(FloatingPointError, match="loss_fn: expected a finite loss, got nan on batch 2 of 3"):
        curvature.hessian(mlp_loss, params, batches)


def test_empty_data_is_rejected():
    params = mlp_params(0)
    with pytest.raises(ValueError, match="data: expected at least one batch, got an empty list"):
        curvature.hessian(mlp_loss, params, [])
    with pytest.raises(ValueError, match="data: expected at least one batch, got an empty generator"):
        curvature.hessian(mlp_loss, params, (b for b in []))
    with pytest.raises(ValueError, match="data: expected at least one stacked batch"):
        curvature.hessian(mlp_loss, params, (jnp.zeros((0, 4, 6)), jnp.zeros((0, 4), jnp.int32)), stacked=True)


def test_other_invalid_arguments_are_rejected():
    params = mlp_params(0)
    batch = classification_data(1)
    with pytest.raises(ValueError, match=r"mode: expected one of \['forward-over-reverse'"):
        curvature.hessian(mlp_loss, params, batch, mode="forward")
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        curvature.hessian("not a function", params, batch)
    with pytest.raises(ValueError, match="params: expected a pytree with at least one floating-point array leaf"):
        curvature.hessian(mlp_loss, {}, batch)
    with pytest.raises(TypeError, match=r"params: leaf \['step'\] expected a floating-point dtype, got int32"):
        curvature.hessian(mlp_loss, {**params, "step": jnp.int32(3)}, batch)
    with pytest.raises(ValueError, match="data: with stacked=True every leaf needs the same leading"):
        curvature.hessian(mlp_loss, params, (jnp.zeros((2, 4, 6)), jnp.zeros((3, 4), jnp.int32)), stacked=True)
    with pytest.raises(ValueError, match="data: batch 1 expected the structure of batch 0"):
        curvature.hessian(mlp_loss, params, [batch, {"x": batch[0]}])
    with pytest.raises(ValueError, match="data: expected batches \\(x, y\\) for a model-output operator"):
        curvature.ggn(mlp_predict, cross_entropy, params, {"x": batch[0], "y": batch[1]})
    with pytest.raises(ValueError, match=r"kind: expected one of \['empirical', 'true'\]"):
        curvature.fisher(mlp_predict, cross_entropy, params, batch, kind="exact")
    with pytest.raises(ValueError, match="key: expected a PRNG key"):
        curvature.fisher(mlp_predict, cross_entropy, params, batch, kind="true")
    with pytest.raises(ValueError, match="operator kind 'linear' has no loss function"):
        curvature.linear_operator(lambda v: 2 * v, jnp.zeros(3)).loss_and_gradient()
    with pytest.raises(ValueError, match="params: the dense Hessian is an n×n matrix for small models only; expected at most max_params=100"):
        curvature.dense_hessian(mlp_loss, params, batch, max_params=100)
    with pytest.raises(ValueError, match="v: expected a non-zero direction"):
        curvature.finite_difference_hvp(mlp_loss, params, batch, jax.tree.map(jnp.zeros_like, params))


def test_loop_modes_give_the_same_operator_and_estimates(x64):
    """"python" (Python-driven / unrolled loops) and "scan" (lax.scan / while_loop) compute the same things; the
    former names still work."""
    params = mlp_params(0)
    x, y = classification_data(1, num_examples=40)
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]
    compiled = curvature.hessian(mlp_loss, params, batches, loops="scan")
    unrolled = curvature.hessian(mlp_loss, params, batches, loops="python")
    assert (compiled.loop_mode, unrolled.loop_mode) == ("scan", "python")
    with pytest.warns(DeprecationWarning, match="loops='unrolled' is now loops='python'"):
        assert curvature.hessian(mlp_loss, params, batches, loops="unrolled").loop_mode == "python"
    v = random_like(4, params)
    np.testing.assert_allclose(flat(unrolled(v)), flat(compiled(v)), atol=1e-14)
    vectors = jax.tree.map(lambda *leaves: np.stack(leaves), *[random_like(seed, params) for seed in range(3)])
    np.testing.assert_allclose(
        flat(unrolled.matmat(vectors, chunk_size=2)), flat(compiled.matmat(vectors, chunk_size=2)), atol=1e-14
    )
    key = jax.random.key(0)
    a = curvature.lanczos(compiled, key, 30, k=2, progress=False)
    b = curvature.lanczos(unrolled, key, 30, k=2, progress=True)
    np.testing.assert_allclose(np.asarray(b.top_eigenvalues), np.asarray(a.top_eigenvalues), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(b.bottom_eigenvalues), np.asarray(a.bottom_eigenvalues), rtol=1e-10)
    p = curvature.power_iteration(compiled, key, 50, 1e-6, progress=False)
    q = curvature.power_iteration(unrolled, key, 50, 1e-6, progress=False)
    assert int(p.num_iterations[0]) == int(q.num_iterations[0])
    np.testing.assert_allclose(np.asarray(q.eigenvalues), np.asarray(p.eigenvalues), rtol=1e-10)


def test_auto_loop_mode_unrolls_convolutions_on_cpu():
    cnn = curvature.hessian(cnn_loss, cnn_params(0), image_data(1))
    mlp = curvature.hessian(mlp_loss, mlp_params(0), classification_data(1))
    expected = "python" if jax.default_backend() == "cpu" else "scan"
    assert cnn.loop_mode == expected and mlp.loop_mode == "scan"
    with pytest.raises(ValueError, match=r"loops must be one of auto, scan, python, got 'vmap'"):
        curvature.hessian(mlp_loss, mlp_params(0), classification_data(1), loops="vmap")


def test_nonfinite_counts_host_and_device_paths_agree():
    """On CPU the counts and norm are read in numpy (no program to compile); the compiled program (the path for
    accelerator arrays) gives the same numbers."""
    from jaxnn import validation

    tree = {"a": jnp.array([1.0, jnp.nan, 3.0, jnp.inf]), "b": jnp.arange(6.0).reshape(2, 3),
            "i": jnp.arange(3, dtype=jnp.int32)}
    host_counts, host_norm = validation.nonfinite_counts_and_norm(tree)
    device_counts, device_norm = validation._nonfinite_counts_and_norm(jax.tree.leaves(tree))
    assert host_counts == [int(c) for c in device_counts] == [2, 0, 0]
    assert np.isnan(host_norm) and np.isnan(float(device_norm))  # a NaN leaf: the norm is NaN on both paths
    finite = {"b": jnp.arange(6.0).reshape(2, 3)}
    np.testing.assert_allclose(validation.nonfinite_counts_and_norm(finite)[1], np.sqrt(55.0), rtol=1e-6)
    np.testing.assert_allclose(float(validation._nonfinite_counts_and_norm(jax.tree.leaves(finite))[1]),
                               np.sqrt(55.0), rtol=1e-6)
