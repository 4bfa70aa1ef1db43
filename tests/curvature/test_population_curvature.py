"""Curvature of a population in one program: exact spectra of quadratics (with repeated eigenvalues, so Lanczos
breaks down and restarts) and, for trained MLP members, the dense Hessian (jax.hessian + eigh) and the
single-model engine, float64 to 1e-10."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jaxnn import curvature, data as data_lib, losses, models
from jaxnn.curvature.population import population_sharpness, population_top_eigenvalues
from jaxnn.train.population import train_population


@pytest.mark.parametrize("strategy", ["vmap", "scan"])
def test_quadratics_with_repeated_eigenvalues(x64, strategy):
    """Member m: L(θ) = ½ Σ s_m,i θ_i², spectrum s_m (4 distinct values in 8): the Krylov space breaks down after 4
    steps and restarts orthogonally, so num_iters = 8 finds the whole spectrum, multiplicities included."""
    spectra = jnp.asarray([[5, 5, 3, 1, 1, 1, -2, -2], [9, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 7]], jnp.float64)

    def loss(scales, params, batch):
        return 0.5 * jnp.sum(scales * params["w"] ** 2) + 0 * jnp.sum(batch)

    loss_fns = jax.tree_util.Partial(loss, spectra)
    params = {"w": jnp.ones((2, 8), jnp.float64)}
    values = population_top_eigenvalues(loss_fns, params, jnp.zeros(3), k=8, num_iters=8, strategy=strategy)
    np.testing.assert_allclose(values, -np.sort(-np.asarray(spectra), axis=1), atol=1e-12)
    # Four steps: a Krylov space holds each distinct eigenvalue once (4 distinct values in each spectrum).
    top2 = population_top_eigenvalues(loss_fns, params, jnp.zeros(3), k=2, num_iters=4, strategy=strategy)
    np.testing.assert_allclose(top2, [[5, 3], [9, 7]], atol=1e-12)


@pytest.fixture(scope="module")
def trained():
    with jax.enable_x64(True):
        digits = data_lib.load_dataset("digits", seed=0)
        model = models.get_model("mlp", num_classes=10, width=8, depth=1)
        result = train_population(model, optax.sgd, digits, members={"seed": [0, 1, 2], "learning_rate": [0.1] * 3},
                                  num_steps=20, batch_size=32, progress=False)
        x, y = data_lib.host_stacked_batches(digits.train, 48, 2, seed=0)
        yield result, [(x[i], y[i]) for i in range(2)]


@pytest.mark.parametrize("strategy", ["vmap", "scan"])
def test_population_equals_dense_hessian_and_single_engine(trained, x64, strategy):
    result, batches = trained
    values = population_sharpness(result.state, batches, k=3, num_iters=60, strategy=strategy)
    assert values.shape == (3, 3)
    for index in range(3):
        member = result.member_state(index)
        loss_fn = losses.make_loss_fn(member.apply_fn, "softmax_cross_entropy", member.model_state)
        flat, unravel = ravel_pytree(member.params)
        total = lambda v: sum(loss_fn(unravel(v), b) for b in batches) / len(batches)  # noqa: E731
        dense = np.linalg.eigvalsh(np.asarray(jax.hessian(total)(flat)))[::-1][:3]
        np.testing.assert_allclose(values[index], dense, rtol=1e-10, atol=1e-12)
        single = curvature.top_eigenvalues(curvature.hessian(loss_fn, member.params, batches), k=3, num_iters=60,
                                           tol=None, progress=False).values
        np.testing.assert_allclose(values[index], np.asarray(single), rtol=1e-10, atol=1e-12)
    assert len(set(np.round(values[:, 0], 6))) == 3  # the members really differ


def test_bad_requests(trained):
    result, batches = trained
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        population_sharpness(result.state, batches, k=0)
    with pytest.raises(ValueError, match="num_iters=2 must be between k=3"):
        population_sharpness(result.state, batches, k=3, num_iters=2)
    with pytest.raises(ValueError, match="leading member axis"):
        population_top_eigenvalues(lambda p, b: 0.0, {"w": jnp.float32(1)}, batches)
    with pytest.raises(ValueError, match="strategy must be one of auto, vmap, scan, python"):
        population_sharpness(result.state, batches, strategy="pmap")


def test_auto_strategy_vmaps_small_members_and_maps_large_ones_on_cpu():
    from jaxnn.curvature.population import _member_strategy

    if jax.default_backend() != "cpu":
        pytest.skip("the CPU rule; accelerators always vmap")
    assert _member_strategy("auto", 16, 40, 3_400, np.float32) == "vmap"      # width-32 MLPs: 9 MB of bases
    assert _member_strategy("auto", 16, 40, 85_002, np.float32) == "scan"     # the main job's MLP: 223 MB
    assert _member_strategy("vmap", 16, 40, 85_002, np.float32) == "vmap"


def test_population_products_run_at_highest_precision():
    """As the single-model engine: the Lanczos arithmetic always, and every member's loss by default, at HIGHEST
    (TensorFloat-32 is JAX's default for float32 products on recent NVIDIA GPUs)."""
    from jaxnn.curvature.population import _check_population, _population_program

    def products(precision):
        params = {"w": jnp.ones((2, 4, 3), jnp.float32)}
        loss = jax.tree_util.Partial(lambda p, batch: jnp.sum((batch @ p["w"]) ** 2))
        population = _check_population(loss, params, jnp.ones((5, 4), jnp.float32), False, precision)
        program = lambda *args: _population_program(*args, num_iters=3, member_axis=None, strategy="vmap")
        jaxpr = jax.make_jaxpr(program)(population.template, params, population.function_arrays,
                                        jnp.ones((2, 12), jnp.float32)).jaxpr
        found, stack = set(), [jaxpr]
        while stack:
            for eqn in stack.pop().eqns:
                if eqn.primitive.name == "dot_general":
                    found.add(eqn.params["precision"])
                for value in eqn.params.values():
                    for item in value if isinstance(value, (list, tuple)) else (value,):
                        inner = getattr(item, "jaxpr", item)
                        if hasattr(inner, "eqns"):
                            stack.append(inner)
        return found

    highest, default = (jax.lax.Precision.HIGHEST,) * 2, (jax.lax.Precision.DEFAULT,) * 2
    with jax.default_matmul_precision("bfloat16"):
        assert products("highest") == {highest}
    assert products("default") == {highest, default}


def test_population_trace_equals_the_dense_hessian_on_the_same_probes(trained, x64):
    """Every member's Hutchinson estimate is the mean of vᵀHv over the shared probes, H from jax.hessian (1e-10); with
    enough probes it is near the exact trace."""
    from jaxnn.curvature.population import population_hessian_trace, population_probes

    result, batches = trained
    traces = population_hessian_trace(result.state, batches, num_samples=12, key=jax.random.PRNGKey(3))
    assert traces.shape == (3,)
    for index in range(3):
        member = result.member_state(index)
        loss_fn = losses.make_loss_fn(member.apply_fn, "softmax_cross_entropy", member.model_state)
        flat, unravel = ravel_pytree(member.params)
        total = lambda v: sum(loss_fn(unravel(v), b) for b in batches) / len(batches)  # noqa: E731
        dense = np.asarray(jax.hessian(total)(flat))
        probes = np.asarray(population_probes(jax.random.PRNGKey(3), 12, flat.size, flat.dtype))
        expected = np.mean(np.einsum("si,ij,sj->s", probes, dense, probes))
        np.testing.assert_allclose(traces[index], expected, rtol=1e-10)
        many = population_hessian_trace(jax.tree.map(lambda leaf: leaf[index:index + 1], result.state), batches,
                                        num_samples=400)
        assert abs(many[0] - np.trace(dense)) < 0.15 * abs(np.trace(dense))
    with pytest.raises(ValueError, match="num_samples"):
        population_hessian_trace(result.state, batches, num_samples=0)


def test_population_gradient_curvature_equals_the_single_engine(trained, x64):
    from jaxnn.curvature.population import population_gradient_curvature

    result, batches = trained
    loss_fns = losses.make_loss_fn(result.state.apply_fn, "softmax_cross_entropy", result.state.model_state)
    products, directional = population_gradient_curvature(loss_fns, result.state.params, batches)
    for index in range(3):
        member = result.member_state(index)
        loss_fn = losses.make_loss_fn(member.apply_fn, "softmax_cross_entropy", member.model_state)
        single = curvature.gradient_curvature(curvature.hessian(loss_fn, member.params, batches))
        np.testing.assert_allclose(products[index], single.gradient_curvature_product, rtol=1e-10)
        np.testing.assert_allclose(directional[index], single.directional_curvature, rtol=1e-10)


@pytest.mark.parametrize("strategy", ["vmap", "scan"])
def test_extreme_eigenvalues_equal_both_ends_of_the_dense_spectrum(trained, x64, strategy):
    """Top and bottom eigenvalues of every member from one Lanczos run against jax.hessian + eigh (indefinite
    Hessians after 20 steps: the bottom end is negative); the top end equals population_top_eigenvalues."""
    result, batches = trained
    count = 3
    loss_fn = losses.make_loss_fn(result.state.apply_fn, "softmax_cross_entropy", result.state.model_state)
    num_params = ravel_pytree(result.member_state(0).params)[0].size
    top, bottom = curvature.population_extreme_eigenvalues(loss_fn, result.state.params, batches, k=2,
                                                           num_iters=num_params, strategy=strategy)
    assert top.shape == bottom.shape == (count, 2)
    np.testing.assert_allclose(top, population_top_eigenvalues(loss_fn, result.state.params, batches, k=2,
                                                               num_iters=num_params, strategy=strategy), atol=1e-12)
    for index in range(count):
        member = result.member_state(index)
        member_loss = losses.make_loss_fn(member.apply_fn, "softmax_cross_entropy", member.model_state)
        flat, unravel = ravel_pytree(member.params)
        total = lambda v: sum(member_loss(unravel(v), b) for b in batches) / len(batches)  # noqa: E731
        dense = np.linalg.eigvalsh(np.asarray(jax.hessian(total)(flat)))
        np.testing.assert_allclose(top[index], dense[::-1][:2], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(bottom[index], dense[:2], rtol=1e-8, atol=1e-10)


def test_loop_strategy_for_convolutional_members_equals_the_dense_hessian(x64):
    """Convolutional members on CPU: "auto" runs each member through the single-model engine (convolutions unrolled);
    both ends of every member's spectrum equal jax.hessian + eigh with a full Krylov space; "python" = "scan"."""
    from _curvature_models import tiny_conv_net

    model = tiny_conv_net()
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 1), jnp.float64)
    y = jnp.arange(6) % 3
    stacked = jax.vmap(lambda key: model.init(key, x)["params"])(jax.random.split(jax.random.PRNGKey(1), 2))
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy")
    flat0, unravel = ravel_pytree(jax.tree.map(lambda leaf: leaf[0], stacked))
    n = flat0.size
    from jaxnn.curvature.population import _convolutional_on_cpu, _check_population

    assert _convolutional_on_cpu(_check_population(loss_fn, stacked, (x, y), False))
    top, bottom = curvature.population_extreme_eigenvalues(loss_fn, stacked, (x, y), k=2, num_iters=n)
    mapped = curvature.population_extreme_eigenvalues(loss_fn, stacked, (x, y), k=2, num_iters=n, strategy="scan")
    np.testing.assert_allclose(top, mapped[0], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(bottom, mapped[1], rtol=1e-8, atol=1e-10)
    for index in range(2):
        flat = ravel_pytree(jax.tree.map(lambda leaf: leaf[index], stacked))[0]
        dense = np.linalg.eigvalsh(np.asarray(jax.hessian(lambda v: loss_fn(unravel(v), (x, y)))(flat)))
        np.testing.assert_allclose(top[index], dense[::-1][:2], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(bottom[index], dense[:2], rtol=1e-8, atol=1e-10)
