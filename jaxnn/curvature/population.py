"""Curvature of a whole population in one compiled program: Lanczos vmapped over members.

    loss_fns = losses.make_loss_fn(state.apply_fn, "softmax_cross_entropy", state.model_state)  # stacked state
    values = population_top_eigenvalues(loss_fns, state.params, batches, k=1)    # (N, k)

``params`` carries a leading member axis on every leaf (``PopulationResult.state.params``); ``loss_fn`` is either
one function for every member or a ``jax.tree_util.Partial`` whose array arguments carry the member axis too (what
``make_loss_fn`` returns for a stacked ``model_state``). Every member runs the same ``num_iters`` Lanczos steps
with full reorthogonalisation, each step one data-set Hessian-vector product per member, all members batched into
one product by ``vmap``; the top ``k`` Ritz values of each member's tridiagonal matrix are returned. Members share
the data (every batch in ``data``, weighted by its size like :func:`jaxnn.curvature.hessian`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxnn.curvature.batches import prepare_data
from jaxnn.curvature.operators import DEFAULT_PRECISION, at_precision, check_precision, precise_jit


def _lanczos_ritz_values(loss_of_flat: Callable, flat_params: jax.Array, start: jax.Array, num_iters: int):
    """Every Ritz value (descending) after ``num_iters`` steps of Lanczos with full reorthogonalisation on the Hessian of
    ``loss_of_flat`` at ``flat_params``. A breakdown (the Krylov space is invariant) continues from a fresh vector
    orthogonal to the basis with a zero coupling, so every Ritz value stays an eigenvalue estimate of the operator."""
    # Linearised once: every product afterwards costs only the tangent pass (the forward and backward passes at θ
    # and their residuals are computed before the loop).
    hvp = jax.linearize(jax.grad(loss_of_flat), flat_params)[1]
    n, dtype = flat_params.size, flat_params.dtype
    # One spare row, so step i always writes row i + 1 in place (the last write is never read).
    basis = jnp.zeros((num_iters + 1, n), dtype).at[0].set(start / jnp.linalg.norm(start))
    alphas, betas = jnp.zeros(num_iters, dtype), jnp.zeros(num_iters, dtype)
    seed = jax.random.PRNGKey(1)

    def body(i, carry):
        basis, alphas, betas = carry

        def orthogonalise(x):
            # Classical Gram-Schmidt against every earlier vector (rows past i are zero); a second pass only when
            # the first removed most of x ("twice is enough"): each pass reads the basis twice.
            first = x - (basis @ x) @ basis
            return jax.lax.cond(jnp.linalg.norm(first) < 0.7 * jnp.linalg.norm(x),
                                lambda f: f - (basis @ f) @ basis, lambda f: f, first)

        v = basis[i]
        w = hvp(v)
        alpha = jnp.vdot(v, w)
        w = orthogonalise(w)
        beta = jnp.linalg.norm(w)
        broke = beta <= 1e3 * jnp.finfo(dtype).eps * jnp.maximum(jnp.abs(alpha), jnp.max(jnp.abs(alphas)))

        def restart():  # a fresh direction orthogonal to the basis, coupled by zero
            fresh = orthogonalise(orthogonalise(jax.random.normal(jax.random.fold_in(seed, i), (n,), dtype)))
            return fresh / jnp.linalg.norm(fresh)

        following = jax.lax.cond(broke, restart, lambda: w / jnp.where(broke, 1, beta))
        return basis.at[i + 1].set(following), alphas.at[i].set(alpha), betas.at[i].set(jnp.where(broke, 0, beta))

    _, alphas, betas = jax.lax.fori_loop(0, num_iters, body, (basis, alphas, betas))
    off_diagonal = betas[:-1]
    tridiagonal = jnp.diag(alphas) + jnp.diag(off_diagonal, 1) + jnp.diag(off_diagonal, -1)
    return jnp.linalg.eigvalsh(tridiagonal)[::-1]


def _check_population(loss_fn: Callable, params: Any, data: Any, stacked: bool):
    """(member count, one member's flat parameters, prepared data, loss_fn as a Partial, member axis of its arrays)."""
    leaves = jax.tree.leaves(params)
    if not leaves or any(np.ndim(leaf) < 1 for leaf in leaves):
        raise ValueError("params: expected a pytree whose every leaf has a leading member axis")
    count = leaves[0].shape[0]
    if any(leaf.shape[0] != count for leaf in leaves):
        raise ValueError(f"params: every leaf needs the same member axis; got {[leaf.shape[0] for leaf in leaves]}")
    flat0, _ = ravel_pytree(jax.tree.map(lambda leaf: leaf[0], params))
    prepared = prepare_data(data, stacked=stacked, name="data", check_finite=True)
    if not isinstance(loss_fn, jax.tree_util.Partial):
        loss_fn = jax.tree_util.Partial(loss_fn)  # a pytree without leaves: the function goes into the cache key
    loss_leaves = jax.tree.leaves(loss_fn)
    if loss_leaves and any(np.ndim(leaf) < 1 or leaf.shape[0] != count for leaf in loss_leaves):
        raise ValueError(f"loss_fn: its array arguments need the member axis ({count}) too, e.g. make_loss_fn with "
                         "the population's stacked model_state")
    groups = tuple((group.batches, group.weights) for group in prepared.groups)
    return count, flat0, groups, loss_fn, 0 if loss_leaves else None


def population_top_eigenvalues(loss_fn: Callable, params: Any, data: Any, *, k: int = 1, num_iters: int | None = None,
                               key: Any = None, stacked: bool = False,
                               precision: str = DEFAULT_PRECISION, strategy: str = "auto") -> np.ndarray:
    """(N, k) top Hessian eigenvalues, λ₁ ≥ … ≥ λ_k, of every member (see the module docstring).

    ``num_iters`` (default max(40, 4k), capped by the parameter count): Lanczos steps, i.e. data-set HVPs per
    member. ``key`` (default key(0)) draws each member's start vector. ``precision``: as in
    :func:`jaxnn.curvature.hessian`. ``strategy``: "vmap" (all members' products batched), "map" (one member after
    another, inside the same program), "loop" (one member after another through the single-model engine, dispatched
    from Python) or "auto": "loop" for convolutional members on CPU, else see :func:`_member_strategy`. Cost:
    N·num_iters products, in one program (vmap, map).
    """
    return _population_ritz_values(loss_fn, params, data, k, num_iters, key, stacked, precision, strategy)[:, :k]


def population_extreme_eigenvalues(loss_fn: Callable, params: Any, data: Any, *, k: int = 1,
                                   num_iters: int | None = None, key: Any = None, stacked: bool = False,
                                   precision: str = DEFAULT_PRECISION, strategy: str = "auto"
                                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(top, bottom)``: every member's k largest (N, k; descending) and k smallest (N, k; ascending: λmin first)
    Hessian eigenvalues, both ends from the same Lanczos run (the program of :func:`population_top_eigenvalues`;
    arguments as there). The smallest eigenvalues of a network's Hessian sit in a dense bulk near zero and converge
    more slowly than the outliers at the top: check them against more ``num_iters``."""
    values = _population_ritz_values(loss_fn, params, data, k, num_iters, key, stacked, precision, strategy)
    return values[:, :k], values[:, ::-1][:, :k]


def _population_ritz_values(loss_fn, params, data, k, num_iters, key, stacked, precision, strategy) -> np.ndarray:
    """(N, num_iters) Ritz values of every member, descending."""
    precision = check_precision(precision)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    count, flat0, groups, loss_fn, member_axis = _check_population(loss_fn, params, data, stacked)
    n = flat0.size
    if k > n:
        raise ValueError(f"k={k} exceeds the {n} parameters of a member")
    num_iters = min(n, max(40, 4 * k)) if num_iters is None else int(num_iters)
    if not k <= num_iters <= n:
        raise ValueError(f"num_iters={num_iters} must be between k={k} and the {n} parameters of a member")
    key = jax.random.PRNGKey(0) if key is None else key
    if strategy == "auto" and _convolutional_on_cpu(loss_fn, params, groups, member_axis):
        strategy = "loop"
    if strategy == "loop":
        return _looped_ritz_values(loss_fn, params, data, num_iters, key, stacked, precision, member_axis, count)
    starts = jax.random.normal(key, (count, n), flat0.dtype)
    strategy = _member_strategy(strategy, count, num_iters, n, flat0.dtype)
    values = _population_program(loss_fn, params, starts, groups, num_iters=num_iters, member_axis=member_axis,
                                 precision=precision, strategy=strategy)
    return np.asarray(values)


def _member(tree: Any, index: int) -> Any:
    return jax.tree.map(lambda leaf: leaf[index], tree)


def _convolutional_on_cpu(loss_fn, params, groups, member_axis) -> bool:
    """A member's loss applies a convolution and the backend is CPU: the "loop" strategy's ground (``groups``: the
    prepared data of :func:`_check_population`)."""
    if jax.default_backend() != "cpu":
        return False
    from jaxnn.curvature.operators import _contains_convolution

    member_loss = loss_fn if member_axis is None else _member(loss_fn, 0)
    batch = _member(groups[0][0], 0)  # the first batch of the first group
    return _contains_convolution(jax.make_jaxpr(member_loss)(_member(params, 0), batch).jaxpr)


def _looped_ritz_values(loss_fn, params, data, num_iters, key, stacked, precision, member_axis, count):
    """The "loop" strategy: each member's Lanczos through the single-model engine (:func:`jaxnn.curvature.lanczos`,
    all ``num_iters`` steps), whose convolutional operators run their loops unrolled on CPU: XLA:CPU runs the
    backward convolutions of an HVP several times slower inside a loop program (``map``) or batched over members
    (``vmap``). Members run one after another, dispatched from Python."""
    from jaxnn.curvature.krylov import lanczos
    from jaxnn.curvature.operators import hessian

    rows = []
    for index, member_key in enumerate(jax.random.split(key, count)):
        member_loss = loss_fn if member_axis is None else _member(loss_fn, index)
        # The data were checked once for every member (_check_population); a non-finite product still raises.
        op = hessian(member_loss, _member(params, index), data, stacked=stacked, precision=precision,
                     check_finite=False)
        result = lanczos(op, member_key, num_iters, k=1, compute_residuals=False, progress=False)
        rows.append(np.asarray(result.ritz_values)[::-1])
    return np.stack(rows)


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
    _, flat0, groups, loss_fn, member_axis = _check_population(loss_fn, params, data, stacked)
    key = jax.random.PRNGKey(0) if key is None else key
    probes = population_probes(key, num_samples, flat0.size, flat0.dtype)
    return np.asarray(_population_trace_program(loss_fn, params, probes, groups, member_axis=member_axis,
                                                precision=precision))


def population_gradient_curvature(loss_fn: Callable, params: Any, data: Any, *, stacked: bool = False,
                                  precision: str = DEFAULT_PRECISION) -> tuple[np.ndarray, np.ndarray]:
    """Every member's (gᵀHg, gᵀHg / gᵀg) along its own data-set gradient g: the curvature the next gradient step
    sees (see :func:`jaxnn.curvature.gradient_curvature`). Cost: N gradients and N HVPs, in one program."""
    precision = check_precision(precision)
    _, _, groups, loss_fn, member_axis = _check_population(loss_fn, params, data, stacked)
    product, squared_norm = (np.asarray(a) for a in _population_gradient_program(
        loss_fn, params, groups, member_axis=member_axis, precision=precision))
    with np.errstate(divide="ignore", invalid="ignore"):
        return product, np.where(squared_norm > 0, product / squared_norm, np.nan)


def _loss_of_flat(member_loss_fn: Callable, unravel: Callable, groups) -> Callable:
    """A member's data-averaged loss of its flat parameter vector (batches of one shape scanned; weights B_b / N)."""

    def loss(vector):
        member_value = unravel(vector)
        total = jnp.zeros((), vector.dtype)
        for batches, weights in groups:
            def one(carry, inputs):
                batch, weight = inputs
                return carry + weight * member_loss_fn(member_value, batch), None

            total = total + jax.lax.scan(one, jnp.zeros((), vector.dtype), (batches, weights))[0]
        return total

    return loss


MEMBER_STRATEGIES = ("auto", "vmap", "map", "loop")
CPU_VMAP_BASIS_BYTES = 32 * 2**20  # on CPU, members are vmapped while all their Lanczos bases fit in this


def _member_strategy(strategy: str, count: int, num_iters: int, n: int, dtype: Any) -> str:
    """"vmap" (every member at once: batched products) or "map" (one member after another inside the program).
    "auto": vmap on accelerators; on CPU vmap only while the members' Lanczos bases together stay small — with 16
    members of the main job's MLP (85k parameters, 41 vectors each: 223 MB) the vmapped program ran 2.2x slower
    than one member at a time, whose 14 MB basis stays in cache (a member's HVP already fills the cores)."""
    if strategy not in MEMBER_STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(MEMBER_STRATEGIES)}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    if jax.default_backend() != "cpu":
        return "vmap"
    basis_bytes = count * (num_iters + 1) * n * np.dtype(dtype).itemsize
    return "vmap" if basis_bytes <= CPU_VMAP_BASIS_BYTES else "map"


