"""Trace (Hutchinson, Hutch++), diagonal and SLQ spectral density against exact values."""

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
    flat,
    image_data,
    matrix_with_spectrum,
    mlp_loss,
    mlp_params,
    quadratic,
)

KEY = jax.random.key(42)


@pytest.mark.parametrize(
    "loss_fn, make_params, make_data",
    [(mlp_loss, mlp_params, classification_data), (cnn_loss, cnn_params, image_data)],
    ids=["mlp", "cnn"],
)
def test_hutchinson_trace_within_three_standard_errors(x64, loss_fn, make_params, make_data):
    params, batch = make_params(0), make_data(1)
    exact = np.trace(dense_hessian_of(loss_fn, params, batch))
    op = curvature.hessian(loss_fn, params, batch)
    methods = ("hutchinson", "hutch++") if loss_fn is mlp_loss else ("hutchinson",)
    for method in methods:
        estimate = curvature.trace(op, KEY, 60, method, progress=False)
        assert estimate.num_matvecs == 60 and estimate.method == method
        assert 0 < estimate.standard_error
        assert abs(estimate.estimate - exact) <= 3 * estimate.standard_error, (method, estimate, exact)


def test_hutch_plus_plus_beats_hutchinson_on_a_low_rank_dominated_matrix(x64):
    rng = np.random.default_rng(0)
    spectrum = np.concatenate([[100.0, 80.0, 60.0, 50.0, 40.0, 30.0], 0.1 * rng.uniform(-1, 1, 194)])
    op = curvature.hessian(quadratic(matrix_with_spectrum(spectrum, seed=1)), jnp.zeros(200), None)
    plain = curvature.trace(op, KEY, 30, "hutchinson", progress=False)
    sketched = curvature.trace(op, KEY, 30, "hutch++", progress=False)
    exact = spectrum.sum()
    assert abs(sketched.estimate - exact) <= 3 * sketched.standard_error
    assert abs(plain.estimate - exact) <= 3 * plain.standard_error
    assert sketched.standard_error < plain.standard_error / 10


def test_trace_of_diagonal_matrix_is_exact_for_hutchinson(x64):
    """For diagonal M, zᵀMz = Σ M_ii z_i² = tr(M) for every Rademacher z: zero variance."""
    diagonal = np.arange(1.0, 11.0)
    op = curvature.linear_operator(lambda v: jnp.asarray(diagonal) * v, jnp.zeros(10))
    estimate = curvature.trace(op, KEY, 8, progress=False)
    assert estimate.estimate == pytest.approx(55.0, abs=1e-12) and estimate.standard_error < 1e-12
    diag = curvature.hessian_diagonal(op, KEY, 8, progress=False)
    np.testing.assert_allclose(np.asarray(diag.diagonal), diagonal, atol=1e-12)


def test_hessian_diagonal_exact_and_estimated(x64):
    params, batch = mlp_params(0), classification_data(1)
    exact = np.diag(dense_hessian_of(mlp_loss, params, batch))
    op = curvature.hessian(mlp_loss, params, batch)
    result = curvature.hessian_diagonal(op, method="exact", chunk_size=50, progress=False)  # 123 = 50+50+23 (padded)
    assert result.num_matvecs == op.num_params
    np.testing.assert_allclose(flat(result.diagonal), exact, atol=1e-13)
    estimate = curvature.hessian_diagonal(op, KEY, 400, progress=False)
    errors = np.abs(flat(estimate.diagonal) - exact) / flat(estimate.standard_error)
    assert np.mean(errors <= 3) > 0.97  # per-entry 3-standard-error coverage
    with pytest.raises(ValueError, match="expected at most max_params=100 parameters, got 123"):
        curvature.hessian_diagonal(op, method="exact", max_params=100)


