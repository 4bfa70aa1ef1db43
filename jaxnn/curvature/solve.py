"""Inverse curvature products: x with (M + δI) x = b, matrix-free, with a stated tolerance and an honest report.

Three methods, all on any operator (Hessian, GGN, Fisher, a block, a plain matvec with ``like=``):

* ``"cg"`` — conjugate gradients, for positive-definite M + δI (GGN, Fisher, a damped Hessian near a minimum). Stops
  when ‖r‖ ≤ tol·‖b‖; a direction of non-positive curvature (pᵀ(M+δI)p ≤ 0: the system is not positive definite)
  stops it and is reported.
* ``"minres"`` — MINRES (Paige & Saunders 1975), for symmetric indefinite systems (an undamped Hessian away from a
  minimum). Minimises ‖r‖ over the Krylov space; on a singular system it converges to a least-squares solution and
  reports the residual it could not remove.
* ``"lissa"`` — LiSSA (Agarwal, Bullins & Hazan 2017; Koh & Liang 2017's influence functions): the Neumann series
  x ← b + (I − (M_j + δI)/s) x with M_j the curvature of one batch at a time (a stochastic data stream), x/s at the
  end (over several batches, the average of the second half's iterates); ``scale`` s must exceed the largest
  eigenvalue of M + δI (default: 1.1 × λmax from a short Lanczos run).

Every result carries the true relative residual ‖(M+δI)x − b‖/‖b‖, computed with one more full product, the number
of iterations, and ``converged`` (that residual ≤ tol). Cost: one product per iteration (LiSSA: one batch product).
CG and MINRES run in one compiled ``while_loop``, or, for operators with ``loop_mode == "python"`` (convolutional
models on CPU), one compiled iteration per Python step: XLA:CPU runs backward convolutions 10-30x slower inside a
loop (ResNet-20, batch 256 on 2 CPU cores: two 5-iteration CG solves had not finished after 7 minutes in the loop;
30 iterations take 50 s from Python, 1.7 s per GGN product).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxnn.curvature.operators import (
    CurvatureOperator,
    flat_operator,
    precise_jit,
    require_operator,
)
from jaxnn.validation import check_choice, check_int, check_like, check_positive_float

SOLVE_METHODS = ("cg", "minres", "lissa")


class SolveResult(NamedTuple):
    solution: Any  # pytree like the operator's parameters
    relative_residual: float  # ‖(M + δI) x − b‖ / ‖b‖, computed with one full product
    num_iters: int
    converged: bool  # relative_residual <= tol
    method: str
    damping: float
    message: str  # why it stopped, in words


class _KrylovState(NamedTuple):
    x: jax.Array
    r: jax.Array
    p: jax.Array
    rs: jax.Array
    step: jax.Array
    indefinite: jax.Array  # CG met pᵀAp ≤ 0


def _damped(matvec, damping):
    return lambda v: matvec(v) + damping.astype(v.dtype) * v


def _cg_parts(op, b, damping, tol, max_iters):
    """Conjugate gradients from x = 0: (first state, keep_going, body); stops on ‖r‖ ≤ tol‖b‖, max_iters, or
    pᵀAp ≤ 0."""
    matvec = _damped(flat_operator(op)[0], damping)
    target = (tol * jnp.linalg.norm(b)) ** 2

    def keep_going(s):
        return (s.rs > target) & (s.step < max_iters) & ~s.indefinite

    def body(s):
        product = matvec(s.p)
        curvature = jnp.vdot(s.p, product)
        indefinite = curvature <= 0
        alpha = jnp.where(indefinite, 0.0, s.rs / jnp.where(indefinite, 1.0, curvature))
        x, r = s.x + alpha * s.p, s.r - alpha * product
        rs = jnp.vdot(r, r)
        p = r + (rs / jnp.where(s.rs > 0, s.rs, 1.0)) * s.p
        return _KrylovState(x, r, jnp.where(indefinite, s.p, p), jnp.where(indefinite, s.rs, rs), s.step + 1,
                            indefinite)

    state = _KrylovState(jnp.zeros_like(b), b, b, jnp.vdot(b, b), jnp.int32(0), jnp.asarray(False))
    return state, keep_going, body


def _cg_result(state, b):
    return state.x, state.step, state.indefinite


class _MinresState(NamedTuple):
    x: jax.Array
    r1: jax.Array
    r2: jax.Array
    w: jax.Array
    w2: jax.Array
    beta: jax.Array
    oldb: jax.Array
    dbar: jax.Array
    epsln: jax.Array
    phibar: jax.Array
    cs: jax.Array
    sn: jax.Array
    step: jax.Array
    norm_squared: jax.Array  # ‖T‖_F² so far: the estimate of ‖A‖ singular steps are measured against
    singular: jax.Array  # the projected matrix became singular: x is the least-squares solution found so far


def _minres_parts(op, b, damping, tol, max_iters):
    """MINRES from x = 0 (the unpreconditioned recurrences of Paige & Saunders, as in SciPy's ``minres``): (first
    state, keep_going, body); stops when the residual estimate φ̄ ≤ tol‖b‖, at max_iters, when the Krylov space is exhausted
    (β = 0), or when the projected matrix turns singular (its next QR pivot γ ≈ 0: the system is singular and the
    part of b it cannot reach stays in the residual; the step that would divide by γ is not taken)."""
    matvec = _damped(flat_operator(op)[0], damping)
    beta1 = jnp.linalg.norm(b)
    tiny = jnp.finfo(b.dtype).eps

    def keep_going(s):
        return (s.phibar > tol * beta1) & (s.step < max_iters) & (s.beta > tiny * beta1) & ~s.singular

    def body(s):
        v = s.r2 / s.beta
        y = matvec(v)
        y = jnp.where(s.step >= 1, y - (s.beta / jnp.where(s.oldb > 0, s.oldb, 1.0)) * s.r1, y)
        alpha = jnp.vdot(v, y)
        y = y - (alpha / s.beta) * s.r2
        beta = jnp.linalg.norm(y)
        delta = s.cs * s.dbar + s.sn * alpha
        gbar = s.sn * s.dbar - s.cs * alpha
        epsln = s.sn * beta
        dbar = -s.cs * beta
        norm_squared = s.norm_squared + alpha**2 + s.beta**2 + beta**2
        gamma = jnp.hypot(gbar, beta)
        singular = gamma <= 1e3 * tiny * jnp.sqrt(norm_squared)
        gamma = jnp.where(singular, 1.0, gamma)
        cs, sn = gbar / gamma, beta / gamma
        phi = jnp.where(singular, 0.0, cs * s.phibar)
        w = (v - s.epsln * s.w2 - delta * s.w) / gamma
        updated = _MinresState(s.x + phi * w, s.r2, y, w, s.w, beta, s.beta, dbar, epsln, sn * s.phibar, cs, sn,
                               s.step + 1, norm_squared, singular)
        return jax.tree.map(lambda new, old: jnp.where(singular, old, new), updated,
                            s._replace(step=s.step + 1, singular=singular))

    zeros = jnp.zeros_like(b)
    one = jnp.ones((), b.dtype)
    state = _MinresState(zeros, b, b, zeros, zeros, beta1, 0 * one, 0 * one, 0 * one, beta1, -one, 0 * one,
                         jnp.int32(0), 0 * one, jnp.asarray(False))
    return state, keep_going, body


def _minres_result(state, b):
    beta1 = jnp.linalg.norm(b)
    return state.x, state.step, state.singular | (state.beta <= jnp.finfo(b.dtype).eps * beta1)


def _krylov_solver(parts, result):
    """``run(op, b, damping, tol, max_iters) -> (x, steps, flag)`` for an iteration given as ``parts`` (first state,
    keep_going, body): one compiled ``while_loop``, or, for ``op.loop_mode == "python"`` operators (convolutional
    models on CPU, whose backward convolutions XLA:CPU runs 10-30x slower inside a loop), one compiled iteration per
    Python step with a host read of the stopping rule. The same arithmetic either way."""
    static = dict(static_argnames=("max_iters",))

    @precise_jit(**static)
    def in_one_program(op, b, damping, tol, max_iters):
        state, keep_going, body = parts(op, b, damping, tol, max_iters)
        return result(jax.lax.while_loop(keep_going, body, state), b)

    @precise_jit(**static)
    def start(op, b, damping, tol, max_iters):
        state, keep_going, _ = parts(op, b, damping, tol, max_iters)
        return state, keep_going(state)

    @precise_jit(**static)
    def step(op, b, damping, tol, max_iters, state):
        _, keep_going, body = parts(op, b, damping, tol, max_iters)
        state = body(state)
        return state, keep_going(state)

    finish = precise_jit(result)

    def run(op, b, damping, tol, max_iters):
        if op.loop_mode != "python":
            return in_one_program(op, b, damping, tol, max_iters)
        state, more = start(op, b, damping, tol, max_iters)
        while bool(more):
            state, more = step(op, b, damping, tol, max_iters, state)
        return finish(state, b)

    return run


_cg = _krylov_solver(_cg_parts, _cg_result)
_minres = _krylov_solver(_minres_parts, _minres_result)


@precise_jit(static_argnames=("num_iters",))
def _lissa(op, b, damping, scale, num_iters):
    """LiSSA: x ← b + x − (M_j x + δx)/s over batches j = 0, 1, … (cycling), then x/s. The batches of every group in
    the operator's data, one per iteration. With several batches the iterates fluctuate around the solution (each
    step sees one batch's curvature): the result averages the iterates of the second half of the run (with one
    batch the iterates converge and the average equals the last one to the series' precision)."""
    flat_params, unravel = ravel_pytree(op.params)
    functions = op.functions
    batches = [jax.tree.map(lambda leaf, i=i: leaf[i], group.batches)
               for group in op.data for i in range(group.weights.shape[0])]
    products = [lambda v, batch=batch: ravel_pytree(op.product(functions, op.params, batch, unravel(v)))[0]
                for batch in batches]

    def body(step, carry):
        x, total = carry
        product = jax.lax.switch(step % len(products), products, x)
        x = b + x - (product + damping.astype(x.dtype) * x) / scale
        return x, total + jnp.where(step >= num_iters // 2, 1.0, 0.0).astype(x.dtype) * x

    last, total = jax.lax.fori_loop(0, num_iters, body, (b, jnp.zeros_like(b)))
    if len(products) == 1:
        return last / scale
    return total / (num_iters - num_iters // 2) / scale


@precise_jit
def _relative_residual(op, x, b, damping):
    matvec = _damped(flat_operator(op)[0], damping)
    return jnp.linalg.norm(matvec(x) - b) / jnp.linalg.norm(b)


def solve(op: CurvatureOperator, b: Any, *, damping: float = 0.0, method: str = "cg", tol: float = 1e-6,
          max_iters: int | None = None, scale: float | None = None, like: Any = None) -> SolveResult:
    """x with (M + δI) x = b for a pytree ``b`` shaped like the operator's parameters (see the module docstring).

    ``tol``: stop at ‖(M + δI)x − b‖ ≤ tol·‖b‖ (CG, MINRES); ``converged`` says whether the final, recomputed
    residual meets it (LiSSA: whether its ``max_iters`` steps got there). ``max_iters``: default the parameter count
    (CG, MINRES; exact arithmetic needs no more) or 1,000 (LiSSA). ``scale``: LiSSA's s (default 1.1·λmax(M) + δ).
    Never raises on non-convergence: the result says it, with the residual and the reason."""
    op = require_operator(op, like=like)
    check_choice(method, "method", choices=SOLVE_METHODS)
    damping = check_positive_float(damping, "damping", allow_zero=True)
    tol = check_positive_float(tol, "tol")
    b = check_like(b, "b", reference=op.params)
    flat_b, unravel = ravel_pytree(b)
    if not bool(jnp.all(jnp.isfinite(flat_b))):
        raise FloatingPointError("b: expected a finite right-hand side, got NaN/inf entries")
    if not bool(jnp.any(flat_b != 0)):
        return SolveResult(jax.tree.map(jnp.zeros_like, b), 0.0, 0, True, method, damping, "b = 0: x = 0")
    dtype = flat_b.dtype
    damping_array = jnp.asarray(damping, dtype)
    if method == "lissa":
        max_iters = 1000 if max_iters is None else check_int(max_iters, "max_iters")
        if scale is None:
            from jaxnn.curvature.krylov import top_eigenvalues

            scale = 1.1 * float(top_eigenvalues(op, tol=1e-2, progress=False).values[0]) + damping
        scale = check_positive_float(scale, "scale")
        x = _lissa(op, flat_b, damping_array, jnp.asarray(scale, dtype), max_iters)
        steps, reason = max_iters, f"{max_iters} LiSSA steps (scale {scale:.4g})"
    else:
        max_iters = op.num_params if max_iters is None else check_int(max_iters, "max_iters")
        solver = _cg if method == "cg" else _minres
        x, steps, flag = solver(op, flat_b, damping_array, jnp.asarray(tol, dtype), max_iters)
        steps, flag = int(steps), bool(flag)
        if method == "cg" and flag:
            reason = (f"stopped at iteration {steps}: a direction of non-positive curvature (M + δI is not positive "
                      "definite; use method='minres' or more damping)")
        elif method == "minres" and flag:
            reason = (f"{steps} iterations, where the Krylov space was exhausted or the projected matrix turned "
                      "singular (M + δI is singular along b: the least-squares solution so far)")
        else:
            reason = f"{steps} iterations"
    relative = float(_relative_residual(op, x, flat_b, damping_array))
    converged = bool(np.isfinite(relative) and relative <= tol)
    message = (f"converged: relative residual {relative:.3g} <= tol {tol:.3g} after {reason}" if converged else
               f"NOT converged: relative residual {relative:.3g} > tol {tol:.3g} after {reason}")
    return SolveResult(unravel(x), relative, steps, converged, method, damping, message)