def _over_members(member: Callable, member_axis, strategy: str, loss_fn, params, *per_member):
    """``member(loss_fn, params, *per_member)`` for every member: vmapped, or lax.map'ed one after another."""
    if strategy == "vmap":
        return jax.vmap(member, in_axes=(member_axis, 0) + (0,) * len(per_member))(loss_fn, params, *per_member)
    if member_axis is None:
        return jax.lax.map(lambda args: member(loss_fn, *args), (params, *per_member))
    return jax.lax.map(lambda args: member(*args), (loss_fn, params, *per_member))


@precise_jit(static_argnames=("num_iters", "member_axis", "precision", "strategy"))
def _population_program(loss_fn, params, starts, groups, *, num_iters: int, member_axis, precision, strategy: str):
    """The Lanczos of every member (vmapped, or one after another), all its Ritz values: one compiled program per
    (loss, shapes, num_iters, strategy), reused for any k and for either end of the spectrum."""
    unravel = ravel_pytree(jax.tree.map(lambda leaf: leaf[0], params))[1]

    def member(member_loss_fn, member_params, start):
        loss = _loss_of_flat(at_precision(member_loss_fn, precision), unravel, groups)
        return _lanczos_ritz_values(loss, ravel_pytree(member_params)[0], start, num_iters)

    return _over_members(member, member_axis, strategy, loss_fn, params, starts)


