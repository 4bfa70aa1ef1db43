"""Matrix-free curvature operators on parameter pytrees: Hessian, generalised Gauss-Newton, Fisher. The products
themselves (the formulas) are in :mod:`jaxnn.curvature.products`; this module makes them operators.

Every constructor returns the same small frozen dataclass, :class:`CurvatureOperator`. It is a JAX pytree whose
leaves are the parameters, the (stacked) data and any arrays inside the user's functions (e.g. the model state held
by a ``jax.tree_util.Partial``), so it can be passed straight into ``jit``: estimators compile once per model and
reuse the compiled program when only the numbers change.

Over many batches the product is accumulated inside one compiled ``lax.scan`` over batches stacked on a leading
axis (see :mod:`jaxnn.curvature.batches`), so the working memory does not grow with the number of batches. (On CPU,
for losses with convolutions, loops are unrolled instead: see ``loops`` in :func:`hessian`.) For a single batch,
the estimators linearise the product once per compiled call, so repeated products cost only the tangent pass.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxnn.curvature import products
from jaxnn.curvature.batches import BatchGroup, PreparedData, first_batch, place_on_mesh, prepare_data
from jaxnn.validation import (
    check_choice,
    check_int,
    check_key,
    check_like,
    check_params,
    num_params as count_params,
)

HESSIAN_MODES = ("forward-over-reverse", "reverse-over-reverse", "reverse-over-forward")
LOOP_MODES = ("auto", "scan", "python")  # the names of jaxnn.runtime.STRATEGIES that apply to loops
FISHER_KINDS = ("empirical", "true")
# Matrix-product precision. JAX's default for float32 products on NVIDIA GPUs since Ampere is TensorFloat-32 (10-bit
# mantissa): there Hessian products came out 8% off float64 in small entries (an H200), and Lanczos would
# re-orthogonalise at that precision. Every compiled curvature program is traced at "highest" (``precise_jit``),
# and the user's functions at the operator's ``precision`` (default "highest"). CPUs compute float32 products in full
# precision whatever is asked, so this changes nothing there.
PRECISIONS = ("highest", "high", "default")
DEFAULT_PRECISION = "highest"


def check_precision(precision: str) -> str:
    return check_choice(precision, "precision", choices=PRECISIONS)


def at_precision(fn: Callable, precision: str) -> Callable:
    """``fn`` traced under ``jax.default_matmul_precision(precision)``."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision(precision):
            return fn(*args, **kwargs)

    return wrapped


def precise_jit(fun: Callable | None = None, **jit_kwargs: Any) -> Callable:
    """``jax.jit`` of ``fun`` traced at the highest matrix-product precision (usable as ``@precise_jit`` and
    ``@precise_jit(static_argnames=...)``)."""
    if fun is None:
        return functools.partial(precise_jit, **jit_kwargs)
    return jax.jit(at_precision(fun, "highest"), **jit_kwargs)


# --------------------------------------------------------------------------------------------------------------
# User functions split into arrays (traced) and everything else (static, part of the compile cache key).


class _ByIdentity:
    """Wraps an unhashable static object so it can sit in a jit cache key (equal only to itself)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _ByIdentity) and other.obj is self.obj


class FunctionSkeleton(NamedTuple):
    """The static part of the user's functions: tree structure and non-array leaves (arrays are ``None``)."""

    treedef: Any
    static_leaves: tuple


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def split_functions(functions: Any) -> tuple[list, FunctionSkeleton]:
    leaves, treedef = jax.tree.flatten(functions)
    arrays = [jnp.asarray(leaf) if _is_array(leaf) else None for leaf in leaves]
    statics = []
    for leaf in leaves:
        if _is_array(leaf):
            statics.append(None)
            continue
        try:
            hash(leaf)
            statics.append(leaf)
        except TypeError:
            statics.append(_ByIdentity(leaf))
    return arrays, FunctionSkeleton(treedef, tuple(statics))


def join_functions(arrays: list, skeleton: FunctionSkeleton) -> Any:
    leaves = [
        array if static is None else (static.obj if isinstance(static, _ByIdentity) else static)
        for array, static in zip(arrays, skeleton.static_leaves)
    ]
    return jax.tree.unflatten(skeleton.treedef, leaves)


