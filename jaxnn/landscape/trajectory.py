"""Training trajectories in a plane: PCA directions of saved checkpoints, and projection onto a plane.

Li et al. (2018, §7): stack ``θ_i − θ_final`` for the saved checkpoints and take its principal components; the
loss surface in the plane of the first two shows the path that optimisation took, overlaid as the projected
trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxnn.validation import check_direction, check_int, check_like, check_params


def _flat_trajectory(trajectory: Sequence[Any], reference: Any, name: str) -> np.ndarray:
    if isinstance(trajectory, (str, bytes, Mapping, np.ndarray, jax.Array)) or not hasattr(trajectory, "__iter__"):
        raise TypeError(f"{name}: expected a sequence of parameter pytrees, got {type(trajectory).__name__}")
    trajectory = list(trajectory)
    if not trajectory:
        raise ValueError(f"{name}: expected at least one checkpoint, got an empty sequence")
    rows = []
    for index, point in enumerate(trajectory):
        point = check_like(point, f"{name}[{index}]", reference=reference, reference_name="the reference params")
        flat = np.asarray(ravel_pytree(point)[0], dtype=np.float64)
        if not np.all(np.isfinite(flat)):
            bad = np.count_nonzero(~np.isfinite(flat))
            raise ValueError(f"{name}[{index}]: expected finite parameters, got {bad} NaN/inf")
        rows.append(flat)
    return np.stack(rows)


def trajectory_pca_directions(trajectory: Sequence[Any], final_params: Any, k: int = 2, *,
                              center: bool = True) -> tuple[list[Any], np.ndarray]:
    """The first ``k`` principal directions of ``M = [θ_i − θ_final]_i`` and their explained-variance ratios.

    ``center=True`` is PCA as the reference tool computes it (scikit-learn's, rows centred): the right singular
    vectors of ``M − mean(M)``; ``center=False`` takes those of ``M`` itself. Directions are unit vectors (pytrees
    like ``final_params``); the explained-variance ratio of component i is ``σ_i² / Σ_j σ_j²``.
    Cost: one SVD of the ``(num_checkpoints, num_params)`` matrix in float64.
    """
    final_params = check_params(final_params, "final_params", allow_complex=False)
    k = check_int(k, "k", allow_bool=False)
    flat_final, unravel = ravel_pytree(final_params)
    matrix = _flat_trajectory(trajectory, final_params, "trajectory") - np.asarray(flat_final, dtype=np.float64)
    limit = min(matrix.shape[0] - (1 if center else 0), matrix.shape[1])
    if k > limit:
        raise ValueError(
            f"k: expected at most {limit} for a trajectory of {matrix.shape[0]} checkpoints and {matrix.shape[1]} "
            f"parameters{' (centred PCA loses one dimension)' if center else ''}, got {k}"
        )
    spread = matrix - matrix.mean(axis=0) if center else matrix
    if not np.any(spread):
        raise ValueError("trajectory: expected checkpoints that differ from final_params (and from each other), "
                         "got a trajectory with zero variance")
    _, singular_values, vt = np.linalg.svd(spread, full_matrices=False)
    components = vt[:k]
    energy = singular_values ** 2
    total_variance = float(energy.sum())
    ratio = energy[:k] / total_variance if total_variance > 0 else np.full(k, np.nan)
    if not total_variance > 0 or not np.all(np.isfinite(ratio)):
        raise ValueError("trajectory: expected checkpoints that differ from final_params (and from each other), "
                         "got a trajectory with zero variance")
    dtype = np.asarray(flat_final).dtype
    directions = [unravel(np.asarray(component, dtype=dtype)) for component in components]
    return directions, np.asarray(ratio, dtype=np.float64)


def project_trajectory(trajectory: Sequence[Any], origin_params: Any, d1: Any, d2: Any
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coordinates ``(α_i, β_i) = argmin ‖θ_i − θ₀ − α d₁ − β d₂‖`` of every checkpoint.

    Solved from the 2×2 Gram matrix in float64 (exact for orthogonal directions, where ``α = ⟨Δ, d₁⟩/‖d₁‖²``).
    Collinear directions are an error. Cost: one dot product per checkpoint and direction.
    """
    origin_params = check_params(origin_params, "origin_params", allow_complex=False)
    d1 = check_direction(d1, "d1", params=origin_params)
    d2 = check_direction(d2, "d2", params=origin_params)
    origin = np.asarray(ravel_pytree(origin_params)[0], dtype=np.float64)
    basis = np.stack([np.asarray(ravel_pytree(d)[0], dtype=np.float64) for d in (d1, d2)], axis=1)
    gram = basis.T @ basis
    cosine = gram[0, 1] / np.sqrt(gram[0, 0] * gram[1, 1])
    if not abs(cosine) < 1 - 1e-10:
        raise ValueError(f"d2: expected a direction not parallel to d1, got |cos(d1, d2)| = {abs(cosine):.12g}")
    deltas = _flat_trajectory(trajectory, origin_params, "trajectory") - origin
    coordinates = np.linalg.solve(gram, basis.T @ deltas.T)
    return coordinates[0], coordinates[1]


def trajectory_deviation(trajectory: Sequence[Any], origin_params: Any, d1: Any, d2: Any) -> np.ndarray:
    """Relative distance of every checkpoint from the plane: ``‖Δ_i − (α_i d₁ + β_i d₂)‖ / ‖Δ_i‖`` (0 if in-plane)."""
    alphas, betas = project_trajectory(trajectory, origin_params, d1, d2)
    origin = np.asarray(ravel_pytree(check_params(origin_params, "origin_params", allow_complex=False))[0],
                        dtype=np.float64)
    basis = np.stack([np.asarray(ravel_pytree(jax.tree.map(np.asarray, d))[0], dtype=np.float64) for d in (d1, d2)], 1)
    deltas = _flat_trajectory(trajectory, origin_params, "trajectory") - origin
    residual = deltas - (basis @ np.stack([alphas, betas])).T
    norms = np.linalg.norm(deltas, axis=1)
    return np.where(norms > 0, np.linalg.norm(residual, axis=1) / np.where(norms > 0, norms, 1), 0.0)
