"""Curvature during training: a callback for ``jaxnn.train.fit`` recording the top Hessian eigenvalues.

It follows the training loop's callback protocol (``on_train_begin(ctx)``, ``on_step_end(ctx)``,
``on_train_end(ctx)``; ``ctx.step``, ``ctx.state.params``, ``ctx.loss_fn()``, ``ctx.analysis_examples(n)``,
``ctx.learning_rate(step)``, ``ctx.log(dict)``) by duck typing, so this module does not import the training code
(nor Flax).

What it measures on: ``batch`` when given; otherwise a fixed set of ``examples`` training examples (default 1,024, or
the whole split when it is smaller) from ``fit``, the same set at every measurement, so the numbers follow the
parameters and not the draw of a batch; it is fed to the Hessian in chunks of at most ``chunk_size`` examples, so
memory stays that of a ``chunk_size`` batch. One training batch is a noisy, biased estimate: on the digits LeNet a
128-example batch gave λmax 11.86 where 1,024 examples gave 6.99, at the same weights. Measurements use the
eval-mode loss (batch norm with its running statistics: at step 0 those are their initial values).

When: at step 0 of a fresh run (the initial parameters; a resumed run does not measure at its start), then every
``every_k_steps`` steps. Each measurement logs (and appends to ``history``):

- ``lambda_max``, and ``lambda_2`` … ``lambda_k`` with ``k > 1``: the top Hessian eigenvalues (Lanczos, stopped once
  the top-k pairs' residual bounds are below ``tol``·|λ|, default 1e-3; at most ``num_iters`` HVPs);
- ``stable_lr_bound`` = 2 / ``lambda_max``: the largest learning rate at which gradient descent is stable along the
  top eigenvector of a quadratic (inf when λmax ≤ 0);
- ``edge_of_stability_ratio`` when ``optimizer`` names the update rule and ``fit`` has a schedule: ``lambda_max``
  over the largest curvature that update is stable on at the learning rate η = schedule(step) (the rate of the next
  update, applied at the measured parameters; the record's ``lr`` is the previous step's), 1 at the edge of
  stability (Cohen et al. 2021): λ·η/2 for ``"sgd"``, λ·η/(2(1+β)) for ``"momentum"`` (heavy ball, β =
  ``momentum``), λ·η(1+2β)/(2(1+β)) for ``"nesterov"`` (optax's form). Adaptive optimizers have no such bound on
  the raw Hessian (their preconditioned sharpness is the relevant quantity), so nothing is logged for them;
- ``lanczos_iters``: the Lanczos iterations used;
- ``trace`` and ``trace_se`` with ``trace_samples > 0``: the Hutchinson (or ``trace_method``) estimate of the
  Hessian's trace and its standard error;
- ``hessian_examples``: how many examples the measurement used (a batch or list of batches);
  ``hessian_seconds``: its wall time.

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


STABILITY_RULES = ("sgd", "momentum", "nesterov")
"""The update rules :func:`stable_curvature` knows (optax's ``sgd`` without, with heavy-ball and Nesterov momentum)."""


def stable_curvature(rule: str, learning_rate: float, momentum: float = 0.0) -> float:
    """The largest curvature λ of a quadratic on which ``rule`` with ``learning_rate`` η is stable: 2/η for gradient
    descent, 2(1+β)/η with heavy-ball momentum β, 2(1+β)/((1+2β)η) with optax's Nesterov momentum (the roots of
    each iteration's characteristic polynomial reach −1 there)."""
    if rule == "sgd":
        return 2.0 / learning_rate
    if rule == "momentum":
        return 2.0 * (1.0 + momentum) / learning_rate
    return 2.0 * (1.0 + momentum) / ((1.0 + 2.0 * momentum) * learning_rate)


def _examples_in(batch: Any) -> int | None:
    """The number of examples of a batch ``(x, y, ...)`` or a list of such batches (their sum); None for other
    forms (an iterable is not consumed to count it)."""
    if isinstance(batch, list):
        counts = [_examples_in(b) for b in batch]
        return None if None in counts else sum(counts)
    if not isinstance(batch, tuple):
        return None
    leaves = jax.tree.leaves(batch)
    return int(leaves[0].shape[0]) if leaves and getattr(leaves[0], "ndim", 0) else None


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

    def data(self, ctx: Any) -> Any:
        """What to measure on: ``batch``, else the fit's analysis batch."""
        batch = self.batch if self.batch is not None else getattr(ctx, "analysis_batch", None)
        if batch is None:
            raise ValueError(f"batch: {type(self).__name__} needs data; pass batch=... or run fit with an analysis "
                             "batch (ctx.analysis_batch is None)")
        return batch

    def measure_now(self, ctx: Any) -> None:
        """Measure at ``ctx.step``, log the values into that step's record and append them to ``history``."""
        values = self.measure_step(ctx, self.data(ctx))
        ctx.log(values)
        self.history.append({"step": int(ctx.step), **values})

    def on_step_end(self, ctx: Any) -> None:
        if int(ctx.step) % self.every_k_steps == 0:
            self.measure_now(ctx)


class HessianCallback(PeriodicMeasurement):
    """Log the top-k Hessian eigenvalues (and optionally the trace) at step 0 and every ``every_k_steps`` training
    steps (the keys are listed in the module docstring).

    ``batch``: the data to measure on, any form accepted by :func:`jaxnn.curvature.hessian`; default: ``examples``
    training examples from ``ctx.analysis_examples`` (a context without it: ``ctx.analysis_batch``). ``key``: PRNG
    key for the Lanczos start and trace probes (default key(0)); each measurement folds in the step number, so runs
    are reproducible.
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
        examples: int = 1024,
        chunk_size: int = 256,
        optimizer: str | None = None,
        momentum: float = 0.0,
    ):
        super().__init__(check_int(every_k_steps, "every_k_steps"), batch)
        self.examples = check_int(examples, "examples")
        self.chunk_size = check_int(chunk_size, "chunk_size")
        self.optimizer = None if optimizer is None else check_choice(optimizer, "optimizer", choices=STABILITY_RULES)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
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
        metrics["stable_lr_bound"] = 2.0 / values[0] if values[0] > 0 else math.inf
        metrics["lanczos_iters"] = float(result.num_iters)
        if self.trace_samples:
            estimate = trace(op, trace_key, self.trace_samples, self.trace_method, progress=False)
            metrics["trace"] = estimate.estimate
            metrics["trace_se"] = estimate.standard_error
        metrics["hessian_seconds"] = time.perf_counter() - start
        return metrics

    def measure_step(self, ctx: Any, batch: Any) -> dict[str, float]:
        """:meth:`measure` at the training state's parameters, with the edge-of-stability ratio when the context
        knows the learning rate and the number of examples measured on."""
        step = int(ctx.step)
        metrics = self.measure(ctx.loss_fn(), ctx.state.params, batch, step)
        learning_rate = getattr(ctx, "learning_rate", None)
        if learning_rate is not None and self.optimizer is not None:
            limit = stable_curvature(self.optimizer, float(learning_rate(step)), self.momentum)
            metrics["edge_of_stability_ratio"] = metrics["lambda_max"] / limit
        examples = _examples_in(batch)
        if examples is not None:
            metrics["hessian_examples"] = float(examples)
        return metrics

    def data(self, ctx: Any) -> Any:
        """``batch``, else ``examples`` examples from the context (else its analysis batch)."""
        if self.batch is None and getattr(ctx, "analysis_examples", None) is not None:
            x, y = ctx.analysis_examples(self.examples)
            return [(x[i:i + self.chunk_size], y[i:i + self.chunk_size]) for i in range(0, len(x), self.chunk_size)]
        return super().data(ctx)

    def on_train_begin(self, ctx: Any) -> None:
        """Measure the initial parameters of a fresh run (step 0)."""
        super().on_train_begin(ctx)
        if int(ctx.step) == 0:
            self.measure_now(ctx)

    def on_train_end(self, ctx: Any) -> None:
        """Nothing to flush: every measurement was logged through ``ctx.log`` when it was made."""
        return None