# --------------------------------------------------------------------------------------------------------------
# Per-batch products. Signature: product(functions, params, batch, v) -> pytree like params.


# --------------------------------------------------------------------------------------------------------------
# The operator.


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("params", "data", "function_arrays"),
    meta_fields=(
        "function_skeleton", "product", "loss", "kind", "num_params", "num_batches", "num_examples", "loop_mode",
        "precision",
    ),
)
@dataclasses.dataclass(frozen=True)
class CurvatureOperator:
    """A symmetric linear operator on parameter pytrees, v ↦ Σ_b w_b M_b(θ) v, with w_b the batch's example share.

    ``op(v)`` / ``op.matvec(v)``: one product (one pass over the data). ``op.matmat(V)``: V has a leading block
    axis; the products are vmapped (one pass over the data computing all of them). ``op.loss_and_gradient()``:
    the data-averaged loss and its gradient (operators built from a loss only).
    """

    params: Any
    data: tuple[BatchGroup, ...]
    function_arrays: list
    function_skeleton: FunctionSkeleton
    product: Callable
    loss: Callable | None
    kind: str
    num_params: int
    num_batches: int
    num_examples: int
    loop_mode: str = "scan"
    precision: str = DEFAULT_PRECISION

    @property
    def functions(self) -> Any:
        """The user's function(s), each traced at the operator's matrix-product ``precision``."""
        functions = join_functions(self.function_arrays, self.function_skeleton)
        if isinstance(functions, tuple):
            return tuple(at_precision(fn, self.precision) for fn in functions)
        return at_precision(functions, self.precision)

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype of the flattened parameters (their promoted dtype)."""
        return jnp.result_type(*jax.tree.leaves(self.params))

    def matvec(self, v: Any) -> Any:
        """M v for a pytree ``v`` shaped like params. Cost: 1 product per batch."""
        return _apply_jit(self, check_like(v, "v", reference=self.params))

    __call__ = matvec

    def matmat(self, vectors: Any, *, chunk_size: int | None = None) -> Any:
        """M V for V with a leading block axis (vmapped). ``chunk_size`` bounds how many are vmapped at once."""
        vectors = check_like(vectors, "vectors", reference=self.params, leading_axis=True)
        if chunk_size is None:
            return _apply_block_jit(self, vectors)
        chunk_size = check_int(chunk_size, "chunk_size")
        if self.loop_mode == "scan":
            return _apply_block_chunked_jit(self, vectors, chunk_size)
        count = jax.tree.leaves(vectors)[0].shape[0]
        chunks = [
            _apply_block_jit(self, jax.tree.map(lambda leaf: leaf[begin : begin + chunk_size], vectors))
            for begin in range(0, count, chunk_size)
        ]
        return jax.tree.map(lambda *parts: jnp.concatenate(parts), *chunks)

    def loss_and_gradient(self, params: Any = None) -> tuple[jax.Array, Any]:
        """(L(θ), ∇L(θ)) averaged over the data, at ``params`` (default: the operator's). Cost: 1 gradient."""
        if self.loss is None:
            raise ValueError(
                f"operator kind {self.kind!r} has no loss function; pass the gradient explicitly (gradient=...)"
            )
        params = self.params if params is None else check_like(params, "params", reference=self.params)
        return _loss_and_gradient_jit(self, params)

    def loss_value(self, params: Any = None) -> jax.Array:
        """L(θ) averaged over the data, at ``params`` (default: the operator's). Cost: 1 forward pass."""
        if self.loss is None:
            raise ValueError(f"operator kind {self.kind!r} has no loss function")
        params = self.params if params is None else check_like(params, "params", reference=self.params)
        return _loss_value(self, params)


def _add_weighted(total: Any, value: Any, weight: jax.Array) -> Any:
    return jax.tree.map(lambda a, x: a + weight.astype(a.dtype) * x.astype(a.dtype), total, value)


def accumulate_over_batches(op: CurvatureOperator, per_batch: Callable[[Any], Any], initial: Any) -> Any:
    """initial + Σ_b w_b per_batch(batch_b), traceable.

    One batch: a direct call. Otherwise, per group of equal-shape batches, a ``lax.scan`` (one compiled loop, working
    memory independent of the number of batches) when ``op.loop_mode == "scan"``, or a loop unrolled into the
    program when ``"python"`` (see :func:`hessian`'s ``loops``).
    """
    total = initial
    for group in op.data:
        count = group.weights.shape[0]
        if count == 1 or op.loop_mode == "python":
            for index in range(count):
                batch = jax.tree.map(lambda leaf: leaf[index], group.batches)
                total = _add_weighted(total, per_batch(batch), group.weights[index])
            continue

        def step(acc, batch_and_weight):
            batch, weight = batch_and_weight
            return _add_weighted(acc, per_batch(batch), weight), None

        total, _ = jax.lax.scan(step, total, (group.batches, group.weights))
    return total


def apply_operator(op: CurvatureOperator, v: Any) -> Any:
    """Traceable M v (no checks), accumulated over the batches; used by every estimator inside its own jit."""
    functions = op.functions
    return accumulate_over_batches(
        op, lambda batch: op.product(functions, op.params, batch, v), jax.tree.map(jnp.zeros_like, v)
    )


def _apply_block_chunked(op, vectors, chunk_size):
    return jax.lax.map(lambda v: apply_operator(op, v), vectors, batch_size=chunk_size)


_apply_jit = precise_jit(apply_operator)
_apply_block_jit = precise_jit(jax.vmap(apply_operator, in_axes=(None, 0)))
_apply_block_chunked_jit = precise_jit(_apply_block_chunked, static_argnums=2)


def _loss_and_gradient(op, params):
    functions = op.functions
    initial = (jnp.zeros((), dtype=jnp.result_type(*jax.tree.leaves(params))), jax.tree.map(jnp.zeros_like, params))
    return accumulate_over_batches(
        op, lambda batch: jax.value_and_grad(op.loss, argnums=1)(functions, params, batch), initial
    )


def _per_batch_losses(op, params):
    """The loss of every batch, one array per batch group (shared by the finite check and ``loss_value``)."""
    functions = op.functions
    return tuple(
        jax.lax.map(lambda batch: op.loss(functions, params, batch), group.batches)
        if group.batches is not None
        else op.loss(functions, params, None)[None]
        for group in op.data
    )


def _loss_value(op, params):
    per_group = _per_batch_losses_jit(op, params)
    return sum(jnp.sum(group.weights.astype(losses.dtype) * losses) for group, losses in zip(op.data, per_group))


_loss_and_gradient_jit = precise_jit(_loss_and_gradient)
_per_batch_losses_jit = precise_jit(_per_batch_losses)


# --------------------------------------------------------------------------------------------------------------
# Construction and checks.


def _prepared(data: Any, stacked: bool, params: Any) -> PreparedData:
    """``data`` as stacked batch groups, split over the data axis of the mesh the parameters live on (if any)."""
    from jaxnn.parallel import mesh_of

    return place_on_mesh(prepare_data(data, stacked=stacked), mesh_of(params))


def _make_operator(kind, functions, product, loss, params, prepared: PreparedData,
                   precision: str = DEFAULT_PRECISION) -> CurvatureOperator:
    arrays, skeleton = split_functions(functions)
    return CurvatureOperator(
        params=params,
        data=prepared.groups,
        function_arrays=arrays,
        function_skeleton=skeleton,
        product=product,
        loss=loss,
        kind=kind,
        num_params=count_params(params),
        num_batches=prepared.num_batches,
        num_examples=prepared.num_examples,
        precision=check_precision(precision),
    )


def _with_loop_mode(op: CurvatureOperator, prepared: PreparedData, loops: str) -> CurvatureOperator:
    """Resolve ``loops="auto"`` by the one rule of :func:`jaxnn.runtime.prefers_python_loops`: "python" on CPU when
    the loss applies a convolution (XLA:CPU runs backward convolutions 10-30x slower inside loops,
    https://github.com/jax-ml/jax/issues/12868), else "scan"."""
    from jaxnn.runtime import prefers_python_loops, resolve_strategy

    loops = resolve_strategy(loops, LOOP_MODES, "loops")
    if loops == "auto":
        loss = lambda p, b: op.loss(op.functions, p, b)  # noqa: E731
        loops = "python" if prefers_python_loops(loss, op.params, first_batch(prepared)) else "scan"
    return dataclasses.replace(op, loop_mode=loops)


def _check_scalar_loss(op: CurvatureOperator, prepared: PreparedData, what: str) -> None:
    batch = first_batch(prepared)
    try:
        shape_dtype = jax.eval_shape(lambda p, b: op.loss(op.functions, p, b), op.params, batch)
    except Exception as error:  # re-raised with the argument named; the original is chained
        raise type(error)(f"{what}: evaluating the loss on params and the first batch failed: {error}") from error
    leaves = jax.tree.leaves(shape_dtype)
    if len(leaves) != 1 or leaves[0].shape != ():
        shapes = [leaf.shape for leaf in leaves]
        raise ValueError(f"{what}: expected a scalar loss (shape ()), got output shape(s) {shapes}")
    if not jnp.issubdtype(leaves[0].dtype, jnp.floating):
        raise TypeError(f"{what}: expected a floating-point scalar loss, got dtype {leaves[0].dtype}")


def _check_finite_loss(op: CurvatureOperator, prepared: PreparedData, what: str) -> None:
    per_group = jax.device_get(_per_batch_losses_jit(op, op.params))
    values = np.concatenate([np.ravel(v) for v in per_group])
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise FloatingPointError(
            f"{what}: expected a finite loss, got {values[bad[0]]} on batch {int(bad[0])} of {values.size} "
            f"(batches grouped by shape; {bad.size} non-finite in all)"
        )


def hessian(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Any = None,
    *,
    mode: str = "forward-over-reverse",
    stacked: bool = False,
    check_finite: bool = True,
    loops: str = "auto",
    precision: str = DEFAULT_PRECISION,
    wrt: Any = None,
) -> CurvatureOperator:
    """Hessian operator of the data-averaged loss: Hv = ∂/∂ε ∇L(θ+εv)|ε=0, L = Σ_b (B_b/N) loss_fn(θ, batch_b).

    ``mode`` picks the automatic-differentiation composition (all give the same product): ``"forward-over-reverse"``
    (jvp of grad, the default and fastest), ``"reverse-over-reverse"`` (PyHessian's double backward),
    ``"reverse-over-forward"``. ``data``: one batch, a list/iterable of batches, ``None`` (the loss ignores its
    batch) or, with ``stacked=True``, batches stacked on a leading axis. ``check_finite`` evaluates the loss once
    per batch (one forward pass over the data) and raises ``FloatingPointError`` naming the batch if it is not
    finite. Cost of one product: one HVP per batch (≈ 2-3 gradient evaluations).
    ``loops`` (names of :data:`jaxnn.runtime.STRATEGIES`): how loops over batches and estimator iterations run.
    ``"scan"``: inside the compiled program
    (``lax.scan`` over batches, ``lax.while_loop`` in Lanczos / power iteration: one program, constant memory).
    ``"python"``: batches unrolled into the program (its size grows with the number of batches) and estimator
    iterations driven from Python, one compiled step each (no host synchronisation per step in Lanczos). ``"auto"``
    (default) picks "python" on CPU when the loss contains a convolution — XLA:CPU runs backward convolutions
    10-30x slower inside loops (jax-ml/jax#12868) — and "scan" otherwise (:func:`jaxnn.runtime.prefers_python_loops`).
    The former names "compiled" and "unrolled" are accepted with a DeprecationWarning.
    ``precision``: the matrix-product precision ``loss_fn`` is traced at inside every product, loss and gradient:
    ``"highest"`` (default: full float32 products, also on GPUs whose default is TensorFloat-32), ``"high"`` or
    ``"default"`` (the platform's fastest, e.g. TensorFloat-32). CPUs compute float32 products in full precision
    whatever is asked. The estimators' own arithmetic (re-orthogonalisation, projections) is always "highest".
    ``wrt``: a layer name, path pattern or list of them: the block of those parameters (:func:`jaxnn.curvature.
    restrict`), whose vectors are dicts ``{path: array}``.
    """
    check_choice(mode, "mode", choices=HESSIAN_MODES)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(params, batch), got {type(loss_fn).__name__}")
    params = check_params(params)
    prepared = _prepared(data, stacked, params)
    op = _make_operator("hessian", loss_fn, products.HVP_PRODUCTS[mode], products.loss_of_loss_fn, params, prepared, precision)
    _check_scalar_loss(op, prepared, "loss_fn")
    op = _with_loop_mode(op, prepared, loops)
    if check_finite:
        _check_finite_loss(op, prepared, "loss_fn")
    return _restricted(op, wrt)


def _restricted(op: CurvatureOperator, wrt: Any) -> CurvatureOperator:
    if wrt is None:
        return op
    from jaxnn.curvature.blocks import restrict

    return restrict(op, wrt)


def _check_output_functions(predict_fn, output_loss, prepared: PreparedData) -> None:
    if not callable(predict_fn):
        raise TypeError(f"predict_fn: expected a callable predict_fn(params, x), got {type(predict_fn).__name__}")
    if not callable(output_loss):
        raise TypeError(f"output_loss: expected a callable output_loss(outputs, y), got {type(output_loss).__name__}")
    batch = first_batch(prepared)
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"data: expected batches (x, y) for a model-output operator, got {type(batch).__name__}")


