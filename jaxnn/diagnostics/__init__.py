"""Diagnostics: looking inside a training run. ``gradient_check`` compares autodiff with finite differences."""

from jaxnn.diagnostics.gradcheck import GradientCheck, gradient_check, verdict_for

__all__ = ["GradientCheck", "gradient_check", "verdict_for"]
