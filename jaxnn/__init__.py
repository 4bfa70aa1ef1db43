"""jaxnn: compiled training and loss-surface analysis on one pure ``loss_fn(params, batch)``."""

__version__ = "0.1.0"
