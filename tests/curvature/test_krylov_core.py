"""The pure Krylov core: ``lanczos_decomposition`` on plain matvecs, vmapped over a batch of matrices, against
numpy's eigh (float64); the residual bounds it reports are honest (an eigenvalue lies within each Ritz value's
bound, a theorem for symmetric matrices); the adaptive driver runs the same iteration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn import curvature
from jaxnn.curvature.krylov import lanczos_decomposition, ritz_values


def symmetric_matrices(count, n, seed=0):
    """``count`` symmetric n×n matrices with spread-out spectra (a few outliers over a bulk, some negative)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        spectrum = np.concatenate([[40.0, 25.0, 12.0], rng.normal(size=n - 4), [-8.0]]) * rng.uniform(0.5, 2)
        out.append((q * spectrum) @ q.T)
    return np.stack(out)


def test_vmapped_over_matrices_a_full_krylov_space_is_the_spectrum(x64):
    matrices = jnp.asarray(symmetric_matrices(3, 24))
    starts = jax.random.normal(jax.random.PRNGKey(0), (3, 24), jnp.float64)

    def spectrum(matrix, start):
        return ritz_values(lanczos_decomposition(lambda v: matrix @ v, start, 24))

    values, bounds = jax.jit(jax.vmap(spectrum))(matrices, starts)
    assert values.shape == bounds.shape == (3, 24)
    for index in range(3):
        np.testing.assert_allclose(values[index], np.linalg.eigvalsh(matrices[index]), atol=1e-10)
    np.testing.assert_array_equal(bounds, 0)  # the basis spans the space: the Ritz pairs are exact


@pytest.mark.parametrize("num_iters", [5, 10, 16])
def test_residual_bounds_are_honest(x64, num_iters):
    """After fewer iterations than the dimension, every Ritz value θ has an eigenvalue within its bound β|s_last|
    (for symmetric M, min_i |λ_i − θ| ≤ ‖M y − θ y‖); converged values (small bounds) are eigenvalues, unconverged
    ones are not claimed to be. The bound equals the computed residual of the Ritz vector."""
    matrix = jnp.asarray(symmetric_matrices(1, 60, seed=1)[0])
    exact = np.linalg.eigvalsh(matrix)
    start = jax.random.normal(jax.random.PRNGKey(1), (60,), jnp.float64)
    state = lanczos_decomposition(lambda v: matrix @ v, start, num_iters)
    values, bounds = (np.asarray(a) for a in ritz_values(state))
    assert values.shape == (num_iters,)
    distance = np.min(np.abs(exact[None, :] - values[:, None]), axis=1)
    assert np.all(distance <= bounds * (1 + 1e-8) + 1e-10)
    # the bound is the residual of the Ritz vector Qs (computed here from the basis, numpy)
    from jaxnn.curvature.krylov import _analyze

    analysis = _analyze(state, 60, 1)
    basis = np.asarray(state.basis[:num_iters])
    coordinates = np.asarray(analysis.coordinates)[:num_iters, :num_iters]
    vectors = coordinates.T @ basis
    residuals = np.linalg.norm(vectors @ np.asarray(matrix) - values[:, None] * vectors, axis=1)
    np.testing.assert_allclose(bounds, residuals, rtol=1e-6, atol=1e-10)
    assert bounds[-1] < 1e-3 * abs(values[-1]) or num_iters < 10  # λmax (40 × scale, an outlier) converges first


def test_block_start_finds_a_double_eigenvalue_and_nonfinite_products_are_recorded(x64):
    """A double eigenvalue 10 over a bulk in (0, 1]: a block of 2 finds it twice; one start vector can only find it
    once (its Krylov space holds one vector of the eigenspace)."""
    spectrum = jnp.concatenate([jnp.asarray([10.0, 10.0]), jnp.linspace(0.05, 1.0, 18)])
    q = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(2), (20, 20), jnp.float64))[0]
    matrix = (q * spectrum) @ q.T
    block = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(3), (20, 2), jnp.float64))[0].T
    values, bounds = ritz_values(lanczos_decomposition(lambda v: matrix @ v, block, 5))
    assert values.shape == (10,)
    np.testing.assert_allclose(np.asarray(values)[-2:], [10.0, 10.0], rtol=1e-8)
    assert np.all(np.asarray(bounds)[-2:] < 1e-4)  # the values are accurate to ~bound²/gap
    single, _ = ritz_values(lanczos_decomposition(lambda v: matrix @ v, block[0], 10))
    assert abs(float(single[-1]) - 10) < 1e-8 and float(single[-2]) < 1.0 + 1e-8
    broken = lanczos_decomposition(lambda v: jnp.where(v[0] > -10, jnp.nan, 1.0) * v, jnp.ones(8), 4)
    assert int(broken.nonfinite_step) == 0


def test_the_adaptive_driver_runs_the_same_iteration(x64):
    """curvature.lanczos (the host driver) from a given start vector, all iterations, gives the core's Ritz values
    and bounds; its result carries the bound of every Ritz value."""
    matrix = jnp.asarray(symmetric_matrices(1, 40, seed=2)[0])
    start = jax.random.normal(jax.random.PRNGKey(4), (40,), jnp.float64)
    values, bounds = ritz_values(lanczos_decomposition(lambda v: matrix @ v, start, 12))
    op = curvature.linear_operator(lambda v: matrix @ v, jnp.zeros(40, jnp.float64))
    result = curvature.lanczos(op, jax.random.key(0), 12, start=start, progress=False)
    np.testing.assert_allclose(np.asarray(result.ritz_values), np.asarray(values), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(result.ritz_residual_bounds), np.asarray(bounds), rtol=1e-8, atol=1e-12)


def test_every_estimator_accepts_a_plain_matvec(x64):
    """A callable with like= goes where an operator goes: top/bottom eigenvalues, trace, density, power iteration
    and the condition number of a known matrix (numpy's eigh and trace); a matvec without like= and like= with an
    operator are refused by name."""
    matrix = jnp.asarray(symmetric_matrices(1, 30, seed=3)[0])
    exact = np.linalg.eigvalsh(matrix)
    matvec, like = (lambda v: matrix @ v), jnp.zeros(30, jnp.float64)
    top = curvature.top_eigenvalues(matvec, k=2, like=like, num_iters=30, tol=None, progress=False)
    np.testing.assert_allclose(np.asarray(top.values), exact[::-1][:2], rtol=1e-10)
    bottom = curvature.bottom_eigenvalues(matvec, like=like, num_iters=30, tol=None, progress=False)
    np.testing.assert_allclose(np.asarray(bottom.values), exact[:1], rtol=1e-10)
    estimate = curvature.trace(matvec, jax.random.key(0), num_samples=60, method="hutch++", like=like,
                               progress=False)
    assert abs(estimate.estimate - np.trace(np.asarray(matrix))) < 4 * estimate.standard_error + 1e-8
    power = curvature.power_iteration(matvec, jax.random.key(1), 2000, 1e-10, like=like, progress=False)
    assert abs(float(power.eigenvalues[0]) - exact[np.argmax(np.abs(exact))]) < 1e-6 * np.abs(exact).max()
    density = curvature.spectral_density(matvec, jax.random.key(2), num_probes=2, num_iters=30, like=like,
                                         progress=False)
    assert density.nodes.max() == pytest.approx(exact.max(), rel=1e-8)
    with pytest.raises(TypeError, match="a plain matvec needs like="):
        curvature.top_eigenvalues(matvec)
    op = curvature.linear_operator(matvec, like)
    with pytest.raises(ValueError, match="like= is for a plain matvec"):
        curvature.top_eigenvalues(op, like=like)
