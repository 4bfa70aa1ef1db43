"""Curvature engine: matrix-free Hessian / GGN / Fisher operators on parameter pytrees and their estimators.

Works on any pure ``loss_fn(params, batch) -> scalar`` (no Flax dependency)::

    H = curvature.hessian(loss_fn, params, data)          # Hv = ∂/∂ε ∇L(θ+εv)|ε=0, over one or many batches
    values, vectors = curvature.top_eigenvalues(H, k=5, key=key)
    result = curvature.lanczos(H, key, num_iters=80, k=5)  # top-k and bottom-k with residuals
    curvature.condition_number(H, lanczos_result=result)
    curvature.trace(H, key, num_samples=100, method="hutch++")
    curvature.spectral_density(H, key, num_probes=4, num_iters=80)
    curvature.block_spectra(H, key=key)                    # every layer's block: top-k, residuals, trace, density
    curvature.top_eigenvalues(curvature.restrict(H, "Dense_0"), k=3)   # one layer's block
    curvature.solve(H, b, damping=1e-3, method="minres")    # (H + δI)⁻¹ b, with its residual and converged flag
    curvature.influence(loss_fn, params, train, test)       # each training example's effect on a test loss
    curvature.self_influence(loss_fn, params, train, damping=0.01)  # ∇ℓ_iᵀ(H+δI)⁻¹∇ℓ_i: mislabeled ones first
    K = curvature.kfac(predict_fn, output_loss, params, data, ekfac=True)   # Kronecker factors, no layer tagging
"""

from jaxnn.curvature.batches import BatchGroup, prepare_data
from jaxnn.curvature.blocks import (
    BlockSpectra,
    BlockSpectrum,
    block_spectra,
    layer_blocks,
    layer_names,
    parameter_paths,
    restrict,
)
from jaxnn.curvature.callback import STABILITY_RULES, HessianCallback, stable_curvature
from jaxnn.curvature.conditioning import (
    ConditionNumber,
    CriticalPoint,
    classify_critical_point,
    condition_from_extremes,
    condition_number,
    spectrum_verdict,
)
from jaxnn.curvature.dense import dense_hessian, dense_matrix, finite_difference_hvp
from jaxnn.curvature.density import SpectralDensity, gaussian_broadening, spectral_density
from jaxnn.curvature.population import (
    population_gradient_curvature,
    population_hessian_trace,
    population_sharpness,
    population_extreme_eigenvalues,
    population_top_eigenvalues,
    population_trace,
)
from jaxnn.curvature.gradient_direction import (
    GradientCurvature,
    NewtonStep,
    gradient_curvature,
    newton_step,
    predicted_loss_change,
)
from jaxnn.curvature.influence import InfluenceResult, SelfInfluenceResult, influence, self_influence
from jaxnn.curvature.kfac import KFAC, kfac, kfac_preconditioner
from jaxnn.curvature.krylov import LanczosResult, bottom_eigenvalues, lanczos, top_eigenvalues
from jaxnn.curvature.operators import CurvatureOperator, fisher, ggn, hessian, linear_operator
from jaxnn.curvature.products import tree_vdot
from jaxnn.curvature.power import PowerIterationResult, power_iteration
from jaxnn.curvature.report import curvature_report, write_curvature_report
from jaxnn.curvature.solve import SolveResult, solve
from jaxnn.curvature.trace_estimators import DiagonalEstimate, TraceEstimate, hessian_diagonal, trace

_PLOTS = ("plot_blocks", "plot_influence", "plot_spectral_density", "plot_spectrum")


def __getattr__(name):
    """The figure functions load matplotlib, so they are imported on first use."""
    if name in _PLOTS:
        from jaxnn.curvature import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'jaxnn.curvature' has no attribute {name!r}")


__all__ = [
    "BatchGroup",
    "BlockSpectra",
    "BlockSpectrum",
    "ConditionNumber",
    "CriticalPoint",
    "CurvatureOperator",
    "DiagonalEstimate",
    "GradientCurvature",
    "HessianCallback",
    "STABILITY_RULES",
    "stable_curvature",
    "InfluenceResult",
    "KFAC",
    "LanczosResult",
    "NewtonStep",
    "PowerIterationResult",
    "SelfInfluenceResult",
    "SolveResult",
    "SpectralDensity",
    "population_gradient_curvature",
    "population_hessian_trace",
    "population_sharpness",
    "population_extreme_eigenvalues",
    "population_top_eigenvalues",
    "population_trace",
    "TraceEstimate",
    "block_spectra",
    "bottom_eigenvalues",
    "classify_critical_point",
    "condition_from_extremes",
    "condition_number",
    "curvature_report",
    "dense_hessian",
    "dense_matrix",
    "finite_difference_hvp",
    "fisher",
    "gaussian_broadening",
    "ggn",
    "gradient_curvature",
    "hessian",
    "hessian_diagonal",
    "influence",
    "kfac",
    "kfac_preconditioner",
    "lanczos",
    "layer_blocks",
    "layer_names",
    "linear_operator",
    "newton_step",
    "parameter_paths",
    "plot_spectral_density",
    "plot_spectrum",
    "power_iteration",
    "predicted_loss_change",
    "prepare_data",
    "restrict",
    "self_influence",
    "solve",
    "spectral_density",
    "spectrum_verdict",
    "top_eigenvalues",
    "trace",
    "tree_vdot",
    "write_curvature_report",
]
