"""Curvature during training: a callback for ``jaxnn.train.fit`` recording the top Hessian eigenvalues.

It follows the training loop's callback protocol (``on_train_begin(ctx)``, ``on_step_end(ctx)``,
``on_train_end(ctx)``; ``ctx.step``, ``ctx.state.params``, ``ctx.loss_fn()``, ``ctx.analysis_batch``,
``ctx.log(dict)``) by duck typing, so this module does not import the training code (nor Flax).

Every ``every_k_steps`` steps it logs ``lambda_max`` (and ``lambda_2`` … ``lambda_k``), the stability threshold
``sharpness_threshold = 2 / lambda_max`` (gradient descent with a larger learning rate is unstable along the top
eigenvector of a quadratic — the edge-of-stability quantity), the Lanczos iterations used (``lanczos_iters``), and
with ``trace_samples > 0`` the Hutchinson ``trace`` and its standard error ``trace_se``. Lanczos stops once the top-k
pairs' residual bounds are below ``tol``·|λ| (default 1e-3). Cost per measurement: at most ``num_iters`` HVPs
(+ trace_samples).

Compilation is cached on the identity of the loss function's code; a loss function that closes over changing
arrays (e.g. batch-norm statistics) recompiles at every measurement unless it is a ``jax.tree_util.Partial``
holding those arrays as arguments.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax

from jaxnn.curvature.krylov import default_num_iters, lanczos
from jaxnn.curvature.operators import hessian
from jaxnn.curvature.trace_estimators import TRACE_METHODS, trace
from jaxnn.validation import check_choice, check_int, check_key


class PeriodicMeasurement:
    """The shape shared by the analysis callbacks (this one, the diagnostics' layer statistics and gradient noise):
    every ``every_k_steps`` steps, ``self.measure_step(ctx, batch) -> dict of floats`` on ``batch`` (default: the fit's
    analysis batch), merged into that step's metrics.jsonl record and appended to ``history``."""

    def __init__(self, every_k_steps: int, batch: Any = None):
        if isinstance(every_k_steps, bool) or not isinstance(every_k_steps, int) or every_k_steps < 1:
            raise ValueError(f"every_k_steps must be an integer >= 1, got {every_k_steps!r}")
        self.every_k_steps, self.batch = every_k_steps, batch
        self.history: list[dict] = []

    def measure_step(self, ctx: Any, batch: Any) -> dict:
        raise NotImplementedError

    def on_train_begin(self, ctx: Any) -> None:
        self.history = []

    def on_step_end(self, ctx: Any) -> None:
        step = int(ctx.step)
        if step % self.every_k_steps:
            return
        batch = self.batch if self.batch is not None else getattr(ctx, "analysis_batch", None)
        if batch is None:
            raise ValueError(f"batch: {type(self).__name__} needs data; pass batch=... or run fit with an analysis "
                             "batch (ctx.analysis_batch is None)")
        values = self.measure_step(ctx, batch)
        ctx.log(values)
        self.history.append({"step": step, **values})


class HessianCallback(PeriodicMeasurement):
    """Log the top-k Hessian eigenvalues (and optionally the trace) every ``every_k_steps`` training steps.

    ``batch``: the data to measure on (default: ``ctx.analysis_batch``); any form accepted by
    :func:`jaxnn.curvature.hessian`. ``key``: PRNG key for the Lanczos start and trace probes (default key(0));
    each measurement folds in the step number, so runs are reproducible.
    """

    def __init__(
        self,
        every_k_steps: int,
        k: int = 1,
        batch: Any = None,
        trace_samples: int = 0,
        *,
        num_iters: int | None = None,
        key: Any = None,
        trace_method: str = "hutchinson",
        block_size: int = 1,
        tol: float | None = 1e-3,
    ):
        super().__init__(check_int(every_k_steps, "every_k_steps"), batch)
        self.k = check_int(k, "k")
        self.trace_samples = check_int(trace_samples, "trace_samples", minimum=0)
        if self.trace_samples == 1:
            raise ValueError("trace_samples: expected 0 (no trace) or >= 2 (a standard error needs 2), got 1")
        self.num_iters = None if num_iters is None else check_int(num_iters, "num_iters")
        self.key = jax.random.key(0) if key is None else check_key(key)
        self.trace_method = check_choice(trace_method, "trace_method", choices=TRACE_METHODS)
        self.block_size = check_int(block_size, "block_size")
        self.tol = tol

    def measure(self, loss_fn: Any, params: Any, batch: Any, step: int) -> dict[str, float]:
        """The metrics this callback logs, for ``loss_fn`` at ``params`` on ``batch`` (step folds into the key)."""
        start = time.perf_counter()
        op = hessian(loss_fn, params, batch)
        k = min(self.k, op.num_params)
        num_iters = self.num_iters or default_num_iters(op.num_params, k, self.block_size)
        key = jax.random.fold_in(self.key, step)
        lanczos_key, trace_key = jax.random.split(key)
        result = lanczos(op, lanczos_key, num_iters, k=k, block_size=self.block_size, compute_residuals=False,
                         progress=False, tol=self.tol, which="top")
        values = [float(v) for v in jax.device_get(result.top_eigenvalues)]
        metrics = {"lambda_max": values[0]}
        for index, value in enumerate(values[1:], start=2):
            metrics[f"lambda_{index}"] = value
        metrics["sharpness_threshold"] = 2.0 / values[0] if values[0] > 0 else math.inf
        metrics["lanczos_iters"] = float(result.num_iters)
        if self.trace_samples:
            estimate = trace(op, trace_key, self.trace_samples, self.trace_method, progress=False)
            metrics["trace"] = estimate.estimate
            metrics["trace_se"] = estimate.standard_error
        metrics["hessian_seconds"] = time.perf_counter() - start
        return metrics

    def measure_step(self, ctx: Any, batch: Any) -> dict[str, float]:
        """:meth:`measure` at the training state's parameters (called every ``every_k_steps`` steps)."""
        return self.measure(ctx.loss_fn(), ctx.state.params, batch, int(ctx.step))

    def on_train_end(self, ctx: Any) -> None:
        """Nothing to flush: every measurement was logged through ``ctx.log`` when it was made."""
        return None
