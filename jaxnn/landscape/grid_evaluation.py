"""The compiled engine behind every surface: metrics at many points ``θ(c) = Σ_j c_j T_j`` over a data set.

One ``jit``-compiled program evaluates all points: ``lax.scan`` over the batches of each stacked batch group
(weighted by the batch's share of examples), and inside it ``lax.map`` over chunks of ``chunk_size`` points, each
chunk evaluated with ``vmap`` (the chunk size bounds memory: about ``chunk_size`` forward passes are live at once).
With ``factor_linear_ops`` (default) the operations linear in the parameters are computed once per basis tree and
batch outside the point loop (:mod:`jaxnn.landscape.linear_factoring`); without it the parameters are materialised
at each point and the whole function runs per point. Either way the metric functions are traced together and
equations they share (loss and accuracy of the same logits) run once. Points are padded to a multiple of the
chunk size with copies of the last point; the padding is dropped from the result.

Optional per-point state (batch-norm statistics recomputed at every point): ``state_fn(params, batch) -> pytree``
is averaged over ``state_data`` at each point first (the same weighted mean over batches), and the metric
functions then receive it as a third argument ``fn(params, batch, state)``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from jaxnn.curvature.batches import PreparedData, group_first_batch
from jaxnn.landscape.linear_factoring import LinearFactorization


def _shape_struct(tree: Any) -> Any:
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf)), tree)


def _combine(offset: Any, basis: Sequence[Any], coefficients: jax.Array) -> Any:
    """``offset + Σ_j c_j basis[j]`` leaf by leaf (``offset`` may be None)."""

    def leaf_sum(offset_leaf: Any, *leaves: jax.Array) -> jax.Array:
        total = offset_leaf
        for j, leaf in enumerate(leaves):
            term = coefficients[j].astype(leaf.dtype) * leaf
            total = term if total is None else total + term
        return total

    offsets = jax.tree.map(lambda _: None, basis[0]) if offset is None else offset
    return jax.tree.map(leaf_sum, offsets, *basis, is_leaf=lambda x: x is None)


def _weighted_mean_at_points(fn: Callable, offset: Any, basis: Sequence[Any], coefficient_chunks: jax.Array,
                             group_batches: Sequence[Any], group_weights: Sequence[jax.Array],
                             plans: Sequence[LinearFactorization], plan_consts: Sequence[Sequence[Any]],
                             state_chunks: Any, out_dtype: Any, advance: Callable | None, factor: bool) -> Any:
    """Traced body: ``Σ_b w_b fn(θ(c), batch_b[, state(c)])`` at every chunked point, shape ``(chunks, chunk)``.

    Factored: batches outer (the parameter-linear part once per batch), chunks of points inner. Not factored:
    chunks outer (θ(c) materialised once per chunk), batches inner.
    """
    num_chunks, chunk_size = coefficient_chunks.shape[:2]
    chunk_indices = jnp.arange(num_chunks)
    num_batches = sum(int(w.shape[0]) for w in group_weights)
    state_like = () if state_chunks is None else (jax.tree.map(lambda leaf: leaf[0, 0], state_chunks),)
    params_like = basis[0] if offset is None else offset

    def zeros(leading: tuple, batches: Any) -> Any:
        point_shape = jax.eval_shape(lambda b, s: fn(params_like, b, *s), jax.tree.map(lambda x: x[0], batches),
                                     state_like)
        return jax.tree.map(lambda s: jnp.zeros(leading + s.shape, out_dtype or s.dtype), point_shape)

    def cast(values: Any) -> Any:
        return values if out_dtype is None else jax.tree.map(lambda v: v.astype(out_dtype), values)

    def accumulate(accumulated: Any, weight: jax.Array, values: Any) -> Any:
        return jax.tree.map(lambda a, v: a + weight.astype(a.dtype) * v, accumulated, values)

    def report(index: jax.Array, values: Any, batches_done: int) -> None:
        if advance is not None:
            jax.debug.callback(advance, index, batches_done, jax.tree.leaves(values)[0][0])

    groups = list(zip(group_batches, group_weights, plans, plan_consts))
    if factor:
        total = None
        for batches, weights, plan, consts in groups:

            def body(accumulated: Any, batch_and_weight: Any, plan: LinearFactorization = plan,
                     consts: Sequence[Any] = consts) -> tuple[Any, None]:
                batch, weight = batch_and_weight
                shared = plan.shared(basis, batch, consts, offset)

                def evaluate_chunk(chunk: Any) -> Any:
                    index, coefficients, state = chunk
                    values = cast(jax.vmap(lambda c, s: plan.at_point(shared, c, s))(coefficients, state))
                    report(index, values, 1)
                    return values

                values = lax.map(evaluate_chunk, (chunk_indices, coefficient_chunks, state_chunks))
                return accumulate(accumulated, weight, values), None

            accumulated, _ = lax.scan(body, zeros((num_chunks, chunk_size), batches), (batches, weights))
            total = accumulated if total is None else jax.tree.map(jnp.add, total, accumulated)
        return total

    def evaluate_chunk(chunk: Any) -> Any:
        index, coefficients, state = chunk
        params = jax.vmap(lambda c: _combine(offset, basis, c))(coefficients)  # θ(c) once per chunk
        total = None
        for batches, weights, plan, consts in groups:

            def body(accumulated: Any, batch_and_weight: Any, plan: LinearFactorization = plan,
                     consts: Sequence[Any] = consts) -> tuple[Any, None]:
                batch, weight = batch_and_weight
                values = cast(jax.vmap(lambda p, s: plan.evaluate(p, batch, consts, s))(params, state))
                return accumulate(accumulated, weight, values), None

            accumulated, _ = lax.scan(body, zeros((chunk_size,), batches), (batches, weights))
            total = accumulated if total is None else jax.tree.map(jnp.add, total, accumulated)
        report(index, total, num_batches)
        return total

    return lax.map(evaluate_chunk, (chunk_indices, coefficient_chunks, state_chunks))


def _plans(fn: Callable, prepared: PreparedData, params_like: Any, state_like: Any, num_basis: int,
           factor: bool) -> list[LinearFactorization]:
    return [LinearFactorization(fn, params_like, _shape_struct(group_first_batch(group)), state_like,
                                num_basis=num_basis, with_state=state_like is not None, factor_linear=factor)
            for group in prepared.groups]


def evaluate_at_points(metric_fns: Mapping[str, Callable], basis: Sequence[Any], coefficients: np.ndarray,
                       prepared: PreparedData, *, chunk_size: int, state_fn: Callable | None = None,
                       state_prepared: PreparedData | None = None, factor_linear_ops: bool = True,
                       progress: bool = True, description: str = "landscape"
                       ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every metric at every point ``θ(c_p) = Σ_j coefficients[p, j] basis[j]``, as host arrays of shape ``(P,)``,
    and the compile / run wall-clock seconds.

    ``metric(p) = Σ_b w_b fn(θ(c_p), batch_b)`` (weighted mean over the batches of ``prepared``); cost: one
    forward pass of every metric per point and batch (fewer with ``factor_linear_ops``), in one compiled program.
    """
    coefficients = np.asarray(coefficients)
    dtype = jnp.result_type(*jax.tree.leaves(basis[0]))
    params_like = _shape_struct(basis[0])
    offset = None
    if len(basis) > 1 and np.all(coefficients[:, 0] == 1.0):  # θ + Σ_j c_j d_j: θ is the constant offset
        offset, basis, coefficients = basis[0], tuple(basis[1:]), coefficients[:, 1:]
    num_points, num_basis = coefficients.shape
    out_dtype = jnp.promote_types(dtype, jnp.float32)
    chunk = min(int(chunk_size), num_points)
    num_chunks = math.ceil(num_points / chunk)
    padded = np.concatenate([coefficients, np.repeat(coefficients[-1:], num_chunks * chunk - num_points, axis=0)])
    coefficient_chunks = jnp.asarray(padded.reshape(num_chunks, chunk, num_basis), dtype=dtype)

    names = tuple(metric_fns)
    with_state = state_fn is not None

    def metrics_fn(params: Any, batch: Any, *state: Any) -> dict[str, jax.Array]:
        return {name: metric_fns[name](params, batch, *state) for name in names}

    state_like = None
    if with_state:
        state_batch_like = _shape_struct(group_first_batch(state_prepared.groups[0]))
        state_like = jax.eval_shape(state_fn, params_like, state_batch_like)
    metric_plans = _plans(metrics_fn, prepared, params_like, state_like, num_basis, factor_linear_ops)
    state_plans = (_plans(state_fn, state_prepared, params_like, None, num_basis, factor_linear_ops)
                   if with_state else [])

    total_work = num_points * prepared.num_batches + (num_points * state_prepared.num_batches if with_state else 0)
    bar = tqdm(total=total_work, desc=description, unit="pt·batch", disable=not progress, leave=False)

    def advance(index: Any, batches_done: Any, _: Any) -> None:
        start = int(index) * chunk
        bar.update(max(0, min(chunk, num_points - start)) * int(batches_done))

    def run(offset, basis, coefficient_chunks, metric_batches, metric_weights, metric_consts, state_batches,
            state_weights, state_consts):
        state_chunks = None
        if with_state:
            state_chunks = _weighted_mean_at_points(
                state_fn, offset, basis, coefficient_chunks, state_batches, state_weights, state_plans,
                state_consts, None, None, advance if progress else None, factor_linear_ops)
            state_chunks = jax.tree.map(lambda s, like: s.astype(like.dtype), state_chunks, state_like)
        return _weighted_mean_at_points(
            metrics_fn, offset, basis, coefficient_chunks, metric_batches, metric_weights, metric_plans,
            metric_consts, state_chunks, out_dtype, advance if progress else None, factor_linear_ops)

    def group_inputs(data: PreparedData | None, plans: Sequence[Any]) -> tuple:
        if data is None:
            return (), (), ()
        batches = tuple(group.batches for group in data.groups)
        weights = tuple(jnp.asarray(group.weights, dtype=out_dtype) for group in data.groups)
        consts = tuple(tuple(plan.consts) for plan in plans)
        return batches, weights, consts

    metric_inputs = group_inputs(prepared, metric_plans)
    state_inputs = group_inputs(state_prepared if with_state else None, state_plans)
    arguments = (offset, tuple(basis), coefficient_chunks, *metric_inputs, *state_inputs)
    try:
        start = time.perf_counter()
        compiled = jax.jit(run).lower(*arguments).compile()
        compiled_at = time.perf_counter()
        result = jax.block_until_ready(compiled(*arguments))
        finished = time.perf_counter()
    finally:
        bar.close()
    values = {name: np.asarray(result[name]).reshape(-1)[:num_points] for name in names}
    timing = {"compile_seconds": compiled_at - start, "run_seconds": finished - compiled_at}
    return values, timing
