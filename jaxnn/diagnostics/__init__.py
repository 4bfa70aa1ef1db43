"""Diagnostics: looking inside a training run. ``gradient_check`` compares autodiff with finite differences;
``layer_statistics`` reports every layer's activations, gradients and update sizes on a batch."""

from jaxnn.diagnostics import doctor
from jaxnn.diagnostics.gradcheck import GradientCheck, gradient_check, verdict_for
from jaxnn.diagnostics.layers import LayerStatistics, LayerStatisticsCallback, layer_statistics

__all__ = ["doctor", "GradientCheck", "gradient_check", "verdict_for", "LayerStatistics", "LayerStatisticsCallback",
           "layer_statistics"]
