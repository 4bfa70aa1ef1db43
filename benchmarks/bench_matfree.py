"""matfree's Lanczos tridiagonalisation vs jaxnn's pure Lanczos core, in one process, on the same matvec.

Needs matfree (pure Python on top of JAX; not a jaxnn dependency), installed without touching JAX:

    pip install --no-deps matfree==0.6.3

Matvec: the Hessian-vector product of an MLP 784-64-10 (50,890 parameters, bench_curvature's weights and loss) on
one batch of the real MNIST test images (synthetic MNIST-shaped data if absent), on ravel_pytree-flat vectors,
linearised once per program (jax.linearize of jax.grad, outside the Krylov loop, as jaxnn's flat_operator does).
Same start vector (normal, seed 0) on every side; each side is one jitted program returning Ritz values:

- jaxnn:  ritz_values(lanczos_decomposition(matvec, start, k)) (full re-orthogonalisation, DGKS second pass only
          when needed, random restart on an invariant Krylov space, residual bounds from the coupling).
- matfree full: matfree.decomp.tridiag_sym(k, reortho="full") (Arnoldi with two Gram-Schmidt passes every step),
          then eigh of the k x k tridiagonal T; bounds ||residual||·|s_last| computed here from its residual output.
- matfree none: tridiag_sym(k, reortho="none") (three-term recurrence only): expect ghost copies of converged
          Ritz values once k is large (loss of orthogonality).

For k in (20, 40, 80): compile time (first call minus warm call), warm median of 5 runs, top-5 Ritz values, their
max relative difference to jaxnn's, the relative error of the largest one against a 150-step jaxnn reference, the
largest residual bound of the top 5, and the matfree/jaxnn time ratios.

    python benchmarks/bench_matfree.py            # batch 1024, k = 20, 40, 80
    python benchmarks/bench_matfree.py --quick    # batch 256, k = 20, 40
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

try:
    from matfree import decomp
except ImportError:
    sys.exit("bench_matfree: matfree is not installed. Install it with: pip install --no-deps matfree==0.6.3")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_curvature as bc  # noqa: E402

from jaxnn.curvature.krylov import lanczos_decomposition, ritz_values  # noqa: E402

REPEATS, REFERENCE_ITERS = 5, 150


def hvp_of(unravel):
    def linearised(flat_params, batch):
        grad = lambda p: ravel_pytree(jax.grad(bc.mlp_loss)(unravel(p), batch))[0]
        return jax.linearize(grad, flat_params)[1]
    return linearised


def jaxnn_program(hvp, k):
    @jax.jit
    def run(flat_params, batch, start):
        values, bounds = ritz_values(lanczos_decomposition(hvp(flat_params, batch), start, k))
        return values, bounds
    return run


def matfree_program(hvp, k, reortho):
    tridiag = decomp.tridiag_sym(k, reortho=reortho)

    @jax.jit
    def run(flat_params, batch, start):
        _, tridiagonal, residual, _ = tridiag(hvp(flat_params, batch), start)
        values, vectors = jnp.linalg.eigh(tridiagonal)
        return values, jnp.linalg.norm(residual) * jnp.abs(vectors[-1])  # ||M y - θ y|| = β_k |s_k|
    return run


def timed(program, *args):
    """(top-5 Ritz values descending, max residual bound of those, compile s, warm median s)."""
    start = time.perf_counter()
    values, bounds = jax.block_until_ready(program(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        times.append(time.perf_counter() - start)
    warm = float(np.median(times))
    values, bounds = np.asarray(values), np.asarray(bounds)
    return values[::-1][:5], float(bounds[::-1][:5].max()), first - warm, warm


def ghost_copies(top: np.ndarray, rtol: float = 1e-5) -> int:
    """Top values that repeat a larger one to rtol: spurious copies (the reference has distinct top eigenvalues)."""
    return int(np.sum(np.abs(np.diff(top)) <= rtol * np.abs(top[1:])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 256, num_iters 20 and 40")
    args = parser.parse_args()
    batch_size, iters = (256, (20, 40)) if args.quick else (1024, (20, 40, 80))

    from importlib.metadata import version

    x, y, source = bc.load_mnist(batch_size)
    flat_params, unravel = ravel_pytree(jax.tree.map(jnp.asarray, bc.mlp_params((784, 64, 10))))
    batch = (jnp.asarray(x), jnp.asarray(y))
    start = jnp.asarray(np.random.default_rng(0).normal(size=flat_params.shape).astype(np.float32))
    hvp = hvp_of(unravel)
    print(f"matfree {version('matfree')}, JAX {jax.__version__} on {jax.devices()[0].platform}; MLP 784-64-10 "
          f"({flat_params.size:,} params), Hessian on {batch_size} images of {source}")

    ref_top, ref_bound, _, ref_time = timed(jaxnn_program(hvp, REFERENCE_ITERS), flat_params, batch, start)
    print(f"reference: jaxnn {REFERENCE_ITERS} steps, top-5 {np.array2string(ref_top, precision=5)}, "
          f"max bound {ref_bound:.1e} ({ref_time:.2f} s warm)")
    print(f"\n{'k':>3s} {'side':<13s} {'compile s':>9s} {'warm ms':>8s} {'top-5 Ritz values':<46s} "
          f"{'rel diff':>8s} {'λmax err':>8s} {'bound':>7s} {'ghosts':>6s}")
    rows = {}
    for k in iters:
        sides = {"jaxnn": jaxnn_program(hvp, k), "matfree full": matfree_program(hvp, k, "full"),
                 "matfree none": matfree_program(hvp, k, "none")}
        for side, program in sides.items():
            top, bound, compile_s, warm = timed(program, flat_params, batch, start)
            rows[k, side] = (top, compile_s, warm)
            diff = np.max(np.abs(top - rows[k, "jaxnn"][0]) / np.abs(rows[k, "jaxnn"][0]))
            err = abs(top[0] - ref_top[0]) / abs(ref_top[0])
            print(f"{k:3d} {side:<13s} {compile_s:9.2f} {warm * 1e3:8.1f} {np.array2string(top, precision=5):<46s} "
                  f"{diff:8.1e} {err:8.1e} {bound:7.1e} {ghost_copies(top):6d}")
    print("\nratios matfree/jaxnn (compile, warm):")
    for k in iters:
        _, jc, jw = rows[k, "jaxnn"]
        line = "  ".join(f"{side}: {rows[k, side][1] / jc:5.2f}x, {rows[k, side][2] / jw:5.2f}x"
                         for side in ("matfree full", "matfree none"))
        print(f"  k={k:3d}  {line}")
    print(f"reference ghosts in top-5: {ghost_copies(ref_top)} (a nonzero 'ghosts' count above is a spurious copy "
          "of a converged eigenvalue: loss of orthogonality without re-orthogonalisation)")


if __name__ == "__main__":
    main()
