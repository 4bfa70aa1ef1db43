"""Conditioning and critical points from the ends of the spectrum.

* condition number κ = λmax/λmin (positive definite; λmin/λmax when negative definite; ∞ otherwise);
* Li et al. (2018) non-convexity ratio |λmin|/|λmax|;
* a definiteness verdict and the second-order critical-point test (minimum / maximum / saddle / degenerate),
  with the escape direction (eigenvector of the most negative eigenvalue) at a saddle.

"Zero" is relative: |λ| <= zero_tolerance · max(|λmax|, |λmin|), default 100 · machine epsilon of the dtype.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.curvature.krylov import LanczosResult, default_num_iters, lanczos
from jaxnn.curvature.operators import CurvatureOperator, precise_jit, require_operator
from jaxnn.curvature.products import tree_vdot
from jaxnn.validation import check_key, check_like, check_positive_float

VERDICTS = (
    "positive definite",
    "positive semidefinite",
    "negative definite",
    "negative semidefinite",
    "indefinite",
    "zero",
)
CRITICAL_POINT_KINDS = ("minimum", "maximum", "saddle", "degenerate", "not critical")


class ConditionNumber(NamedTuple):
    lambda_max: float
    lambda_min: float
    condition_number: float  # λmax/λmin if λmin > 0; λmin/λmax if λmax < 0; inf otherwise
    nonconvexity_ratio: float  # |λmin| / |λmax| (Li et al. 2018); nan if λmax = 0
    verdict: str  # one of VERDICTS
    positive_definite: bool


class CriticalPoint(NamedTuple):
    kind: str  # one of CRITICAL_POINT_KINDS
    gradient_norm: float
    lambda_min: float
    lambda_max: float
    escape_direction: Any  # unit eigenvector pytree of λmin when λmin < 0 (saddle or maximum), else None
    escape_curvature: float | None  # λmin when an escape direction is returned


@precise_jit
def _tree_norm(tree):
    return jnp.sqrt(tree_vdot(tree, tree))


@precise_jit
def _first(tree):
    """Entry 0 along the leading axis of every leaf."""
    return jax.tree.map(lambda leaf: leaf[0], tree)


def _extremes(op, key, lanczos_result, num_iters, progress) -> LanczosResult:
    if lanczos_result is not None:
        if not isinstance(lanczos_result, LanczosResult):
            raise TypeError(f"lanczos_result: expected a LanczosResult, got {type(lanczos_result).__name__}")
        return lanczos_result
    key = jax.random.key(0) if key is None else check_key(key)
    if num_iters is None:
        num_iters = default_num_iters(op.num_params, 1)
    return lanczos(op, key, num_iters, k=1, compute_residuals=False, progress=progress)


def _zero_tolerance(op: CurvatureOperator, zero_tolerance: float | None) -> float:
    if zero_tolerance is None:
        return 100.0 * float(jnp.finfo(op.dtype).eps)
    return check_positive_float(zero_tolerance, "zero_tolerance", allow_zero=True)


def spectrum_verdict(lambda_max: float, lambda_min: float, zero_tolerance: float) -> str:
    """Definiteness from the spectrum's ends, with |λ| <= zero_tolerance·max(|λmax|, |λmin|) counted as 0."""
    scale = max(abs(lambda_max), abs(lambda_min))
    threshold = zero_tolerance * scale
    positive_end = lambda_max > threshold
    negative_end = lambda_min < -threshold
    if scale == 0 or (not positive_end and not negative_end):
        return "zero"
    if positive_end and negative_end:
        return "indefinite"
    if positive_end:
        return "positive definite" if lambda_min > threshold else "positive semidefinite"
    return "negative definite" if lambda_max < -threshold else "negative semidefinite"


def condition_from_extremes(lambda_max: float, lambda_min: float, zero_tolerance: float) -> ConditionNumber:
    """κ, the non-convexity ratio and the verdict from λmax and λmin (no operator products)."""
    verdict = spectrum_verdict(lambda_max, lambda_min, zero_tolerance)
    if verdict == "positive definite":
        kappa = lambda_max / lambda_min
    elif verdict == "negative definite":
        kappa = lambda_min / lambda_max
    else:
        kappa = math.inf
    ratio = abs(lambda_min) / abs(lambda_max) if lambda_max != 0 else math.nan
    return ConditionNumber(lambda_max, lambda_min, kappa, ratio, verdict, verdict == "positive definite")


def condition_number(
    op: CurvatureOperator,
    key: Any = None,
    *,
    lanczos_result: LanczosResult | None = None,
    num_iters: int | None = None,
    zero_tolerance: float | None = None,
    progress: bool = True,
    like: Any = None,
) -> ConditionNumber:
    """κ = λmax/λmin, |λmin|/|λmax| and the definiteness verdict of ``op``.

    Uses ``lanczos_result`` when given (no products); otherwise runs Lanczos from ``key`` (default key(0)) for
    ``num_iters`` steps (default max(40, 4), capped by the parameter count) — that many products.
    """
    op = require_operator(op, like=like)
    result = _extremes(op, key, lanczos_result, num_iters, progress)
    lambda_max = float(result.top_eigenvalues[0])
    lambda_min = float(result.bottom_eigenvalues[0])
    return condition_from_extremes(lambda_max, lambda_min, _zero_tolerance(op, zero_tolerance))


def classify_critical_point(
    op: CurvatureOperator,
    key: Any = None,
    *,
    gradient: Any = None,
    gradient_tolerance: float = 1e-3,
    zero_tolerance: float | None = None,
    lanczos_result: LanczosResult | None = None,
    num_iters: int | None = None,
    progress: bool = True,
    like: Any = None,
) -> CriticalPoint:
    """Second-order test at θ: ||∇L|| <= gradient_tolerance, then λmin > 0 → minimum, λmax < 0 → maximum,
    λmin < 0 < λmax → saddle (escape along the λmin eigenvector), otherwise degenerate (a zero eigenvalue at an end:
    the test is inconclusive). A point whose gradient norm exceeds the tolerance is "not critical".

    ``gradient`` defaults to ``op.loss_and_gradient()`` (one gradient pass). Cost as :func:`condition_number`
    (the eigenvector of λmin comes from the same Lanczos run).
    """
    op = require_operator(op, like=like)
    gradient_tolerance = check_positive_float(gradient_tolerance, "gradient_tolerance", allow_zero=True)
    if gradient is None:
        _, gradient = op.loss_and_gradient()
    else:
        gradient = check_like(gradient, "gradient", reference=op.params)
    gradient_norm = float(_tree_norm(gradient))
    if not np.isfinite(gradient_norm):
        raise FloatingPointError(f"gradient: expected a finite gradient, got norm {gradient_norm}")
    result = _extremes(op, key, lanczos_result, num_iters, progress)
    lambda_max = float(result.top_eigenvalues[0])
    lambda_min = float(result.bottom_eigenvalues[0])
    verdict = spectrum_verdict(lambda_max, lambda_min, _zero_tolerance(op, zero_tolerance))
    if verdict == "positive definite":
        kind = "minimum"
    elif verdict == "negative definite":
        kind = "maximum"
    elif verdict == "indefinite":
        kind = "saddle"
    else:
        kind = "degenerate"
    if gradient_norm > gradient_tolerance:
        kind = "not critical"
    escape_direction, escape_curvature = None, None
    if verdict in ("indefinite", "negative definite", "negative semidefinite"):
        escape_direction = _first(result.bottom_eigenvectors)
        escape_curvature = lambda_min
    return CriticalPoint(kind, gradient_norm, lambda_min, lambda_max, escape_direction, escape_curvature)
