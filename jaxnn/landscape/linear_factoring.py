"""Evaluate ``f(θ(c), batch)`` at many points ``θ(c) = Σ_j c_j T_j`` of a low-dimensional parameter subspace,
computing every operation that is linear in the parameters once per basis tree ``T_j`` instead of once per point.

For a dense or convolutional layer ``x·(Σ_j c_j W_j) = Σ_j c_j (x·W_j)``: on a 51×51 grid spanned by
``(θ, d₁, d₂)`` the first layer of a network (an MLP on images spends most of its FLOPs there) costs 3 products
for the whole grid, and each grid point only pays ``m`` scaled additions of the layer's output.

The transform reads the jaxpr of any pure function (no Flax needed) and classifies every value as

* CONST  — independent of the grid point (the batch, closed-over model state, anything computed only from them);
* AFFINE — ``offset + Σ_j c_j v_j``, carried as ``(offset, (v_1..v_m))``: the parameters themselves, and whatever
  only linear operations (add/sub/neg, scaling by a CONST, dot_general / conv with a CONST operand, reshapes,
  broadcasts, slices, sums, concatenation, padding, selection with a CONST predicate) made from them;
* POINT  — anything else (after the first nonlinearity, or the product of two AFFINE values): evaluated per
  point, under ``vmap``, from the affine values materialised at that point.

CONST and AFFINE values are computed once per batch by :meth:`LinearFactorization.shared`; the remaining equations
run per point in :meth:`LinearFactorization.at_point`. Calls to ``jit``, ``custom_jvp``/``custom_vjp`` functions and
``checkpoint`` are inlined (only their forward computation matters here); control flow (``scan``, ``while``,
``cond``) and every other primitive are evaluated as they are. Identical effect-free equations are kept once
(metrics that trace the same forward pass share it). The result equals ``f(Σ_j c_j T_j, batch)`` up to
floating-point reassociation.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

CONST, AFFINE, POINT = "const", "affine", "point"


def _core():
    """``jax.extend.core`` (its types), imported when a jaxpr is first read, not with this module."""
    import jax.extend.core

    return jax.extend.core

# Calls whose body is a plain forward computation of the same inputs: inlined so linear layers inside a jitted
# (or custom-derivative, or rematerialised) function are still found.
_INLINED_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}

# Linear in their single (array) operand.
_UNARY_LINEAR = {
    "neg", "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "reduce_sum", "copy", "copy_p",
    "slice", "rev", "cumsum", "convert_element_type",
}
# Linear in the first operand when every other operand (indices) is CONST.
_FIRST_OPERAND_LINEAR = {"dynamic_slice", "gather"}
# Bilinear: linear in either operand when the other one is CONST.
_BILINEAR = {"dot_general", "conv_general_dilated", "mul"}


class Affine(NamedTuple):
    """``offset + Σ_j c_j coefficients[j]``; ``offset`` is None for zero."""

    offset: Any
    coefficients: tuple


class _Literal(NamedTuple):
    value: Any


@dataclasses.dataclass(frozen=True)
class _Equation:
    primitive: Any
    params: dict
    inputs: tuple  # int ids or _Literal
    outputs: tuple  # int ids


class _Flattener:
    """Turns a closed jaxpr into one flat list of equations over integer value ids, inlining plain calls."""

    def __init__(self) -> None:
        self.equations: list[_Equation] = []
        self.avals: dict[int, Any] = {}
        self._next = 0
        self._seen: dict[Any, tuple] = {}  # common-subexpression elimination: key -> outputs

    def new_id(self, aval: Any) -> int:
        self._next += 1
        self.avals[self._next] = aval
        return self._next

    def flatten(self, jaxpr: Any, const_atoms: Sequence[Any], input_atoms: Sequence[Any]) -> list[Any]:
        env: dict[Any, Any] = {}
        for var, atom in zip(jaxpr.constvars, const_atoms):
            env[var] = atom
        for var, atom in zip(jaxpr.invars, input_atoms):
            env[var] = atom

        def read(var: Any) -> Any:
            return _Literal(var.val) if isinstance(var, _core().Literal) else env[var]

        for eqn in jaxpr.eqns:
            inputs = [read(v) for v in eqn.invars]
            body = _inlinable_body(eqn)
            if body is not None:
                sub_jaxpr, sub_consts = body
                outputs = self.flatten(sub_jaxpr, [_Literal(c) for c in sub_consts], inputs)
            else:
                key = _equation_key(eqn, inputs)
                if key is not None and key in self._seen:
                    outputs = list(self._seen[key])
                else:
                    outputs = [self.new_id(v.aval) for v in eqn.outvars]
                    self.equations.append(_Equation(eqn.primitive, dict(eqn.params), tuple(inputs), tuple(outputs)))
                    if key is not None:
                        self._seen[key] = tuple(outputs)
            for var, atom in zip(eqn.outvars, outputs):
                if not isinstance(var, _core().DropVar):
                    env[var] = atom
        return [read(v) for v in jaxpr.outvars]


def _equation_key(eqn: Any, inputs: Sequence[Any]) -> tuple | None:
    """A hashable identity of an effect-free equation (primitive, parameters, inputs), or None if it has none.

    Two metrics that share a forward pass (loss and accuracy of the same logits) trace it twice; equal keys let the
    second trace reuse the first's values, so the forward pass runs once per point.
    """
    if eqn.effects:
        return None
    parts = []
    for atom in inputs:
        if isinstance(atom, _Literal):
            value = atom.value
            if np.ndim(value) != 0:
                return None
            scalar = value.item() if hasattr(value, "item") else value
            if scalar != scalar:  # NaN literals never compare equal
                return None
            parts.append(("literal", str(getattr(value, "dtype", type(value).__name__)), scalar))
        else:
            parts.append(atom)
    try:
        params = tuple(sorted(eqn.params.items()))
        hash(params)
    except TypeError:
        return None
    return (eqn.primitive, params, tuple(parts))


def _inlinable_body(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    param = _INLINED_CALLS.get(eqn.primitive.name)
    if param is None or param not in eqn.params:
        return None
    body = eqn.params[param]
    if isinstance(body, _core().ClosedJaxpr):
        jaxpr, consts = body.jaxpr, body.consts
    elif isinstance(body, _core().Jaxpr):
        jaxpr, consts = body, ()
    else:
        return None
    if len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars) or jaxpr.constvars and not consts:
        return None
    return jaxpr, consts


_POOLING = {"reduce_window_max": jax.lax.max, "reduce_window_sum": jax.lax.add}
MAX_SLICED_WINDOW = 9  # pooling windows of at most this many elements are evaluated as strided slices on CPU


def _pool_by_slices(eqn: _Equation, values: Sequence[Any]) -> Any:
    """Non-overlapping pooling (window = stride, no padding or dilation) on CPU as the elementwise max / sum of one
    strided slice per window offset, or None when it does not apply. XLA:CPU runs a reduce_window fused with its
    elementwise producer (a factored layer's combination, the activation) at a fraction of the memory bandwidth:
    a LeNet's first pooling over 250 images of a landscape point took 3.3 ms, as slices 1.6 ms (measured)."""
    p = eqn.params
    window, operand = tuple(p["window_dimensions"]), values[0]
    if (window != tuple(p["window_strides"]) or math.prod(window) > MAX_SLICED_WINDOW
            or any(tuple(pad) != (0, 0) for pad in p["padding"]) or set(p["base_dilation"]) != {1}
            or set(p["window_dilation"]) != {1} or jax.default_backend() != "cpu"):
        return None
    out_shape = [(size - w) // w + 1 for size, w in zip(jnp.shape(operand), window)]
    combine, result = _POOLING[eqn.primitive.name], None
    for offset in itertools.product(*(range(w) for w in window)):
        limit = [o + (m - 1) * w + 1 for o, m, w in zip(offset, out_shape, window)]
        piece = jax.lax.slice(operand, offset, limit, window)
        result = piece if result is None else combine(result, piece)
    return result


def _bind(eqn: _Equation, values: Sequence[Any]) -> list[Any]:
    if eqn.primitive.name in _POOLING:
        pooled = _pool_by_slices(eqn, values)
        if pooled is not None:
            return [pooled]
    params = eqn.primitive.get_bind_params(eqn.params)
    out = eqn.primitive.bind(*values, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _bind_single(eqn: _Equation, values: Sequence[Any]) -> Any:
    return _bind(eqn, values)[0]


def _is_linear(eqn: _Equation, kinds: Sequence[str]) -> bool:
    """Whether ``eqn`` maps its (CONST/AFFINE, at least one AFFINE) inputs to an AFFINE output."""
    if eqn.primitive.multiple_results or len(eqn.outputs) != 1:
        return False
    name = eqn.primitive.name
    affine = [k == AFFINE for k in kinds]
    if name in _UNARY_LINEAR:
        if name == "convert_element_type" and not jnp.issubdtype(eqn.params["new_dtype"], jnp.inexact):
            return False
        return len(kinds) == 1
    if name in _FIRST_OPERAND_LINEAR:
        if name == "gather" and "FILL" in str(eqn.params.get("mode", "")).upper():
            fill = eqn.params.get("fill_value")
            if fill is not None and fill == fill and fill != 0:  # out-of-bounds rows get a nonzero constant
                return False
        return affine[0] and not any(affine[1:])
    if name in ("add", "add_any", "sub", "concatenate"):
        return True
    if name in _BILINEAR:
        return len(kinds) == 2 and sum(affine) == 1
    if name == "div":
        return len(kinds) == 2 and affine[0] and not affine[1]
    if name == "pad":
        return len(kinds) == 2 and affine[0] and not affine[1]
    if name == "select_n":
        return not affine[0]
    return False


def _zeros(aval: Any) -> jax.Array:
    return jnp.zeros(aval.shape, aval.dtype)


def _apply_linear(eqn: _Equation, values: Sequence[Any], kinds: Sequence[str], in_avals: Sequence[Any],
                  out_aval: Any, num_basis: int) -> Affine:
    """The AFFINE output of a linear equation (see :func:`_is_linear`)."""
    name = eqn.primitive.name

    def each(fn: Callable[[Any], Any], affine: Affine) -> Affine:
        offset = None if affine.offset is None else fn(affine.offset)
        return Affine(offset, tuple(fn(v) for v in affine.coefficients))

    if name in _UNARY_LINEAR:
        result = each(lambda v: _bind_single(eqn, [v]), values[0])
    elif name in _FIRST_OPERAND_LINEAR:
        rest = list(values[1:])
        result = each(lambda v: _bind_single(eqn, [v, *rest]), values[0])
    elif name in _BILINEAR or name == "div":
        if kinds[0] == AFFINE:
            other = values[1]
            result = each(lambda v: _bind_single(eqn, [v, other]), values[0])
        else:
            other = values[0]
            result = each(lambda v: _bind_single(eqn, [other, v]), values[1])
    elif name in ("add", "add_any", "sub"):
        a, b = values
        ka, kb = kinds
        if name == "sub":
            negate = jnp.negative
            b = each(negate, b) if kb == AFFINE else negate(b)
        offsets = [v.offset if k == AFFINE else v for v, k in ((a, ka), (b, kb))]
        offsets = [o for o in offsets if o is not None]
        offset = None if not offsets else (offsets[0] if len(offsets) == 1 else jnp.add(*offsets))
        if ka == AFFINE and kb == AFFINE:
            coefficients = tuple(jnp.add(u, v) for u, v in zip(a.coefficients, b.coefficients))
        else:
            coefficients = (a if ka == AFFINE else b).coefficients
        result = Affine(offset, coefficients)
    elif name == "concatenate":
        def piece_offset(v, k, aval):
            if k == AFFINE:
                return _zeros(aval) if v.offset is None else v.offset
            return v

        def piece_coefficient(v, k, aval, j):
            return v.coefficients[j] if k == AFFINE else _zeros(aval)

        offset = _bind_single(eqn, [piece_offset(v, k, a) for v, k, a in zip(values, kinds, in_avals)])
        coefficients = tuple(
            _bind_single(eqn, [piece_coefficient(v, k, a, j) for v, k, a in zip(values, kinds, in_avals)])
            for j in range(num_basis)
        )
        result = Affine(offset, coefficients)
    elif name == "pad":
        operand, padding_value = values
        base = _zeros(in_avals[0]) if operand.offset is None else operand.offset
        offset = _bind_single(eqn, [base, padding_value])
        zero = jnp.zeros((), in_avals[1].dtype)
        result = Affine(offset, tuple(_bind_single(eqn, [v, zero]) for v in operand.coefficients))
    elif name == "select_n":
        predicate, cases = values[0], list(zip(values[1:], kinds[1:], in_avals[1:]))
        offsets = [
            (v if k != AFFINE else (_zeros(a) if v.offset is None else v.offset)) for v, k, a in cases
        ]
        offset = _bind_single(eqn, [predicate, *offsets])
        coefficients = tuple(
            _bind_single(eqn, [predicate, *[(v.coefficients[j] if k == AFFINE else _zeros(a)) for v, k, a in cases]])
            for j in range(num_basis)
        )
        result = Affine(offset, coefficients)
    else:  # pragma: no cover - _is_linear and _apply_linear list the same primitives
        raise NotImplementedError(name)

    def fit(v: Any) -> Any:
        v = jnp.asarray(v)
        if v.shape != tuple(out_aval.shape):
            v = jnp.broadcast_to(v, out_aval.shape)
        return v.astype(out_aval.dtype) if v.dtype != out_aval.dtype else v

    return Affine(None if result.offset is None else fit(result.offset), tuple(fit(v) for v in result.coefficients))


def materialize(value: Affine, coefficients: jax.Array) -> jax.Array:
    """``offset + Σ_j c_j v_j`` at one point ``c`` (shape ``(m,)``)."""
    total = value.offset
    for j, v in enumerate(value.coefficients):
        term = coefficients[j].astype(v.dtype) * v
        total = term if total is None else total + term
    return total


class LinearFactorization:
    """``fn(params, batch[, state])`` split into a per-batch shared part and a per-point remainder.

    ``shared(basis, batch)`` evaluates every CONST and AFFINE value (cost: the parameter-linear operations once per
    basis tree, ``m`` = ``len(basis)`` times); ``at_point(shared, c, state)`` evaluates the rest at
    ``θ = Σ_j c_j basis[j]`` (cost: ``m`` scaled additions per factored output plus the nonlinear remainder).
    With ``factor_linear=False`` nothing is factored: the parameters are materialised at each point and the whole
    function runs per point (only the batch-only CONST part is shared). Identical equations (two metrics tracing
    the same forward pass) are evaluated once in both modes.
    """

    def __init__(self, fn: Callable, params_like: Any, batch_like: Any, state_like: Any = None,
                 *, num_basis: int, with_state: bool = False, factor_linear: bool = True) -> None:
        args = (params_like, batch_like, state_like) if with_state else (params_like, batch_like)
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        self.num_basis = num_basis
        self.with_state = with_state
        self.out_tree = jax.tree.structure(out_shape)
        self.params_tree = jax.tree.structure(params_like)
        self.consts = list(closed.consts)
        flattener = _Flattener()
        num_params = len(jax.tree.leaves(params_like))
        num_batch = len(jax.tree.leaves(batch_like))
        input_ids = [flattener.new_id(v.aval) for v in closed.jaxpr.invars]
        const_ids = [flattener.new_id(v.aval) for v in closed.jaxpr.constvars]
        outputs = flattener.flatten(closed.jaxpr, const_ids, input_ids)
        self._equations = flattener.equations
        self._avals = flattener.avals
        self._param_ids = input_ids[:num_params]
        self._batch_ids = input_ids[num_params:num_params + num_batch]
        self._state_ids = input_ids[num_params + num_batch:]
        self._const_ids = const_ids
        self._outputs = outputs

        kinds: dict[int, str] = {i: AFFINE for i in self._param_ids}
        kinds.update({i: CONST for i in self._batch_ids + self._const_ids})
        kinds.update({i: POINT for i in self._state_ids})
        for eqn in self._equations:
            in_kinds = [self._kind(kinds, a) for a in eqn.inputs]
            if all(k == CONST for k in in_kinds):
                out_kind = CONST
            elif any(k == POINT for k in in_kinds):
                out_kind = POINT
            else:
                out_kind = AFFINE if factor_linear and _is_linear(eqn, in_kinds) else POINT
            for o in eqn.outputs:
                kinds[o] = out_kind
        self._kinds = kinds

        batch_dependent = set(self._batch_ids)
        for eqn in self._equations:
            if any(not isinstance(a, _Literal) and a in batch_dependent for a in eqn.inputs):
                batch_dependent.update(eqn.outputs)

        needed = set()
        for eqn in self._equations:
            if kinds[eqn.outputs[0]] == POINT:
                needed.update(a for a in eqn.inputs if not isinstance(a, _Literal) and kinds[a] != POINT)
        needed.update(a for a in outputs if not isinstance(a, _Literal) and kinds[a] != POINT)
        self._shared_ids = sorted(needed)
        # vmap axes of ``shared`` over a stack of batches: only values computed from the batch carry the axis
        self.shared_batch_axes = {i: 0 if i in batch_dependent else None for i in self._shared_ids}

    @staticmethod
    def _kind(kinds: dict, atom: Any) -> str:
        return CONST if isinstance(atom, _Literal) else kinds[atom]

    def _aval(self, atom: Any) -> Any:
        if isinstance(atom, _Literal):
            return jax.typeof(atom.value)
        return self._avals[atom]

    def counts(self) -> dict[str, int]:
        """Number of equations of each kind (after inlining), e.g. for a report."""
        result = {CONST: 0, AFFINE: 0, POINT: 0}
        for eqn in self._equations:
            result[self._kinds[eqn.outputs[0]]] += 1
        return result

    def shared(self, basis: Sequence[Any], batch: Any, consts: Sequence[Any], offset: Any = None) -> dict[int, Any]:
        """CONST and AFFINE values the per-point remainder reads; cost: the linear prefix once per basis tree.

        With ``offset`` (a params-like tree) the parameters are ``offset + Σ_j c_j basis[j]`` (saves one scaled
        addition per factored value when one coefficient is always 1, as for lines and planes through θ).
        """
        env: dict[int, Any] = {}
        basis_leaves = [jax.tree.leaves(tree) for tree in basis]
        offset_leaves = [None] * len(self._param_ids) if offset is None else jax.tree.leaves(offset)
        for index, leaf_id in enumerate(self._param_ids):
            env[leaf_id] = Affine(offset_leaves[index], tuple(leaves[index] for leaves in basis_leaves))
        for leaf_id, leaf in zip(self._batch_ids, jax.tree.leaves(batch)):
            env[leaf_id] = leaf
        for leaf_id, value in zip(self._const_ids, consts):
            env[leaf_id] = value

        def read(atom: Any) -> Any:
            return atom.value if isinstance(atom, _Literal) else env[atom]

        for eqn in self._equations:
            out_kind = self._kinds[eqn.outputs[0]]
            if out_kind == POINT:
                continue
            values = [read(a) for a in eqn.inputs]
            if out_kind == CONST:
                outs = _bind(eqn, values)
            else:
                in_kinds = [self._kind(self._kinds, a) for a in eqn.inputs]
                in_avals = [self._aval(a) for a in eqn.inputs]
                outs = [_apply_linear(eqn, values, in_kinds, in_avals, self._avals[eqn.outputs[0]], self.num_basis)]
            for o, v in zip(eqn.outputs, outs):
                env[o] = v
        return {i: env[i] for i in self._shared_ids}

    def at_point(self, shared: dict[int, Any], coefficients: jax.Array, state: Any = None) -> Any:
        """``fn(Σ_j c_j basis[j], batch[, state])`` from :meth:`shared` (vmap this over points)."""
        env: dict[int, Any] = {}
        if self.with_state:
            for leaf_id, leaf in zip(self._state_ids, jax.tree.leaves(state)):
                env[leaf_id] = leaf
        materialized: dict[int, Any] = {}

        def read(atom: Any) -> Any:
            if isinstance(atom, _Literal):
                return atom.value
            kind = self._kinds[atom]
            if kind == POINT:
                return env[atom]
            if kind == AFFINE:
                if atom not in materialized:
                    materialized[atom] = materialize(shared[atom], coefficients)
                return materialized[atom]
            return shared[atom]

        for eqn in self._equations:
            if self._kinds[eqn.outputs[0]] != POINT:
                continue
            outs = _bind(eqn, [read(a) for a in eqn.inputs])
            for o, v in zip(eqn.outputs, outs):
                env[o] = v
        return jax.tree.unflatten(self.out_tree, [read(a) for a in self._outputs])

    def evaluate(self, params: Any, batch: Any, consts: Sequence[Any], state: Any = None) -> Any:
        """``fn(params, batch[, state])`` itself, from the flattened, deduplicated equations (nothing factored)."""
        env: dict[int, Any] = {}
        for leaf_id, leaf in zip(self._param_ids, jax.tree.leaves(params)):
            env[leaf_id] = leaf
        for leaf_id, leaf in zip(self._batch_ids, jax.tree.leaves(batch)):
            env[leaf_id] = leaf
        for leaf_id, value in zip(self._const_ids, consts):
            env[leaf_id] = value
        if self.with_state:
            for leaf_id, leaf in zip(self._state_ids, jax.tree.leaves(state)):
                env[leaf_id] = leaf

        def read(atom: Any) -> Any:
            return atom.value if isinstance(atom, _Literal) else env[atom]

        for eqn in self._equations:
            for o, v in zip(eqn.outputs, _bind(eqn, [read(a) for a in eqn.inputs])):
                env[o] = v
        return jax.tree.unflatten(self.out_tree, [read(a) for a in self._outputs])
