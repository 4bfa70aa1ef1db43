"""jaxnn: compiled training and loss-surface analysis on one pure ``loss_fn(params, batch)``.

The public API is flat, by concept: ``jaxnn.data``, ``jaxnn.models``, ``jaxnn.losses``, ``jaxnn.optim``,
``jaxnn.train``, ``jaxnn.curvature``, ``jaxnn.landscape``, ``jaxnn.diagnostics``, ``jaxnn.parallel``, ``jaxnn.plotting``,
``jaxnn.config``.

Submodules load on first use (PEP 562), so ``import jaxnn`` costs nothing and the ``jaxnn`` command can parse its
arguments (``--devices``, the compilation cache) before jax is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("config", "curvature", "data", "diagnostics", "landscape", "losses", "models", "optim", "parallel",
               "plotting", "train", "runtime", "analysis", "validation")
_ATTRIBUTES = {
    "Config": "jaxnn.config",
    "load_config": "jaxnn.config",
    "make_loss_fn": "jaxnn.losses",
    "enable_compilation_cache": "jaxnn.runtime",
}

__all__ = ["config", "curvature", "data", "diagnostics", "landscape", "losses", "models", "optim", "parallel",
           "plotting", "train", "Config", "load_config", "make_loss_fn", "enable_compilation_cache", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxnn.{name}")
    if name in _ATTRIBUTES:
        return getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    raise AttributeError(f"module 'jaxnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES) | set(_ATTRIBUTES))
