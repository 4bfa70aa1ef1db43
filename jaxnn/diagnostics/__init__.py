"""Diagnostics: looking inside a training run. ``gradient_check`` compares autodiff with finite differences;
``layer_statistics`` reports every layer's activations, gradients and update sizes on a batch; ``gradient_noise`` the
per-example gradients' noise scale and per-layer signal-to-noise ratio; ``find_nonfinite``
names the layer and the operation behind a NaN. (The sanity checks of a new model, which train it, are
``jaxnn.train.doctor``.)"""

from jaxnn.diagnostics.gradcheck import GradientCheck, gradient_check, verdict_for
from jaxnn.diagnostics.gradient_noise import (
    GradientNoise,
    GradientNoiseCallback,
    gradient_noise,
    two_batch_noise_scale,
)
from jaxnn.diagnostics.layers import LayerStatistics, LayerStatisticsCallback, layer_statistics
from jaxnn.diagnostics.nonfinite import NonFiniteReport, find_nonfinite

__all__ = ["GradientCheck", "gradient_check", "verdict_for", "GradientNoise", "GradientNoiseCallback",
           "gradient_noise", "two_batch_noise_scale", "LayerStatistics", "LayerStatisticsCallback",
           "layer_statistics", "NonFiniteReport", "find_nonfinite"]