def test_slq_quadrature_is_exact_for_low_moments_and_density_moments_match(x64):
    rng = np.random.default_rng(3)
    spectrum = np.concatenate([rng.normal(0, 0.3, 140), [-2.0, 4.0, 5.0]])
    matrix = matrix_with_spectrum(spectrum, seed=2)
    op = curvature.hessian(quadratic(matrix), jnp.zeros(spectrum.size), None)
    density = curvature.spectral_density(op, KEY, num_probes=6, num_iters=25, grid=4000, progress=False)
    assert density.nodes.shape == (6, 25) and density.num_matvecs == 150
    np.testing.assert_allclose(density.weights.sum(axis=1), 1.0, atol=1e-12)

    # Per probe, Σ_j τ_j θ_j^p = (1/n) zᵀ A^p z for p <= 2m − 1; averaged over probes it estimates (1/n) tr(A^p).
    n = spectrum.size
    for power in (1, 2, 3, 4):
        per_probe = np.sum(density.weights * density.nodes**power, axis=1)
        exact = np.mean(spectrum**power)
        standard_error = per_probe.std(ddof=1) / np.sqrt(per_probe.size)
        assert abs(per_probe.mean() - exact) <= 3 * standard_error + 1e-12, (power, per_probe.mean(), exact)

    # The broadened density integrates to 1 and keeps the nodes' mean; its variance grows by σ².
    grid, phi = density.grid, density.density
    node_mean = np.sum(density.weights * density.nodes) / 6
    node_second = np.sum(density.weights * density.nodes**2) / 6
    assert np.trapezoid(phi, grid) == pytest.approx(1.0, abs=1e-6)
    assert np.trapezoid(grid * phi, grid) == pytest.approx(node_mean, abs=1e-6)
    assert np.trapezoid(grid**2 * phi, grid) == pytest.approx(node_second + density.sigma**2, abs=1e-6)
    # Outliers are resolved as nodes of (nearly) their own.
    assert np.isclose(density.nodes.max(), 5.0, atol=1e-8) and np.isclose(density.nodes.min(), -2.0, atol=1e-8)


def test_slq_gauss_quadrature_with_an_explicit_probe(x64):
    """With a given probe z and m steps: Σ τ_j θ_j^p = zᵀA^p z / zᵀz exactly for p <= 2m − 1."""
    spectrum = np.linspace(-1.0, 2.0, 40)
    matrix = matrix_with_spectrum(spectrum, seed=6)
    op = curvature.hessian(quadratic(matrix), jnp.zeros(40), None)
    probe = np.random.default_rng(1).choice([-1.0, 1.0], size=(1, 40))
    density = curvature.spectral_density(op, KEY, num_iters=6, probes=probe, progress=False)
    z = probe[0]
    for power in range(0, 12):
        expected = z @ np.linalg.matrix_power(matrix, power) @ z / (z @ z)
        assert np.sum(density.weights[0] * density.nodes[0] ** power) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_slq_on_mlp_matches_exact_spectrum_moments(x64):
    params, batch = mlp_params(0), classification_data(1)
    exact = np.linalg.eigvalsh(dense_hessian_of(mlp_loss, params, batch))
    op = curvature.hessian(mlp_loss, params, batch)
    density = curvature.spectral_density(op, KEY, num_probes=8, num_iters=30, progress=False)
    for power in (1, 2):
        per_probe = np.sum(density.weights * density.nodes**power, axis=1)
        standard_error = per_probe.std(ddof=1) / np.sqrt(per_probe.size)
        assert abs(per_probe.mean() - np.mean(exact**power)) <= 3 * standard_error
    assert density.nodes.max() == pytest.approx(exact.max(), rel=1e-8)  # extreme Ritz value converges first


def test_density_plot_and_invalid_arguments(tmp_path):
    op = curvature.hessian(quadratic(np.diag(np.linspace(-1.0, 1.0, 20))), jnp.zeros(20), None)
    density = curvature.spectral_density(op, KEY, num_probes=2, num_iters=10, progress=False)
    path = curvature.plot_spectral_density(density, tmp_path / "density.png")
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="sigma: expected a finite number > 0, got 0.0"):
        curvature.spectral_density(op, KEY, sigma=0.0, progress=False)
    with pytest.raises(ValueError, match="grid: expected an int or a finite 1-D array"):
        curvature.spectral_density(op, KEY, 1, 5, grid=np.array([[0.0, 1.0]]), progress=False)
    with pytest.raises(ValueError, match=r"probes: leaf <root> expected shape \(block,\) \+ \(20,\) "
                                         r"\(that of params with a leading block axis\), got \(20,\)"):
        curvature.spectral_density(op, KEY, probes=np.ones(20), progress=False)
    with pytest.raises(ValueError, match="num_samples: expected an integer >= 4, got 3"):
        curvature.trace(op, KEY, 3, "hutch++", progress=False)
    with pytest.raises(ValueError, match=r"method: expected one of \['hutchinson', 'hutch\+\+'\], got 'xtrace'"):
        curvature.trace(op, KEY, 10, "xtrace", progress=False)