def ggn(
    predict_fn: Callable[[Any, Any], Any],
    output_loss: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Any,
    *,
    stacked: bool = False,
    check_finite: bool = True,
    loops: str = "auto",
    precision: str = DEFAULT_PRECISION,
    wrt: Any = None,
) -> CurvatureOperator:
    """Generalised Gauss-Newton operator Gv = Σ_b w_b J_bᵀ H_out,b J_b v (positive semi-definite for convex losses).

    ``predict_fn(params, x)`` gives the model outputs (e.g. logits), ``output_loss(outputs, y)`` the batch-mean
    loss on them; J is the Jacobian of the outputs in θ and H_out the Hessian of ``output_loss`` in the outputs.
    Cost of one product: one forward-mode + one reverse-mode pass of the model per batch (≈ one HVP).
    ``loops``, ``precision``, ``wrt``: as in :func:`hessian`.
    """
    params = check_params(params)
    prepared = _prepared(data, stacked, params)
    _check_output_functions(predict_fn, output_loss, prepared)
    op = _make_operator("ggn", (predict_fn, output_loss), products.ggn_product, products.loss_of_outputs, params, prepared, precision)
    _check_scalar_loss(op, prepared, "output_loss")
    op = _with_loop_mode(op, prepared, loops)
    if check_finite:
        _check_finite_loss(op, prepared, "output_loss")
    return _restricted(op, wrt)


