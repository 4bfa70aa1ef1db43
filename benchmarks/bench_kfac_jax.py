"""jaxnn's K-FAC factors vs kfac-jax's curvature estimator on the same Flax MLP and batch, in one process.

Issue 22's goal: computing the Kronecker factors at least as fast as kfac-jax (ratio >= 1). Both sides estimate the
same curvature: the type-2 GGN of softmax cross-entropy (jaxnn ``kind="ggn"``: one backward pass per column of each
example's output-Hessian square root; kfac-jax ``estimation_mode="fisher_exact"``, which for softmax cross-entropy
is the same matrix), with kfac-jax finding the layers itself (auto-registration by graph matching) as jaxnn does (by
module interception). Timed: warm medians of calls taken in turn, round after round (a slow spell of this noisy machine hits both
sides), after a first call that compiles (reported apart):

- factors: jaxnn ``curvature.kfac(...)`` (statistics pass + per-block eigendecompositions) vs kfac-jax's jitted
  ``update_curvature_matrix_estimate`` followed by its jitted ``update_cache`` of eigenvalues and eigenvectors (exact
  power -1: what a damped inverse product with any damping needs, as jaxnn keeps);
- agreement: K v for one random v from both (kfac-jax's ``multiply``), relative difference printed.

kfac-jax 0.0.8 from PyPI imports next to JAX 0.10 but fails when it traces a model (``get_bind_params`` returns one
value since JAX 0.9.2); its GitHub main (commit babd853, 2026-08-19) has the fix. Install that, without dependencies:

    pip install --no-deps git+https://github.com/google-deepmind/kfac-jax distrax dm-tree immutabledict six \
        cloudpickle gast decorator tfp-nightly
    python benchmarks/bench_kfac_jax.py [--width 256] [--batch 1024] [--repeats 5]

Measured on the 2-core CPU (float32, 41 rounds), factors only, kfac-jax / jaxnn: MLP 64-256-256-10 (85,002
parameters), batch 1024: 1.08-1.14x (jaxnn 41-48 ms, kfac-jax 47-52 ms); MLP 64-512-512-10, batch 512: 1.10-1.39x.
With the eigendecompositions: 0.94-1.01x and 0.89-0.92x. First calls: jaxnn 0.7-0.8 s, kfac-jax 1.2-1.4 s. K v
equal to 4e-7. Before this version (an eigendecomposition of each example's output Hessian instead of its closed
form, all columns' gradients at once, the other side's calls timed in a block after ours): 0.50-0.63x.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np

from _timing import interleaved, timed  # benchmarks/_timing.py: the scripts run from this folder

try:
    import kfac_jax
except ImportError:
    sys.exit("bench_kfac_jax: needs kfac-jax installed without dependencies, see the module docstring "
             "(../shared/PEERS.md)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from jaxnn import curvature, data, losses, models

    digits = data.load_dataset("digits", seed=0, val_fraction=0.0, test_fraction=0.0)
    x = jnp.asarray(digits.train.x[:args.batch]).reshape(min(args.batch, len(digits.train)), -1)
    y = jnp.asarray(digits.train.y[:args.batch])
    model = models.get_model("mlp", num_classes=10, width=args.width, depth=args.depth)
    params = models.init_model(model, jax.random.PRNGKey(0), x.shape[1:])[0]
    predict = lambda p, inputs: model.apply({"params": p}, inputs)  # noqa: E731

    # each side names its loss: kfac-jax by registering it, jaxnn by its loss registry (which carries the output
    # Hessian's square root in closed form, as kfac-jax's registered loss does)
    cross_entropy = losses.batch_mean("softmax_cross_entropy")

    def ours():
        factored = curvature.kfac(predict, cross_entropy, params, (x, y), kind="ggn")
        jax.block_until_ready(factored.eigen)
        return factored

    def loss_with_registration(p, batch):
        logits = predict(p, batch[0])
        kfac_jax.register_softmax_cross_entropy_loss(logits, batch[1])
        return cross_entropy(logits, batch[1])

    estimator = kfac_jax.BlockDiagonalCurvature(loss_with_registration, default_estimation_mode="fisher_exact")
    key = jax.random.PRNGKey(1)
    state = estimator.init(key, (params, (x, y)), exact_powers_to_cache=-1, approx_powers_to_cache=None,
                           cache_eigenvalues=True)
    # params and the batch are arguments, not constants: a closed-over constant lets XLA fold the work at compile time
    update = jax.jit(lambda s, p, batch: estimator.update_curvature_matrix_estimate(
        s, ema_old=0.0, ema_new=1.0, identity_weight=0.0, batch_size=x.shape[0], rng=key, func_args=(p, batch)))
    # exact power -1 cached: the factors' eigenvalues and eigenvectors, which a damped inverse product with any damping
    # needs (jaxnn's K-FAC keeps the same)
    cache = jax.jit(lambda s: estimator.update_cache(s, identity_weight=0.0, exact_powers=-1, approx_powers=None,
                                                     eigenvalues=True, pmap_axis_name=None))

    def theirs():
        fresh = cache(update(state, params, (x, y)))
        jax.block_until_ready(fresh)
        return fresh

    first, _, factored = timed(ours, 0)
    their_first, _, their_state = timed(theirs, 0)
    # the factors alone: jaxnn's statistics pass (the jitted program inside curvature.kfac) vs kfac-jax's update
    from jaxnn.curvature.kfac import _statistics, _unrolled, discover_layers

    layers, _, shapes = discover_layers(predict, params, x)
    signature = tuple(("/".join(layer.path), shapes["/".join(layer.path)]) for layer in layers)
    statistics = lambda: _statistics(predict, cross_entropy, params, (x, y), layers, signature,  # noqa: E731
                                     "ggn", None, (), False, _unrolled(layers))
    timed(statistics, 0)
    timed(lambda: update(state, params, (x, y)), 0)
    medians = interleaved({"ours": ours, "theirs": theirs, "stats": statistics,
                           "update": lambda: update(state, params, (x, y))}, args.repeats)
    warm, their_warm, stats_warm, update_warm = (medians[k] for k in ("ours", "theirs", "stats", "update"))
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.PRNGKey(2), flat.shape, flat.dtype)
    mine = ravel_pytree(factored.matvec(unravel(v)))[0]
    their_product = ravel_pytree(estimator.multiply(their_state, unravel(v), identity_weight=0.0,
                                                    exact_power=1, use_cached=False, pmap_axis_name=None))[0]
    difference = float(jnp.linalg.norm(mine - their_product) / jnp.linalg.norm(their_product))
    blocks = factored.report()["factored"]
    print(f"jax {jax.__version__}, kfac-jax {kfac_jax.__version__} on {jax.devices()[0].platform}; Flax MLP "
          f"{x.shape[1]}-{'-'.join([str(args.width)] * args.depth)}-10 ({flat.size:,} params), batch {x.shape[0]}, "
          f"float32; layers found: jaxnn {len(blocks)}, kfac-jax {estimator.num_blocks}")
    print(f"{'':<34} {'warm':>9} {'first':>8}")
    print(f"{'jaxnn curvature.kfac':<34} {warm * 1e3:7.1f} ms {first:6.2f} s")
    print(f"{'kfac-jax estimate + eigen cache':<34} {their_warm * 1e3:7.1f} ms {their_first:6.2f} s")
    print(f"{'factors only: jaxnn statistics pass':<34} {stats_warm * 1e3:7.1f} ms")
    print(f"{'factors only: kfac-jax estimate':<34} {update_warm * 1e3:7.1f} ms")
    print(f"ratio kfac-jax / jaxnn (warm): {their_warm / warm:.2f}x with the eigendecompositions, "
          f"{update_warm / stats_warm:.2f}x factors only (goal >= 1); K v relative difference {difference:.1e}")
    np.testing.assert_array_less(difference, 1e-3)  # the same matrix, or the timing compares different things


if __name__ == "__main__":
    main()
