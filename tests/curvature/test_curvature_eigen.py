"""Eigenvalue estimators (Lanczos, power iteration) against exact spectra; NaN handling and bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnn.curvature as curvature
from _curvature_models import (
    classification_data,
    cnn_loss,
    cnn_params,
    dense_hessian_of,
    image_data,
    matrix_with_spectrum,
    mlp_loss,
    mlp_params,
    quadratic,
)

KEY = jax.random.key(0)


def _relative_error(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    return np.max(np.abs(actual - expected) / np.abs(expected))


# A spectrum with negative, repeated and tiny eigenvalues; |λ|max/|λ|min = 1e6.
INDEFINITE_SPECTRUM = np.concatenate(
    [[-4.0, -2.5, -2.5, -2.5, -1.0], np.linspace(-0.5, 0.5, 30) + 1e-3, [2e-6, 3e-6], [1.0, 2.0, 3.0, 3.0, 4.0]]
)
# Positive definite with κ = 1e6, repeated eigenvalues at both ends.
CONDITIONED_SPECTRUM = np.concatenate([[1e-6, 1e-6, 2e-6, 5e-6, 1e-5], np.logspace(-4, -1, 30), [0.5, 0.7, 1.0, 1.0, 1.0]])


@pytest.mark.parametrize("spectrum", [INDEFINITE_SPECTRUM, CONDITIONED_SPECTRUM], ids=["indefinite", "kappa1e6"])
def test_lanczos_recovers_quadratic_extremes(x64, spectrum):
    matrix = matrix_with_spectrum(spectrum, seed=3)
    op = curvature.hessian(quadratic(matrix), jnp.zeros(spectrum.size), None)
    exact = np.sort(spectrum)
    result = curvature.lanczos(op, KEY, num_iters=spectrum.size, k=5, progress=False)
    assert _relative_error(result.top_eigenvalues, exact[::-1][:5]) < 1e-8
    assert _relative_error(result.bottom_eigenvalues, exact[:5]) < 1e-8
    assert np.max(np.asarray(result.top_residuals)) < 1e-10 and np.max(np.asarray(result.bottom_residuals)) < 1e-10
    # Residuals are the true ||Av − λv|| of the returned pytree eigenvectors.
    vectors = np.asarray(result.bottom_eigenvectors)
    assert vectors.shape == (5, spectrum.size)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(
        np.linalg.norm(vectors @ matrix - np.asarray(result.bottom_eigenvalues)[:, None] * vectors, axis=1),
        np.asarray(result.bottom_residuals),
        atol=1e-12,
    )
    condition = curvature.condition_number(op, lanczos_result=result)
    if spectrum is CONDITIONED_SPECTRUM:
        assert condition.verdict == "positive definite" and condition.positive_definite
        assert abs(condition.condition_number / 1e6 - 1) < 1e-8
    else:
        assert condition.verdict == "indefinite" and condition.condition_number == np.inf
        assert abs(condition.nonconvexity_ratio - 1.0) < 1e-12  # |−4| / 4


def test_block_lanczos_finds_repeated_extremes_in_a_partial_krylov_space(x64):
    rng = np.random.default_rng(5)
    spectrum = np.concatenate([[-6.0, -6.0, -5.0, -4.5, -4.0], rng.uniform(-1, 1, 290), [8.0, 9.0, 9.5, 10.0, 10.0]])
    matrix = matrix_with_spectrum(spectrum, seed=4)
    op = curvature.hessian(quadratic(matrix), jnp.zeros(spectrum.size), None)
    result = curvature.lanczos(op, KEY, num_iters=40, k=5, block_size=2, progress=False)
    assert result.num_matvecs == 40 * 2 + 10
    exact = np.sort(spectrum)
    assert _relative_error(result.top_eigenvalues, exact[::-1][:5]) < 1e-8
    assert _relative_error(result.bottom_eigenvalues, exact[:5]) < 1e-8
    # Eigenvectors of the simple eigenvalues agree with numpy's up to sign.
    values, vectors = np.linalg.eigh(matrix)
    top = np.asarray(result.top_eigenvectors)
    assert abs(abs(top[2] @ vectors[:, -3]) - 1) < 1e-8  # λ = 9.5


@pytest.mark.parametrize(
    "loss_fn, make_params, make_data, num_iters",
    [(mlp_loss, mlp_params, classification_data, 80), (cnn_loss, cnn_params, image_data, 120)],
    ids=["mlp", "cnn"],
)
def test_lanczos_matches_eigh_of_dense_hessian(x64, loss_fn, make_params, make_data, num_iters):
    params, batch = make_params(0), make_data(1)
    exact = np.linalg.eigvalsh(dense_hessian_of(loss_fn, params, batch))
    op = curvature.hessian(loss_fn, params, batch)
    assert op.num_params > num_iters  # a partial Krylov space, not the whole matrix
    values, vectors = curvature.top_eigenvalues(op, k=3, key=KEY, num_iters=num_iters, progress=False)
    bottom, _ = curvature.bottom_eigenvalues(op, k=3, key=KEY, num_iters=num_iters, progress=False)
    scale = np.abs(exact).max()
    np.testing.assert_allclose(np.asarray(values), exact[::-1][:3], rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(np.asarray(bottom), exact[:3], rtol=0, atol=1e-6 * scale)
    assert jax.tree.structure(vectors) == jax.tree.structure(jax.tree.map(jnp.asarray, params))
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(vectors))


def test_power_iteration_with_deflation(x64):
    spectrum = np.concatenate([[7.0, 7.0, -6.0], np.linspace(-2, 2, 37)])
    matrix = matrix_with_spectrum(spectrum, seed=8)
    op = curvature.hessian(quadratic(matrix), jnp.zeros(spectrum.size), None)
    result = curvature.power_iteration(op, KEY, num_iters=2000, tol=1e-13, k=3, progress=False)
    # Dominant = largest |λ|, found with multiplicity: 7, 7, then −6.
    np.testing.assert_allclose(np.asarray(result.eigenvalues), [7.0, 7.0, -6.0], rtol=1e-9)
    assert bool(np.all(np.asarray(result.converged)))
    vectors = np.asarray(result.eigenvectors)
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(3), atol=1e-6)


def test_power_iteration_matches_dense_top_eigenvalue_on_mlp(x64):
    params, batch = mlp_params(0), classification_data(1)
    exact = np.linalg.eigvalsh(dense_hessian_of(mlp_loss, params, batch))
    dominant = exact[np.argmax(np.abs(exact))]
    result = curvature.power_iteration(curvature.hessian(mlp_loss, params, batch), KEY, 2000, 1e-12, progress=False)
    assert abs(float(result.eigenvalues[0]) / dominant - 1) < 1e-6


def test_nan_in_a_lanczos_step_stops_with_the_iteration_number(x64):
    """A path-graph operator started at e₀ reaches coordinate j at iteration j exactly; coordinate 5 is poisoned."""
    n = 12
    diagonal = jnp.asarray(np.where(np.arange(n) == 5, np.nan, 2.0))

    def path_graph(v):
        off = -1.0
        out = jnp.where(v != 0, diagonal * v, 0.0)
        return out + off * jnp.concatenate([v[1:], jnp.zeros(1)]) + off * jnp.concatenate([jnp.zeros(1), v[:-1]])

    op = curvature.linear_operator(path_graph, jnp.zeros(n))
    start = jnp.zeros(n).at[0].set(1.0)
    with pytest.raises(FloatingPointError, match=re.escape("non-finite (NaN/inf) at iteration 6 of 10")):
        curvature.lanczos(op, KEY, 10, start=start, progress=False)
    with pytest.raises(FloatingPointError, match="non-finite"):
        curvature.power_iteration(op, KEY, 10, progress=False)


def test_nan_parameters_stop_lanczos_at_the_first_iteration(x64):
    params = jax.tree.map(lambda p: p.copy(), mlp_params(0))
    params["dense2"]["bias"][0] = np.nan
    with pytest.raises(FloatingPointError, match="loss_fn: expected a finite loss, got nan on batch 0 of 1"):
        curvature.hessian(mlp_loss, params, classification_data(1))
    op = curvature.hessian(mlp_loss, params, classification_data(1), check_finite=False)
    with pytest.raises(FloatingPointError, match="iteration 1 of 80"):
        curvature.lanczos(op, KEY, 80, progress=False)


def test_invalid_estimator_arguments_are_rejected():
    op = curvature.hessian(quadratic(np.diag([1.0, 2.0, 3.0])), jnp.zeros(3), None)
    with pytest.raises(ValueError, match="k: expected at most num_params=3, got 4"):
        curvature.top_eigenvalues(op, k=4, progress=False)
    with pytest.raises(ValueError, match="k: expected at most num_params=3, got 5"):
        curvature.lanczos(op, KEY, 3, k=5, progress=False)
    with pytest.raises(ValueError, match="k: expected at most num_params=3, got 4"):
        curvature.power_iteration(op, KEY, 10, k=4, progress=False)
    with pytest.raises(ValueError, match="k: expected at most num_iters\\*block_size=2, got 3"):
        curvature.lanczos(op, KEY, 2, k=3, progress=False)
    with pytest.raises(ValueError, match="k: expected an integer >= 1, got 0"):
        curvature.lanczos(op, KEY, 3, k=0, progress=False)
    with pytest.raises(ValueError, match="block_size: expected at most num_params=3, got 4"):
        curvature.lanczos(op, KEY, 3, block_size=4, progress=False)
    with pytest.raises(ValueError, match="key: expected a PRNG key"):
        curvature.lanczos(op, None, 3, progress=False)
    with pytest.raises(TypeError, match="op: expected a CurvatureOperator"):
        curvature.lanczos(np.eye(3), KEY, 3, progress=False)
    with pytest.raises(ValueError, match="start: a start vector needs block_size=1"):
        curvature.lanczos(op, KEY, 1, block_size=2, start=jnp.ones(3), progress=False)
    with pytest.raises(ValueError, match=r"start: leaf <root> expected shape \(3,\) \(that of params\), got \(4,\)"):
        curvature.lanczos(op, KEY, 3, start=jnp.ones(4), progress=False)
    with pytest.raises(ValueError, match="tol: expected a finite number > 0, got -1.0"):
        curvature.power_iteration(op, KEY, 10, tol=-1.0, progress=False)


def test_lanczos_float32_and_progress_bar(capsys):
    spectrum = np.linspace(-1.0, 3.0, 50)
    op = curvature.hessian(quadratic(matrix_with_spectrum(spectrum, seed=2)), jnp.zeros(50), None)
    result = curvature.lanczos(op, KEY, 50, k=2, progress=True)
    assert result.top_eigenvalues.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(result.top_eigenvalues), [3.0, spectrum[-2]], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(result.bottom_eigenvalues), [-1.0, spectrum[1]], atol=1e-5)
    assert "lanczos" in capsys.readouterr().err


def test_adaptive_lanczos_stops_once_the_wanted_pairs_converge(x64):
    """Top-3 of a 300-dim quadratic with a well separated top: far fewer iterations than the cap, every wanted pair
    within the tolerance (true residuals, not the Lanczos bound), eigenvalues to 1e-9."""
    rng = np.random.default_rng(11)
    spectrum = np.concatenate([rng.uniform(-1, 1, 297), [3.0, 4.0, 6.0]])
    matrix = matrix_with_spectrum(spectrum, seed=12)
    op = curvature.hessian(quadratic(matrix), jnp.zeros(spectrum.size), None)
    result = curvature.lanczos(op, KEY, 150, k=3, tol=1e-6, which="top", progress=False)
    assert result.converged and result.num_iters < 100 and result.num_matvecs == result.num_iters + 6
    assert _relative_error(result.top_eigenvalues, [6.0, 4.0, 3.0]) < 1e-9
    vectors = np.asarray(result.top_eigenvectors)
    true_residuals = np.linalg.norm(vectors @ matrix - np.asarray(result.top_eigenvalues)[:, None] * vectors, axis=1)
    assert np.all(true_residuals <= 1e-6 * np.array([6.0, 4.0, 3.0]) * 1.01)
    # The same run without a tolerance goes to the cap, and is not reported as converged.
    fixed = curvature.lanczos(op, KEY, 60, k=3, progress=False)
    assert fixed.num_iters == 60 and not fixed.converged
    # top_eigenvalues: adaptive by default, unpacks as (values, vectors), reports the iterations.
    pair = curvature.top_eigenvalues(op, k=2, key=KEY, tol=1e-6, progress=False)
    values, vectors = pair
    assert pair.converged and pair.num_iters < 100 and pair.values is values
    np.testing.assert_allclose(np.asarray(values), [6.0, 4.0], rtol=1e-9)
    bottom = curvature.bottom_eigenvalues(op, k=1, key=KEY, num_iters=299, tol=1e-6, progress=False)
    assert bottom.converged and abs(float(bottom.values[0]) - spectrum.min()) < 1e-8


@pytest.mark.parametrize("loops", ["scan", "python"])
def test_adaptive_lanczos_on_a_network_matches_the_dense_spectrum(x64, loops):
    params, batch = mlp_params(0), classification_data(1)
    exact = np.linalg.eigvalsh(dense_hessian_of(mlp_loss, params, batch))
    op = curvature.hessian(mlp_loss, params, batch, loops=loops)
    values, _ = pair = curvature.top_eigenvalues(op, k=2, key=KEY, num_iters=80, tol=1e-8, progress=False)
    assert pair.converged and pair.num_iters < 80
    np.testing.assert_allclose(np.asarray(values), exact[::-1][:2], rtol=1e-9)


def test_adaptive_lanczos_grows_its_basis_as_needed(x64, monkeypatch):
    """An adaptive run starts with a small basis and grows it (copying what it holds) until the pairs converge:
    the same iterations and Ritz values as one run in the full-size basis, both ends right against eigh (the
    compiled loop; the unrolled one goes through the same stages in run_lanczos)."""
    from jaxnn.curvature import krylov

    assert krylov._stage_iters(40, 1, 1, True) == [20, 40]
    assert krylov._stage_iters(40, 5, 1, True) == [30, 40]  # at least 6k vectors
    assert krylov._stage_iters(100, 1, 2, True) == [20, 40, 80, 100]
    assert krylov._stage_iters(15, 1, 1, True) == [15] and krylov._stage_iters(40, 1, 1, False) == [40]
    params, batch = mlp_params(0), classification_data(1)
    exact = np.linalg.eigvalsh(dense_hessian_of(mlp_loss, params, batch))
    op = curvature.hessian(mlp_loss, params, batch)
    monkeypatch.setattr(krylov, "FIRST_STAGE_ITERS", 3)  # grows through 3, 6, 12, 24, ...
    grown = curvature.lanczos(op, KEY, 80, k=2, tol=1e-8, progress=False)
    monkeypatch.setattr(krylov, "FIRST_STAGE_ITERS", 1000)  # one basis of 81 rows
    whole = curvature.lanczos(op, KEY, 80, k=2, tol=1e-8, progress=False)
    assert grown.converged and grown.num_iters == whole.num_iters > 12
    for name in ("top_eigenvalues", "bottom_eigenvalues"):
        np.testing.assert_allclose(np.asarray(getattr(grown, name)), np.asarray(getattr(whole, name)), rtol=1e-11)
    np.testing.assert_allclose(np.asarray(grown.top_eigenvalues), exact[::-1][:2], rtol=1e-9)
    np.testing.assert_allclose(np.asarray(grown.bottom_eigenvalues), exact[:2], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_eigenvalue_when_it_exceeds_twice_every_projected_entry(x64, seed):
    """Spectrum -8 .. 15 (60 values): the Lanczos T has entries ≲ 7 while λmax = 15. The padding of the projected
    matrix was placed at 1 + 2·max|T_ij| (≈ 14.9), below λmax, and reported as a converged top eigenvalue (14.92,
    14.81) after 9-13 iterations; it now lies above a Gershgorin bound. Also at the cap, without a tolerance."""
    spectrum = np.linspace(-8.0, 15.0, 60)
    op = curvature.hessian(quadratic(matrix_with_spectrum(spectrum, seed=seed)), jnp.zeros(spectrum.size), None)
    key = jax.random.key(seed)
    adaptive = curvature.top_eigenvalues(op, key=key, num_iters=59, tol=1e-6, progress=False)
    assert adaptive.converged and float(adaptive.values[0]) == pytest.approx(15.0, rel=1e-6)
    capped = curvature.lanczos(op, key, 12, k=1, which="top", progress=False)
    assert np.all(np.asarray(capped.ritz_values) <= 15.0 + 1e-9)
    assert float(capped.top_eigenvalues[0]) == pytest.approx(np.max(np.asarray(capped.ritz_values)))


def test_lanczos_tolerance_and_which_are_checked():
    op = curvature.hessian(quadratic(np.diag([1.0, 2.0, 3.0])), jnp.zeros(3), None)
    with pytest.raises(ValueError, match="tol: expected None or a finite number > 0, got 0"):
        curvature.lanczos(op, KEY, 3, tol=0, progress=False)
    with pytest.raises(ValueError, match="which: expected one of"):
        curvature.lanczos(op, KEY, 3, tol=1e-3, which="middle", progress=False)


def test_long_lanczos_on_a_wide_spectrum_keeps_its_basis_orthogonal(x64):
    """A ridge Hessian XᵀX + I with 300 features and 200 examples (κ ≈ 4e4, eigenvalue 1 with multiplicity 100),
    Lanczos for 185 steps (near the 201-dimensional Krylov space): with one Gram-Schmidt pass unless the first
    left < 1/4 of the vector, λmax came out 10% high and λmin = -1e-12; both must match eigh."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 300)) * np.geomspace(1.0, 10.0, 300)
    matrix = x.T @ x + np.eye(300)
    exact = np.linalg.eigvalsh(matrix)
    op = curvature.linear_operator(lambda v: jnp.asarray(matrix) @ v, jnp.zeros(300))
    for steps in (160, 185):
        result = curvature.lanczos(op, jax.random.PRNGKey(0), steps, k=1, progress=False)
        assert float(result.top_eigenvalues[0]) == pytest.approx(exact[-1], rel=1e-10)
        assert float(result.bottom_eigenvalues[0]) == pytest.approx(exact[0], rel=1e-8)
