"""The compiled engine behind every surface: metrics at many points ``θ(c) = Σ_j c_j T_j`` over a data set.

Two strategies (names of :data:`jaxnn.runtime.STRATEGIES`), picked per platform and model (``strategy="auto"``) by
the rule every engine uses, :func:`jaxnn.runtime.prefers_python_loops`:

* ``"vmap"`` (accelerators; dense networks on CPU): one compiled program evaluates a block of points:
  ``lax.scan`` over the batches of each stacked batch group (weighted by the batch's share of examples), and inside
  it ``lax.map`` over chunks of ``chunk_size`` points, each chunk evaluated with ``vmap`` (the chunk size bounds
  memory: about ``chunk_size`` forward passes are live at once). Small batches of a group are evaluated several at
  a time (up to :data:`MERGED_ROWS` examples, with correspondingly fewer points per chunk), so each layer is one
  long matrix product per point. The grid is split into a few blocks (one call each) only to advance the progress
  bar.
* ``"python"`` (convolutions on CPU, where XLA runs vmapped and looped convolutions several times slower than a
  plain one): per batch, the parameter-linear part is computed once by one program, then one compiled call per
  point evaluates the rest and adds its weighted value into an output buffer in place (no loops, no vmap).

Neither uses host callbacks, so both programs go into the persistent compilation cache.

On a mesh (parameters placed on devices, :mod:`jaxnn.parallel`) the grid is split one of two ways (``split``):
``"data"`` (default) gives each device its slice of every batch and reduces once per point, as the curvature
engine does; ``"points"`` gives each device all the data and its own ``chunk_size`` points of every chunk
(``jax.shard_map`` over the point axis, no reduction; vmapped strategy). Points suit small data sets and large
grids, data suits large batches.
With ``factor_linear_ops`` (default) the operations linear in the parameters are computed once per basis tree and
batch outside the point loop (:mod:`jaxnn.landscape.linear_factoring`); without it the parameters are materialised
at each point and the whole function runs per point. Either way the metric functions are traced together and
equations they share (loss and accuracy of the same logits) run once. Points are padded to a multiple of the
chunk size with copies of the last point; the padding is dropped from the result.

Optional per-point state (batch-norm statistics recomputed at every point): ``state_fn(params, batch) -> pytree``
is averaged over ``state_data`` at each point first (the same weighted mean over batches), and the metric
functions then receive it as a third argument ``fn(params, batch, state)`` (vmapped strategy only).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm import tqdm

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
                             state_chunks: Any, out_dtype: Any, factor: bool, merges: Sequence[int]) -> Any:
    """Traced body: ``Σ_b w_b fn(θ(c), batch_b[, state(c)])`` at every chunked point, shape ``(chunks, chunk)``.

    Factored: batches outer (the parameter-linear part once per batch), chunks of points inner. Not factored:
    chunks outer (θ(c) materialised once per chunk), batches inner. Either way ``merges[g]`` batches of group ``g``
    are evaluated together (vmapped over the batches; the parameters are not, so a layer's product at a point is
    one matrix product over all their rows) and their weighted values summed.
    """
    num_chunks, chunk_size = coefficient_chunks.shape[:2]
    chunk_indices = jnp.arange(num_chunks)
    state_like = () if state_chunks is None else (jax.tree.map(lambda leaf: leaf[0, 0], state_chunks),)
    params_like = basis[0] if offset is None else offset

    def zeros(leading: tuple, batches: Any) -> Any:
        point_shape = jax.eval_shape(lambda b, s: fn(params_like, b, *s), jax.tree.map(lambda x: x[0], batches),
                                     state_like)
        return jax.tree.map(lambda s: jnp.zeros(leading + s.shape, out_dtype or s.dtype), point_shape)

    def cast(values: Any) -> Any:
        return values if out_dtype is None else jax.tree.map(lambda v: v.astype(out_dtype), values)

    def accumulate(accumulated: Any, weight: jax.Array, values: Any, axis: int) -> Any:
        """``accumulated + Σ_k weight[k] values[..., k, ...]`` (the merged batches on ``axis`` of ``values``)."""

        def add(a: jax.Array, v: jax.Array) -> jax.Array:
            w = weight.astype(a.dtype).reshape((1,) * axis + weight.shape + (1,) * (v.ndim - axis - 1))
            return a + jnp.sum(w * v, axis=axis)

        return jax.tree.map(add, accumulated, values)

    def merged(batches: Any, weights: jax.Array, merge: int) -> tuple[Any, jax.Array]:
        """``(B, ...)`` stacked batches as ``(B / merge, merge, ...)``."""
        split = lambda leaf: leaf.reshape((leaf.shape[0] // merge, merge) + leaf.shape[1:])
        return jax.tree.map(split, batches), split(weights)

    groups = list(zip(group_batches, group_weights, plans, plan_consts, merges))
    if factor:
        total = None
        for batches, weights, plan, consts, merge in groups:

            def body(accumulated: Any, batch_and_weight: Any, plan: LinearFactorization = plan,
                     consts: Sequence[Any] = consts, merge: int = merge) -> tuple[Any, None]:
                batch, weight = batch_and_weight
                axes = plan.shared_batch_axes
                if merge == 1:  # no vmap (a group may have no data to map over)
                    shared = plan.shared(basis, jax.tree.map(lambda leaf: leaf[0], batch), consts, offset)
                    at_batches = lambda sh, c, s: jax.tree.map(lambda v: v[None], plan.at_point(sh, c, s))
                else:
                    shared = jax.vmap(lambda b: plan.shared(basis, b, consts, offset), out_axes=axes)(batch)
                    at_batches = jax.vmap(plan.at_point, in_axes=(axes, None, None))

                def evaluate_chunk(chunk: Any) -> Any:
                    _, coefficients, state = chunk
                    return cast(jax.vmap(lambda c, s: at_batches(shared, c, s))(coefficients, state))

                values = lax.map(evaluate_chunk, (chunk_indices, coefficient_chunks, state_chunks))
                return accumulate(accumulated, weight, values, 2), None

            accumulated, _ = lax.scan(body, zeros((num_chunks, chunk_size), batches),
                                      merged(batches, weights, merge))
            total = accumulated if total is None else jax.tree.map(jnp.add, total, accumulated)
        return total

    def evaluate_chunk(chunk: Any) -> Any:
        _, coefficients, state = chunk
        params = jax.vmap(lambda c: _combine(offset, basis, c))(coefficients)  # θ(c) once per chunk
        total = None
        for batches, weights, plan, consts, merge in groups:

            def body(accumulated: Any, batch_and_weight: Any, plan: LinearFactorization = plan,
                     consts: Sequence[Any] = consts, merge: int = merge) -> tuple[Any, None]:
                batch, weight = batch_and_weight
                evaluate = lambda p, b, s: plan.evaluate(p, b, consts, s)
                if merge == 1:
                    at_batches = lambda p, b, s: jax.tree.map(
                        lambda v: v[None], evaluate(p, jax.tree.map(lambda leaf: leaf[0], b), s))
                else:
                    at_batches = jax.vmap(evaluate, in_axes=(None, 0, None))
                values = cast(jax.vmap(lambda p, s: at_batches(p, batch, s))(params, state))
                return accumulate(accumulated, weight, values, 1), None

            accumulated, _ = lax.scan(body, zeros((chunk_size,), batches), merged(batches, weights, merge))
            total = accumulated if total is None else jax.tree.map(jnp.add, total, accumulated)
        return total

    return lax.map(evaluate_chunk, (chunk_indices, coefficient_chunks, state_chunks))


def _plans(fn: Callable, prepared: PreparedData, params_like: Any, state_like: Any, num_basis: int,
           factor: bool) -> list[LinearFactorization]:
    return [LinearFactorization(fn, params_like, _shape_struct(group_first_batch(group)), state_like,
                                num_basis=num_basis, with_state=state_like is not None, factor_linear=factor)
            for group in prepared.groups]


STRATEGIES = ("auto", "vmap", "python")
SPLITS = ("data", "points")
PROGRESS_BLOCKS = 8  # calls a vmapped grid is split into when a progress bar is shown


def choose_strategy(strategy: str, fn: Callable, params_like: Any, batch_like: Any, with_state: bool) -> str:
    """``"auto"``: ``"python"`` (one point per compiled call) where :func:`jaxnn.runtime.prefers_python_loops` says
    so and no per-point state is recomputed, else ``"vmap"``. Former names: "vmapped", "per_point"."""
    from jaxnn.runtime import prefers_python_loops, resolve_strategy

    strategy = resolve_strategy(strategy, STRATEGIES)
    if strategy == "python" and with_state:
        raise ValueError("strategy: 'python' (one point per call) does not recompute per-point state; use 'vmap' "
                         "with recompute_state_fn")
    if strategy != "auto":
        return strategy
    if with_state:
        return "vmap"
    return "python" if prefers_python_loops(fn, params_like, batch_like) else "vmap"


def check_split(split: str, strategy: str, mesh: Any) -> str:
    """The split in effect: ``"points"`` only on a mesh of several devices (one device: nothing to split)."""
    from jaxnn.parallel import mesh_size
    from jaxnn.runtime import resolve_strategy

    strategy = resolve_strategy(strategy, STRATEGIES)
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    if split == "points" and strategy == "python":
        raise ValueError("split: 'points' needs the 'vmap' strategy ('python' evaluates one point per call); "
                         "use strategy='vmap' or split='data'")
    return split if mesh_size(mesh) > 1 else "data"


def evaluate_at_points(metric_fns: Mapping[str, Callable], basis: Sequence[Any], coefficients: np.ndarray,
                       prepared: PreparedData, *, chunk_size: int, state_fn: Callable | None = None,
                       state_prepared: PreparedData | None = None, factor_linear_ops: bool = True,
                       progress: bool = True, description: str = "landscape", strategy: str = "auto",
                       split: str = "data", mesh: Any = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every metric at every point ``θ(c_p) = Σ_j coefficients[p, j] basis[j]``, as host arrays of shape ``(P,)``,
    and the compile / run wall-clock seconds (``python_loop``: 1.0 when the "python" strategy was used).
    ``split="points"`` (with ``mesh``, the mesh the parameters and the replicated data are on) shares the points
    out over the mesh's devices; see the module docstring.

    ``metric(p) = Σ_b w_b fn(θ(c_p), batch_b)`` (weighted mean over the batches of ``prepared``); cost: one
    forward pass of every metric per point and batch (fewer with ``factor_linear_ops``).
    """
    coefficients = np.asarray(coefficients)
    dtype = jnp.result_type(*jax.tree.leaves(basis[0]))
    params_like = _shape_struct(basis[0])
    offset = None
    if len(basis) > 1 and np.all(coefficients[:, 0] == 1.0):  # θ + Σ_j c_j d_j: θ is the constant offset
        offset, basis, coefficients = basis[0], tuple(basis[1:]), coefficients[:, 1:]
    num_points, num_basis = coefficients.shape
    out_dtype = jnp.promote_types(dtype, jnp.float32)
    names = tuple(metric_fns)
    with_state = state_fn is not None

    def metrics_fn(params: Any, batch: Any, *state: Any) -> dict[str, jax.Array]:
        return {name: metric_fns[name](params, batch, *state) for name in names}

    split = check_split(split, strategy, mesh)
    if split == "points" and strategy == "auto":
        strategy = "vmap"
    strategy = choose_strategy(strategy, metrics_fn, params_like, group_first_batch(prepared.groups[0]), with_state)
    if strategy == "python":
        values, timing = _per_point(metrics_fn, offset, tuple(basis), coefficients, prepared, params_like,
                                    out_dtype, factor_linear_ops, progress, description)
    else:
        values, timing = _vmapped(metrics_fn, offset, tuple(basis), coefficients, prepared, params_like, dtype,
                                  out_dtype, chunk_size, state_fn, state_prepared, factor_linear_ops, progress,
                                  description, mesh if split == "points" else None)
    timing["python_loop"] = float(strategy == "python")
    return {name: np.asarray(values[name]).reshape(-1)[:num_points] for name in names}, timing