def fisher(
    predict_fn: Callable[[Any, Any], Any],
    output_loss: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Any,
    *,
    kind: str = "empirical",
    key: Any = None,
    num_label_samples: int = 1,
    stacked: bool = False,
    check_finite: bool = True,
    loops: str = "auto",
    precision: str = DEFAULT_PRECISION,
    wrt: Any = None,
) -> CurvatureOperator:
    """Fisher operator Fv = (1/N) Σ_i g_i (g_iᵀ v) with per-example gradients g_i = ∇_θ ℓ(f(θ, x_i), y_i).

    ``kind="empirical"``: y_i are the data labels. ``kind="true"``: the outputs are taken as logits of a
    categorical distribution and ``num_label_samples`` labels ŷ ~ softmax(f(θ, x_i)) are drawn per example with
    ``key`` (once, when the operator is built, so it stays a fixed linear operator); ``output_loss`` must then be
    the negative log-likelihood of integer labels (softmax cross-entropy). Per-example losses are ``output_loss``
    applied to one row of outputs and targets. Cost of one product: one forward-mode + one reverse-mode pass of
    the model per batch (no per-example gradients are materialised). ``loops``, ``precision``, ``wrt``: as in
    :func:`hessian`.
    """
    check_choice(kind, "kind", choices=FISHER_KINDS)
    params = check_params(params)
    prepared = _prepared(data, stacked, params)
    _check_output_functions(predict_fn, output_loss, prepared)
    functions = (predict_fn, output_loss)
    if kind == "empirical":
        op = _make_operator("fisher-empirical", functions, products.empirical_fisher_product, products.loss_of_outputs, params, prepared,
                            precision)
    else:
        key = check_key(key, "key")
        num_label_samples = check_int(num_label_samples, "num_label_samples")
        groups = []
        offset = 0
        arrays, skeleton = split_functions(functions)
        for group in prepared.groups:
            count = jax.tree.leaves(group.batches)[0].shape[0]
            keys = jax.random.split(jax.random.fold_in(key, offset), count)
            labels = _sample_labels_jit(arrays, skeleton, params, group.batches, keys, num_label_samples)
            groups.append(BatchGroup((group.batches[0], group.batches[1], labels), group.weights))
            offset += count
        prepared = prepared._replace(groups=tuple(groups))
        op = _make_operator("fisher-true", functions, products.true_fisher_product, products.loss_of_outputs, params, prepared, precision)
    _check_scalar_loss(op, prepared, "output_loss")
    op = _with_loop_mode(op, prepared, loops)
    if check_finite:
        _check_finite_loss(op, prepared, "output_loss")
    return _restricted(op, wrt)


