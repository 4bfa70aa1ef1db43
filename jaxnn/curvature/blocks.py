"""Curvature blocks: any operator restricted to a subset of the parameters, and every layer's block at once.

For a parameter subset B (by layer name or path pattern) the block operator is M_BB = P_B M P_Bᵀ: its vectors are
the block's parameters alone (a dict ``{"Dense_0/kernel": array, ...}`` keyed by path), and its product is the
curvature of the loss as a function of those parameters with every other parameter held fixed — so the tangent
pass runs from the block's layer on and the backward pass only down to it (JAX prunes what does not depend on the
block), cheaper than a full product for early and late layers alike. Every estimator takes a block operator.

    H = curvature.hessian(loss_fn, params, data)
    dense = curvature.restrict(H, "Dense_0")                 # one layer (or "Dense_0/kernel", "*/kernel", a list)
    spectra = curvature.block_spectra(H, key=key)            # every layer: top-k with residual bounds, trace, density

Paths are the pytree's keys joined by "/" ("Dense_0/kernel" for Flax's ``params["Dense_0"]["kernel"]``); a layer is
a path without its last key. ``wrt`` patterns match a path when equal to it, when they name a prefix of it ("Dense_0"
matches "Dense_0/kernel"), or by ``fnmatch`` wildcards ("*/kernel").
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.curvature.operators import (
    CurvatureOperator,
    flat_operator,
    join_functions,
    precise_jit,
    require_operator,
    split_functions,
)
from jaxnn.validation import check_int, check_key


def _key_name(entry: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def parameter_paths(params: Any) -> list[str]:
    """Every leaf's path, keys joined by "/", in ``jax.tree`` flattening order."""
    return ["/".join(_key_name(entry) for entry in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def layer_names(params: Any) -> list[str]:
    """The layers of ``params``: each leaf's path without its last key (the leaf itself at the top level), in order
    of first appearance."""
    names: list[str] = []
    for path in parameter_paths(params):
        layer = path.rsplit("/", 1)[0] if "/" in path else path
        if layer not in names:
            names.append(layer)
    return names


def _matches(path: str, pattern: str) -> bool:
    return path == pattern or path.startswith(pattern.rstrip("/") + "/") or fnmatch.fnmatchcase(path, pattern)


def select_paths(params: Any, wrt: str | Sequence[str]) -> list[str]:
    """The leaf paths ``wrt`` (a pattern or a list of them) selects, in flattening order; raises naming the layers
    when a pattern selects nothing."""
    patterns = [wrt] if isinstance(wrt, str) else list(wrt)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"wrt: expected a non-empty path pattern or list of them, got {wrt!r}")
    paths = parameter_paths(params)
    for pattern in patterns:
        if not any(_matches(path, pattern) for path in paths):
            raise ValueError(f"wrt: {pattern!r} matches no parameter; the layers are {', '.join(layer_names(params))} "
                             f"(leaf paths like {paths[0]!r}; patterns match a path, a prefix of it, or by fnmatch)")
    return [path for path in paths if any(_matches(path, pattern) for pattern in patterns)]


# Block functions: the user's functions of the full parameters, seen as functions of the block's. The full
# parameters ride along as arrays (traced), the block's leaf positions and names as static data.


def _embedded(full: Any, positions: tuple, names: tuple, block: dict) -> Any:
    leaves, treedef = jax.tree.flatten(full)
    for position, name in zip(positions, names):
        leaves[position] = block[name]
    return jax.tree.unflatten(treedef, leaves)


def _block_loss(loss_fn, full, positions, names, block, batch):
    return loss_fn(_embedded(full, positions, names, block), batch)


def _block_predict(predict_fn, full, positions, names, block, x):
    return predict_fn(_embedded(full, positions, names, block), x)


def _block_of_matvec(matvec, full, positions, names, v):
    """Block product of a plain matvec (no loss to restrict): P_B M P_Bᵀ v, one full product."""
    product = matvec(_embedded(jax.tree.map(jnp.zeros_like, full), positions, names, v))
    leaves = jax.tree.leaves(product)
    return {name: leaves[position] for position, name in zip(positions, names)}


def restrict(op: CurvatureOperator, wrt: str | Sequence[str], *, like: Any = None) -> CurvatureOperator:
    """The block M_BB of ``op`` on the parameters ``wrt`` selects (see the module docstring): an operator on dicts
    ``{path: array}`` of those parameters, usable by every estimator. Hessian, GGN and Fisher blocks differentiate
    only through the block's parameters; a plain matvec's block costs one full product. Cost of one block product:
    one product of the loss as a function of the block (≤ one full product)."""
    op = require_operator(op, like=like)
    paths = parameter_paths(op.params)
    names = tuple(select_paths(op.params, wrt))
    positions = tuple(paths.index(name) for name in names)
    leaves = jax.tree.leaves(op.params)
    block = {name: leaves[position] for name, position in zip(names, positions)}
    user = join_functions(op.function_arrays, op.function_skeleton)  # as given, without the precision wrapper
    if op.kind.startswith("linear"):
        functions = jax.tree_util.Partial(_block_of_matvec, user, op.params, positions, names)
    elif op.kind.startswith("hessian"):
        functions = jax.tree_util.Partial(_block_loss, user, op.params, positions, names)
    else:  # ggn / fisher: (predict_fn, output_loss)
        predict_fn, output_loss = user
        functions = (jax.tree_util.Partial(_block_predict, predict_fn, op.params, positions, names), output_loss)
    arrays, skeleton = split_functions(functions)
    kind = op.kind if op.kind.endswith("-block") else f"{op.kind}-block"
    return dataclasses.replace(op, params=block, function_arrays=arrays, function_skeleton=skeleton, kind=kind,
                               num_params=sum(int(np.size(leaf)) for leaf in block.values()))


def layer_blocks(op: CurvatureOperator, *, like: Any = None) -> dict[str, CurvatureOperator]:
    """``{layer: restrict(op, layer)}`` for every layer of the operator's parameters (see :func:`layer_names`)."""
    op = require_operator(op, like=like)
    return {layer: restrict(op, layer) for layer in layer_names(op.params)}


class BlockSpectrum(NamedTuple):
    """One block's curvature: top-k Ritz values with residual bounds, trace and SLQ density nodes/weights."""

    name: str
    num_params: int
    top: np.ndarray  # (k,), descending
    residuals: np.ndarray  # (k,): Lanczos residual bound ‖M y − θ y‖ of each
    converged: np.ndarray  # (k,) bool: residual ≤ tol·|θ|
    trace: float  # Hutchinson / SLQ estimate, n · mean_p (e₁ᵀ T_p e₁)
    trace_standard_error: float
    nodes: np.ndarray  # (num_probes, m) Ritz values of each probe's run (SLQ nodes), ascending
    weights: np.ndarray  # (num_probes, m) quadrature weights


class BlockSpectra(NamedTuple):
    blocks: list  # [BlockSpectrum], in layer order
    num_iters: int
    num_probes: int
    tol: float

    def as_dict(self) -> dict:
        """JSON-ready: per block ``top``, ``residuals``, ``converged``, ``trace`` (and its standard error)."""
        return {b.name: {"num_params": b.num_params, "top": [float(v) for v in b.top],
                         "residuals": [float(r) for r in b.residuals],
                         "converged": [bool(c) for c in b.converged], "trace": b.trace,
                         "trace_standard_error": b.trace_standard_error} for b in self.blocks}


@precise_jit(static_argnames=("num_iters",))
def _block_program(blocks: tuple, probes: tuple, num_iters: int):
    """For every block (unrolled: blocks differ in shape), one Lanczos run per probe, vmapped over probes, from the
    normalised probe: Ritz values, residual bounds and quadrature weights (first coordinates squared), and the
    probe's quadratic form zᵀMz = ‖z‖² T₁₁ (the Hutchinson sample). One compiled program for every block."""
    from jaxnn.curvature.krylov import _analyze, lanczos_decomposition

    out = []
    for op, block_probes in zip(blocks, probes):
        matvec = flat_operator(op)[0]
        size = min(num_iters, op.num_params)

        def run(probe):
            state = lanczos_decomposition(matvec, probe, size)
            analysis = _analyze(state, op.num_params, 1)
            return (analysis.values[:size], analysis.bounds[:size], analysis.coordinates[0, :size] ** 2,
                    jnp.vdot(probe, probe) * state.projected[0, 0])

        out.append(jax.vmap(run)(block_probes))
    return out


def _block_from_python(op: CurvatureOperator, probes: jax.Array, num_iters: int, key: Any) -> tuple:
    """:func:`_block_program`'s numbers for one block, each probe's Lanczos run driven from Python (one compiled
    iteration per step; :func:`jaxnn.curvature.krylov.run_lanczos`)."""
    from jaxnn.curvature.krylov import run_lanczos

    size = min(num_iters, op.num_params)
    rows = []
    for probe in probes:
        state, analysis = run_lanczos(op, key, size, 1, probe, False, "block_spectra")
        values, bounds, first = jax.device_get((analysis.values[:size], analysis.bounds[:size],
                                                analysis.coordinates[0, :size]))
        rows.append((values, bounds, first**2, float(jnp.vdot(probe, probe) * state.projected[0, 0])))
    return tuple(np.stack([row[i] for row in rows]) for i in range(4))


def block_spectra(op: CurvatureOperator, blocks: str | Sequence[str] | dict = "layer", *, k: int = 1,
                  key: Any = None, num_iters: int = 30, num_probes: int = 4, tol: float = 1e-3,
                  like: Any = None) -> BlockSpectra:
    """Every block's top-k eigenvalues (with residual bounds and converged flags), trace and SLQ density, in one
    compiled program. ``blocks``: "layer" (every layer), a list of ``wrt`` patterns (one block each) or a dict
    ``{name: pattern(s)}``. Each block runs ``num_probes`` Lanczos runs of ``num_iters`` steps (capped by its size)
    from Rademacher probes drawn from ``key`` (default key(0)); the top-k come from the first probe's run, the trace
    is the mean of zᵀM_BBz over the probes (its standard error beside it), the density's nodes and weights are every
    probe's Gauss quadrature (:func:`jaxnn.curvature.spectral_density`'s estimator). Operators whose loops run from
    Python (convolutions on CPU) run each block's iterations from Python instead. A value is ``converged`` when
    its residual bound is ≤ ``tol``·|θ|: the others are reported, not claimed. Cost: Σ_B num_probes · num_iters
    block products."""
    op = require_operator(op, like=like)
    key = jax.random.key(0) if key is None else check_key(key)
    k = check_int(k, "k")
    num_iters = check_int(num_iters, "num_iters")
    num_probes = check_int(num_probes, "num_probes")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol: expected a finite number > 0, got {tol}")
    if isinstance(blocks, str) and blocks == "layer":
        named = {layer: layer for layer in layer_names(op.params)}
    elif isinstance(blocks, dict):
        named = dict(blocks)
    elif isinstance(blocks, str):
        raise ValueError(f"blocks: expected 'layer', a list of wrt patterns or a dict name -> pattern(s); got {blocks!r}")
    else:
        named = {pattern: pattern for pattern in blocks}
    operators = tuple(restrict(op, pattern) for pattern in named.values())
    for name, block in zip(named, operators):
        if k > min(num_iters, block.num_params):
            raise ValueError(f"k: block {name!r} has {block.num_params} parameters and runs "
                             f"{min(num_iters, block.num_params)} iterations; expected k <= that, got {k}")
    dtype = op.dtype
    probes = tuple(jax.random.rademacher(jax.random.fold_in(key, index), (num_probes, block.num_params), dtype)
                   for index, block in enumerate(operators))
    if op.loop_mode == "scan":
        results = jax.device_get(_block_program(operators, probes, num_iters=num_iters))
    else:  # convolutions on CPU: the driver runs each block's iterations from Python (jaxnn.runtime.STRATEGIES)
        results = [_block_from_python(block, block_probes, num_iters, key)
                   for block, block_probes in zip(operators, probes)]
    spectra = []
    for name, block, (values, bounds, weights, forms) in zip(named, operators, results):
        values, bounds, weights, forms = (np.asarray(a, np.float64) for a in (values, bounds, weights, forms))
        if not (np.all(np.isfinite(values)) and np.all(np.isfinite(forms))):
            raise FloatingPointError(f"block_spectra: the product of block {name!r} is not finite (NaN/inf)")
        order = np.argsort(values[0])[::-1][:k]
        top, residuals = values[0][order], bounds[0][order]
        error = float(np.std(forms, ddof=1) / math.sqrt(num_probes)) if num_probes > 1 else math.nan
        spectra.append(BlockSpectrum(name, block.num_params, top, residuals, residuals <= tol * np.abs(top),
                                     float(np.mean(forms)), error, np.sort(values, axis=1),
                                     np.take_along_axis(weights, np.argsort(values, axis=1), axis=1)))
    return BlockSpectra(spectra, num_iters, num_probes, tol)
