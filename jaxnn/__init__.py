"""jaxnn: compiled training and loss-surface analysis on one pure ``loss_fn(params, batch)``.

The public API is flat, by concept: ``jaxnn.data``, ``jaxnn.models``, ``jaxnn.losses``, ``jaxnn.optim``,
``jaxnn.train``, ``jaxnn.curvature``, ``jaxnn.landscape``, ``jaxnn.parallel``, ``jaxnn.plotting``,
``jaxnn.config``.
"""

__version__ = "0.1.0"

from jaxnn import config, curvature, data, landscape, losses, models, optim, parallel, plotting, train  # noqa: E402
from jaxnn.config import Config, load_config  # noqa: E402
from jaxnn.losses import make_loss_fn  # noqa: E402

__all__ = ["config", "curvature", "data", "landscape", "losses", "models", "optim", "parallel", "plotting", "train",
           "Config", "load_config", "make_loss_fn", "__version__"]
