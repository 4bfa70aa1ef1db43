"""Callbacks that ``fit`` calls: the one door from the training loop to analysis.

A callback is any object with some of ``on_train_begin(ctx)``, ``on_step_end(ctx)``, ``on_eval_end(ctx)``,
``on_train_end(ctx)``; the base class gives no-op defaults.  ``ctx`` is a :class:`FitContext`:

- ``ctx.step``          number of optimizer steps done so far (int)
- ``ctx.state``         the current :class:`~jaxnn.train.state.TrainState`
- ``ctx.loss_fn()``     the current eval-mode pure ``loss_fn(params, batch)`` (model state closed over)
- ``ctx.analysis_batch`` a fixed batch ``(x, y)`` of ``batch_size`` training examples, on device
- ``ctx.analysis_examples(n)`` a fixed set ``(x, y)`` of ``n`` training examples (all of them when the split is
  smaller), on device: the first ``n`` of one fixed shuffle (seeded by ``fit``'s seed), the same set at every call
- ``ctx.learning_rate(step)`` the schedule's learning rate at ``step`` (None when ``fit`` was given no schedule)
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
    analysis_examples: Callable[[int], Any] | None = None
    learning_rate: Callable[[int], float] | None = None
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


class Patience:
    """The early-stopping rule, for one run or every member of a population at once (``size`` members): a value
    improves on the best so far when it is lower (``mode="min"``) / higher (``"max"``) by more than ``min_delta``
    (NaN never improves); ``patience`` evaluations in a row without improvement and the run stops."""

    def __init__(self, patience: int, mode: str = "min", min_delta: float = 0.0, size: int | tuple = ()):
        import numpy as np

        if mode not in ("min", "max"):
            raise ValueError(f"early stopping mode must be 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"early stopping patience must be an integer >= 1, got {patience!r}")
        self.patience, self.mode, self.min_delta = patience, mode, min_delta
        self.best = np.full(size, math.inf if mode == "min" else -math.inf)
        self.bad_evals = np.zeros(size, int)

    def update(self, values: Any, active: Any = True) -> Any:
        """Record one evaluation of the runs where ``active``; True where patience ran out at this evaluation."""
        import numpy as np

        values = np.asarray(values, float)
        if self.mode == "min":
            better = values < self.best - self.min_delta
        else:
            better = values > self.best + self.min_delta
        better, worse = better & active, ~better & active
        self.best = np.where(better, values, self.best)
        self.bad_evals = np.where(better, 0, self.bad_evals + worse)
        return worse & (self.bad_evals >= self.patience)


class EarlyStopping(Callback):
    """Stop when ``monitor`` (an eval metric, e.g. ``val_loss``) has not improved for ``patience`` evals
    (:class:`Patience`'s rule, which populations apply member by member)."""

    def __init__(self, monitor: str = "val_loss", patience: int = 5, mode: str = "min", min_delta: float = 0.0):
        self.monitor = monitor
        self.rule = Patience(patience, mode, min_delta)

    @property
    def best(self) -> float:
        return float(self.rule.best)

    @property
    def bad_evals(self) -> int:
        return int(self.rule.bad_evals)

    def on_eval_end(self, ctx: FitContext) -> None:
        if self.monitor not in ctx.eval_metrics:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r}, but eval produced {sorted(ctx.eval_metrics)}")
        if self.rule.update(ctx.eval_metrics[self.monitor]):
            ctx.request_stop(f"early stop: {self.monitor} did not improve for {self.rule.patience} evaluations")
