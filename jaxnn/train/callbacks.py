"""Callbacks that ``fit`` calls: the one door from the training loop to analysis.

A callback is any object with some of ``on_train_begin(ctx)``, ``on_step_end(ctx)``, ``on_eval_end(ctx)``,
``on_train_end(ctx)``; the base class gives no-op defaults.  ``ctx`` is a :class:`FitContext`:

- ``ctx.step``          number of optimizer steps done so far (int)
- ``ctx.state``         the current :class:`~jaxnn.train.state.TrainState`
- ``ctx.loss_fn()``     the current eval-mode pure ``loss_fn(params, batch)`` (model state closed over)
- ``ctx.analysis_batch`` a fixed batch ``(x, y)`` from the training split, on device
- ``ctx.log(d)``        merge a dict of floats into this step's ``metrics.jsonl`` record
- ``ctx.metrics``       the last logged train metrics (host floats), ``ctx.eval_metrics`` the last eval
- ``ctx.run_dir``       the run folder (or None), ``ctx.request_stop(reason)`` ends training cleanly
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable


class Callback:
    """No-op base: subclass and override what you need."""

    def on_train_begin(self, ctx: "FitContext") -> None:
        pass

    def on_step_end(self, ctx: "FitContext") -> None:
        pass

    def on_eval_end(self, ctx: "FitContext") -> None:
        pass

    def on_train_end(self, ctx: "FitContext") -> None:
        pass


@dataclasses.dataclass
class FitContext:
    """What a callback sees; ``fit`` owns and updates it."""

    state: Any
    make_loss_fn: Callable[[Any], Callable]
    analysis_batch: Any
    run_dir: Any = None
    step: int = 0
    metrics: dict = dataclasses.field(default_factory=dict)
    eval_metrics: dict = dataclasses.field(default_factory=dict)
    stop_reason: str | None = None
    _pending: dict = dataclasses.field(default_factory=dict)

    def loss_fn(self) -> Callable:
        """Eval-mode ``loss_fn(params, batch)`` for the current model state."""
        return self.make_loss_fn(self.state)

    def log(self, values: dict) -> None:
        """Add scalars to the metrics record written for the current step."""
        for name, value in values.items():
            self._pending[name] = float(value)

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason

    def pop_pending(self) -> dict:
        pending, self._pending = self._pending, {}
        return pending


class EarlyStopping(Callback):
    """Stop when ``monitor`` (an eval metric, e.g. ``val_loss``) has not improved for ``patience`` evals."""

    def __init__(self, monitor: str = "val_loss", patience: int = 5, mode: str = "min", min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"EarlyStopping patience must be >= 1, got {patience}")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, min_delta
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_evals = 0

    def on_eval_end(self, ctx: FitContext) -> None:
        if self.monitor not in ctx.eval_metrics:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r}, but eval produced {sorted(ctx.eval_metrics)}")
        value = ctx.eval_metrics[self.monitor]
        better = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if better:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
            if self.bad_evals >= self.patience:
                ctx.request_stop(f"early stop: {self.monitor} did not improve for {self.patience} evaluations")
