"""Loss-landscape analysis of any pure ``loss_fn(params, batch)`` (no Flax imports here).

Directions (pytrees like ``params``), 1-D/2-D surfaces evaluated in one compiled, vmapped and chunked program,
trajectory PCA and projection, ``.npz`` output, plots, and a one-call report::

    d1 = filter_normalized_direction(jax.random.key(0), params)
    d2 = filter_normalized_direction(jax.random.key(1), params)
    grid = np.linspace(-1, 1, 51)
    surface = plane_surface(loss_fn, params, d1, d2, grid, grid, batches, accuracy_fn=accuracy_fn)
    plot_contour(surface, "landscape_2d.png")
"""

from jaxnn.landscape.directions import (
    checkpoint_difference_direction,
    direction_description,
    eigenvector_directions,
    filter_normalized_direction,
    layer_normalized_direction,
    normalize_direction,
    random_direction,
)
from jaxnn.landscape.io import load_surface, load_surfaces, save_surface, save_surfaces
from jaxnn.landscape.linear_factoring import LinearFactorization
from jaxnn.landscape.report import landscape_report, write_landscape_report
from jaxnn.landscape.surfaces import (
    DEFAULT_CHUNK_SIZE,
    Surface,
    SurfaceOptions,
    bezier_surface,
    interpolation_surface,
    line_surface,
    plane_surface,
)
from jaxnn.landscape.trajectory import project_trajectory, trajectory_deviation, trajectory_pca_directions

_PLOTS = ("plot_contour", "plot_contours_side_by_side", "plot_line", "plot_surface_3d", "shared_color_limits")


def __getattr__(name):
    """The figure functions load matplotlib, so they are imported on first use."""
    if name in _PLOTS:
        from jaxnn.landscape import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'jaxnn.landscape' has no attribute {name!r}")


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LinearFactorization",
    "Surface",
    "SurfaceOptions",
    "bezier_surface",
    "checkpoint_difference_direction",
    "direction_description",
    "eigenvector_directions",
    "filter_normalized_direction",
    "interpolation_surface",
    "landscape_report",
    "layer_normalized_direction",
    "line_surface",
    "load_surface",
    "load_surfaces",
    "normalize_direction",
    "plane_surface",
    "plot_contour",
    "plot_contours_side_by_side",
    "plot_line",
    "plot_surface_3d",
    "project_trajectory",
    "random_direction",
    "save_surface",
    "save_surfaces",
    "shared_color_limits",
    "trajectory_deviation",
    "trajectory_pca_directions",
    "write_landscape_report",
]
