"""Landscape figures (matplotlib; figures are built as ``Figure`` objects without pyplot, rendered by Agg, so no
backend or global figure state is touched).

* :func:`plot_line` — 1-D curves (lines and interpolations), several on one axis, accuracy on a twin axis;
* :func:`plot_contour` — filled contour of a plane with an optional projected trajectory;
* :func:`plot_surface_3d` — the plane as a 3-D surface;
* :func:`plot_contours_side_by_side` — several planes with one colour scale (compare two models).

Non-finite values (stored as NaN) are gaps: masked in contours and surfaces, breaks in curves. ``log_scale`` uses
a logarithmic colour/value axis and needs positive values. ``vmin``/``vmax`` fix the colour scale (values outside
are drawn in the extreme colours); :func:`shared_color_limits` gives limits common to several surfaces.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from matplotlib import colors, ticker
from matplotlib.figure import Figure

from jaxnn.landscape.surfaces import PATH_KINDS, Surface


def _values(surface: Surface, metric: str, name: str = "surface") -> np.ndarray:
    if not isinstance(surface, Surface):
        raise TypeError(f"{name}: expected a Surface, got {type(surface).__name__}")
    if metric not in surface.metrics:
        raise ValueError(f"metric: expected one of {sorted(surface.metrics)} for {name}, got {metric!r}")
    return np.asarray(surface.metrics[metric], dtype=np.float64)


def _check_log(values: np.ndarray, metric: str) -> None:
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() <= 0:
        raise ValueError(f"log_scale: metric {metric!r} needs positive values, got minimum {finite.min():.6g}")


def _check_plane(surface: Surface, name: str) -> None:
    if surface.betas is None:
        raise ValueError(f"{name}: expected a 2-D (plane) surface, got a 1-D {surface.kind!r} surface")


_DIRECTION_NAMES = {"filter_normalized": "random, filter-normalised", "layer_normalized": "random, layer-normalised",
                    "random": "random Gaussian"}


def axis_label(surface: Surface, axis: int) -> str:
    """``α along d₁ (random, filter-normalised)``: the coordinate and what its direction is, from the surface's
    direction descriptions (``α (d₁)`` when it has none)."""
    symbol, index = ("α", "₁") if axis == 0 else ("β", "₂")
    if axis >= len(surface.directions):
        return f"{symbol} (d{index})"
    description = surface.directions[axis]
    kind, options = description.get("kind", ""), description.get("options", {})
    index_ = _number(options.get("index"))
    number = axis + 1 if index_ is None else int(index_) + 1
    if kind == "hessian_eigenvector":
        value = _number(options.get("eigenvalue"))
        what = f"Hessian eigenvector {number}" + ("" if value is None else f", λ = {value:.4g}")
    elif kind == "trajectory_pca":
        ratio = _number(options.get("explained_variance_ratio"))
        what = f"trajectory PCA {number}" + ("" if ratio is None else f", {ratio:.0%} of variance")
    else:
        what = _DIRECTION_NAMES.get(kind, kind)
    return f"{symbol} along d{index} ({what})"


def _number(value: Any) -> float | None:
    """A description's number (stored as a number or, by older writers, as its text), else None."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _save(figure: Figure, path: Any) -> None:
    if path is not None:
        path = os.fspath(path)
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        figure.savefig(path, dpi=120, bbox_inches="tight")


def shared_color_limits(surfaces: Sequence[Surface], metric: str = "loss", *,
                        log_scale: bool = False) -> tuple[float, float]:
    """``(vmin, vmax)`` over the finite values of all ``surfaces`` (for one colour scale across models)."""
    finite = []
    for index, surface in enumerate(surfaces):
        values = _values(surface, metric, f"surfaces[{index}]")
        if log_scale:
            _check_log(values, metric)
        finite.append(values[np.isfinite(values)])
    finite = np.concatenate(finite) if finite else np.zeros(0)
    if finite.size == 0:
        raise ValueError(f"surfaces: metric {metric!r} has no finite value to set a colour scale")
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        high = low + (abs(low) * 1e-6 or 1e-6)
    return low, high


def _levels(vmin: float, vmax: float, count: int, log_scale: bool) -> np.ndarray:
    if log_scale:
        return np.geomspace(vmin, vmax, count)
    return np.linspace(vmin, vmax, count)