MERGED_ROWS = 2048  # the vmapped strategy evaluates batches together up to this many examples per point


def _merge_factors(data: PreparedData, chunk_size: int) -> tuple[int, ...]:
    """Per group, how many of its batches one vmapped evaluation takes: the largest divisor of the group's batch
    count with at most :data:`MERGED_ROWS` examples and at most ``chunk_size`` batches (the chunk then holds
    ``chunk_size // merge`` points: as many forward passes live as unmerged). Small batches evaluated one by one
    made every layer's product a few hundred rows long: a 784-128-128-10 plane over 2,000 examples ran 2.2x
    slower in batches of 250 than in one batch of 2,000 on CPU (measured)."""
    factors = []
    for group in data.groups:
        leaves = jax.tree.leaves(group.batches)
        num_batches = int(group.weights.shape[0])
        rows = int(leaves[0].shape[1]) if leaves and leaves[0].ndim > 1 else 1
        limit = max(1, min(int(chunk_size), MERGED_ROWS // max(rows, 1)))
        factors.append(max(d for d in range(1, min(limit, num_batches) + 1) if num_batches % d == 0))
    return tuple(factors)


def _group_inputs(data: PreparedData | None, plans: Sequence[Any], out_dtype: Any) -> tuple:
    if data is None:
        return (), (), ()
    batches = tuple(group.batches for group in data.groups)
    weights = tuple(jnp.asarray(group.weights, dtype=out_dtype) for group in data.groups)
    consts = tuple(tuple(plan.consts) for plan in plans)
    return batches, weights, consts


def _vmapped(metrics_fn, offset, basis, coefficients, prepared, params_like, dtype, out_dtype, chunk_size, state_fn,
             state_prepared, factor_linear_ops, progress, description, points_mesh=None):
    """One compiled program per block of points (a block per progress-bar step); see the module docstring.
    ``points_mesh``: each chunk holds ``chunk_size`` points per device, split over the mesh's data axis."""
    from jaxnn import parallel

    num_points, num_basis = coefficients.shape
    with_state = state_fn is not None
    devices = parallel.mesh_size(points_mesh)
    metric_merges = _merge_factors(prepared, chunk_size)
    state_merges = _merge_factors(state_prepared, chunk_size) if with_state else ()
    points_per_chunk = max(1, int(chunk_size) // max(metric_merges + state_merges))  # same forward passes live
    chunk = min(points_per_chunk, math.ceil(num_points / devices)) * devices
    num_chunks = math.ceil(num_points / chunk)
    blocks = min(PROGRESS_BLOCKS, num_chunks) if progress else 1
    chunks_per_block = math.ceil(num_chunks / blocks)
    blocks = math.ceil(num_chunks / chunks_per_block)
    total_points = blocks * chunks_per_block * chunk
    padded = np.concatenate([coefficients, np.repeat(coefficients[-1:], total_points - num_points, axis=0)])
    coefficient_blocks = padded.reshape(blocks, chunks_per_block, chunk, num_basis).astype(dtype)

    state_like = None
    if with_state:
        state_batch_like = _shape_struct(group_first_batch(state_prepared.groups[0]))
        state_like = jax.eval_shape(state_fn, params_like, state_batch_like)
    metric_plans = _plans(metrics_fn, prepared, params_like, state_like, num_basis, factor_linear_ops)
    state_plans = (_plans(state_fn, state_prepared, params_like, None, num_basis, factor_linear_ops)
                   if with_state else [])

    def run(offset, basis, coefficient_chunks, metric_batches, metric_weights, metric_consts, state_batches,
            state_weights, state_consts):
        state_chunks = None
        if with_state:
            state_chunks = _weighted_mean_at_points(
                state_fn, offset, basis, coefficient_chunks, state_batches, state_weights, state_plans,
                state_consts, None, None, factor_linear_ops, state_merges)
            state_chunks = jax.tree.map(lambda s, like: s.astype(like.dtype), state_chunks, state_like)
        return _weighted_mean_at_points(
            metrics_fn, offset, basis, coefficient_chunks, metric_batches, metric_weights, metric_plans,
            metric_consts, state_chunks, out_dtype, factor_linear_ops, metric_merges)

    metric_inputs = _group_inputs(prepared, metric_plans, out_dtype)
    state_inputs = _group_inputs(state_prepared if with_state else None, state_plans, out_dtype)
    program, place_chunks = jax.jit(run), jnp.asarray
    if points_mesh is not None:  # every device: all the data, its own slice of each chunk's points
        from jax.sharding import PartitionSpec

        everywhere, by_point = PartitionSpec(), PartitionSpec(None, parallel.DATA_AXIS)
        data_specs = (everywhere,) * (len(metric_inputs) + len(state_inputs))
        per_device = jax.shard_map(run, mesh=points_mesh, in_specs=(everywhere, everywhere, by_point, *data_specs),
                                   out_specs=by_point, check_vma=False)
        program = jax.jit(per_device, out_shardings=parallel.replicated(points_mesh))  # every process reads all
        chunk_sharding = jax.sharding.NamedSharding(points_mesh, by_point)
        place_chunks = lambda value: parallel.global_array(np.asarray(value), chunk_sharding)
    arguments = lambda block: (offset, tuple(basis), place_chunks(coefficient_blocks[block]), *metric_inputs,
                               *state_inputs)
    work_per_point = prepared.num_batches + (state_prepared.num_batches if with_state else 0)
    wait_mesh = points_mesh or parallel.mesh_of((offset, basis))
    start = time.perf_counter()
    compiled = program.lower(*arguments(0)).compile()
    compiled_at = time.perf_counter()
    results = []
    with tqdm(total=num_points * work_per_point, desc=description, unit="pt·batch", disable=not progress,
              leave=False) as bar:
        for block in range(blocks):
            results.append(parallel.settle(compiled(*arguments(block)), wait_mesh))
            if progress:
                jax.block_until_ready(results[-1])
                done = min(num_points, (block + 1) * chunks_per_block * chunk)
                bar.update(done * work_per_point - bar.n)
        results = jax.device_get(results)
    finished = time.perf_counter()
    values = {name: np.concatenate([np.asarray(r[name]).reshape(-1) for r in results]) for name in results[0]}
    return values, {"compile_seconds": compiled_at - start, "run_seconds": finished - compiled_at}


PER_POINT_BLOCK_BYTES = 256 << 20  # shared values of the batches one per-point call reads (unrolled)
PER_POINT_BLOCK_BATCHES = 16


def _per_point(metrics_fn, offset, basis, coefficients, prepared, params_like, out_dtype, factor_linear_ops, progress,
               description):
    """Per block of batches: the parameter-linear part once, then one compiled call per point that evaluates the
    block's batches unrolled (no vmap, no loop) and adds their weighted values into the output in place. A block
    holds as many batches as fit in :data:`PER_POINT_BLOCK_BYTES` of shared values (one call per point and block
    ran ~25% faster than one per point and batch for a LeNet on CPU, measured)."""
    from jaxnn import parallel

    num_points, num_basis = coefficients.shape
    plans = _plans(metrics_fn, prepared, params_like, None, num_basis, factor_linear_ops)

    def shared_of(plan, offset, basis, batch, consts):
        if factor_linear_ops:
            return plan.shared(basis, batch, consts, offset)
        return {"batch": batch, "consts": consts}

    def add_point(plans_and_shared, offset, basis, coefficients, index, weights, totals):
        for (plan, shared), weight in zip(plans_and_shared, weights):
            if factor_linear_ops:
                values = plan.at_point(shared, coefficients)
            else:
                values = plan.evaluate(_combine(offset, basis, coefficients), shared["batch"], shared["consts"])
            totals = jax.tree.map(lambda t, v: t.at[index].add(weight.astype(out_dtype) * v.astype(out_dtype)),
                                  totals, values)
        return totals

    # (plan, batch, weight) for every batch, cut into blocks by the memory their shared values take
    items = [(plan, jax.tree.map(lambda leaf, b=b: leaf[b], group.batches), group.weights[b])
             for group, plan in zip(prepared.groups, plans) for b in range(group.weights.shape[0])]
    shared_bytes = [sum(math.prod(v.shape) * v.dtype.itemsize for v in jax.tree.leaves(jax.eval_shape(
        lambda o, bs, batch, plan=plan: shared_of(plan, o, bs, batch, tuple(plan.consts)), offset, basis, batch)))
        for plan, batch, _ in items]
    blocks, current, size = [], [], 0
    for item, nbytes in zip(items, shared_bytes):
        if current and (size + nbytes > PER_POINT_BLOCK_BYTES or len(current) == PER_POINT_BLOCK_BATCHES):
            blocks.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    blocks.append(current)

    shared_program = jax.jit(lambda o, bs, batches, plans: [shared_of(plan, o, bs, batch, tuple(plan.consts))
                                                              for plan, batch in zip(plans, batches)],
                             static_argnums=3)
    point_program = jax.jit(lambda shared, o, bs, c, i, w, totals, plans: add_point(
        list(zip(plans, shared)), o, bs, c, i, w, totals), donate_argnums=(6,), static_argnums=7)
    out_like = jax.eval_shape(metrics_fn, params_like, group_first_batch(prepared.groups[0]))
    totals = jax.tree.map(lambda s: jnp.zeros((num_points,), out_dtype), out_like)
    points = np.asarray(coefficients, dtype=jnp.result_type(*jax.tree.leaves(basis[0])))
    wait_mesh = parallel.mesh_of((offset, basis))
    start = time.perf_counter()
    compile_seconds = None
    with tqdm(total=num_points * prepared.num_batches, desc=description, unit="pt·batch", disable=not progress,
              leave=False) as bar:
        for block in blocks:
            block_plans = _IdentityTuple(plan for plan, _, _ in block)
            shared = parallel.settle(shared_program(offset, basis, [batch for _, batch, _ in block], block_plans),
                                     wait_mesh)
            weights = [weight for _, _, weight in block]
            for p in range(num_points):
                first = time.perf_counter() if compile_seconds is None else None
                totals = parallel.settle(point_program(shared, offset, basis, points[p], p, weights, totals,
                                                       block_plans), wait_mesh)
                if first is not None:  # the first call compiles: time it apart
                    jax.block_until_ready(totals)
                    compile_seconds = time.perf_counter() - first
                bar.update(len(block))
        totals = jax.device_get(totals)
    compile_seconds = compile_seconds or 0.0
    return totals, {"compile_seconds": compile_seconds, "run_seconds": time.perf_counter() - start - compile_seconds}


class _IdentityTuple(tuple):
    """A tuple of plans usable as a static jit argument (hashed and compared by the plans' identity)."""

    def __hash__(self) -> int:
        return hash(tuple(id(item) for item in self))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, tuple) and len(other) == len(self) and all(a is b for a, b in zip(self, other))
