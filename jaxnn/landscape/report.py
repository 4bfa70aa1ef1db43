"""One call for a loss-landscape study: directions, a 1-D line, a 2-D plane, an interpolation to another model and a
projected training trajectory; and a writer for the run folder (``landscape.npz``/``.json``/``*.png``).

The CLI (``jaxnn landscape RUN_DIR --dirs filter --grid 51 --span 1.0 [--other RUN_DIR2] [--trajectory]``) maps
its flags one to one onto :func:`landscape_report` arguments; ``jaxnn run`` calls it with a small grid.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from jaxnn.landscape.directions import (
    direction_description,
    eigenvector_directions,
    filter_normalized_direction,
    layer_normalized_direction,
    random_direction,
)
from jaxnn.landscape.io import save_surfaces
from jaxnn.landscape.surfaces import (
    DEFAULT_CHUNK_SIZE,
    Surface,
    SurfaceOptions,
    interpolation_surface,
    line_surface,
    plane_surface,
)
from jaxnn.landscape.trajectory import project_trajectory, trajectory_deviation, trajectory_pca_directions
from jaxnn.validation import check_choice, check_int, check_key, check_params, check_positive_float

DIRECTION_KINDS = ("filter", "layer", "random", "eigen", "pca")


def _directions(dirs: str, loss_fn: Callable, params: Any, data: Any, key: jax.Array, ignore: str | None,
                trajectory: Sequence[Any] | None, stacked: bool, progress: bool) -> tuple[list[Any], list[dict], dict]:
    key_1, key_2 = jax.random.split(key)
    extra: dict[str, Any] = {}
    if dirs == "filter":
        directions = [filter_normalized_direction(k, params, ignore=ignore) for k in (key_1, key_2)]
        descriptions = [direction_description("filter_normalized", key=k, ignore=ignore) for k in (key_1, key_2)]
    elif dirs == "layer":
        directions = [layer_normalized_direction(k, params, ignore=ignore) for k in (key_1, key_2)]
        descriptions = [direction_description("layer_normalized", key=k, ignore=ignore) for k in (key_1, key_2)]
    elif dirs == "random":
        directions = [random_direction(k, params) for k in (key_1, key_2)]
        descriptions = [direction_description("random", key=k) for k in (key_1, key_2)]
    elif dirs == "eigen":
        directions, eigenvalues = eigenvector_directions(loss_fn, params, data, k=2, key=key, stacked=stacked,
                                                         progress=progress)
        descriptions = [direction_description("hessian_eigenvector", key=key, index=i, eigenvalue=float(v))
                        for i, v in enumerate(eigenvalues)]
        extra["eigenvalues"] = [float(v) for v in eigenvalues]
    else:  # pca
        if trajectory is None:
            raise ValueError("trajectory: dirs='pca' needs the training trajectory (a list of parameter pytrees)")
        directions, ratio = trajectory_pca_directions(trajectory, params, k=2)
        descriptions = [direction_description("trajectory_pca", index=i, explained_variance_ratio=float(r),
                                              num_checkpoints=len(trajectory)) for i, r in enumerate(ratio)]
        extra["explained_variance_ratio"] = [float(r) for r in ratio]
    return directions, descriptions, extra


def _symmetric_grid(span: float, points: int) -> np.ndarray:
    """``points`` equally spaced values in [−span, span], with an exact 0 in the middle when ``points`` is odd."""
    grid = np.linspace(-span, span, points)
    if points % 2:
        grid[points // 2] = 0.0
    return grid


def _plane_column(plane: Surface, index: int, description: dict) -> Surface:
    """``L(θ + α d₁)`` read off a plane ``L(θ + α d₁ + β d₂)`` at its ``β = betas[index] = 0`` column."""
    metrics = {name: np.array(values[:, index]) for name, values in plane.metrics.items()}
    return Surface(kind="line", alphas=plane.alphas, betas=None, metrics=metrics,
                   nonfinite_counts={name: int(np.sum(~np.isfinite(v))) for name, v in metrics.items()},
                   directions=(dict(description),), num_examples=plane.num_examples, num_batches=plane.num_batches,
                   timing={"from_plane": 1.0})


def landscape_report(loss_fn: Callable, params: Any, data: Any, *, key: Any, dirs: str = "filter", grid: int = 51,
                     span: float | None = 1.0, other_params: Any = None, trajectory: Sequence[Any] | None = None,
                     accuracy_fn: Callable | None = None, metric_fns: Mapping[str, Callable] | None = None,
                     chunk_size: int = DEFAULT_CHUNK_SIZE, grid_1d: int | None = None, ignore: str | None = "biasbn",
                     interpolation_range: tuple[float, float] = (-0.5, 1.5), stacked: bool = False,
                     recompute_state_fn: Callable | None = None, state_data: Any = None,
                     factor_linear_ops: bool = True, progress: bool = True, split: str = "data") -> dict:
    """Directions ``d₁, d₂`` of kind ``dirs``, then ``L(θ+αd₁)`` (``grid_1d`` points, default ``grid``),
    ``L(θ+αd₁+βd₂)`` on a ``grid × grid`` plane over ``[−span, span]²``, ``L((1−α)θ+α θ_other)`` over
    ``interpolation_range`` if ``other_params`` is given, and the ``trajectory`` projected onto the plane.

    ``dirs``: ``filter`` (Li et al.), ``layer``, ``random``, ``eigen`` (top-2 Hessian eigenvectors, unit norm) or
    ``pca`` (of the trajectory, relative to ``params``; unit norm). ``span=None`` sizes the plane to the projected
    trajectory (1.2 × its largest coordinate). Use an odd ``grid`` so that θ itself is a grid point.
    ``split``: with ``params`` on a mesh, share the surfaces out over its devices by ``"data"`` or ``"points"``.
    Cost: ``grid_1d + grid² (+ grid_1d)`` forward passes per batch of ``data`` (see :func:`plane_surface`).

    Returns ``{"line", "plane", "interpolation", "trajectory", "directions", "config", "summary"}``:
    surfaces, the projected trajectory ``{"alphas", "betas", "relative_residual"}``, the JSON-able
    direction descriptions, and ``summary`` (JSON-able, what ``landscape.json`` holds).
    """
    start = time.perf_counter()
    check_choice(dirs, "dirs", choices=DIRECTION_KINDS)
    grid = check_int(grid, "grid", minimum=2, allow_bool=False)
    grid_1d = grid if grid_1d is None else check_int(grid_1d, "grid_1d", minimum=2, allow_bool=False)
    key = check_key(key, allow_int_seed=True)
    params = check_params(params, allow_complex=False)
    if span is None:
        if trajectory is None:
            raise ValueError("span: None (fit the plane to the trajectory) needs a trajectory, got trajectory=None")
    else:
        span = check_positive_float(span, "span")
    if dirs == "eigen" and recompute_state_fn is not None:
        raise ValueError("dirs: 'eigen' differentiates loss_fn(params, batch); with recompute_state_fn the metric "
                         "functions take (params, batch, state), so pass eigenvector directions to plane_surface "
                         "yourself (from a loss_fn with the statistics you want)")
    low, high = (float(v) for v in interpolation_range)
    if not (np.isfinite([low, high]).all() and low < high):
        raise ValueError(f"interpolation_range: expected finite (low, high) with low < high, got {interpolation_range}")
    common = dict(options=SurfaceOptions(accuracy_fn=accuracy_fn, metric_fns=metric_fns, chunk_size=chunk_size,
                                         stacked=stacked, recompute_state_fn=recompute_state_fn, state_data=state_data,
                                         factor_linear_ops=factor_linear_ops, progress=progress, split=split))

    directions, descriptions, extra = _directions(dirs, loss_fn, params, data, key, ignore, trajectory, stacked,
                                                  progress)
    d1, d2 = directions

    projected = None
    if trajectory is not None:
        alphas_t, betas_t = project_trajectory(trajectory, params, d1, d2)
        residual = trajectory_deviation(trajectory, params, d1, d2)
        projected = {"alphas": alphas_t, "betas": betas_t, "relative_residual": residual}
        if span is None:
            largest = float(np.max(np.abs(np.concatenate([alphas_t, betas_t]))))
            span = 1.2 * largest if largest > 0 else 1.0

    line_alphas = _symmetric_grid(span, grid_1d)
    plane_coordinates = _symmetric_grid(span, grid)
    plane = plane_surface(loss_fn, params, d1, d2, plane_coordinates, plane_coordinates, data,
                          descriptions=descriptions, **common)
    if grid_1d == grid and grid % 2 == 1:  # the line is the plane's β = 0 column: no second evaluation
        line = _plane_column(plane, grid // 2, descriptions[0])
    else:
        line = line_surface(loss_fn, params, d1, line_alphas, data, description=descriptions[0], **common)
    interpolation = None
    if other_params is not None:
        interpolation = interpolation_surface(
            loss_fn, params, other_params, np.linspace(low, high, grid_1d), data,
            descriptions=[{"kind": "checkpoint", "role": "params"}, {"kind": "checkpoint", "role": "other_params"}],
            **common)

    config = {"dirs": dirs, "grid": grid, "grid_1d": grid_1d, "span": float(span), "ignore": ignore,
              "chunk_size": int(chunk_size), "interpolation_range": [low, high],
              "recompute_state": recompute_state_fn is not None, "factor_linear_ops": bool(factor_linear_ops),
              "split": split,
              "key": direction_description("key", key=key)["seed"], **extra}
    summary: dict[str, Any] = {"config": config, "directions": descriptions, "line": line.summary(),
                               "plane": plane.summary(),
                               "interpolation": None if interpolation is None else interpolation.summary()}
    if projected is not None:
        summary["trajectory"] = {
            "num_checkpoints": int(len(projected["alphas"])),
            "alphas": [float(v) for v in projected["alphas"]],
            "betas": [float(v) for v in projected["betas"]],
            "max_relative_residual": float(np.max(projected["relative_residual"])),
        }
    summary["seconds"] = time.perf_counter() - start
    return {"line": line, "plane": plane, "interpolation": interpolation, "trajectory": projected,
            "directions": descriptions, "config": config, "summary": summary}


def write_landscape_report(report: Mapping[str, Any], out_dir: Any, *, log_scale: bool = False,
                           draw: Callable | None = None) -> dict[str, str]:
    """Write ``landscape.npz``, ``landscape.json``, ``landscape_1d.png``, ``landscape_2d.png``, ``landscape_3d.png``
    (and ``interpolation.png`` when the report has an interpolation) into ``out_dir``; return ``{name: path}``.
    ``draw(function, *args, **kwargs)`` draws each figure (default: now, in this process)."""
    for needed in ("line", "plane", "summary"):
        if needed not in report:
            raise ValueError(f"report: expected the dict returned by landscape_report, missing key {needed!r}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in
             ("landscape.npz", "landscape.json", "landscape_1d.png", "landscape_2d.png", "landscape_3d.png")}
    surfaces = {"line": report["line"], "plane": report["plane"]}
    if report.get("interpolation") is not None:
        surfaces["interpolation"] = report["interpolation"]
        paths["interpolation.png"] = os.path.join(out_dir, "interpolation.png")
    projected = report.get("trajectory")
    trajectory = None if projected is None else (projected["alphas"], projected["betas"])
    from jaxnn.plotting import FigureFunction  # matplotlib loads where (and when) the figures are drawn

    plot_line, plot_contour, plot_surface_3d = (FigureFunction("jaxnn.landscape.plots", name)
                                                for name in ("plot_line", "plot_contour", "plot_surface_3d"))

    save_surfaces(paths["landscape.npz"], surfaces, trajectory=trajectory,
                  metadata={"config": report["summary"]["config"], "directions": report["summary"]["directions"]})
    draw = draw or (lambda function, *args, **kwargs: function(*args, **kwargs))
    draw(plot_line, report["line"], paths["landscape_1d.png"], log_scale=log_scale, title="loss along d₁ (θ at α = 0)")
    draw(plot_contour, report["plane"], paths["landscape_2d.png"], trajectory=trajectory, log_scale=log_scale)
    draw(plot_surface_3d, report["plane"], paths["landscape_3d.png"], log_scale=log_scale)
    if "interpolation.png" in paths:
        draw(plot_line, report["interpolation"], paths["interpolation.png"], log_scale=log_scale,
             title="linear interpolation θ₀ → θ₁")
    summary = dict(report["summary"])
    summary["files"] = sorted(os.path.basename(p) for p in paths.values())
    with open(paths["landscape.json"], "w") as handle:
        json.dump(summary, handle, indent=2, allow_nan=False)
    return paths
