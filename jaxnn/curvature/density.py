"""Spectral density by stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019; Lin, Saad & Yang 2016).

For a unit probe v, m Lanczos steps give T = QᵀMQ with eigenpairs (θ_j, s_j); the Gauss quadrature
vᵀ f(M) v ≈ Σ_j τ_j f(θ_j), τ_j = (s_j)₁², is exact for polynomials of degree ≤ 2m−1. With Rademacher probes
v = z/√n, E[vᵀ f(M) v] = (1/n) Σ_i f(λ_i), so averaging over probes estimates the normalised spectral measure
(1/n) Σ_i δ(t − λ_i); replacing each node by a Gaussian of width σ gives a smooth density on a grid:
φ(t) = (1/P) Σ_p Σ_j τ_pj N(t; θ_pj, σ²).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxnn.curvature.krylov import flat_vector, run_lanczos
from jaxnn.curvature.operators import CurvatureOperator, require_operator
from jaxnn.runtime import quick_jit
from jaxnn.validation import check_int, check_key, check_like, check_positive_float


class SpectralDensity(NamedTuple):
    grid: np.ndarray  # (G,)
    density: np.ndarray  # (G,), integrates to ≈ 1 over the grid
    nodes: np.ndarray  # (num_probes, m) Ritz values θ
    weights: np.ndarray  # (num_probes, m) quadrature weights τ, each row sums to 1
    sigma: float
    num_matvecs: int


def _quadrature(analysis) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature of a Lanczos run started at the (unit) probe: nodes θ_j (Ritz values, ascending) and
    weights τ_j = (first coordinate of Ritz vector j)²."""
    values, valid, first = jax.device_get((analysis.values, analysis.valid, analysis.coordinates[0]))
    index = np.flatnonzero(valid)
    index = index[np.argsort(values[index], kind="stable")]
    return np.asarray(values[index]), np.asarray(first[index]) ** 2


@quick_jit(static_argnames=("num_params", "dtype"))
def _rademacher(key, num_params, dtype):
    return jax.random.rademacher(key, (num_params,), dtype=dtype)


def gaussian_broadening(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """φ(t) = (1/P) Σ_p Σ_j τ_pj exp(−(t−θ_pj)²/2σ²)/(σ√2π) evaluated on ``grid``."""
    nodes = np.asarray(nodes, dtype=np.float64).reshape(-1)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1) / np.asarray(weights).shape[0]
    grid = np.asarray(grid, dtype=np.float64)
    kernel = np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return kernel @ weights


def spectral_density(
    op: CurvatureOperator,
    key: Any,
    num_probes: int = 4,
    num_iters: int = 80,
    grid: int | np.ndarray = 1000,
    sigma: float | None = None,
    *,
    probes: Any = None,
    progress: bool = True,
    like: Any = None,
) -> SpectralDensity:
    """SLQ estimate of the eigenvalue density of ``op``: nodes/weights per probe and the Gaussian-broadened density.

    ``grid``: a number of points (spanning the nodes ± 5σ) or explicit grid points. ``sigma`` (default 1% of the
    node range) is the broadening width. ``num_iters`` is capped at the parameter count. ``probes``: optional
    probe vectors (pytree like params with a leading probe axis; they are normalised), replacing ``num_probes``
    Rademacher probes drawn from ``key``. Cost: num_probes · num_iters products.
    """
    op = require_operator(op, like=like)
    key = check_key(key)
    num_probes = check_int(num_probes, "num_probes")
    num_iters = min(check_int(num_iters, "num_iters"), op.num_params)
    if sigma is not None:
        sigma = check_positive_float(sigma, "sigma")
    dtype = jnp.dtype(op.dtype).name
    if probes is not None:
        probes = check_like(probes, "probes", reference=op.params, leading_axis=True)
        num_probes = jax.tree.leaves(probes)[0].shape[0]
    nodes, weights = [], []
    for probe in tqdm(range(num_probes), desc="spectral density (SLQ)", unit="probe", disable=not progress, leave=False):
        probe_key, lanczos_key = jax.random.split(jax.random.fold_in(key, probe))
        if probes is None:
            start = _rademacher(probe_key, num_params=op.num_params, dtype=dtype)
        else:
            start = flat_vector(jax.tree.map(lambda leaf: leaf[probe], probes))
        _, analysis = run_lanczos(op, lanczos_key, num_iters, 1, start, False, "spectral_density")
        values, quadrature_weights = _quadrature(analysis)
        nodes.append(values)
        weights.append(quadrature_weights)
    nodes, weights = np.stack(nodes), np.stack(weights)
    low, high = float(nodes.min()), float(nodes.max())
    if sigma is None:
        scale = high - low if high > low else max(abs(high), 1.0)
        sigma = 0.01 * scale
    if isinstance(grid, (int, np.integer)):
        num_points = check_int(grid, "grid", minimum=2)
        grid = np.linspace(low - 5 * sigma, high + 5 * sigma, num_points)
    else:
        grid = np.asarray(grid, dtype=np.float64)
        if grid.ndim != 1 or grid.size < 2 or not np.all(np.isfinite(grid)):
            raise ValueError(f"grid: expected an int or a finite 1-D array of >= 2 points, got shape {grid.shape}")
    density = gaussian_broadening(nodes, weights, grid, sigma)
    return SpectralDensity(grid, density, nodes, weights, float(sigma), num_probes * num_iters)
