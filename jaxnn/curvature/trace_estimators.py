"""Stochastic trace and diagonal of a curvature operator: Hutchinson, Hutch++, and the exact diagonal.

Hutchinson: tr(M) = E[zᵀMz] for Rademacher z (E[zzᵀ] = I), with the sample standard error.
Hutch++ (Meyer, Musco, Musco & Woodruff 2021): tr(M) = tr(QᵀMQ) + tr((I−QQᵀ)M(I−QQᵀ)), Q an orthonormal basis
of M S for a Rademacher sketch S; the first term is exact, the second is estimated by Hutchinson. Its standard
error is that of the second term (conditional on Q).

Probes are drawn inside the compiled programs, ``chunk_size`` vmapped products per call (the chunk size bounds the
memory of the vmapped products; a progress bar advances per chunk). Chunks have equal sizes so there is one
compilation; products beyond ``num_samples`` in the last chunk are discarded (``num_matvecs`` counts them).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from tqdm import tqdm

from jaxnn.curvature.operators import (
    precise_jit,
    CurvatureOperator,
    balanced_chunks,
    chunked_products,
    flat_operator,
    flat_products,
    require_operator,
)
from jaxnn.runtime import quick_jit
from jaxnn.validation import check_choice, check_int, check_key

TRACE_METHODS = ("hutchinson", "hutch++")
DIAGONAL_METHODS = ("hutchinson", "exact")


class TraceEstimate(NamedTuple):
    estimate: float
    standard_error: float
    num_samples: int
    num_matvecs: int
    method: str


class DiagonalEstimate(NamedTuple):
    diagonal: Any  # pytree like params
    standard_error: Any  # pytree like params (zeros for the exact diagonal)
    num_matvecs: int
    method: str


def _probes(op, key, count, basis):
    """``count`` Rademacher probes (flat), projected onto the complement of ``basis`` rows when given."""
    flat_params = ravel_pytree(op.params)[0]
    probes = jax.random.rademacher(key, (count, flat_params.size), dtype=flat_params.dtype)
    if basis is not None:
        probes = probes - (probes @ basis.T) @ basis
    return probes


_probes_jit = quick_jit(_probes, static_argnames=("count",))  # random numbers: run once, compile fast


@precise_jit
def _forms(probes, products):
    return jnp.sum(probes * products, axis=1)


@precise_jit(static_argnames=("count",))
def _diagonal_moments(op, key, count, valid):
    """Σ z⊙Mz and Σ (z⊙Mz)² over the first ``valid`` of ``count`` Rademacher probes: ``count`` products."""
    flat_matvec, _, _ = flat_operator(op)
    probes = _probes(op, key, count, None)
    samples = probes * jax.vmap(flat_matvec)(probes)
    samples = jnp.where((jnp.arange(count) < valid)[:, None], samples, 0)
    return jnp.sum(samples, axis=0), jnp.sum(samples**2, axis=0)


@precise_jit
def _orthonormal_rows(rows):
    """Orthonormal rows spanning the rows of ``rows`` (QR of the transpose)."""
    return jnp.linalg.qr(rows.T)[0].T


@precise_jit
def _trace_of_projection(basis, products):
    """tr(QᵀMQ) from the rows q_i of Q and the products M q_i."""
    return jnp.sum(basis * products)


def _hutchinson_forms(op, key, num_samples, chunk_size, basis, bar) -> tuple[np.ndarray, int]:
    """zᵀMz for ``num_samples`` probes, drawn chunk by chunk; the products go through the shared product program."""
    chunk, num_chunks = balanced_chunks(num_samples, chunk_size)
    forms = []
    for index in range(num_chunks):
        probes = _probes_jit(op, jax.random.fold_in(key, index), chunk, basis)
        forms.append(_forms(probes, flat_products(op, probes)))
        bar.update(min(chunk, num_samples - index * chunk))
    return np.concatenate(jax.device_get(forms))[:num_samples], chunk * num_chunks


def _mean_and_standard_error(samples: np.ndarray) -> tuple[float, float]:
    mean = float(np.mean(samples))
    if samples.size < 2:
        return mean, float("nan")
    return mean, float(np.std(samples, ddof=1) / math.sqrt(samples.size))


def trace(
    op: CurvatureOperator,
    key: Any,
    num_samples: int = 100,
    method: str = "hutchinson",
    *,
    chunk_size: int | None = None,
    progress: bool = True,
    like: Any = None,
) -> TraceEstimate:
    """tr(M) ± standard error. Cost: ``num_samples`` products (Hutch++: ⌊s/3⌋ sketch + ⌊s/3⌋ for tr(QᵀMQ) + the
    rest Hutchinson on the complement), at most ``chunk_size`` (default 16) vmapped per compiled call.
    """
    op = require_operator(op, like=like)
    key = check_key(key)
    check_choice(method, "method", choices=TRACE_METHODS)
    minimum = 4 if method == "hutch++" else 2
    num_samples = check_int(num_samples, "num_samples", minimum=minimum)
    with tqdm(total=num_samples, desc=f"trace ({method})", unit="matvec", disable=not progress, leave=False) as bar:
        if method == "hutchinson":
            forms, used = _hutchinson_forms(op, key, num_samples, chunk_size, None, bar)
            estimate, standard_error = _mean_and_standard_error(forms)
            return TraceEstimate(estimate, standard_error, num_samples, used, method)

        sketch_size = min(num_samples // 3, op.num_params)
        residual_samples = num_samples - 2 * sketch_size
        sketch_key, residual_key = jax.random.split(key)
        sketch_products = chunked_products(op, _probes_jit(op, sketch_key, sketch_size, None), chunk_size)
        bar.update(sketch_size)
        basis = _orthonormal_rows(sketch_products)  # (s, n) orthonormal rows spanning M S
        exact_part = float(_trace_of_projection(basis, chunked_products(op, basis, chunk_size)))
        bar.update(sketch_size)
        forms, used = _hutchinson_forms(op, residual_key, residual_samples, chunk_size, basis, bar)
    residual_mean, standard_error = _mean_and_standard_error(forms)
    return TraceEstimate(exact_part + residual_mean, standard_error, num_samples, 2 * sketch_size + used, method)


def hessian_diagonal(
    op: CurvatureOperator,
    key: Any = None,
    num_samples: int = 100,
    *,
    method: str = "hutchinson",
    chunk_size: int | None = None,
    max_params: int = 10_000,
    progress: bool = True,
    like: Any = None,
) -> DiagonalEstimate:
    """diag(M) as a pytree like params.

    ``method="hutchinson"``: diag(M) = E[z ⊙ Mz] for Rademacher z, with per-entry standard errors
    (``num_samples`` products). ``method="exact"``: (M e_i)_i for every unit vector e_i: ``num_params`` products,
    refused above ``max_params`` parameters.
    """
    op = require_operator(op, like=like)
    check_choice(method, "method", choices=DIAGONAL_METHODS)
    flat_params, unravel = ravel_pytree(op.params)
    n, dtype = flat_params.size, flat_params.dtype
    if method == "exact":
        if n > max_params:
            raise ValueError(
                f"params: the exact diagonal needs one product per parameter; expected at most max_params={max_params} "
                f"parameters, got {n} (use method='hutchinson' or raise max_params)"
            )
        chunk, num_chunks = balanced_chunks(n, 128 if chunk_size is None else chunk_size)
        entries = []
        with tqdm(total=n, desc="exact diagonal", unit="matvec", disable=not progress, leave=False) as bar:
            for index in range(num_chunks):
                rows = jnp.arange(index * chunk, (index + 1) * chunk)  # rows >= n: zero one-hot vectors (padding)
                products = flat_products(op, jax.nn.one_hot(rows, n, dtype=dtype))
                entries.append(products[jnp.arange(chunk), jnp.minimum(rows, n - 1)])
                bar.update(min(chunk, n - index * chunk))
        diagonal = jnp.concatenate(entries)[:n]
        return DiagonalEstimate(unravel(diagonal), unravel(jnp.zeros(n, dtype)), n, method)

    key = check_key(key)
    num_samples = check_int(num_samples, "num_samples", minimum=2)
    chunk, num_chunks = balanced_chunks(num_samples, chunk_size)
    total, total_squares = jnp.zeros(n, dtype), jnp.zeros(n, dtype)
    with tqdm(total=num_samples, desc="diagonal (hutchinson)", unit="matvec", disable=not progress, leave=False) as bar:
        for index in range(num_chunks):
            valid = min(chunk, num_samples - index * chunk)
            sums, squares = _diagonal_moments(op, jax.random.fold_in(key, index), chunk, valid)
            total, total_squares = total + sums, total_squares + squares
            bar.update(valid)
    mean = total / num_samples
    variance = jnp.maximum(total_squares - num_samples * mean**2, 0) / (num_samples - 1)
    return DiagonalEstimate(unravel(mean), unravel(jnp.sqrt(variance / num_samples)), chunk * num_chunks, method)


def quadratic_forms(matvec: Any, probes: jax.Array) -> jax.Array:
    """(zᵀMz for every row z of ``probes``), one product at a time in a ``lax.scan`` (the memory of one product):
    the Hutchinson samples of any flat ``matvec``. Pure and traceable (vmapped over a population's members)."""
    return jax.lax.scan(lambda _, z: (None, jnp.vdot(z, matvec(z))), None, probes)[1]
