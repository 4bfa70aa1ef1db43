"""A K-FAC damped inverse product vs conjugate gradients on the same GGN, in one process, same weights and data.

Issue 22's goal: (K + δI)⁻¹v (K-FAC's Kronecker factors, eigendecomposed once) at least 20x faster than CG solving
(G + δI)x = v to a relative residual of 1e-6 on the exact GGN G it approximates (ResNet-20, batch 256). The two are
not the same answer — K-FAC is an approximation of G — which is why one would take it: this script prints both
times, the factorisation's cost apart (statistics pass + eigendecompositions, paid once per curvature update), and
how far the K-FAC solution is from the exact one (relative error, cosine). CG is capped at ``--max-iters``; when it
stops short of 1e-6 the ratio printed is a lower bound (marked "≥").

Models: the main job's MLP (digits 64-256-256-10, 512 examples) and, unless ``--skip-resnet``, ResNet-20 (batch
norm in eval mode, CIFAR-shaped random images, batch 256). Timings: first call (with compilation) and warm median;
also one GGN product, since CG pays one per iteration. On a 2-core CPU one ResNet-20 GGN product takes ~2 s, so CG
is capped at ``--resnet-max-iters`` (30) and far from 1e-6 there: its ratio is a lower bound. Both sides get their
operands as arguments of compiled functions (closed-over arrays are constants XLA folds: minutes of compilation).

    python benchmarks/bench_kfac.py [--damping 1e-3] [--max-iters 300] [--resnet-max-iters 30] [--skip-resnet]
"""

from __future__ import annotations

import argparse

from _timing import timed  # benchmarks/_timing.py: the scripts run from this folder



def compare(label, model, variables, batch, damping, max_iters, repeats) -> None:
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from jaxnn import curvature

    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def predict(p, x):
        return model.apply({"params": p, **state}, x)

    def cross_entropy(logits, labels):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    flat, unravel = ravel_pytree(params)
    v = unravel(jax.random.normal(jax.random.PRNGKey(2), flat.shape, flat.dtype))
    factor_first, factor_warm, factored = timed(lambda: curvature.kfac(predict, cross_entropy, params, batch), 1)
    print(f"{label}: {flat.size:,} parameters, {len(factored.layers)} factored layers, fallback diagonal for "
          f"{len(factored.fallback)} ({', '.join(factored.fallback[:3])}{'...' if len(factored.fallback) > 3 else ''})")
    print(f"  K-FAC factors (statistics + eigh)  first {factor_first:7.2f} s, warm {factor_warm:7.2f} s", flush=True)
    inverse = jax.jit(lambda f, x: f.inverse_matvec(x, damping))  # the factors as arguments, not folded constants
    kfac_first, kfac_warm, kfac_x = timed(lambda: inverse(factored, v), repeats)
    print(f"  K-FAC (K + dI)^-1 v               first {kfac_first * 1e3:8.1f} ms, warm {kfac_warm * 1e3:8.2f} ms",
          flush=True)
    G = curvature.ggn(predict, cross_entropy, params, batch)
    product_first, product_warm, _ = timed(lambda: G.matvec(v), repeats)  # compiled inside, G as an argument
    print(f"  one GGN product G v                first {product_first:7.2f} s, warm {product_warm:7.3f} s "
          f"(loops: {G.loop_mode})", flush=True)
    cg_first, cg_warm, solved = timed(lambda: curvature.solve(G, v, damping=damping, method="cg", tol=1e-6,
                                                               max_iters=max_iters), 1)
    exact, approx = ravel_pytree(solved.solution)[0], ravel_pytree(kfac_x)[0]
    error = float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))
    cosine = float(jnp.vdot(approx, exact) / (jnp.linalg.norm(approx) * jnp.linalg.norm(exact)))
    bound = "" if solved.converged else "≥ "
    print(f"  CG on the GGN to 1e-6              first {cg_first:7.2f} s, warm {cg_warm:7.2f} s "
          f"({solved.num_iters} iterations, relative residual {solved.relative_residual:.1e}"
          f"{'' if solved.converged else ', NOT converged: capped'})")
    print(f"  RATIO CG / K-FAC inverse product = {bound}{cg_warm / kfac_warm:,.0f}x   (goal >= 20); with the "
          f"factorisation: {bound}{cg_warm / (kfac_warm + factor_warm):,.1f}x")
    print(f"  one GGN product / K-FAC inverse product = {product_warm / kfac_warm:,.1f}x (CG needs one per "
          f"iteration)")
    print(f"  K-FAC's solution vs CG's: relative error {error:.2f}, cosine {cosine:.3f} (an approximation of G)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--max-iters", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resnet-max-iters", type=int, default=30,
                        help="CG's cap on ResNet-20 (one GGN product of batch 256 takes seconds on a CPU)")
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxnn import data as data_lib, models

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; damping {args.damping}")
    digits = data_lib.load_dataset("digits", seed=0)
    model = models.get_model("mlp", num_classes=10, width=256, depth=2)
    variables = model.init(jax.random.PRNGKey(0), digits.train.x[:1])
    compare("main job MLP 64-256-256-10 (512 digits)", model, variables,
            (jnp.asarray(digits.train.x[:512]), jnp.asarray(digits.train.y[:512])), args.damping, args.max_iters,
            args.repeats)
    if not args.skip_resnet:
        model = models.get_model("resnet", num_classes=10, depth=20)
        images = jax.random.normal(jax.random.PRNGKey(1), (256, 32, 32, 3))
        variables = model.init(jax.random.PRNGKey(0), images[:1])
        compare("ResNet-20 (CIFAR shape, batch 256)", model, variables, (images, jnp.arange(256) % 10),
                args.damping, args.resnet_max_iters, args.repeats)


if __name__ == "__main__":
    main()
