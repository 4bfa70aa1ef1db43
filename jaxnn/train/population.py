"""Populations: many members of one model trained at once by ``vmap`` — seeds, optimizer hyper-parameters, init
scale, dropout rate.

    result = train_population(models.get_model("mlp", num_classes=10), optax.adam, ds,
                              members=population_grid(seed=[0, 1, 2], learning_rate=[1e-3, 1e-2]),
                              num_steps=500)
    result.table()          # one row per member: its values, final train/val/test metrics, status

Member ``i`` is exactly the run ``fit(create_train_state(model, optimizer(**hyper_i), shape, PRNGKey(seed_i)), ds,
seed=data_seed_i, ...)`` with the initial parameters multiplied by ``init_scale_i`` (and, for ``dropout``, the
model built with dropout rate ``dropout_i``: every ``nn.Dropout`` runs at the member's rate): the same initial
weights, the same batches in the same order, the same updates (tested against ``fit`` to 1e-12 in float64). The
optimizer's swept hyper-parameters live in its state (``optax.inject_hyperparams``), so one compiled step serves
every member.

Batches: the training split is copied to the device once; every call runs ``steps_per_call`` steps in a
``lax.scan``, gathering each step's batch on the device from the epoch permutations of ``batch_iterator``. By default
all members share one data stream (``data_seed``); ``shuffle_per_member=True`` gives member ``i`` the stream of seed
``seed_i`` instead. Memory: members run ``chunk`` at a time (default: all), each chunk to the end before the next.

A member whose loss turns non-finite is frozen at its last finite state and reported (``status`` "diverged at step
s"); the others go on.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec
from tqdm import tqdm

from jaxnn import data as data_lib
from jaxnn import losses
from jaxnn.train.callbacks import Patience
from jaxnn.train.state import TrainState
from jaxnn.train.fit import mean_metrics, padded_batches
from jaxnn.train.step import step_function, make_eval_step
from jaxnn.validation import merge_options

MEMBER_FIELDS = ("seed", "init_scale", "dropout", "label_noise")  # per-member values that are not optimizer hyper-parameters


def population_grid(**axes: Sequence[Any]) -> dict[str, list]:
    """Every combination of the given values, as equal-length columns: ``population_grid(seed=[0, 1],
    learning_rate=[0.1, 0.01])`` has 4 members (the last axis varies fastest)."""
    if not axes:
        raise ValueError("population_grid: give at least one axis, e.g. seed=[0, 1, 2]")
    names = list(axes)
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) == 0:
            raise ValueError(f"population_grid: {name} must be a non-empty list of values, got {values!r}")
    rows = list(itertools.product(*(list(axes[name]) for name in names)))
    return {name: [row[i] for row in rows] for i, name in enumerate(names)}


def _tunable(optimizer: Callable[..., optax.GradientTransformation]) -> list[str]:
    """The numeric arguments of an optax optimizer factory (those ``inject_hyperparams`` can hold in its state)."""
    try:
        parameters = inspect.signature(optimizer).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and (p.default is inspect.Parameter.empty or isinstance(p.default, (int, float)) or p.default is None)
            and not isinstance(p.default, bool)]


def rate_name(name: str, accepted: Sequence[str], given: Mapping[str, Any]) -> str:
    """``lr`` and ``learning_rate`` are one name (configs say ``optimizer.lr``, optax ``learning_rate``): the one
    ``accepted`` holds; ValueError when ``given`` holds both."""
    other = {"lr": "learning_rate", "learning_rate": "lr"}.get(name)
    if other is None or name in accepted or other not in accepted:
        return name
    if other in given:
        raise ValueError(f"{name} and {other} name the same rate; give one")
    return other


def check_members(members: Mapping[str, Sequence[Any]], optimizer: Callable) -> tuple[int, dict[str, np.ndarray]]:
    """(N, columns): every column a float/int array of length N; names checked against the optimizer's arguments."""
    if not isinstance(members, Mapping) or not members:
        raise ValueError("members: expected a mapping of column name -> one value per member, e.g. "
                         "{'seed': [0, 1, 2], 'learning_rate': [0.1, 0.1, 0.01]}")
    tunable = _tunable(optimizer)
    name_of = getattr(optimizer, "__name__", repr(optimizer))
    columns: dict[str, np.ndarray] = {}
    for name, values in members.items():
        name = rate_name(name, tunable, members)
        if name not in MEMBER_FIELDS and name not in tunable:
            raise ValueError(f"members: {name!r} cannot be varied across a population: it is neither a member field "
                             f"({', '.join(MEMBER_FIELDS)}) nor a numeric argument of the optimizer {name_of} "
                             f"(those are: {', '.join(tunable) or 'none'})")
        array = np.asarray(values)
        if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"members: {name} must be a non-empty list of numbers, got {values!r}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"members: {name} has non-finite values: {values!r}")
        columns[name] = array
    sizes = {name: len(array) for name, array in columns.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"members: every column needs one value per member; got lengths {sizes} "
                         "(population_grid(...) builds the combinations)")
    count = next(iter(sizes.values()))
    if "seed" in columns and not np.issubdtype(columns["seed"].dtype, np.integer):
        raise ValueError(f"members: seed must be integers, got {members['seed']!r}")
    if "init_scale" in columns and np.any(columns["init_scale"] <= 0):
        raise ValueError(f"members: init_scale must be positive, got {members['init_scale']!r}")
    if "dropout" in columns and np.any((columns["dropout"] < 0) | (columns["dropout"] >= 1)):
        raise ValueError(f"members: dropout rates must be in [0, 1), got {members['dropout']!r}")
    if "label_noise" in columns and np.any((columns["label_noise"] < 0) | (columns["label_noise"] > 1)):
        raise ValueError(f"members: label_noise probabilities must be in [0, 1], got {members['label_noise']!r}")
    return count, columns