@precise_jit(static_argnames=("skeleton", "num_samples"))
def _sample_labels_jit(arrays, skeleton, params, batches, keys, num_samples):
    predict_fn, _ = join_functions(arrays, skeleton)

    def sample(batch_and_key):
        batch, key = batch_and_key
        logits = predict_fn(params, batch[0])
        shape = (num_samples,) + logits.shape[:-1]
        return jax.random.categorical(key, logits, axis=-1, shape=shape).astype(jnp.int32)

    return jax.lax.map(sample, (batches, keys))


def linear_operator(matvec: Callable[[Any], Any], params: Any) -> CurvatureOperator:
    """Wrap any symmetric ``matvec(v)`` on pytrees shaped like ``params`` (e.g. ``lambda v: A @ v``) as an operator.

    Useful to run the estimators on a known matrix. There is no loss, so gradient-based quantities need an
    explicit ``gradient=``.
    """
    if not callable(matvec):
        raise TypeError(f"matvec: expected a callable matvec(v), got {type(matvec).__name__}")
    params = check_params(params)
    prepared = prepare_data(None)
    op = _make_operator("linear", matvec, products.apply_user_matvec, None, params, prepared)
    out = jax.eval_shape(lambda v: matvec(v), params)
    try:
        check_like(out, "matvec(v)", reference=params, cast=False)
    except ValueError as error:
        raise ValueError(f"matvec: expected an output shaped like its input; {error}") from None
    return op


