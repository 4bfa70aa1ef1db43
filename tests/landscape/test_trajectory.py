"""Trajectory PCA recovers a known plane; projection equals least squares (numpy.linalg.lstsq); bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxnn.landscape import project_trajectory, trajectory_deviation, trajectory_pca_directions


def _template():
    return {"conv": {"kernel": jnp.zeros((2, 2, 1, 3))}, "dense": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)}}


def _in_plane_trajectory(num=12, seed=0):
    """θ_i = θ_final + a_i u + b_i v with orthonormal u, v (23 parameters); a, b along a curved path."""
    rng = np.random.default_rng(seed)
    flat_template, unravel = ravel_pytree(_template())
    size = flat_template.size
    basis, _ = np.linalg.qr(rng.normal(size=(size, 2)))
    final = rng.normal(size=size)
    t = np.linspace(0, 1, num)
    a, b = 3.0 * (1 - t), 1.5 * np.sin(3 * t) * (1 - t)
    trajectory = [unravel(jnp.asarray(final + ai * basis[:, 0] + bi * basis[:, 1])) for ai, bi in zip(a, b)]
    return trajectory, unravel(jnp.asarray(final)), basis, unravel


def _principal_angles(a, b):
    qa, _ = np.linalg.qr(a)
    qb, _ = np.linalg.qr(b)
    return np.arccos(np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), -1, 1))


@pytest.mark.parametrize("center", [True, False])
def test_pca_recovers_the_plane_of_an_in_plane_trajectory(x64, center):
    trajectory, final, basis, _ = _in_plane_trajectory()
    directions, ratio = trajectory_pca_directions(trajectory, final, k=2, center=center)
    assert ratio.shape == (2,) and ratio.sum() > 0.999
    assert ratio[0] >= ratio[1]
    recovered = np.stack([np.asarray(ravel_pytree(d)[0]) for d in directions], axis=1)
    np.testing.assert_allclose(np.linalg.norm(recovered, axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(recovered[:, 0] @ recovered[:, 1], 0.0, atol=1e-12)
    np.testing.assert_allclose(_principal_angles(recovered, basis), 0.0, atol=1e-6)
    assert jax.tree.structure(directions[0]) == jax.tree.structure(final)
    # the trajectory lies in the recovered plane: zero residual
    np.testing.assert_allclose(trajectory_deviation(trajectory, final, *directions), 0.0, atol=1e-10)


def test_pca_of_noisy_trajectory_reports_explained_variance_like_sklearn_definition(x64):
    trajectory, final, basis, unravel = _in_plane_trajectory(num=30)
    rng = np.random.default_rng(3)
    noisy = [unravel(ravel_pytree(p)[0] + 0.05 * rng.normal(size=basis.shape[0])) for p in trajectory]
    _, ratio = trajectory_pca_directions(noisy, final, k=2)
    matrix = np.stack([np.asarray(ravel_pytree(p)[0] - ravel_pytree(final)[0]) for p in noisy])
    singular = np.linalg.svd(matrix - matrix.mean(axis=0), compute_uv=False)  # oracle: centred SVD energies
    np.testing.assert_allclose(ratio, singular[:2] ** 2 / np.sum(singular**2), rtol=1e-10)
    assert 0.9 < ratio.sum() < 0.9999


def test_projection_is_exact_for_orthogonal_directions_and_least_squares_otherwise(x64):
    trajectory, final, basis, unravel = _in_plane_trajectory()
    t = np.linspace(0, 1, 12)
    d1, d2 = unravel(jnp.asarray(basis[:, 0])), unravel(jnp.asarray(basis[:, 1]))
    alphas, betas = project_trajectory(trajectory, final, d1, d2)
    np.testing.assert_allclose(alphas, 3.0 * (1 - t), atol=1e-12)
    np.testing.assert_allclose(betas, 1.5 * np.sin(3 * t) * (1 - t), atol=1e-12)
    # skewed, unnormalised directions and off-plane points: compare with numpy's least squares
    rng = np.random.default_rng(1)
    skew = np.stack([2.0 * basis[:, 0] + 0.5 * rng.normal(size=basis.shape[0]), basis[:, 0] + basis[:, 1]], axis=1)
    off_plane = [unravel(ravel_pytree(p)[0] + 0.3 * rng.normal(size=basis.shape[0])) for p in trajectory]
    alphas, betas = project_trajectory(off_plane, final, unravel(jnp.asarray(skew[:, 0])), unravel(jnp.asarray(skew[:, 1])))
    deltas = np.stack([np.asarray(ravel_pytree(p)[0] - ravel_pytree(final)[0]) for p in off_plane])
    expected, *_ = np.linalg.lstsq(skew, deltas.T, rcond=None)
    np.testing.assert_allclose(alphas, expected[0], rtol=1e-10)
    np.testing.assert_allclose(betas, expected[1], rtol=1e-10)


def test_bad_input():
    trajectory, final, basis, unravel = _in_plane_trajectory()
    d1 = unravel(jnp.asarray(basis[:, 0]))
    with pytest.raises(ValueError, match="d2: expected a direction not parallel to d1"):
        project_trajectory(trajectory, final, d1, jax.tree.map(lambda v: -2.0 * v, d1))
    with pytest.raises(ValueError, match="d2: expected a non-zero direction"):
        project_trajectory(trajectory, final, d1, jax.tree.map(jnp.zeros_like, d1))
    with pytest.raises(ValueError, match="trajectory: expected at least one checkpoint"):
        trajectory_pca_directions([], final)
    with pytest.raises(TypeError, match="trajectory: expected a sequence of parameter pytrees"):
        trajectory_pca_directions(final, final)  # one pytree, not a list of them
    broken = list(trajectory)
    broken[3] = {"dense": final["dense"], "conv": {"kernel": jnp.zeros((2, 2, 1, 4))}}
    with pytest.raises(ValueError, match=r"trajectory\[3\]: leaf \['conv'\]\['kernel'\] expected shape \(2, 2, 1, 3\) "
                                         r"\(that of the reference params\), got \(2, 2, 1, 4\)"):
        trajectory_pca_directions(broken, final)
    broken[3] = jax.tree.map(lambda v: v * jnp.nan, final)
    with pytest.raises(ValueError, match=r"trajectory\[3\]: expected finite parameters"):
        project_trajectory(broken, final, d1, unravel(jnp.asarray(basis[:, 1])))
    with pytest.raises(ValueError, match="k: expected at most 2 for a trajectory of 3 checkpoints"):
        trajectory_pca_directions(trajectory[:3], final, k=3)
    with pytest.raises(ValueError, match="trajectory: expected checkpoints that differ from final_params"):
        trajectory_pca_directions([final, final, final], final, k=1)