@dataclasses.dataclass
class PopulationResult:
    """``state``: the final members, every leaf with a leading member axis; ``members``: one dict per member (its
    values, final metrics, ``status``); ``losses``/``accuracies``: (num_steps, N) per-step training metrics (NaN
    after a member diverged); ``compile_s``/``run_s``: wall-clock seconds of compiling and of training."""

    state: TrainState
    members: list[dict]
    losses: np.ndarray
    accuracies: np.ndarray | None
    compile_s: float
    run_s: float

    def member_state(self, index: int) -> TrainState:
        """Member ``index`` as an ordinary ``TrainState`` (what ``fit`` would have returned)."""
        return jax.tree.map(lambda leaf: leaf[index], self.state)

    def table(self, sort_by: str | None = "val_accuracy") -> str:
        """The members as a text table, best first by ``sort_by`` when every member has it (``None``: member
        order); the ``member`` column is each one's index in ``state``, ``losses`` and the per-member functions
        (``population_sharpness``, ``ensemble_metrics``, ``member_state``)."""
        return format_table(self.members, sort_by)


def format_table(rows: Sequence[dict], sort_by: str | None = "val_accuracy") -> str:
    """Rows (dicts with the same keys) as a text table, best first by ``sort_by`` when every row has a finite value
    (highest first for accuracies, lowest for anything else)."""
    rows = list(rows)
    if sort_by and all(isinstance(r.get(sort_by), float) and math.isfinite(r[sort_by]) for r in rows):
        rows.sort(key=lambda r: -r[sort_by] if "accuracy" in sort_by else r[sort_by])
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def init_members(model, tx, input_shape, seeds, scales, hyper):
    """Stacked initial states: each member's parameters drawn exactly as ``create_train_state`` draws them for its
    seed (``init_model``'s cached program, one call per member: compiling a vmapped init took ~3 s), then scaled;
    the optimizer states initialised together, each with its own hyper-parameter values."""
    from jaxnn.models import init_model

    members_params, members_state, rngs = [], [], []
    for seed, scale in zip(seeds, scales):
        init_key, rng = jax.random.split(jax.random.PRNGKey(int(seed)))
        params, model_state = init_model(model, init_key, tuple(input_shape))
        members_params.append(jax.tree.map(lambda p: p * jnp.asarray(scale, p.dtype), params))
        members_state.append(dict(model_state))
        rngs.append(rng)
    stack = lambda trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)  # noqa: E731
    params = stack(members_params)
    model_state = stack(members_state) if members_state[0] else {}
    opt_state = jax.vmap(tx.init)(params)
    for name, values in hyper.items():
        opt_state.hyperparams[name] = jnp.asarray(values, jnp.asarray(opt_state.hyperparams[name]).dtype)
    return TrainState(step=jnp.zeros(len(seeds), jnp.int32), params=params, model_state=model_state,
                      opt_state=opt_state, rng=jnp.stack(rngs), apply_fn=model.apply, tx=tx,
                      input_shape=tuple(input_shape))