def require_operator(op: Any, name: str = "op", *, like: Any = None) -> CurvatureOperator:
    """``op`` if it is a :class:`CurvatureOperator`; a plain ``matvec(v)`` with ``like`` (a pytree or array shaped
    like its input) wrapped by :func:`linear_operator` — every estimator accepts either; else raise naming what was
    passed."""
    if isinstance(op, CurvatureOperator):
        if like is not None:
            raise ValueError(f"{name}: like= is for a plain matvec; a CurvatureOperator already knows its parameters")
        return op
    if callable(op):
        if like is None:
            raise TypeError(f"{name}: a plain matvec needs like= (a pytree or array shaped like the vectors it takes), "
                            "e.g. top_eigenvalues(lambda v: A @ v, like=jnp.zeros(n))")
        return linear_operator(op, like)
    raise TypeError(f"{name}: expected a CurvatureOperator (from hessian/ggn/fisher/linear_operator) or a matvec "
                    f"callable with like=, got {type(op).__name__}")


# --------------------------------------------------------------------------------------------------------------
# Flat views used by the estimators (inside their jit).


def flat_operator(op: CurvatureOperator, *, linearize_batches: bool = False) -> tuple[Callable, jax.Array, Callable]:
    """(matvec on flat vectors, flat params, unravel). Traceable; the flat order is ``ravel_pytree``'s.

    For a single-batch operator whose product can be linearised, the forward/backward passes at θ are traced here,
    once: call this outside a loop and apply the matvec inside it, and each product costs only the tangent pass.
    ``linearize_batches``: the same over many batches — the passes at θ of every batch run once and their
    residuals are kept (memory grows with the data, as a population's Lanczos has always used); without it a
    product over many batches recomputes them in constant memory.
    """
    flat_params, unravel = ravel_pytree(op.params)
    if linearize_batches and op.num_batches > 1:
        zeros = jax.tree.map(jnp.zeros_like, op.params)
        linear = jax.linearize(lambda v: apply_operator(op, v), zeros)[1]
        return (lambda x: ravel_pytree(linear(unravel(x)))[0]), flat_params, unravel
    linearize = products.LINEARIZERS.get(op.product)
    if linearize is not None and op.num_batches == 1:
        group = op.data[0]
        linear = linearize(op.functions, op.params, jax.tree.map(lambda leaf: leaf[0], group.batches))
        weight = group.weights[0]

        def flat_matvec(x):
            return ravel_pytree(jax.tree.map(lambda r: weight.astype(r.dtype) * r, linear(unravel(x))))[0]

        return flat_matvec, flat_params, unravel

    def flat_matvec(x):
        return ravel_pytree(apply_operator(op, unravel(x)))[0]

    return flat_matvec, flat_params, unravel