def plot_line(surfaces: Surface | Sequence[Surface], path: Any = None, *, metric: str = "loss",
              labels: Sequence[str] | None = None, log_scale: bool = False, show_accuracy: bool = True,
              title: str | None = None) -> Figure:
    """1-D curve(s) of ``metric`` against α; ``accuracy`` (if present) on a second y axis. Saved to ``path``."""
    surfaces = [surfaces] if isinstance(surfaces, Surface) else list(surfaces)
    if not surfaces:
        raise ValueError("surfaces: expected at least one 1-D surface, got none")
    if labels is not None and len(labels) != len(surfaces):
        raise ValueError(f"labels: expected {len(surfaces)} labels, got {len(labels)}")
    figure = Figure(figsize=(6, 4))
    axis = figure.add_subplot()
    accuracy_axis = None
    for index, surface in enumerate(surfaces):
        if surface.betas is not None:
            raise ValueError(f"surfaces[{index}]: expected a 1-D surface, got a plane")
        values = _values(surface, metric, f"surfaces[{index}]")
        if log_scale:
            _check_log(values, metric)
        label = labels[index] if labels is not None else (surface.kind if len(surfaces) > 1 else metric)
        line, = axis.plot(surface.alphas, values, "-", label=label)
        if show_accuracy and "accuracy" in surface.metrics and metric != "accuracy":
            accuracy_axis = accuracy_axis or axis.twinx()
            accuracy_axis.plot(surface.alphas, surface.metrics["accuracy"], "--", color=line.get_color(),
                               label=f"{label} accuracy")
            accuracy_axis.set_ylabel("accuracy")
    if log_scale:
        axis.set_yscale("log")
    axis.set_xlabel(f"α ({surfaces[0].kind}: 0 = θ₀, 1 = θ₁)" if surfaces[0].kind in PATH_KINDS
                    else axis_label(surfaces[0], 0))
    axis.set_ylabel(metric)
    handles, names = axis.get_legend_handles_labels()
    if accuracy_axis is not None:
        more_handles, more_names = accuracy_axis.get_legend_handles_labels()
        handles, names = handles + more_handles, names + more_names
    axis.legend(handles, names, loc="best", fontsize=8)
    if surfaces[0].kind in PATH_KINDS:
        for endpoint in (0.0, 1.0):
            axis.axvline(endpoint, color="grey", linewidth=0.6, linestyle=":")
    counts = sum(s.nonfinite_counts.get(metric, 0) for s in surfaces)
    axis.set_title((title or f"{metric} along {surfaces[0].kind}") + (f"  ({counts} non-finite)" if counts else ""))
    _save(figure, path)
    return figure


def _draw_contour(axis: Any, surface: Surface, metric: str, vmin: float, vmax: float, levels: int,
                  log_scale: bool, trajectory: tuple[Any, Any] | None) -> Any:
    values = _values(surface, metric)
    masked = np.ma.masked_invalid(values.T)
    norm = colors.LogNorm(vmin=vmin, vmax=vmax) if log_scale else colors.Normalize(vmin=vmin, vmax=vmax)
    filled = axis.contourf(surface.alphas, surface.betas, masked, levels=_levels(vmin, vmax, levels, log_scale),
                           norm=norm, cmap="viridis", extend="both")
    axis.contour(surface.alphas, surface.betas, masked, levels=_levels(vmin, vmax, levels, log_scale)[::3],
                 colors="white", linewidths=0.4, alpha=0.6)
    if trajectory is not None:
        t_alpha, t_beta = (np.asarray(v, dtype=np.float64) for v in trajectory)
        if t_alpha.shape != t_beta.shape or t_alpha.ndim != 1:
            raise ValueError(f"trajectory: expected (alphas, betas) of equal 1-D shape, got {t_alpha.shape} and "
                             f"{t_beta.shape}")
        axis.plot(t_alpha, t_beta, "o-", color="tab:red", markersize=3, linewidth=1, label="trajectory")
        axis.plot(t_alpha[-1:], t_beta[-1:], "*", color="yellow", markersize=10, markeredgecolor="black")
        axis.legend(loc="upper right", fontsize=8)
    axis.set_xlabel(axis_label(surface, 0))
    axis.set_ylabel(axis_label(surface, 1))
    axis.set_aspect("auto")
    return filled


