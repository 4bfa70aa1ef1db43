"""One-call curvature summary of a trained model: ``curvature_report`` and ``write_curvature_report``.

The report is a JSON-serialisable dict (non-finite numbers are stored as ``null``): extreme eigenvalues with
residuals, conditioning, the critical-point test, the trace, second-order quantities along the gradient (with the
actual loss change of the quadratic model's optimal step as a check), optionally the SLQ spectral density, and the
time and number of Hessian-vector products each part took.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.curvature.conditioning import classify_critical_point, condition_number
from jaxnn.curvature.density import spectral_density
from jaxnn.curvature.gradient_direction import gradient_curvature, predicted_loss_change
from jaxnn.curvature.krylov import default_num_iters, lanczos
from jaxnn.curvature.operators import hessian, precise_jit
from jaxnn.curvature.trace_estimators import TRACE_METHODS, trace
from jaxnn.validation import check_choice, check_int, check_key

REPORT_FILE = "curvature.json"
FIGURE_FILE = "spectrum.png"
BLOCKS_FIGURE_FILE = "blocks.png"


def _json_number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _json_numbers(values: Any) -> list[float | None]:
    return [_json_number(v) for v in np.ravel(np.asarray(jax.device_get(values), dtype=np.float64))]


@precise_jit
def _gradient_step(params, gradient, step_size):
    """θ − ε g (one compiled call)."""
    return jax.tree.map(lambda p, g: p - jnp.asarray(step_size, p.dtype) * g, params, gradient)


def curvature_report(
    loss_fn: Any,
    params: Any,
    data: Any,
    *,
    k: int = 5,
    density: bool = False,
    key: Any,
    progress: bool = True,
    num_iters: int | None = None,
    trace_samples: int = 60,
    trace_method: str = "hutch++",
    density_probes: int = 4,
    density_iters: int | None = None,
    gradient_tolerance: float = 1e-3,
    stacked: bool = False,
    blocks: str | None = None,
    block_iters: int = 30,
    convergence_tol: float = 1e-3,
) -> dict:
    """Curvature summary of ``loss_fn`` at ``params`` over ``data`` (one batch, a list of batches, or stacked).

    Cost in HVPs: num_iters (default max(40, 4k)) + 2k residuals + trace_samples + 1 (gᵀHg)
    [+ density_probes · density_iters (default num_iters)], plus 2 gradient/loss passes. The count is in
    ``report["num_hvps"]``. Every eigenvalue carries its computed residual ‖Hv − λv‖ and ``converged`` (residual ≤
    ``convergence_tol``·|λ|): an unconverged value is an estimate, not an eigenvalue. ``blocks="layer"`` adds every
    layer's block (:func:`jaxnn.curvature.block_spectra`: top-k with residual bounds and converged flags, trace,
    SLQ nodes and weights; ``density_probes`` runs of ``block_iters`` steps per block) under ``report["blocks"]``.

    Compiled programs are shared: the Lanczos run and the density's Lanczos runs are one program (same basis size
    when ``density_iters`` is left at ``num_iters``), and the residuals, the trace probes and gᵀHg go through one
    single-product program. A second report on the same model in the same process (or, with the persistent
    compilation cache, in any later process) compiles nothing.
    """
    key = check_key(key)
    k = check_int(k, "k")
    check_choice(trace_method, "trace_method", choices=TRACE_METHODS)
    trace_samples = check_int(trace_samples, "trace_samples", minimum=4 if trace_method == "hutch++" else 2)
    total_start = time.perf_counter()
    timing: dict[str, float] = {}
    lanczos_key, trace_key, density_key = jax.random.split(key, 3)

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        timing[name] = time.perf_counter() - start
        return out

    op = timed("setup", lambda: hessian(loss_fn, params, data, stacked=stacked))
    k = check_int(k, "k", maximum=op.num_params, maximum_name="num_params")
    loss, gradient = timed("gradient", op.loss_and_gradient)
    loss = float(loss)
    if num_iters is None:
        num_iters = default_num_iters(op.num_params, k)
    result = timed("lanczos", lambda: lanczos(op, lanczos_key, num_iters, k=k, progress=progress))
    conditioning = condition_number(op, lanczos_result=result)
    critical = classify_critical_point(
        op, gradient=gradient, lanczos_result=result, gradient_tolerance=gradient_tolerance
    )
    trace_estimate = timed("trace", lambda: trace(op, trace_key, trace_samples, trace_method, chunk_size=1,
                                                  progress=progress))
    along_gradient = timed("gradient_direction", lambda: gradient_curvature(op, gradient=gradient))

    optimal = along_gradient.optimal_step
    check_step = {"step_size": None, "predicted_change": None, "actual_change": None}
    if math.isfinite(optimal):
        stepped = _gradient_step(op.params, gradient, optimal)
        actual = float(timed("loss_at_optimal_step", lambda: op.loss_value(stepped))) - loss
        check_step = {
            "step_size": _json_number(optimal),
            "predicted_change": _json_number(predicted_loss_change(along_gradient, optimal)),
            "actual_change": _json_number(actual),
        }

    num_hvps = result.num_matvecs + trace_estimate.num_matvecs + along_gradient.num_matvecs
    report: dict[str, Any] = {
        "num_params": op.num_params,
        "num_batches": op.num_batches,
        "num_examples": op.num_examples,
        "dtype": str(op.dtype),
        "loss": _json_number(loss),
        "gradient_norm": _json_number(critical.gradient_norm),
        "eigenvalues": {
            "method": "lanczos (full re-orthogonalisation)",
            "num_iters": result.num_iters,
            "top": _json_numbers(result.top_eigenvalues),
            "top_residuals": _json_numbers(result.top_residuals),
            "bottom": _json_numbers(result.bottom_eigenvalues),
            "bottom_residuals": _json_numbers(result.bottom_residuals),
            "convergence_tol": convergence_tol,
            "top_converged": _converged(result.top_eigenvalues, result.top_residuals, convergence_tol),
            "bottom_converged": _converged(result.bottom_eigenvalues, result.bottom_residuals, convergence_tol),
        },
        "conditioning": {
            "lambda_max": _json_number(conditioning.lambda_max),
            "lambda_min": _json_number(conditioning.lambda_min),
            "condition_number": _json_number(conditioning.condition_number),
            "nonconvexity_ratio": _json_number(conditioning.nonconvexity_ratio),
            "verdict": conditioning.verdict,
            "positive_definite": bool(conditioning.positive_definite),
        },
        "critical_point": {
            "kind": critical.kind,
            "gradient_tolerance": gradient_tolerance,
            "escape_curvature": None if critical.escape_curvature is None else _json_number(critical.escape_curvature),
        },
        "trace": {
            "estimate": _json_number(trace_estimate.estimate),
            "standard_error": _json_number(trace_estimate.standard_error),
            "num_samples": trace_estimate.num_samples,
            "method": trace_estimate.method,
        },
        "gradient_direction": {
            "gradient_curvature_product": _json_number(along_gradient.gradient_curvature_product),
            "directional_curvature": _json_number(along_gradient.directional_curvature),
            "optimal_step": _json_number(along_gradient.optimal_step),
            "largest_nonincreasing_step": _json_number(along_gradient.largest_nonincreasing_step),
            "stable_lr_bound": _json_number(2.0 / conditioning.lambda_max) if conditioning.lambda_max > 0 else None,
            "quadratic_model_check": check_step,
        },
    }
    if density:
        slq = timed(
            "density",
            lambda: spectral_density(op, density_key, density_probes, density_iters or num_iters, progress=progress),
        )
        num_hvps += slq.num_matvecs
        report["density"] = {
            "grid": _json_numbers(slq.grid),
            "density": _json_numbers(slq.density),
            "nodes": [_json_numbers(row) for row in slq.nodes],
            "weights": [_json_numbers(row) for row in slq.weights],
            "sigma": slq.sigma,
            "num_probes": density_probes,
            "num_iters": int(slq.nodes.shape[1]),
        }
    if blocks is not None:
        if blocks != "layer":
            raise ValueError(f"blocks: expected None or 'layer', got {blocks!r}")
        from jaxnn.curvature.blocks import block_spectra, layer_blocks

        smallest = min(block.num_params for block in layer_blocks(op).values())
        spectra = timed("blocks", lambda: block_spectra(
            op, "layer", k=min(k, smallest, block_iters), key=jax.random.fold_in(key, 7), num_iters=block_iters,
            num_probes=density_probes, tol=convergence_tol))
        report["blocks"] = {name: {**entry, "nodes": [_json_numbers(row) for row in block.nodes],
                                   "weights": [_json_numbers(row) for row in block.weights]}
                            for (name, entry), block in zip(spectra.as_dict().items(), spectra.blocks)}
        num_hvps += sum(spectra.num_probes * min(block_iters, b.num_params) for b in spectra.blocks)
    timing["total"] = time.perf_counter() - total_start
    report["num_hvps"] = int(num_hvps)
    report["timing_seconds"] = {name: round(seconds, 6) for name, seconds in timing.items()}
    return report


def _converged(values: Any, residuals: Any, tol: float) -> list[bool]:
    values, residuals = np.asarray(values, np.float64), np.asarray(residuals, np.float64)
    return [bool(r <= tol * abs(v)) for v, r in zip(values, residuals)]


def write_curvature_report(report: dict, out_dir: str | os.PathLike, *, draw: Any = None) -> dict[str, str]:
    """Write ``curvature.json`` and ``spectrum.png`` into ``out_dir`` (created if missing); return their paths.

    ``draw(function, *args)`` draws the figure (default: now, in this process; ``jaxnn.plotting.FigureWorker().submit``
    draws it in a background process)."""
    if not isinstance(report, dict) or "eigenvalues" not in report:
        raise ValueError("report: expected the dict returned by curvature_report (with an 'eigenvalues' entry)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / REPORT_FILE
    with open(json_path, "w") as handle:
        json.dump(report, handle, indent=2, allow_nan=False)
    figure_path = out_dir / FIGURE_FILE
    from jaxnn.plotting import FigureFunction  # matplotlib loads where (and when) the figure is drawn

    draw = draw or (lambda function, *args: function(*args))
    draw(FigureFunction("jaxnn.curvature.plots", "plot_spectrum"), report, figure_path)
    paths = {"json": str(json_path), "figure": str(figure_path)}
    if report.get("blocks"):
        paths["blocks_figure"] = str(out_dir / BLOCKS_FIGURE_FILE)
        draw(FigureFunction("jaxnn.curvature.plots", "plot_blocks"), report["blocks"], paths["blocks_figure"])
    return paths
