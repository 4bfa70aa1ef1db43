"""Loss surfaces: 1-D lines ``L(θ+αd)``, interpolations ``L((1−α)θ₀+αθ₁)`` and 2-D planes ``L(θ+αd₁+βd₂)``.

Every surface function takes the same evaluation options, :class:`SurfaceOptions` (as keyword arguments, e.g.
``chunk_size=16, progress=False``, or ``options=SurfaceOptions(...)``). Every surface is evaluated by one compiled
program (:mod:`jaxnn.landscape.grid_evaluation`): chunks of ``chunk_size`` grid points are vmapped, ``lax.map`` runs
over the chunks and ``lax.scan`` over the batches of ``data`` (one batch, a list/iterable of batches, or batches
stacked on a leading axis with ``stacked=True``); each metric is the example-weighted mean over batches, ``Σ_b
(B_b/N) m_b(θ)``.

Speed: with ``factor_linear_ops=True`` (default) the operations that are linear in the parameters (a first Dense
or Conv layer and its bias) are computed once per direction and batch instead of once per grid point; on CPU
that is where the speed-up over a per-point loop comes from (benchmarks/bench_landscape.py: large when the first
layer dominates the FLOPs, as in 784-512-10). ``chunk_size`` points are evaluated at once (memory ≈ ``chunk_size``
forward passes of one batch; 8 suits CPUs, accelerators like larger). ``strategy``: ``"auto"`` (default) evaluates
one point per compiled call for convolutional losses on CPU (XLA:CPU runs vmapped or looped convolutions several
times slower; :func:`jaxnn.runtime.prefers_python_loops`) and vmapped chunks otherwise; ``"vmap"`` or
``"python"`` force one (the former names "vmapped" and "per_point" still work, with a DeprecationWarning).

Devices: with the parameters on a mesh (:func:`jaxnn.parallel.place_state`) the work is shared out over its
devices: ``split="data"`` (default) gives each device its slice of every batch, ``split="points"`` gives each
device all the data and its own grid points (``chunk_size`` points per device at a time).

Metrics: ``loss_fn`` is always evaluated (as ``"loss"``), ``accuracy_fn`` as ``"accuracy"``, and any
``metric_fns={name: fn(params, batch) -> scalar}``. A non-finite value at a grid point is kept as NaN, counted in
``Surface.nonfinite_counts`` and left as a gap in the plots; it is not an error.

Batch-norm statistics. By default the caller's functions decide (e.g. eval mode: the model state is closed over
in ``loss_fn``). To recompute the statistics at every grid point, as the reference tool's users ask for, pass
``recompute_state_fn(params, batch) -> state`` (a pytree of floating arrays, e.g. per-channel means and mean
squares): at each point the state is averaged over ``state_data`` (default ``data``) with the same example
weights, and every metric function is then called as ``fn(params, batch, state)``. Returning first and second
moments (rather than variances) makes the averaged state exact full-data statistics.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.curvature.batches import PreparedData, place_on_mesh, prepare_data
from jaxnn.parallel import mesh_of
from jaxnn.landscape.grid_evaluation import check_split, evaluate_at_points
from jaxnn.validation import (
    check_direction,
    check_grid,
    check_int,
    check_like,
    check_metric_fns,
    check_params,
    merge_options,
)

DEFAULT_CHUNK_SIZE = 8

SURFACE_KINDS = ("line", "interpolation", "bezier", "plane")
PATH_KINDS = ("interpolation", "bezier")  # 1-D paths from θ₀ (α = 0) to θ₁ (α = 1)


def _json_number(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


@dataclasses.dataclass(frozen=True)
class Surface:
    """Metric values on a 1-D (``betas is None``) or 2-D grid; ``metrics[name][i, j]`` is at ``(alphas[i], betas[j])``.

    Non-finite values are stored as NaN and counted in ``nonfinite_counts``. ``directions`` holds one JSON-able
    description per direction (for ``interpolation``: the two endpoints).
    """

    kind: str
    alphas: np.ndarray
    betas: np.ndarray | None
    metrics: dict[str, np.ndarray]
    nonfinite_counts: dict[str, int]
    directions: tuple[dict, ...] = ()
    num_examples: int = 0
    num_batches: int = 1
    timing: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SURFACE_KINDS:
            raise ValueError(f"kind: expected one of {list(SURFACE_KINDS)}, got {self.kind!r}")
        if "loss" not in self.metrics:
            raise ValueError(f"metrics: expected a 'loss' entry, got names {sorted(self.metrics)}")
        expected = self.shape
        for name, values in self.metrics.items():
            if tuple(np.shape(values)) != expected:
                raise ValueError(f"metrics[{name!r}]: expected shape {expected}, got {tuple(np.shape(values))}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.alphas),) if self.betas is None else (len(self.alphas), len(self.betas))

    @property
    def losses(self) -> np.ndarray:
        return self.metrics["loss"]

    @property
    def accuracies(self) -> np.ndarray | None:
        return self.metrics.get("accuracy")

    def value_at(self, name: str, alpha: float, beta: float | None = None) -> float | None:
        """The metric at a grid coordinate (``None`` if that coordinate is not on the grid)."""
        i = np.flatnonzero(np.isclose(self.alphas, alpha, rtol=0, atol=1e-12))
        if i.size == 0:
            return None
        if self.betas is None:
            return float(self.metrics[name][i[0]])
        j = np.flatnonzero(np.isclose(self.betas, beta if beta is not None else 0.0, rtol=0, atol=1e-12))
        return None if j.size == 0 else float(self.metrics[name][i[0], j[0]])

    def plot(self, path: Any = None, *, metric: str = "loss", log_scale: bool = False, **options: Any) -> Any:
        """The picture of this surface, saved to ``path`` when given; returns the matplotlib Figure: a line (with
        accuracy on a second axis) for a 1-D surface, a filled contour for a plane (``trajectory=(alphas, betas)``
        overlays a path). Axes name their directions. Other options: ``jaxnn.landscape.plots``."""
        from jaxnn.landscape import plots

        if self.betas is None:
            return plots.plot_line(self, path, metric=metric, log_scale=log_scale, **options)
        return plots.plot_contour(self, path, metric=metric, log_scale=log_scale, **options)

    def summary(self) -> dict:
        """JSON-able: grid, per-metric min/max/argmin/value at the origin, non-finite counts, directions, timing.

        For ``interpolation`` also the endpoint values and the barrier ``max_{α∈[0,1]} L(α) − ((1−α)L(0)+αL(1))``
        over the grid points in [0, 1].
        """
        metrics = {}
        for name, values in self.metrics.items():
            finite = np.isfinite(values)
            entry: dict[str, Any] = {"nonfinite": int(self.nonfinite_counts.get(name, int((~finite).sum())))}
            if finite.any():
                flat_index = int(np.nanargmin(np.where(finite, values, np.nan)))
                index = np.unravel_index(flat_index, values.shape)
                entry["min"] = _json_number(values[index])
                entry["max"] = _json_number(np.nanmax(np.where(finite, values, np.nan)))
                entry["argmin"] = {"alpha": float(self.alphas[index[0]])}
                if self.betas is not None:
                    entry["argmin"]["beta"] = float(self.betas[index[1]])
            else:
                entry.update(min=None, max=None, argmin=None)
            origin = self.value_at(name, 0.0, None if self.betas is None else 0.0)
            entry["at_origin"] = None if origin is None else _json_number(origin)
            if self.kind in PATH_KINDS:
                start, end = self.value_at(name, 0.0), self.value_at(name, 1.0)
                entry["at_start"] = None if start is None else _json_number(start)
                entry["at_end"] = None if end is None else _json_number(end)
                inside = (self.alphas >= 0) & (self.alphas <= 1)
                if start is not None and end is not None and np.isfinite([start, end]).all():
                    chord = (1 - self.alphas[inside]) * start + self.alphas[inside] * end
                    gap = values[inside] - chord
                    entry["barrier"] = _json_number(np.nanmax(gap)) if np.isfinite(gap).any() else None
            metrics[name] = entry
        summary = {
            "kind": self.kind,
            "shape": list(self.shape),
            "alpha_range": [float(self.alphas.min()), float(self.alphas.max())],
            "num_examples": int(self.num_examples),
            "num_batches": int(self.num_batches),
            "nonfinite_points": int(sum(self.nonfinite_counts.values())),
            "metrics": metrics,
            "directions": [dict(d) for d in self.directions],
            "timing": {k: float(v) for k, v in self.timing.items()},
        }
        if self.betas is not None:
            summary["beta_range"] = [float(self.betas.min()), float(self.betas.max())]
        json.dumps(summary)  # fail here, not in a writer, if a description is not JSON-able
        return summary


def _check_scalar_outputs(metrics: Mapping[str, Callable], params: Any, prepared: PreparedData,
                          state_like: Any) -> None:
    batch_like = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype),
                              prepared.groups[0].batches)
    extra = () if state_like is None else (state_like,)
    for name, fn in metrics.items():
        label = {"loss": "loss_fn", "accuracy": "accuracy_fn"}.get(name, f"metric_fns[{name!r}]")
        try:
            out = jax.eval_shape(fn, params, batch_like, *extra)
        except Exception as error:  # the user's function fails on these shapes: name it
            raise ValueError(
                f"{label}: failed when traced on params and one batch of data ({type(error).__name__}: {error})"
            ) from error
        leaves = jax.tree.leaves(out)
        if len(leaves) != 1 or leaves[0].shape != ():
            shapes = [tuple(leaf.shape) for leaf in leaves]
            got = f"shapes {shapes}" if shapes else "nothing"
            raise ValueError(f"{label}: expected a scalar output, got {got}")
        if not (jnp.issubdtype(leaves[0].dtype, jnp.number) or leaves[0].dtype == jnp.bool_):
            raise TypeError(f"{label}: expected a numeric scalar, got dtype {leaves[0].dtype}")


def _state_like(recompute_state_fn: Callable, params: Any, state_prepared: PreparedData) -> Any:
    if not callable(recompute_state_fn):
        raise TypeError(f"recompute_state_fn: expected a callable (params, batch) -> state, got "
                        f"{type(recompute_state_fn).__name__}")
    batch_like = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype),
                              state_prepared.groups[0].batches)
    state_like = jax.eval_shape(recompute_state_fn, params, batch_like)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state_like)[0]:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"recompute_state_fn: output leaf {jax.tree_util.keystr(path) or '<root>'} expected a "
                            f"floating dtype (it is averaged over batches), got {leaf.dtype}")
    return state_like


@dataclasses.dataclass(frozen=True)
class SurfaceOptions:
    """How every surface is evaluated (the same for lines, interpolations, Bézier curves and planes; see the module
    docstring): the metrics besides the loss (``accuracy_fn``, ``metric_fns``), the grid points evaluated at once
    (``chunk_size``), ``stacked`` batches, batch-norm statistics recomputed per point (``recompute_state_fn``,
    ``state_data``), ``factor_linear_ops``, a ``progress`` bar, the loop ``strategy`` and the device ``split``. The
    surface functions take these as keyword arguments (or ``options=SurfaceOptions(...)``)."""

    accuracy_fn: Callable | None = None
    metric_fns: Mapping[str, Callable] | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    stacked: bool = False
    recompute_state_fn: Callable | None = None
    state_data: Any = None
    factor_linear_ops: bool = True
    progress: bool = True
    strategy: str = "auto"
    split: str = "data"

    @classmethod
    def of(cls, function: str, options: SurfaceOptions | None, keywords: Mapping[str, Any]) -> SurfaceOptions:
        """``options`` with ``keywords`` (a surface function's other keyword arguments) on top
        (:func:`jaxnn.validation.merge_options`: a keyword that is not a field is a TypeError naming it)."""
        return merge_options(function, keywords, (cls, options, "options"))[0]


def _evaluate_surface(kind: str, loss_fn: Callable, basis: Sequence[Any], coefficients: np.ndarray,
                      grid_shape: tuple[int, ...], data: Any, alphas: np.ndarray, betas: np.ndarray | None,
                      descriptions: Sequence[dict], options: SurfaceOptions) -> Surface:
    o = options
    metrics = check_metric_fns(loss_fn, o.accuracy_fn, o.metric_fns)
    chunk_size = check_int(o.chunk_size, "chunk_size", allow_bool=False)
    mesh = mesh_of(basis[0])  # parameters on a mesh: batches split over its data axis, or grid points
    split = check_split(o.split, o.strategy, mesh)
    replicate = split == "points"
    prepared = place_on_mesh(prepare_data(data, stacked=o.stacked, name="data", check_finite=True), mesh, replicate)
    state_prepared, state_like = None, None
    if o.recompute_state_fn is not None:
        state_prepared = (prepared if o.state_data is None else place_on_mesh(
            prepare_data(o.state_data, stacked=o.stacked, name="state_data", check_finite=True), mesh, replicate))
        state_like = _state_like(o.recompute_state_fn, basis[0], state_prepared)
    _check_scalar_outputs(metrics, basis[0], prepared, state_like)
    values, timing = evaluate_at_points(
        metrics, basis, coefficients, prepared, chunk_size=chunk_size, state_fn=o.recompute_state_fn,
        state_prepared=state_prepared, factor_linear_ops=o.factor_linear_ops, progress=o.progress,
        description=f"{kind} surface", strategy=o.strategy, split=split, mesh=mesh)
    shaped, nonfinite = {}, {}
    for name, flat in values.items():
        array = np.asarray(flat, dtype=np.float64 if flat.dtype == np.float64 else np.float32).reshape(grid_shape)
        bad = ~np.isfinite(array)
        nonfinite[name] = int(bad.sum())
        shaped[name] = np.where(bad, np.nan, array)
    return Surface(kind=kind, alphas=alphas, betas=betas, metrics=shaped, nonfinite_counts=nonfinite,
                   directions=tuple(dict(d) for d in descriptions), num_examples=prepared.num_examples,
                   num_batches=prepared.num_batches, timing=timing)


def _descriptions(given: Sequence[dict] | None, count: int, name: str, default: dict) -> list[dict]:
    if given is None:
        return [dict(default) for _ in range(count)]
    given = list(given)
    if len(given) != count or not all(isinstance(d, Mapping) for d in given):
        raise ValueError(f"{name}: expected {count} dict(s) describing the direction(s), got {given!r}")
    return [dict(d) for d in given]


def line_surface(loss_fn: Callable, params: Any, direction: Any, alphas: Any, data: Any, *,
                 description: dict | None = None, options: SurfaceOptions | None = None, **keywords: Any) -> Surface:
    """``L(θ + α d)`` for every ``α`` in ``alphas``; cost: ``len(alphas)`` forward passes per batch of ``data``.

    ``direction`` must match ``params`` leaf for leaf, be finite and non-zero.
    """
    options = SurfaceOptions.of("line_surface", options, keywords)
    params = check_params(params, allow_complex=False)
    direction = check_direction(direction, "direction", params=params)
    alphas = check_grid(alphas, "alphas")
    coefficients = np.stack([np.ones_like(alphas), alphas], axis=1)
    descriptions = _descriptions(None if description is None else [description], 1, "description",
                                 {"kind": "custom"})
    return _evaluate_surface(
        "line", loss_fn, (params, direction), coefficients, (len(alphas),), data, alphas, None, descriptions,
        options)


def interpolation_surface(loss_fn: Callable, params0: Any, params1: Any, alphas: Any, data: Any, *,
                          descriptions: Sequence[dict] | None = None, options: SurfaceOptions | None = None,
                          **keywords: Any) -> Surface:
    """``L((1−α)θ₀ + αθ₁)`` for every ``α`` (Goodfellow et al. 2015); α=0 is ``params0``, α=1 is ``params1``.

    The two checkpoints must have the same structure and leaf shapes (an incompatible pair is a ``ValueError``
    naming ``params1``); they may be equal. Cost: ``len(alphas)`` forward passes per batch.
    """
    options = SurfaceOptions.of("interpolation_surface", options, keywords)
    params0 = check_params(params0, "params0", allow_complex=False)
    params1 = check_like(check_params(params1, "params1", allow_complex=False), "params1", reference=params0,
                         reference_name="params0")
    alphas = check_grid(alphas, "alphas")
    coefficients = np.stack([1.0 - alphas, alphas], axis=1)
    descriptions = _descriptions(descriptions, 2, "descriptions", {"kind": "checkpoint"})
    return _evaluate_surface(
        "interpolation", loss_fn, (params0, params1), coefficients, (len(alphas),), data, alphas, None,
        descriptions, options)


def bezier_surface(loss_fn: Callable, params0: Any, bend: Any, params1: Any, ts: Any, data: Any, *,
                   descriptions: Sequence[dict] | None = None, options: SurfaceOptions | None = None,
                   **keywords: Any) -> Surface:
    """``L(φ(t))`` on the quadratic Bézier curve ``φ(t) = (1−t)²θ₀ + 2t(1−t)θ_b + t²θ₁`` for every ``t`` in
    ``ts`` (Garipov et al. 2018: a trained bend ``θ_b`` connects two minima at almost constant loss); t = 0 is
    ``params0``, t = 1 is ``params1``. The summary's ``barrier`` is the largest excess over the chord between the
    endpoint values, as for :func:`interpolation_surface`. Cost: ``len(ts)`` forward passes per batch."""
    options = SurfaceOptions.of("bezier_surface", options, keywords)
    params0 = check_params(params0, "params0", allow_complex=False)
    bend = check_like(check_params(bend, "bend", allow_complex=False), "bend", reference=params0,
                      reference_name="params0")
    params1 = check_like(check_params(params1, "params1", allow_complex=False), "params1", reference=params0,
                         reference_name="params0")
    ts = check_grid(ts, "ts")
    coefficients = np.stack([(1.0 - ts) ** 2, 2.0 * ts * (1.0 - ts), ts**2], axis=1)
    descriptions = _descriptions(descriptions, 3, "descriptions", {"kind": "checkpoint"})
    return _evaluate_surface(
        "bezier", loss_fn, (params0, bend, params1), coefficients, (len(ts),), data, ts, None, descriptions,
        options)


def plane_surface(loss_fn: Callable, params: Any, d1: Any, d2: Any, alphas: Any, betas: Any, data: Any, *,
                  descriptions: Sequence[dict] | None = None, options: SurfaceOptions | None = None,
                  **keywords: Any) -> Surface:
    """``L(θ + α d₁ + β d₂)`` on the grid ``alphas × betas`` (``metrics[name][i, j]`` at ``(alphas[i], betas[j])``).

    Cost: ``len(alphas)·len(betas)`` forward passes per batch of ``data`` (the parameter-linear first layers only
    3 per batch with ``factor_linear_ops``), in one compiled program; memory: about ``chunk_size`` forward passes.
    """
    options = SurfaceOptions.of("plane_surface", options, keywords)
    params = check_params(params, allow_complex=False)
    d1 = check_direction(d1, "d1", params=params)
    d2 = check_direction(d2, "d2", params=params)
    alphas = check_grid(alphas, "alphas")
    betas = check_grid(betas, "betas")
    grid_alpha, grid_beta = np.meshgrid(alphas, betas, indexing="ij")
    coefficients = np.stack([np.ones(grid_alpha.size), grid_alpha.ravel(), grid_beta.ravel()], axis=1)
    descriptions = _descriptions(descriptions, 2, "descriptions", {"kind": "custom"})
    return _evaluate_surface(
        "plane", loss_fn, (params, d1, d2), coefficients, (len(alphas), len(betas)), data, alphas, betas,
        descriptions, options)
