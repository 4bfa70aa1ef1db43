"""Figures for curvature results (matplotlib, Agg canvas: no display and no global backend change)."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _floats(values: Any) -> np.ndarray:
    """A float array from a sequence that may hold None (how the JSON report stores non-finite numbers)."""
    return np.asarray([np.nan if value is None else value for value in np.ravel(np.asarray(values, dtype=object))], float)


def _new_figure(num_axes: int, width_per_axis: float = 5.0, height: float = 4.0):
    figure = Figure(figsize=(width_per_axis * num_axes, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(1, num_axes, i + 1) for i in range(num_axes)]
    return figure, axes


def draw_eigenvalues(ax, top: Sequence[float], bottom: Sequence[float], residuals_top=None, residuals_bottom=None):
    """Top-k (descending) and bottom-k (ascending) eigenvalues against their rank, on a symmetric-log axis."""
    top, bottom = _floats(top), _floats(bottom)
    ax.axhline(0.0, color="0.7", linewidth=0.8)
    ax.plot(np.arange(1, top.size + 1), top, "o-", color="C3", label="top-k (λ₁ ≥ λ₂ ≥ …)")
    ax.plot(np.arange(1, bottom.size + 1), bottom, "s-", color="C0", label="bottom-k (λ_n ≤ λ_{n−1} ≤ …)")
    if residuals_top is not None:
        ax.errorbar(np.arange(1, top.size + 1), top, yerr=_floats(residuals_top), fmt="none", ecolor="C3")
    if residuals_bottom is not None:
        ax.errorbar(
            np.arange(1, bottom.size + 1), bottom, yerr=_floats(residuals_bottom), fmt="none", ecolor="C0"
        )
    finite = np.abs(np.concatenate([top, bottom]))
    finite = finite[np.isfinite(finite)]
    scale = finite.max() if finite.size and finite.max() > 0 else 1.0
    ax.set_yscale("symlog", linthresh=max(scale * 1e-4, np.finfo(float).tiny))
    ax.set_xlabel("rank from the end of the spectrum")
    ax.set_ylabel("eigenvalue")
    ax.set_title("extreme eigenvalues (Lanczos)")
    ax.legend(loc="best", fontsize="small")


def draw_spectral_density(ax, grid: Sequence[float], density: Sequence[float], *, log_scale: bool = True, sigma=None):
    """The SLQ density φ(t) on its grid (log scale by default: the bulk near 0 dwarfs the outliers)."""
    grid, density = _floats(grid), _floats(density)
    if log_scale:
        peak = np.nanmax(density) if np.any(np.isfinite(density)) else 1.0
        floor = max(peak * 1e-12, np.finfo(float).tiny)
        ax.semilogy(grid, np.maximum(density, floor), color="C2")
    else:
        ax.plot(grid, density, color="C2")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    title = "spectral density (SLQ)"
    if sigma is not None:
        title += f", σ = {sigma:.3g}"
    ax.set_title(title)


def plot_spectral_density(density: Any, path: str | os.PathLike, *, log_scale: bool = True) -> str:
    """Write a PNG of a :class:`~jaxnn.curvature.density.SpectralDensity` (or anything with .grid/.density)."""
    figure, (ax,) = _new_figure(1)
    draw_spectral_density(ax, density.grid, density.density, log_scale=log_scale, sigma=getattr(density, "sigma", None))
    figure.savefig(path, dpi=120)
    return os.fspath(path)


def plot_spectrum(report: dict, path: str | os.PathLike) -> str:
    """Write the curvature report's figure: extreme eigenvalues, plus the SLQ density when the report has one."""
    eigen = report["eigenvalues"]
    density = report.get("density")
    figure, axes = _new_figure(2 if density else 1)
    draw_eigenvalues(axes[0], eigen["top"], eigen["bottom"], eigen.get("top_residuals"), eigen.get("bottom_residuals"))
    if density:
        draw_spectral_density(axes[1], density["grid"], density["density"], sigma=density.get("sigma"))
    figure.savefig(path, dpi=120)
    return os.fspath(path)
