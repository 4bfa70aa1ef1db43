"""Curvature of a whole population in one compiled program: the Krylov core vmapped over members.

    loss_fns = losses.make_loss_fn(state.apply_fn, "softmax_cross_entropy", state.model_state)  # stacked state
    values = population_top_eigenvalues(loss_fns, state.params, batches, k=1)    # (N, k)

``params`` carries a leading member axis on every leaf (``PopulationResult.state.params``); ``loss_fn`` is either
one function for every member or a ``jax.tree_util.Partial`` whose array arguments carry the member axis too (what
``make_loss_fn`` returns for a stacked ``model_state``). Each member's Hessian is the single-model operator
(:func:`jaxnn.curvature.hessian`: the same products, batch accumulation and precision) with the member's parameters
and function arrays swapped in, and its Lanczos is the single-model core (:func:`jaxnn.curvature.krylov.
lanczos_decomposition`: the same re-orthogonalisation and restarts), run for ``num_iters`` steps under ``vmap``
(or ``lax.map``, or a Python loop: ``strategy``). Members share the data (every batch in ``data``, weighted by its
size like :func:`jaxnn.curvature.hessian`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.curvature.batches import prepare_data
from jaxnn.curvature.operators import (
    DEFAULT_PRECISION,
    CurvatureOperator,
    check_precision,
    flat_operator,
    precise_jit,
    split_functions,
)
from jaxnn.runtime import STRATEGIES, resolve_strategy


class PopulationSpectrum(NamedTuple):
    """Every member's Ritz values after ``num_iters`` Lanczos steps, descending, with their residual bounds."""

    values: np.ndarray  # (N, m), descending
    residual_bounds: np.ndarray  # (N, m): ‖M y − θ y‖ bound of each Ritz pair (the Lanczos estimate ‖β s_last‖)


def _member(tree: Any, index: int) -> Any:
    return jax.tree.map(lambda leaf: leaf[index], tree)


class _Population(NamedTuple):
    count: int
    template: CurvatureOperator  # member 0's Hessian operator: structure, data, product, precision
    params: Any  # stacked
    function_arrays: list  # the loss's arrays, stacked on the member axis (None entries: not arrays)
    member_axis: Any  # 0 when the loss's arrays carry the member axis, else None


def _check_population(loss_fn: Callable, params: Any, data: Any, stacked: bool,
                      precision: str = DEFAULT_PRECISION) -> _Population:
    """The members, member 0's Hessian operator (the template every member's operator is built from), the stacked
    arrays of the loss and their member axis. The data are checked for NaN/inf once for every member."""
    from jaxnn.curvature.operators import hessian

    leaves = jax.tree.leaves(params)
    if not leaves or any(np.ndim(leaf) < 1 for leaf in leaves):
        raise ValueError("params: expected a pytree whose every leaf has a leading member axis")
    count = leaves[0].shape[0]
    if any(leaf.shape[0] != count for leaf in leaves):
        raise ValueError(f"params: every leaf needs the same member axis; got {[leaf.shape[0] for leaf in leaves]}")
    prepare_data(data, stacked=stacked, name="data", check_finite=True)
    if not isinstance(loss_fn, jax.tree_util.Partial):
        loss_fn = jax.tree_util.Partial(loss_fn)  # a pytree without leaves: the function goes into the cache key
    loss_leaves = jax.tree.leaves(loss_fn)
    if loss_leaves and any(np.ndim(leaf) < 1 or leaf.shape[0] != count for leaf in loss_leaves):
        raise ValueError(f"loss_fn: its array arguments need the member axis ({count}) too, e.g. make_loss_fn with "
                         "the population's stacked model_state")
    member_axis = 0 if loss_leaves else None
    first_loss = loss_fn if member_axis is None else _member(loss_fn, 0)
    # Loops compiled into the program (scan over batches): the members run inside one program ("vmap", "scan");
    # the "python" strategy builds its own operators, with the loops the single-model engine picks.
    template = hessian(first_loss, _member(params, 0), data, stacked=stacked, precision=precision,
                       check_finite=False, loops="scan")
    arrays = split_functions(loss_fn)[0]
    return _Population(count, template, params, arrays, member_axis)


def _member_operator(template: CurvatureOperator, params: Any, function_arrays: list) -> CurvatureOperator:
    """The template operator with one member's parameters and function arrays (traceable)."""
    return dataclasses.replace(template, params=params, function_arrays=list(function_arrays))