def plot_contour(surface: Surface, path: Any = None, *, metric: str = "loss",
                 trajectory: tuple[Any, Any] | None = None, levels: int = 30, log_scale: bool = False,
                 vmin: float | None = None, vmax: float | None = None, title: str | None = None) -> Figure:
    """Filled contour of a plane's ``metric`` with the projected ``trajectory`` ``(alphas, betas)`` overlaid."""
    _check_plane(surface, "surface")
    values = _values(surface, metric)
    if log_scale:
        _check_log(values, metric)
    auto_min, auto_max = shared_color_limits([surface], metric, log_scale=log_scale)
    vmin = auto_min if vmin is None else float(vmin)
    vmax = auto_max if vmax is None else float(vmax)
    if not vmin < vmax:
        raise ValueError(f"vmin/vmax: expected vmin < vmax, got {vmin} and {vmax}")
    figure = Figure(figsize=(6, 5))
    axis = figure.add_subplot()
    filled = _draw_contour(axis, surface, metric, vmin, vmax, levels, log_scale, trajectory)
    figure.colorbar(filled, ax=axis, label=metric, format=ticker.FormatStrFormatter("%.4g"))
    count = surface.nonfinite_counts.get(metric, 0)
    axis.set_title((title or f"{metric} on the plane") + (f"  ({count} non-finite, blank)" if count else ""))
    _save(figure, path)
    return figure


def plot_contours_side_by_side(surfaces: Sequence[Surface], path: Any = None, *, metric: str = "loss",
                               titles: Sequence[str] | None = None,
                               trajectories: Sequence[tuple[Any, Any] | None] | None = None, levels: int = 30,
                               log_scale: bool = False, vmin: float | None = None,
                               vmax: float | None = None) -> Figure:
    """Contours of several planes with ONE colour scale (shared ``vmin``/``vmax``) and one colour bar."""
    surfaces = list(surfaces)
    if not surfaces:
        raise ValueError("surfaces: expected at least one plane surface, got none")
    for index, surface in enumerate(surfaces):
        _check_plane(surface, f"surfaces[{index}]")
    for name, given in (("titles", titles), ("trajectories", trajectories)):
        if given is not None and len(given) != len(surfaces):
            raise ValueError(f"{name}: expected {len(surfaces)} entries (one per surface), got {len(given)}")
    auto_min, auto_max = shared_color_limits(surfaces, metric, log_scale=log_scale)
    vmin = auto_min if vmin is None else float(vmin)
    vmax = auto_max if vmax is None else float(vmax)
    if not vmin < vmax:
        raise ValueError(f"vmin/vmax: expected vmin < vmax, got {vmin} and {vmax}")
    figure = Figure(figsize=(5 * len(surfaces) + 1, 4.5))
    axes = figure.subplots(1, len(surfaces), squeeze=False)[0]
    filled = None
    for index, (axis, surface) in enumerate(zip(axes, surfaces)):
        trajectory = trajectories[index] if trajectories is not None else None
        filled = _draw_contour(axis, surface, metric, vmin, vmax, levels, log_scale, trajectory)
        axis.set_title(titles[index] if titles is not None else f"surface {index}")
    figure.colorbar(filled, ax=list(axes), label=metric, format=ticker.FormatStrFormatter("%.4g"))
    _save(figure, path)
    return figure


def plot_surface_3d(surface: Surface, path: Any = None, *, metric: str = "loss", log_scale: bool = False,
                    vmin: float | None = None, vmax: float | None = None, title: str | None = None) -> Figure:
    """The plane's ``metric`` as a 3-D surface over (α, β); ``log_scale`` plots log10 of the values."""
    _check_plane(surface, "surface")
    values = _values(surface, metric)
    if log_scale:
        _check_log(values, metric)
        values = np.log10(values)
        vmin = None if vmin is None else float(np.log10(vmin))
        vmax = None if vmax is None else float(np.log10(vmax))
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError(f"surface: metric {metric!r} has no finite value to plot")
    vmin = float(finite.min()) if vmin is None else float(vmin)
    vmax = float(finite.max()) if vmax is None else float(vmax)
    figure = Figure(figsize=(7, 5))
    axis = figure.add_subplot(projection="3d")
    grid_alpha, grid_beta = np.meshgrid(surface.alphas, surface.betas, indexing="ij")
    axis.plot_surface(grid_alpha, grid_beta, np.ma.masked_invalid(values), cmap="viridis", vmin=vmin, vmax=vmax,
                      linewidth=0, antialiased=True, rstride=1, cstride=1)
    axis.set_xlabel(axis_label(surface, 0))
    axis.set_ylabel(axis_label(surface, 1))
    axis.set_zlabel(f"log10 {metric}" if log_scale else metric)
    count = surface.nonfinite_counts.get(metric, 0)
    axis.set_title((title or f"{metric} surface") + (f"  ({count} non-finite, blank)" if count else ""))
    _save(figure, path)
    return figure
