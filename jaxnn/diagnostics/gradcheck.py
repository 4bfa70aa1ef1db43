"""Gradient check: autodiff against central finite differences, on random coordinates and random directions.

    report = gradient_check(loss_fn, params, batch)      # loss_fn(params, batch) -> scalar
    print(report)                                        # verdict, worst relative errors and where they are

For a coordinate i the numerical derivative is a central difference of L along eᵢ — in float64 the five-point
(L(θ−2h eᵢ) − 8L(θ−h eᵢ) + 8L(θ+h eᵢ) − L(θ+2h eᵢ)) / 12h, in float32 (L(θ+h eᵢ) − L(θ−h eᵢ)) / 2h — and the
analytic one ∂L/∂θᵢ; for a unit direction d they are the same difference along d and ∇L·d. The relative error
``|a − n| / max(|a|, |n|)`` is judged by the usual bands (cs231n): in float64 below 1e-7 is good, up to 1e-4
acceptable (kinks such as ReLU at 0 can reach it), up to 1e-2 suspicious, above 1e-2 wrong. A float32 loss carries
~1e-7·|L| of rounding, which the difference divides by h: its bands are 1e-2 / 5e-2 / 2e-1 (a gradient off by 1.5x
is still "wrong"; cast to float64 for a sharper check). The denominator is at least the rounding noise of the
difference, ~c·ε·|L|/h, divided by the "good" band (and ``atol``), so derivatives near that noise level are not
flagged for noise alone (a dead ReLU's zero gradient against a difference of 2e-13 read "suspicious" before). In
float64 a probe that is not "good" is measured again at h/30: a ReLU kink inside the stencil spoils only the larger
step, a wrong gradient is wrong at both (each probe records the ``step`` it was judged at). Each coordinate is named by its
parameter path, so a wrong backward pass shows up as the layers whose parameters it feeds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

BANDS = {"float64": (1e-7, 1e-4, 1e-2), "float32": (1e-2, 5e-2, 2e-1)}
VERDICTS = ("good", "acceptable", "suspicious", "wrong")


def verdict_for(error: float, dtype: str = "float64") -> str:
    """The band of a relative error: good, acceptable, suspicious or wrong (see the module docstring)."""
    good, acceptable, suspicious = BANDS["float64" if dtype == "float64" else "float32"]
    if not np.isfinite(error):
        return "wrong"
    return VERDICTS[int(error >= good) + int(error >= acceptable) + int(error >= suspicious)]


@dataclasses.dataclass
class GradientCheck:
    """``coordinates``/``directions``: one dict per probe (``where``, ``analytic``, ``numeric``,
    ``relative_error``, ``verdict``); ``verdict``: the worst; ``worst_parameters``: the parameter paths with a
    suspicious or wrong coordinate, worst first."""

    verdict: str
    dtype: str
    step: float
    coordinates: list[dict]
    directions: list[dict]
    worst_parameters: list[str]

    @property
    def max_relative_error(self) -> float:
        return max(p["relative_error"] for p in self.coordinates + self.directions)

    def __str__(self) -> str:
        lines = [f"gradient check ({self.dtype}, h={self.step:.1e}): {self.verdict}, max relative error "
                 f"{self.max_relative_error:.2e} over {len(self.coordinates)} coordinates and "
                 f"{len(self.directions)} directions"]
        for probe in sorted(self.coordinates + self.directions, key=lambda p: -p["relative_error"])[:5]:
            lines.append(f"  {probe['relative_error']:.2e} {probe['verdict']:10s} {probe['where']}: autodiff "
                         f"{probe['analytic']:.6g}, finite difference {probe['numeric']:.6g}")
        if self.worst_parameters:
            lines.append("  disagreeing parameters: " + ", ".join(self.worst_parameters))
        return "\n".join(lines)


def _relative_error(analytic: float, numeric: float, floor: float) -> float:
    return abs(analytic - numeric) / max(abs(analytic), abs(numeric), floor)


def gradient_check(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any = None, *, key: Any = None,
                   num_coordinates: int = 20, num_directions: int = 5, step: float | None = None,
                   atol: float | None = None) -> GradientCheck:
    """Check ``jax.grad(loss_fn)`` at ``params`` on ``batch`` against central differences (see the module
    docstring). ``num_coordinates`` random parameter coordinates (every leaf gets at least one while there are
    enough) and ``num_directions`` random unit directions; ``step`` h defaults to ε^(1/5) (float64) or ε^(1/3)
    (float32) times max(1, ‖θ‖∞); ``atol`` (default 1e-12 in float64, 1e-6 in float32) is the least denominator of a
    relative error, so two derivatives that are both ~0 agree. Cost: one gradient and 4 (float64) or 2 (float32)
    loss evaluations per probe."""
    flat, unravel = ravel_pytree(params)
    if flat.size == 0 or not jnp.issubdtype(flat.dtype, jnp.floating):
        raise ValueError("params: expected a pytree of floating-point arrays with at least one entry")
    if num_coordinates < 0 or num_directions < 0 or num_coordinates + num_directions == 0:
        raise ValueError(f"expected num_coordinates, num_directions >= 0 and at least one probe, got "
                         f"{num_coordinates} and {num_directions}")
    dtype = "float64" if flat.dtype == jnp.float64 else "float32"
    # float64: the five-point central stencil (error O(h⁴), h ~ ε^(1/5)) keeps rounding and truncation near 1e-12,
    # so derivatives down to ~1e-4 still come out "good"; float32: the three-point one with h ~ ε^(1/3), a small
    # step being what ReLU kinks need.
    five_point = dtype == "float64"
    power = 1 / 5 if five_point else 1 / 3
    step = float(np.finfo(dtype).eps ** power * max(1.0, float(jnp.max(jnp.abs(flat))))) if step is None else step
    atol = (1e-12 if dtype == "float64" else 1e-6) if atol is None else atol
    key = jax.random.PRNGKey(0) if key is None else key
    coordinate_key, direction_key = jax.random.split(key)

    loss_of_flat = jax.jit(lambda v: loss_fn(unravel(v), batch))
    gradient = np.asarray(jax.jit(jax.grad(lambda v: loss_fn(unravel(v), batch)))(flat), np.float64)
    # Rounding in the stencil's loss values alone moves the difference by ~c·ε·|L|/h (c = Σ|weights|/12 = 1.5 for
    # the five-point stencil, 1 for the three-point one): the denominator is at least the level where that noise
    # would still read "good", so a derivative that is 0 in autodiff and rounding noise in the difference agrees.
    noise_times_step = (1.5 if five_point else 1.0) * float(np.finfo(dtype).eps) * abs(float(loss_of_flat(flat)))
    floor_at = lambda h: max(atol, noise_times_step / h / BANDS[dtype][0])  # noqa: E731
    if not np.all(np.isfinite(gradient)):
        raise FloatingPointError("gradient_check: the autodiff gradient is not finite at these parameters")

    # Where each flat index lives: (path, offset in the flat vector, shape) of every leaf, in ravel order.
    leaves = jax.tree_util.tree_leaves_with_path(params)
    offsets = np.cumsum([0] + [int(np.size(leaf)) for _, leaf in leaves])
    names = [jax.tree_util.keystr(path) for path, _ in leaves]
    rng = np.random.default_rng(np.asarray(jax.random.key_data(coordinate_key)).ravel().tolist())
    chosen = [int(offsets[i] + rng.integers(offsets[i + 1] - offsets[i])) for i in range(len(leaves))
              if offsets[i + 1] > offsets[i]]
    rng.shuffle(chosen)
    chosen = chosen[:num_coordinates]
    extra = num_coordinates - len(chosen)
    if extra > 0:
        chosen += rng.choice(flat.size, size=min(extra, flat.size), replace=False).tolist()

    def located(index: int) -> tuple[str, str]:
        """(the parameter's path, the coordinate's path with its index)."""
        leaf = int(np.searchsorted(offsets, index, side="right") - 1)
        position = np.unravel_index(index - offsets[leaf], np.shape(leaves[leaf][1]))
        return names[leaf], f"{names[leaf]}[{', '.join(map(str, position))}]" if position else names[leaf]

    def at(offset: float, direction: jax.Array) -> float:
        return float(loss_of_flat(flat + offset * direction))

    def difference(direction: jax.Array, h: float) -> float:
        if five_point:
            return (at(-2 * h, direction) - 8 * at(-h, direction) + 8 * at(h, direction) - at(2 * h, direction)) / (
                12 * h)
        return (at(h, direction) - at(-h, direction)) / (2 * h)

    # In float64 a probe that is not "good" at h is measured again at h/30: a kink (a ReLU whose input crosses 0
    # within the stencil's ±2h) spoils only the larger step, while a wrong gradient is off at every step. (float32
    # keeps one step: its rounding noise at h/30 would hide real errors.)
    steps = (step, step / 30) if five_point else (step,)

    def probe(direction: jax.Array, analytic: float, where: str, parameter: str | None = None) -> dict:
        best = None
        for h in steps:
            numeric = difference(direction, h)
            error = _relative_error(analytic, numeric, floor_at(h))
            if best is None or error < best["relative_error"]:
                best = {"where": where, "parameter": parameter, "analytic": analytic, "numeric": numeric,
                        "relative_error": error, "verdict": verdict_for(error, dtype), "step": h}
            if best["verdict"] == "good":
                break
        return best

    coordinates = [probe(jnp.zeros_like(flat).at[i].set(1), float(gradient[i]), located(i)[1], located(i)[0])
                   for i in chosen]
    directions = []
    for index in range(num_directions):
        d = np.array(jax.random.normal(jax.random.fold_in(direction_key, index), flat.shape, flat.dtype), np.float64)
        d = d / np.linalg.norm(d)
        directions.append(probe(jnp.asarray(d, flat.dtype), float(gradient @ d), f"random direction {index}"))
    probes = coordinates + directions
    verdict = VERDICTS[max(VERDICTS.index(p["verdict"]) for p in probes)]
    bad = sorted((p for p in coordinates if p["verdict"] in ("suspicious", "wrong")),
                 key=lambda p: -p["relative_error"])
    worst_parameters = list(dict.fromkeys(p["parameter"] for p in bad))
    return GradientCheck(verdict=verdict, dtype=dtype, step=step, coordinates=coordinates, directions=directions,
                         worst_parameters=worst_parameters)