def _over_members(member: Callable, template: CurvatureOperator, params: Any, function_arrays: list, member_axis,
                  strategy: str, *per_member):
    """``member(op, *per_member_slices)`` for every member's operator: vmapped ("vmap") or one member after another
    inside the program ("scan"). Traceable."""
    axes = [None if member_axis is None or array is None else 0 for array in function_arrays]

    def one(member_params, member_arrays, *rest):
        return member(_member_operator(template, member_params, member_arrays), *rest)

    if strategy == "vmap":
        return jax.vmap(one, in_axes=(0, axes) + (0,) * len(per_member))(params, function_arrays, *per_member)
    if member_axis is None:
        return jax.lax.map(lambda args: one(args[0], function_arrays, *args[1:]), (params, *per_member))
    return jax.lax.map(lambda args: one(*args), (params, function_arrays, *per_member))


def population_top_eigenvalues(loss_fn: Callable, params: Any, data: Any, *, k: int = 1, num_iters: int | None = None,
                               key: Any = None, stacked: bool = False,
                               precision: str = DEFAULT_PRECISION, strategy: str = "auto") -> np.ndarray:
    """(N, k) top Hessian eigenvalues, λ₁ ≥ … ≥ λ_k, of every member (see the module docstring).

    ``num_iters`` (default max(40, 4k), capped by the parameter count): Lanczos steps, i.e. data-set HVPs per
    member. ``key`` (default key(0)) draws each member's start vector. ``precision``: as in
    :func:`jaxnn.curvature.hessian`. ``strategy`` (:data:`jaxnn.runtime.STRATEGIES`): "vmap" (all members' products
    batched), "scan" (one member after another, inside the same program), "python" (one member after another
    through the single-model driver, dispatched from Python) or "auto": "python" for convolutional members on CPU
    (:func:`jaxnn.runtime.prefers_python_loops`), else see :func:`_member_strategy`. Cost: N·num_iters products, in
    one program (vmap, scan). Residual bounds of every value: :func:`population_spectrum`.
    """
    spectrum = population_spectrum(loss_fn, params, data, k=k, num_iters=num_iters, key=key, stacked=stacked,
                                   precision=precision, strategy=strategy)
    return spectrum.values[:, :k]