def _dropout_at(rate: jax.Array):
    """A flax method interceptor that runs every ``nn.Dropout`` at ``rate`` (a traced per-member value) instead of
    its static one, drawing the mask exactly as ``nn.Dropout`` does (same rng, same Bernoulli draw): a member equals
    the model built with that rate (rate 0 keeps every unit, as a model without dropout)."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, nn.Dropout) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        inputs = args[0]
        deterministic = nn.merge_param("deterministic", module.deterministic,
                                       kwargs.get("deterministic", args[1] if len(args) > 1 else None))
        if deterministic:
            return inputs
        rng = kwargs.get("rng", args[2] if len(args) > 2 else None)
        rng = module.make_rng(module.rng_collection) if rng is None else rng
        keep = (1.0 - rate).astype(inputs.dtype)
        shape = list(inputs.shape)
        for dim in module.broadcast_dims:
            shape[dim] = 1
        mask = jnp.broadcast_to(jax.random.bernoulli(rng, p=keep, shape=shape), inputs.shape)
        return jax.lax.select(mask, inputs / keep, jnp.zeros_like(inputs))

    return interceptor


def _dropout_layers(model, input_shape) -> int:
    """How many ``nn.Dropout`` calls a training-mode forward pass of ``model`` makes (shapes only)."""
    from jaxnn.models import init_model

    calls = []

    def count(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
            calls.append(context.module.name)
        return next_fun(*args, **kwargs)

    params, model_state = init_model(model, jax.random.PRNGKey(0), tuple(input_shape))
    with nn.intercept_methods(count):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)},
                                                mutable=list(model_state)),
                       {"params": params, **model_state}, jnp.zeros((1, *input_shape)))
    return len(calls)


def _has_convolution(model, input_shape) -> bool:
    """Whether :func:`jaxnn.runtime.prefers_python_loops` asks for Python loops for a forward pass of ``model``
    (traced on one example, shapes only): the one rule every engine uses."""
    from jaxnn.models import init_model
    from jaxnn.runtime import prefers_python_loops

    params, model_state = init_model(model, jax.random.PRNGKey(0), tuple(input_shape))
    return prefers_python_loops(lambda v, x: model.apply(v, x), {"params": params, **model_state},
                                jnp.zeros((1, *input_shape)))


POPULATION_STRATEGIES = ("auto", "vmap", "python")  # names of jaxnn.runtime.STRATEGIES


def _population_strategy(strategy: str, model, input_shape, mesh) -> str:
    """"vmap": the members' steps batched, ``steps_per_call`` of them scanned in one program; "python": one compiled
    single-member step dispatched per member and step (:class:`_LoopedSteps`). "auto": "python" for convolutional
    models on CPU without a device mesh, else "vmap". On this 2-core CPU a LeNet population (batch 64) took 119 ms
    per member-step vmapped and 17 looped."""
    from jaxnn.runtime import resolve_strategy

    strategy = resolve_strategy(strategy, POPULATION_STRATEGIES)
    if strategy == "python" and mesh is not None:
        raise ValueError("strategy='python' runs the members one after another on one device; with devices= use "
                         "'vmap' (or 'auto')")
    if strategy != "auto":
        return strategy
    return "python" if mesh is None and _has_convolution(model, input_shape) else "vmap"


def make_steps(loss, classification: bool, shared_batches: bool, dropout: bool, member_labels: bool,
               strategy: str = "vmap", needs_batch: bool = False):
    """``steps(state, alive, rates, data, labels, rows) -> (state, alive, losses, accs)`` over a chunk of members
    (``rates``: each member's dropout rate when ``dropout``; ``labels``: (members, N) training labels when
    ``member_labels``, else None; ``rows``: (steps, B), or (steps, members, B) unless ``shared_batches``); a member
    with a non-finite loss keeps its previous state from then on. "vmap": one jitted program, a ``lax.scan`` over
    the steps of the vmapped member step. "python": a :class:`_LoopedSteps` (same call)."""
    step = step_function(loss, None, 1, classification, False, needs_batch=needs_batch)

    def member_step(state, alive, rate, batch):
        if dropout:
            with nn.intercept_methods(_dropout_at(rate)):
                new_state, metrics = step(state, batch, False)
        else:
            new_state, metrics = step(state, batch, False)
        ok = alive & jnp.isfinite(metrics["loss"])
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        accuracy = metrics.get("accuracy", jnp.zeros_like(metrics["loss"]))
        return new_state, ok, jnp.where(ok, metrics["loss"], jnp.nan), jnp.where(ok, accuracy, jnp.nan)

    if strategy == "python":
        def gathered_step(state, alive, rate, data, labels, step_rows):
            x, y = jax.tree.map(lambda a: jnp.take(a, step_rows, axis=0), data)
            if member_labels:
                y = jnp.take(labels, step_rows, axis=0)
            return member_step(state, alive, rate, (x, y))

        return _LoopedSteps(jax.jit(gathered_step, donate_argnums=(0,)), shared_batches)

    batch_axes = (None if shared_batches else 0, None if shared_batches and not member_labels else 0)
    vmapped = jax.vmap(member_step, in_axes=(0, 0, 0, batch_axes))

    def steps(state, alive, rates, data, labels, rows):
        def body(carry, step_rows):
            state, alive = carry
            x, y = jax.tree.map(lambda a: jnp.take(a, step_rows, axis=0), data)
            if member_labels:
                y = labels[:, step_rows] if shared_batches else jnp.take_along_axis(labels, step_rows, axis=1)
            state, alive, value, accuracy = vmapped(state, alive, rates, (x, y))
            return (state, alive), (value, accuracy)

        (state, alive), (values, accuracies) = jax.lax.scan(body, (state, alive), rows)
        return state, alive, values, accuracies

    return jax.jit(steps, donate_argnums=(0, 1))


class _LoopedSteps:
    """The "python" strategy: each member's steps dispatched one by one from the host, every step one compiled
    single-member program (batch gathered on the device). No compiled loop anywhere: on XLA:CPU a convolution inside
    a ``lax.scan``/``lax.map`` body, or vmapped over members, ran 3.7-4x slower than the same step on its own (LeNet,
    batch 64, 2 cores: 62-66 vs 17 ms). Dispatch is asynchronous, so the host runs ahead of the device."""

    def __init__(self, member_step, shared_batches: bool):
        self.member_step, self.shared_batches = member_step, shared_batches
        self.compiled = None

    def compile_for(self, state, alive, rates, data, labels, rows):
        """Compile the single-member step for this chunk's shapes (once: the same program serves every call)."""
        if self.compiled is None:
            member = jax.tree.map(lambda leaf: leaf[0], (state, alive, rates, labels))
            first_rows = rows[0] if self.shared_batches else rows[0, 0]
            self.compiled = self.member_step.lower(member[0], member[1], member[2], data, member[3],
                                                   first_rows).compile()
        return self

    def __call__(self, state, alive, rates, data, labels, rows):
        rows = np.asarray(rows)
        members, out_alive, values, accuracies = [], [], [], []
        for i in range(len(rates)):
            member = jax.tree.map(lambda leaf: leaf[i], state)
            member_alive, rate = alive[i], rates[i]
            own_labels = None if labels is None else labels[i]
            member_values, member_accuracies = [], []
            for step_rows in rows:
                member, member_alive, value, accuracy = self.compiled(
                    member, member_alive, rate, data, own_labels, step_rows if self.shared_batches else step_rows[i])
                member_values.append(value)
                member_accuracies.append(accuracy)
            members.append(member)
            out_alive.append(member_alive)
            values.append(jnp.stack(member_values))
            accuracies.append(jnp.stack(member_accuracies))
        stack = lambda trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)  # noqa: E731
        return stack(members), jnp.stack(out_alive), jnp.stack(values, axis=1), jnp.stack(accuracies, axis=1)