@precise_jit
def _flat_products(op: CurvatureOperator, vectors: jax.Array) -> jax.Array:
    flat_matvec, _, _ = flat_operator(op)
    if vectors.shape[0] == 1:
        return flat_matvec(vectors[0])[None]
    return jax.vmap(flat_matvec)(vectors)


def flat_products(op: CurvatureOperator, vectors: jax.Array) -> jax.Array:
    """M z for every row z of the (count, n) array ``vectors`` (flat params order), vmapped: ``count`` products.

    A single row is multiplied without ``vmap``: a batch axis of one still changes the compiled program, and made
    a product ~1.5x slower on CPU (measured on an 85k-parameter MLP). On several CPU devices the call returns when
    the products are done (see :func:`jaxnn.parallel.cpu_collectives`)."""
    from jaxnn.parallel import mesh_of, settle

    return settle(_flat_products(op, vectors), mesh_of(op.params))


DEFAULT_CHUNK_SIZE = 16


def placed_like_params(op: CurvatureOperator, tree: Any) -> Any:
    """``tree`` replicated on the mesh the parameters live on (a no-op for arrays already there, and when the
    parameters are not on a mesh). Arrays made by helper programs then have the same sharding type as those made
    from the operator, so the estimators' compiled programs are reused instead of being compiled again per type."""
    from jaxnn.parallel import mesh_of

    mesh = mesh_of(op.params)
    if mesh is None:
        return tree
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def balanced_chunks(count: int, chunk_size: int | None) -> tuple[int, int]:
    """(chunk, num_chunks): equal chunks of at most ``chunk_size`` (default 16) covering ``count`` with least waste."""
    limit = DEFAULT_CHUNK_SIZE if chunk_size is None else check_int(chunk_size, "chunk_size")
    num_chunks = math.ceil(count / limit)
    return math.ceil(count / num_chunks), num_chunks


def chunked_products(op: CurvatureOperator, vectors: jax.Array, chunk_size: int | None = None, *,
                     progress: bool = False, description: str = "") -> jax.Array:
    """Rows of M·vectors, at most ``chunk_size`` vmapped products per compiled call (equal, zero-padded chunks: one
    compilation per chunk size, shared by every caller that uses it). Cost: ``vectors.shape[0]`` products (+ the
    padding)."""
    from tqdm import tqdm

    count = vectors.shape[0]
    vectors = placed_like_params(op, vectors)
    chunk, num_chunks = balanced_chunks(count, chunk_size)
    padding = chunk * num_chunks - count
    padded = jnp.concatenate([vectors, jnp.zeros((padding, vectors.shape[1]), vectors.dtype)]) if padding else vectors
    outputs = []
    with tqdm(total=count, desc=description, unit="matvec", disable=not progress, leave=False) as bar:
        for index in range(num_chunks):
            outputs.append(flat_products(op, padded[index * chunk : (index + 1) * chunk]))
            bar.update(min(chunk, count - index * chunk))
    return outputs[0][:count] if num_chunks == 1 else jnp.concatenate(outputs, axis=0)[:count]
