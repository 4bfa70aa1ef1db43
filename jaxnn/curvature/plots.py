"""Figures for curvature results (matplotlib, Agg canvas: no display and no global backend change)."""

from __future__ import annotations

import os
from typing import Any, Sequence

import matplotlib
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


def draw_eigenvalues(ax, top: Sequence[float], bottom: Sequence[float], residuals_top=None, residuals_bottom=None,
                     converged_top=None, converged_bottom=None):
    """Top-k (descending) and bottom-k (ascending) eigenvalues against their rank, on a symmetric-log axis, with their
    residuals as error bars; unconverged values (``converged_*`` False) are drawn hollow and named in the legend."""
    top, bottom = _floats(top), _floats(bottom)
    ax.axhline(0.0, color="0.7", linewidth=0.8)
    ax.plot(np.arange(1, top.size + 1), top, "o-", color="C3", label="top-k (λ₁ ≥ λ₂ ≥ …)")
    ax.plot(np.arange(1, bottom.size + 1), bottom, "s-", color="C0", label="bottom-k (λ_n ≤ λ_{n−1} ≤ …)")
    hollow = False
    for values, flags, marker in ((top, converged_top, "o"), (bottom, converged_bottom, "s")):
        if flags is None:
            continue
        loose = ~np.asarray(flags, bool)
        if loose.any():
            hollow = True
            ax.plot(np.arange(1, values.size + 1)[loose], values[loose], marker, markersize=11, markerfacecolor="white",
                    markeredgecolor="k", linestyle="none")
    if hollow:
        ax.plot([], [], "o", markerfacecolor="white", markeredgecolor="k", label="not converged (residual > tol·|λ|)")
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
    draw_eigenvalues(axes[0], eigen["top"], eigen["bottom"], eigen.get("top_residuals"), eigen.get("bottom_residuals"),
                     eigen.get("top_converged"), eigen.get("bottom_converged"))
    if density:
        draw_spectral_density(axes[1], density["grid"], density["density"], sigma=density.get("sigma"))
    figure.savefig(path, dpi=120)
    return os.fspath(path)


MAX_LABELLED_BLOCKS = 12


def plot_blocks(blocks: dict, path: str | os.PathLike) -> str:
    """Write the per-block figure of a curvature report's ``"blocks"`` section: each block's SLQ density (Gaussian
    broadening of its probes' nodes and weights, log scale) on one axis, its top eigenvalue marked (hollow when not
    converged), and a bar chart of the blocks' λmax and traces."""
    from jaxnn.curvature.density import gaussian_broadening

    names = list(blocks)
    many = len(names) > MAX_LABELLED_BLOCKS  # then colours follow layer order and only the sharpest are named
    figure = Figure(figsize=(6.0 + max(6.0, 0.22 * len(names)), 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    density_ax, bars_ax = figure.subplots(1, 2, width_ratios=[6.0, max(6.0, 0.22 * len(names))])
    nodes_all = np.concatenate([_floats(row) for name in names for row in blocks[name]["nodes"]])
    low, high = np.nanmin(nodes_all), np.nanmax(nodes_all)
    sigma = 0.01 * (high - low if high > low else max(abs(high), 1.0))
    grid = np.linspace(low - 5 * sigma, high + 5 * sigma, 600)
    lambda_max = [_floats(blocks[name]["top"])[0] for name in names]
    named = set(np.argsort(lambda_max)[::-1][:MAX_LABELLED_BLOCKS // 2]) if many else set(range(len(names)))
    for index, name in enumerate(names):
        entry = blocks[name]
        nodes = np.stack([_floats(row) for row in entry["nodes"]])
        weights = np.stack([_floats(row) for row in entry["weights"]])
        density = gaussian_broadening(nodes, weights, grid, sigma)
        color = matplotlib.colormaps["viridis"](index / max(len(names) - 1, 1)) if many else f"C{index % 10}"
        density_ax.semilogy(grid, np.maximum(density, density.max() * 1e-8), color=color, linewidth=1,
                            label=f"{name} ({entry['num_params']:,} params)" if index in named else None)
        top, converged = _floats(entry["top"])[0], bool(entry["converged"][0])
        density_ax.axvline(top, color=color, linestyle="-" if converged else ":", linewidth=0.8)
    density_ax.set_xlabel("eigenvalue of the layer's Hessian block")
    density_ax.set_ylabel("density (SLQ, per block)")
    density_ax.set_title(f"density per layer (σ = {sigma:.3g}); lines: λmax, dotted if not converged"
                         + ("\ncolour: layer order (viridis, first to last); named: the sharpest" if many else ""),
                         fontsize="medium")
    density_ax.legend(fontsize="x-small" if many else "small")
    positions = np.arange(len(names))
    traces = [_floats([blocks[name]["trace"]])[0] for name in names]
    bars_ax.bar(positions - 0.2, lambda_max, width=0.4, color="C3", label="λmax of the block")
    bars_ax.bar(positions + 0.2, traces, width=0.4, color="C0", label="trace of the block (Hutchinson)")
    bars_ax.set_xticks(positions, names, rotation=60 if many else 45, ha="right",
                       fontsize="x-small" if many else "small")
    bars_ax.set_yscale("symlog", linthresh=max(1e-6, 1e-4 * max(np.abs(lambda_max + traces))))
    bars_ax.set_xlabel("layer")
    bars_ax.set_ylabel("curvature")
    bars_ax.set_title("which layer is sharp")
    bars_ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return os.fspath(path)


def plot_influence(report: dict, test_images: np.ndarray, train_images: np.ndarray, path: str | os.PathLike) -> str:
    """One row per test example of an influence report: the test image, its most helpful and its most harmful
    training images, each titled with its label and removal effect."""
    tests = report["tests"]
    top = len(tests[0]["helpful"])
    columns = 1 + 2 * top
    figure = Figure(figsize=(1.3 * columns, 1.5 * len(tests) + 0.4), layout="constrained")
    FigureCanvasAgg(figure)

    def show(ax, image, title, color="black"):
        image = np.asarray(image, float)
        ax.imshow(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image, cmap="gray")
        ax.set_title(title, fontsize=7, color=color)
        ax.set_xticks([])
        ax.set_yticks([])

    for row, entry in enumerate(tests):
        show(figure.add_subplot(len(tests), columns, row * columns + 1), test_images[entry["test_index"]],
             f"test {entry['test_index']}\nlabel {entry['label']}")
        for kind, offset, color in (("helpful", 1, "C2"), ("harmful", 1 + top, "C3")):
            for j, item in enumerate(entry[kind]):
                show(figure.add_subplot(len(tests), columns, row * columns + offset + j + 1),
                     train_images[item["train_index"]],
                     f"{kind} {item['train_index']}\nlabel {item['label']}, {item['removal_effect']:+.2g}", color)
    figure.suptitle("influence on each test example's loss: most helpful (green) and most harmful (red) training "
                    "examples", fontsize=9)
    figure.savefig(path, dpi=120)
    return os.fspath(path)