def evaluate_members(state, split, loss, classification, size: int, prefix: str,
                     strategy: str = "vmap") -> dict[str, np.ndarray]:
    """Mean loss (and accuracy) of every member over a split (eval mode): arrays of shape (N,). Every batch has
    ``size`` rows (the last zero-padded and masked), so all splits share one compiled program (vmapped over the
    members, or one member at a time for the "python" strategy)."""
    if len(split) == 0:
        return {}
    if strategy == "python":
        single = _member_eval_step(loss, classification, False)
        count = len(jax.tree.leaves(state.params)[0])
        eval_step = lambda state, batch, mask: jax.tree.map(  # noqa: E731
            lambda *sums: jnp.stack(sums),
            *[single(jax.tree.map(lambda leaf: leaf[i], state), batch, mask) for i in range(count)])
    else:
        eval_step = _member_eval_step(loss, classification, True)
    totals = None
    for x, y, mask in padded_batches(split, size):
        sums = eval_step(state, (x, y), mask)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return mean_metrics(jax.device_get(totals), classification, prefix)


@functools.lru_cache(maxsize=8)
def _member_eval_step(loss, classification: bool, vmapped: bool):
    step = make_eval_step(loss, classification=classification)
    return jax.jit(jax.vmap(step, in_axes=(0, None, None)) if vmapped else step)


class PopulationMemoryError(MemoryError):
    """A chunk of members needs more memory than the device has; the message names a chunk size that fits."""