def population_extreme_eigenvalues(loss_fn: Callable, params: Any, data: Any, *, k: int = 1,
                                   num_iters: int | None = None, key: Any = None, stacked: bool = False,
                                   precision: str = DEFAULT_PRECISION, strategy: str = "auto"
                                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(top, bottom)``: every member's k largest (N, k; descending) and k smallest (N, k; ascending: λmin first)
    Hessian eigenvalues, both ends from the same Lanczos run (the program of :func:`population_top_eigenvalues`;
    arguments as there). The smallest eigenvalues of a network's Hessian sit in a dense bulk near zero and converge
    more slowly than the outliers at the top: check their residual bounds (:func:`population_spectrum`)."""
    values = population_spectrum(loss_fn, params, data, k=k, num_iters=num_iters, key=key, stacked=stacked,
                                 precision=precision, strategy=strategy).values
    return values[:, :k], values[:, ::-1][:, :k]


def population_spectrum(loss_fn: Callable, params: Any, data: Any, *, k: int = 1, num_iters: int | None = None,
                        key: Any = None, stacked: bool = False, precision: str = DEFAULT_PRECISION,
                        strategy: str = "auto") -> PopulationSpectrum:
    """Every member's ``num_iters`` Ritz values (descending) and their residual bounds ‖M y − θ y‖ (the Lanczos
    estimate, free): a value whose bound is small against |θ| is converged, one whose bound is of its own order is
    not yet an eigenvalue. Arguments as :func:`population_top_eigenvalues` (``k`` only bounds ``num_iters`` from
    below)."""
    precision = check_precision(precision)
    strategy = resolve_strategy(strategy, STRATEGIES)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k}")
    population = _check_population(loss_fn, params, data, stacked, precision)
    n = population.template.num_params
    if k > n:
        raise ValueError(f"k={k} exceeds the {n} parameters of a member")
    num_iters = min(n, max(40, 4 * k)) if num_iters is None else int(num_iters)
    if not k <= num_iters <= n:
        raise ValueError(f"num_iters={num_iters} must be between k={k} and the {n} parameters of a member")
    key = jax.random.PRNGKey(0) if key is None else key
    if strategy == "auto" and _convolutional_on_cpu(population):
        strategy = "python"
    if strategy == "python":
        return _looped_spectrum(loss_fn, params, data, num_iters, key, stacked, precision, population)
    dtype = population.template.dtype
    starts = jax.random.normal(key, (population.count, n), dtype)
    strategy = _member_strategy(strategy, population.count, num_iters, n, dtype)
    values, bounds = _population_program(population.template, population.params, population.function_arrays,
                                         starts, num_iters=num_iters, member_axis=population.member_axis,
                                         strategy=strategy)
    return PopulationSpectrum(np.asarray(values), np.asarray(bounds))


def _convolutional_on_cpu(population: _Population) -> bool:
    """A member's loss applies a convolution and the backend is CPU: the "python" strategy's ground."""
    from jaxnn.runtime import prefers_python_loops

    op = population.template
    return prefers_python_loops(lambda p, b: op.loss(op.functions, p, b), op.params, _first_batch(op))


def _first_batch(op: CurvatureOperator) -> Any:
    group = op.data[0]
    return None if group.batches is None else jax.tree.map(lambda leaf: leaf[0], group.batches)


def _looped_spectrum(loss_fn, params, data, num_iters, key, stacked, precision, population) -> PopulationSpectrum:
    """The "python" strategy: each member's Lanczos through the single-model driver (:func:`jaxnn.curvature.
    lanczos`, all ``num_iters`` steps), whose convolutional operators run their loops from Python on CPU: XLA:CPU
    runs the backward convolutions of an HVP several times slower inside a loop program ("scan") or batched over
    members ("vmap"). Members run one after another, dispatched from Python."""
    from jaxnn.curvature.krylov import lanczos
    from jaxnn.curvature.operators import hessian

    values, bounds = [], []
    for index, member_key in enumerate(jax.random.split(key, population.count)):
        member_loss = loss_fn if population.member_axis is None else _member(loss_fn, index)
        # The data were checked once for every member (_check_population); a non-finite product still raises.
        op = hessian(member_loss, _member(params, index), data, stacked=stacked, precision=precision,
                     check_finite=False)
        result = lanczos(op, member_key, num_iters, k=1, compute_residuals=False, progress=False)
        values.append(np.asarray(result.ritz_values)[::-1])
        bounds.append(np.asarray(result.ritz_residual_bounds)[::-1])
    return PopulationSpectrum(np.stack(values), np.stack(bounds))


def population_probes(key: Any, num_samples: int, num_params: int, dtype: Any) -> jax.Array:
    """The (num_samples, num_params) Rademacher probes :func:`population_trace` uses for every member."""
    return jax.random.rademacher(key, (num_samples, num_params), dtype)


def population_trace(loss_fn: Callable, params: Any, data: Any, *, num_samples: int = 20, key: Any = None,
                     stacked: bool = False, precision: str = DEFAULT_PRECISION) -> np.ndarray:
    """(N,) Hutchinson estimates of every member's Hessian trace, mean of vᵀHv over ``num_samples`` Rademacher probes
    v (the same probes for every member, drawn by :func:`population_probes` from ``key``, default key(0)).
    Cost: N·num_samples data-set HVPs, in one program."""
    precision = check_precision(precision)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    population = _check_population(loss_fn, params, data, stacked, precision)
    key = jax.random.PRNGKey(0) if key is None else key
    probes = population_probes(key, num_samples, population.template.num_params, population.template.dtype)
    return np.asarray(_population_trace_program(population.template, population.params, population.function_arrays,
                                                probes, member_axis=population.member_axis))


def population_gradient_curvature(loss_fn: Callable, params: Any, data: Any, *, stacked: bool = False,
                                  precision: str = DEFAULT_PRECISION) -> tuple[np.ndarray, np.ndarray]:
    """Every member's (gᵀHg, gᵀHg / gᵀg) along its own data-set gradient g: the curvature the next gradient step
    sees (see :func:`jaxnn.curvature.gradient_curvature`). Cost: N gradients and N HVPs, in one program."""
    precision = check_precision(precision)
    population = _check_population(loss_fn, params, data, stacked, precision)
    product, squared_norm = (np.asarray(a) for a in _population_gradient_program(
        population.template, population.params, population.function_arrays, member_axis=population.member_axis))
    with np.errstate(divide="ignore", invalid="ignore"):
        return product, np.where(squared_norm > 0, product / squared_norm, np.nan)


CPU_VMAP_BASIS_BYTES = 32 * 2**20  # on CPU, members are vmapped while all their Lanczos bases fit in this


def _member_strategy(strategy: str, count: int, num_iters: int, n: int, dtype: Any) -> str:
    """"vmap" (every member at once: batched products) or "scan" (one member after another inside the program).
    "auto": vmap on accelerators; on CPU vmap only while the members' Lanczos bases together stay small — with 16
    members of the main job's MLP (85k parameters, 41 vectors each: 223 MB) the vmapped program ran 2.2x slower
    than one member at a time, whose 14 MB basis stays in cache (a member's HVP already fills the cores)."""
    strategy = resolve_strategy(strategy, STRATEGIES)
    if strategy != "auto":
        return strategy
    if jax.default_backend() != "cpu":
        return "vmap"
    basis_bytes = count * (num_iters + 1) * n * np.dtype(dtype).itemsize
    return "vmap" if basis_bytes <= CPU_VMAP_BASIS_BYTES else "scan"


@precise_jit(static_argnames=("num_iters", "member_axis", "strategy"))
def _population_program(template, params, function_arrays, starts, *, num_iters: int, member_axis, strategy: str):
    """Every member's Ritz values (descending) and residual bounds from ``num_iters`` steps of the single-model
    Lanczos core on its Hessian operator (vmapped, or one after another): one compiled program per (loss, shapes,
    num_iters, strategy), reused for any k and for either end of the spectrum."""
    from jaxnn.curvature.krylov import lanczos_decomposition, ritz_values

    def member(op, start):
        matvec = flat_operator(op, linearize_batches=True)[0]
        values, bounds = ritz_values(lanczos_decomposition(matvec, start, num_iters))
        return values[::-1], bounds[::-1]

    return _over_members(member, template, params, function_arrays, member_axis, strategy, starts)


@precise_jit(static_argnames=("member_axis",))
def _population_trace_program(template, params, function_arrays, probes, *, member_axis):
    """Every member's mean vᵀHv over the probes (one HVP per probe, scanned), vmapped over members."""
    from jaxnn.curvature.trace_estimators import quadratic_forms

    def member(op):
        return jnp.mean(quadratic_forms(flat_operator(op, linearize_batches=True)[0], probes))

    return _over_members(member, template, params, function_arrays, member_axis, "vmap")


@precise_jit(static_argnames=("member_axis",))
def _population_gradient_program(template, params, function_arrays, *, member_axis):
    """Every member's (gᵀHg, gᵀg), vmapped over members."""
    from jaxnn.curvature.gradient_direction import curvature_along_gradient

    return _over_members(curvature_along_gradient, template, params, function_arrays, member_axis, "vmap")


def population_sharpness(state: Any, data: Any, *, loss: str | Callable = "softmax_cross_entropy", k: int = 1,
                         num_iters: int | None = None, key: Any = None, stacked: bool = False,
                         strategy: str = "auto") -> np.ndarray:
    """(N, k) top Hessian eigenvalues of every member of a population's stacked ``TrainState`` (e.g.
    ``train_population(...).state``) on ``data``, the loss in eval mode with each member's own model state."""
    from jaxnn.losses import make_loss_fn

    loss_fns = make_loss_fn(state.apply_fn, loss, state.model_state)
    return population_top_eigenvalues(loss_fns, state.params, data, k=k, num_iters=num_iters, key=key,
                                      stacked=stacked, strategy=strategy)


def population_hessian_trace(state: Any, data: Any, *, loss: str | Callable = "softmax_cross_entropy",
                             num_samples: int = 20, key: Any = None, stacked: bool = False) -> np.ndarray:
    """(N,) Hutchinson Hessian traces of every member of a population's stacked ``TrainState`` on ``data`` (eval
    mode, each member's own model state); see :func:`population_trace`."""
    from jaxnn.losses import make_loss_fn

    loss_fns = make_loss_fn(state.apply_fn, loss, state.model_state)
    return population_trace(loss_fns, state.params, data, num_samples=num_samples, key=key, stacked=stacked)