@precise_jit(static_argnames=("member_axis", "precision"))
def _population_trace_program(loss_fn, params, probes, groups, *, member_axis, precision):
    """Every member's mean vᵀHv over the probes (one HVP per probe, scanned), vmapped over members."""
    unravel = ravel_pytree(jax.tree.map(lambda leaf: leaf[0], params))[1]

    def member(member_loss_fn, member_params):
        grad = jax.grad(_loss_of_flat(at_precision(member_loss_fn, precision), unravel, groups))
        flat = ravel_pytree(member_params)[0]
        quadratic = lambda _, v: (None, jnp.vdot(v, jax.jvp(grad, (flat,), (v,))[1]))  # noqa: E731
        return jnp.mean(jax.lax.scan(quadratic, None, probes)[1])

    return jax.vmap(member, in_axes=(member_axis, 0))(loss_fn, params)


@precise_jit(static_argnames=("member_axis", "precision"))
def _population_gradient_program(loss_fn, params, groups, *, member_axis, precision):
    """Every member's (gᵀHg, gᵀg), vmapped over members."""
    unravel = ravel_pytree(jax.tree.map(lambda leaf: leaf[0], params))[1]

    def member(member_loss_fn, member_params):
        grad = jax.grad(_loss_of_flat(at_precision(member_loss_fn, precision), unravel, groups))
        flat = ravel_pytree(member_params)[0]
        gradient, curvature = jax.jvp(grad, (flat,), (grad(flat),))
        return jnp.vdot(gradient, curvature), jnp.vdot(gradient, gradient)

    return jax.vmap(member, in_axes=(member_axis, 0))(loss_fn, params)


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