def _available_bytes(device) -> int | None:
    """Free memory of ``device``: its allocator's limit minus what is in use (GPU/TPU), else the host's available
    memory (CPU, /proc/meminfo); None when unknown."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without memory statistics
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(program, chunk: int, shared_bytes: int, devices: int, available: int | None) -> None:
    """Refuse a compiled chunk program that cannot fit, naming a chunk size that would (per device)."""
    if available is None:
        return
    analysis = program.memory_analysis()
    if analysis is None:
        return
    need = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes)
    if need <= 0.9 * available:
        return
    per_member = max(1, (need - shared_bytes) * devices // chunk)
    fits = int((0.9 * available - shared_bytes) * devices // per_member)
    fits = fits - fits % devices if fits >= devices else 0
    gib = 2.0 ** 30
    advice = (f"set chunk={fits} (population.chunk in a sweep config) to train {fits} members at a time"
              if fits >= 1 else "even one member does not fit: use a smaller model or batch")
    raise PopulationMemoryError(f"{chunk} members at once need ~{need / gib:.2f} GiB per device "
                                f"(~{per_member / gib:.3f} GiB per member) but ~{available / gib:.2f} GiB is free: "
                                f"{advice}")


def _members_mesh(devices: int | None):
    """A 1-D mesh named ``members`` over the first ``devices`` devices (None or 1: no mesh)."""
    if devices is None or devices == 1:
        return None
    available = jax.devices()
    count = len(available) if devices == -1 else int(devices)
    if count < 1 or count > len(available):
        raise ValueError(f"devices={devices}: this process sees {len(available)} device(s)")
    if count == 1:
        return None
    return jax.sharding.Mesh(np.asarray(available[:count]), ("members",))


@dataclasses.dataclass(frozen=True)
class PopulationOptions:
    """How a population is trained (the members' results do not depend on ``chunk``, ``steps_per_call``,
    ``eval_batch_size``, ``progress``, ``devices`` or ``strategy``):
    ``chunk`` members at a time (default: all), ``steps_per_call`` steps per dispatch, evaluation in batches of
    ``eval_batch_size``, a ``progress`` bar; early stopping member by member (``early_stop_patience`` evaluations
    of ``early_stop_metric``, val_loss or val_accuracy, every ``eval_every`` steps, default once per epoch);
    ``devices`` (shard the members over that many devices, -1: all), ``strategy`` ("vmap", "python" or "auto") and
    ``needs_batch`` (the optimizer's update takes the batch and the eval-mode model). ``curvature``: after training,
    every member's λmax, Hessian trace and gᵀHg/gᵀg on ``curvature_batches`` training batches
    (:func:`member_curvature`), columns of ``members`` and of the table."""

    chunk: int | None = None
    steps_per_call: int = 50
    eval_batch_size: int = 1024
    progress: bool = True
    early_stop_patience: int | None = None
    early_stop_metric: str = "val_loss"
    eval_every: int | None = None
    devices: int | None = None
    strategy: str = "auto"
    needs_batch: bool = False
    curvature: bool = False
    curvature_batches: int = 4


def member_curvature(rows: list[dict], state: TrainState, batches: list, loss: str | Callable) -> None:
    """Add ``lambda_max`` (population Lanczos, 40 steps), ``hessian_trace`` (Hutchinson, 20 probes) and
    ``gradient_curvature`` (gᵀHg/gᵀg) of every member on ``batches`` to its row; NaN for a member that diverged."""
    from jaxnn.curvature.population import (population_gradient_curvature, population_hessian_trace,
                                            population_sharpness)

    alive = np.asarray([not row["status"].startswith("diverged") for row in rows])
    lambdas, traces, along = (np.full(len(rows), np.nan) for _ in range(3))
    if alive.any():
        kept = jax.tree.map(lambda leaf: leaf[alive], state)
        lambdas[alive] = population_sharpness(kept, batches, loss=loss)[:, 0]
        traces[alive] = population_hessian_trace(kept, batches, loss=loss)
        loss_fns = losses.make_loss_fn(kept.apply_fn, loss, kept.model_state)
        along[alive] = population_gradient_curvature(loss_fns, kept.params, batches)[1]
    for row, value, trace, directional in zip(rows, lambdas, traces, along):
        row["lambda_max"], row["hessian_trace"] = float(value), float(trace)
        row["gradient_curvature"] = float(directional)


def train_population(model, optimizer: Callable[..., optax.GradientTransformation], dataset: data_lib.Dataset, *,
                     members: Mapping[str, Sequence[Any]], num_steps: int,
                     loss: str | Callable = "softmax_cross_entropy", batch_size: int = 64, data_seed: int = 0,
                     shuffle_per_member: bool = False, optimizer_kwargs: Mapping[str, Any] | None = None,
                     options: PopulationOptions | None = None, **keywords: Any) -> PopulationResult:
    """Train every member of ``members`` (columns: ``seed``, ``init_scale``, ``dropout`` (the model must have dropout
    layers) and any numeric argument of ``optimizer``, one value per member; missing ones default to seed 0, scale
    1, the model's own dropout and ``optimizer_kwargs``) for
    ``num_steps`` steps of ``batch_size`` on ``dataset.train``; evaluate each on every split. See the module
    docstring for what a member is equal to. :class:`PopulationOptions` say how (as keyword arguments, or
    ``options=``, the keywords on top).

    ``early_stop_patience``: every ``eval_every`` steps (default once per epoch) each member's
    ``early_stop_metric`` (val_loss or val_accuracy) is measured; a member that has not improved for that many
    evaluations is frozen (status "early-stopped at step s") while the others go on. ``label_noise`` (a member
    column, classification only): member ``i`` trains on ``noisy_labels(train.y, p_i, C, seed_i)`` — each training
    label replaced with probability p_i by a random other class — and is evaluated on the clean labels of every split
    (its per-step ``losses``/``accuracies`` are on the labels it trains on). ``needs_batch``: the optimizer's update
    takes the batch and the eval-mode model (the K-FAC preconditioner, ``curvature.kfac_preconditioner``), as
    ``fit(needs_batch=True)``. ``strategy``: "vmap", "python"
    (dispatched member by member and step from the host: fastest for convolutions on CPU; the former name "loop"
    still works) or "auto" (see :func:`_population_strategy`). ``devices``: shard the members over that many devices
    (-1: all; a ``members`` mesh axis; chunks are padded to a multiple of it). A chunk whose
    compiled program needs more memory than the device has free raises :class:`PopulationMemoryError` naming a
    chunk size that fits."""
    o = merge_options("train_population", keywords, (PopulationOptions, options, "options"))[0]
    run = _PopulationRun(model, optimizer, dataset, members, num_steps, loss, batch_size, data_seed,
                         shuffle_per_member, optimizer_kwargs, o)
    member_rows, histories, accuracy_histories, states = [], [], [], []
    bar = tqdm(total=run.count * num_steps, desc=f"population ({run.count} members)", unit="member·step",
               disable=not o.progress, leave=False, dynamic_ncols=True)
    for begin in range(0, run.count, run.chunk):
        state, chunk_losses, chunk_accuracies, stopped = run.train_chunk(begin, bar)
        real = chunk_losses.shape[1]
        member_rows += run.member_rows(begin, state, chunk_losses, stopped)
        histories.append(chunk_losses)
        accuracy_histories.append(chunk_accuracies)
        states.append(jax.tree.map(lambda leaf: np.asarray(leaf)[:real] if run.mesh is not None else leaf[:real],
                                   state))
    bar.close()
    state = states[0] if len(states) == 1 else jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *states)
    if o.curvature:
        size = min(batch_size, len(dataset.train))
        x, y = data_lib.host_stacked_batches(dataset.train, size, o.curvature_batches, seed=data_seed, shuffle=True)
        member_curvature(member_rows, state, list(zip(x, y)), loss)
    return PopulationResult(state=state, members=member_rows, losses=np.concatenate(histories, axis=1),
                            accuracies=np.concatenate(accuracy_histories, axis=1) if run.classification else None,
                            compile_s=run.compile_s, run_s=run.run_s)


class _PopulationRun:
    """One population's checked arguments and what its chunks share (the optimizer, the training data on the device,
    the compiled step programs); ``train_chunk`` trains ``chunk`` members to the end, ``member_rows`` reports them."""

    def __init__(self, model, optimizer, dataset: data_lib.Dataset, members, num_steps: int, loss, batch_size: int,
                 data_seed: int, shuffle_per_member: bool, optimizer_kwargs, o: PopulationOptions):
        count, columns = check_members(members, optimizer)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        if not 1 <= int(batch_size) <= len(dataset.train):
            raise ValueError(f"batch_size={batch_size} must be between 1 and the {len(dataset.train)} training "
                             "examples")
        if "label_noise" in columns and dataset.task != "classification":
            raise ValueError("members: label_noise needs a classification dataset")
        self.model, self.dataset, self.loss, self.o = model, dataset, loss, o
        self.count, self.columns, self.num_steps, self.batch_size = count, columns, num_steps, batch_size
        self.shuffle_per_member = shuffle_per_member
        self.mesh = _members_mesh(o.devices)
        self.strategy = _population_strategy(o.strategy, model, dataset.input_shape, self.mesh)
        self.shards = 1 if self.mesh is None else self.mesh.size
        chunk = count if o.chunk is None else int(o.chunk)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk = -(-chunk // self.shards) * self.shards  # every device holds the same number of members
        self.eval_every = o.eval_every
        if o.early_stop_patience is not None:
            self._check_early_stopping(o, dataset)
            self.eval_every = o.eval_every or data_lib.steps_per_epoch(len(dataset.train), batch_size, True)
        self.tx, self.hyper_names = self._optimizer(optimizer, columns, dict(optimizer_kwargs or {}))
        self.float_dtype = jnp.result_type(float)
        self.seeds = columns.get("seed", np.zeros(count, np.int64)).astype(np.uint32)
        self.scales = columns.get("init_scale", np.ones(count)).astype(self.float_dtype)
        self.data_seeds = self.seeds.astype(int) if shuffle_per_member else np.full(count, int(data_seed))
        self.classification = dataset.task == "classification"
        x_dtype, self.y_dtype = data_lib.pipeline.device_dtypes(dataset.train)
        host_data = (np.asarray(dataset.train.x, x_dtype), np.asarray(dataset.train.y, self.y_dtype))
        self.shared_bytes = sum(a.nbytes for a in host_data)
        self.train_data = jax.device_put(host_data, None if self.mesh is None else self._sharding(PartitionSpec()))
        self.available = _available_bytes(jax.devices()[0])
        self.dropout = "dropout" in columns
        if self.dropout and not _dropout_layers(model, dataset.input_shape):
            raise ValueError("members: dropout varies, but the model has no dropout layer in training mode; build it "
                             "with a dropout rate > 0 (each member's rate replaces it)")
        self.noise = "label_noise" in columns
        self.steps = make_steps(loss, self.classification, shared_batches=not shuffle_per_member,
                                dropout=self.dropout, member_labels=self.noise, strategy=self.strategy,
                                needs_batch=o.needs_batch)
        self.per_call = max(1, min(int(o.steps_per_call), num_steps))
        self.eval_size = max(1, min(int(o.eval_batch_size),
                                    max(len(dataset.train), len(dataset.val), len(dataset.test))))
        self.programs: dict[int, Any] = {}
        self.compile_s = self.run_s = 0.0

    @staticmethod
    def _check_early_stopping(o: PopulationOptions, dataset: data_lib.Dataset) -> None:
        patience = o.early_stop_patience
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"early_stop_patience must be an integer >= 1, got {patience!r}")
        if o.early_stop_metric not in ("val_loss", "val_accuracy"):
            raise ValueError(f"early_stop_metric must be val_loss or val_accuracy, got {o.early_stop_metric!r}")
        if len(dataset.val) == 0:
            raise ValueError("early stopping needs a validation split (data.val_fraction > 0)")
        if o.early_stop_metric == "val_accuracy" and dataset.task != "classification":
            raise ValueError("early_stop_metric val_accuracy needs a classification dataset")

    @staticmethod
    def _optimizer(optimizer, columns: dict[str, np.ndarray], fixed: dict[str, Any]):
        """The optimizer with its swept hyper-parameters in its state (first member's values), and their names."""
        accepted = list(inspect.signature(optimizer).parameters)
        fixed = {rate_name(name, accepted, fixed): value for name, value in fixed.items()}
        hyper_names = [name for name in columns if name not in MEMBER_FIELDS]
        clash = sorted(set(hyper_names) & set(fixed))
        if clash:
            raise ValueError(f"members and optimizer_kwargs both set {clash}: give each value once")
        missing = [p.name for p in inspect.signature(optimizer).parameters.values()
                   if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                   and p.name not in columns and p.name not in fixed]
        if missing:
            raise ValueError(f"the optimizer needs {missing}: give them in members (one value per member) or in "
                             "optimizer_kwargs")
        first = {name: float(columns[name][0]) for name in hyper_names}
        return optax.inject_hyperparams(optimizer)(**fixed, **first), hyper_names

    def _sharding(self, spec):
        return jax.sharding.NamedSharding(self.mesh, spec)

    def place(self, tree, spec=PartitionSpec("members")):
        """``tree`` on the chunk's devices: split over the members axis (or as ``spec`` says); as is without a mesh."""
        return tree if self.mesh is None else jax.device_put(tree, self._sharding(spec))

    def _batch_rows(self, index: np.ndarray, done: int, length: int):
        """The batches' example rows for steps ``done .. done + length``: (length, B), or (length, chunk, B)."""
        if not self.shuffle_per_member:
            return data_lib.batch_rows(len(self.dataset.train), self.batch_size, int(self.data_seeds[0]), done, length)
        rows = np.stack([data_lib.batch_rows(len(self.dataset.train), self.batch_size, int(s), done, length)
                         for s in self.data_seeds[index]], axis=1)
        return self.place(rows, PartitionSpec(None, "members"))

    def _program(self, length: int, *arguments):
        """The compiled program for calls of ``length`` steps (compiled on its own: compile and training times are
        reported apart)."""
        if length not in self.programs:
            started = time.perf_counter()
            if self.strategy == "python":
                self.programs[length] = self.steps.compile_for(*arguments)
            else:
                self.programs[length] = self.steps.lower(*arguments).compile()
            self.compile_s += time.perf_counter() - started
            if self.strategy == "vmap":  # the loop holds one member's step at a time
                _check_memory(self.programs[length], self.chunk, self.shared_bytes, self.shards, self.available)
        return self.programs[length]

    def train_chunk(self, begin: int, bar) -> tuple[Any, np.ndarray, np.ndarray, dict[int, int]]:
        """Members ``begin ..`` trained to the end: their state (padded to ``chunk``; the last chunk repeats its last
        member), per-step losses and accuracies (num_steps, real members), and the early-stopped ones' last step."""
        o, columns = self.o, self.columns
        index = np.arange(begin, begin + self.chunk).clip(max=self.count - 1)
        real = min(self.chunk, self.count - begin)
        state = self.place(init_members(self.model, self.tx, self.dataset.input_shape, self.seeds[index],
                                        self.scales[index], {name: columns[name][index].astype(self.float_dtype)
                                                             for name in self.hyper_names}))
        alive = self.place(jnp.ones(self.chunk, bool))
        rates = self.place(jnp.asarray(columns["dropout"][index] if self.dropout else np.zeros(self.chunk),
                                       self.float_dtype))
        labels = self.place(np.stack([
            data_lib.noisy_labels(self.dataset.train.y, columns["label_noise"][i], self.dataset.num_classes,
                                  int(self.seeds[i])) for i in index]).astype(self.y_dtype)) if self.noise else None
        values, accuracies = [], []
        stopped: dict[int, int] = {}  # position in the chunk -> the step it was early-stopped after
        rule = Patience(o.early_stop_patience, "min" if o.early_stop_metric == "val_loss" else "max",
                        size=self.chunk) if o.early_stop_patience else None
        done = 0
        while done < self.num_steps:
            length = min(self.per_call, self.num_steps - done)
            if self.eval_every:
                length = min(length, self.eval_every - done % self.eval_every)
            arguments = (state, alive, rates, self.train_data, labels, self._batch_rows(index, done, length))
            program = self._program(length, *arguments)
            started = time.perf_counter()
            state, alive, value, accuracy = program(*arguments)
            values.append(value)
            accuracies.append(accuracy)
            jax.block_until_ready(value)
            self.run_s += time.perf_counter() - started
            done += length
            bar.update(real * length)
            if rule is not None and done % self.eval_every == 0 and done < self.num_steps:
                measured = evaluate_members(state, self.dataset.val, self.loss, self.classification, self.eval_size,
                                            "val", self.strategy)
                active = np.asarray(jax.device_get(alive))  # the stopped and the diverged are not alive
                for position in np.flatnonzero(rule.update(measured[o.early_stop_metric], active)):
                    stopped[int(position)] = done
                if stopped:
                    keep = np.ones(self.chunk, bool)
                    keep[list(stopped)] = False
                    alive = self.place(jnp.asarray(active & keep))
        chunk_losses = np.concatenate(jax.device_get(values))[:, :real]
        chunk_accuracies = np.concatenate(jax.device_get(accuracies))[:, :real]
        return state, chunk_losses, chunk_accuracies, stopped

    def member_rows(self, begin: int, state, chunk_losses: np.ndarray, stopped: dict[int, int]) -> list[dict]:
        """One row per real member of the chunk from ``begin``: its values, status, final loss and split metrics."""
        metrics = {}
        for split_name in ("train", "val", "test"):
            metrics.update(evaluate_members(state, getattr(self.dataset, split_name), self.loss, self.classification,
                                            self.eval_size, split_name, self.strategy))
        rows = []
        for position in range(chunk_losses.shape[1]):
            member = begin + position
            row = {"member": member}  # its index in the result's state, losses and every per-member function
            row.update({name: (int(self.columns[name][member]) if name == "seed" else float(self.columns[name][member]))
                        for name in self.columns})
            trained = stopped.get(position, self.num_steps)
            finite = np.isfinite(chunk_losses[:trained, position])
            diverged_at = None if finite.all() else int(np.argmin(finite))  # the first step whose loss was not finite
            if diverged_at is not None:
                row["status"] = f"diverged at step {diverged_at}"
            elif position in stopped:
                row["status"] = f"early-stopped at step {trained}"
            else:
                row["status"] = "completed"
            last_finite = trained - 1 if diverged_at is None else diverged_at - 1
            row["final_loss"] = float(chunk_losses[last_finite, position]) if last_finite >= 0 else float("nan")
            row.update({name: float(value[position]) for name, value in metrics.items()})
            rows.append(row)
        return rows


def _example_scores(log_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per example (leading axes of ``log_probs`` kept): the training losses' own scores, negative log-likelihood
    (``softmax_cross_entropy``, or ``sequence_cross_entropy`` for per-position labels with ``IGNORE_LABEL``
    padding) and ``example_accuracy``. ``log_probs`` (..., n, C) with labels (n,), or (..., n, T, C) with (n, T)."""
    per_example = losses.sequence_cross_entropy if labels.ndim > 1 else losses.softmax_cross_entropy
    lead = log_probs.shape[:log_probs.ndim - labels.ndim - 1]
    flat = log_probs.reshape((-1,) + log_probs.shape[len(lead):])
    scores = [np.stack([np.asarray(score(member, labels)) for member in flat]).reshape(lead + labels.shape[:1])
              for score in (per_example, losses.example_accuracy)]
    return scores[0], scores[1]


def ensemble_metrics(result: PopulationResult, split: data_lib.Split, batch_size: int = 1024) -> dict[str, float]:
    """The members as an ensemble on ``split``: accuracy and mean negative log-likelihood of the averaged
    probabilities, against the mean member and the best member (by accuracy on ``split``)."""
    if len(split) == 0:
        raise ValueError("ensemble_metrics: the split is empty")
    apply = jax.jit(jax.vmap(lambda s, x: jax.nn.log_softmax(s.apply_fn({"params": s.params, **s.model_state}, x,
                                                                        train=False)), in_axes=(0, None)))
    x_dtype, _ = data_lib.pipeline.device_dtypes(split)
    scores = []  # per batch: member NLL, member accuracy (N, b), ensemble NLL, accuracy (b,); log-probs not kept
    for i in range(0, len(split), batch_size):
        log_probs = np.asarray(apply(result.state, np.asarray(split.x[i:i + batch_size], x_dtype)))  # (N, b, [T,] C)
        labels = np.asarray(split.y[i:i + batch_size], np.int64)
        mixed = np.logaddexp.reduce(log_probs, axis=0) - math.log(log_probs.shape[0])  # log of the mean probability
        scores.append(_example_scores(log_probs, labels) + _example_scores(mixed, labels))
    member_nll, member_accuracy = (np.concatenate([s[k] for s in scores], axis=1).mean(axis=1) for k in (0, 1))
    ensemble_nll, ensemble_accuracy = (np.concatenate([s[k] for s in scores]) for k in (2, 3))
    best = int(np.argmax(member_accuracy))
    return {"ensemble_accuracy": float(ensemble_accuracy.mean()), "ensemble_nll": float(ensemble_nll.mean()),
            "mean_member_accuracy": float(member_accuracy.mean()), "mean_member_nll": float(member_nll.mean()),
            "best_member": best, "best_member_accuracy": float(member_accuracy[best]),
            "best_member_nll": float(member_nll[best])}
