"""Every layer's λmax at once vs the whole model's, in one process, on the same weights and data.

Issue 21's goal: ``block_spectra`` over L layer blocks (one compiled program, each block a Lanczos run on the loss as
a function of that layer alone) takes ≤ 0.6 × L × the time of the whole-model λmax (``top_eigenvalues``, the same
number of Lanczos steps). A block's product needs the tangent pass only from its layer on and the backward pass only
down to it, so blocks of early and late layers cost less than a full HVP; this script also prints each block's
product time against a full product.

Models: the main job's MLP (digits 64-256-256-10, 512 examples) and, unless ``--skip-resnet``, ResNet-20 (CIFAR
shape, random images, batch 32). Timings are warm medians (11 calls on the MLP, 3 on ResNet-20); compile times are printed apart.

    python benchmarks/bench_blocks.py [--iters 20] [--skip-resnet]
"""

from __future__ import annotations

import argparse

from _timing import timed  # benchmarks/_timing.py: the scripts run from this folder



def compare(label, loss_fn, params, batch, iters: int, repeats: int = 3) -> None:
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from jaxnn import curvature
    from jaxnn.curvature.operators import flat_operator, precise_jit

    H = curvature.hessian(loss_fn, params, batch)
    layers = curvature.layer_names(params)
    whole_first, whole, _ = timed(lambda: curvature.top_eigenvalues(H, k=1, num_iters=iters, tol=None,
                                                                   progress=False).values, repeats)
    blocks_first, blocks, _ = timed(lambda: np.asarray([b.top for b in curvature.block_spectra(
        H, k=1, num_iters=iters, num_probes=1).blocks]), repeats)
    print(f"{label}: {H.num_params:,} parameters, {len(layers)} layer blocks, {iters} Lanczos steps each, "
          f"loop mode {H.loop_mode}")
    print(f"  whole-model lambda_max   warm {whole * 1e3:8.1f} ms (first call {whole_first:.2f} s)")
    print(f"  every layer's lambda_max warm {blocks * 1e3:8.1f} ms (first call {blocks_first:.2f} s)")
    print(f"  RATIO blocks / (L x whole) = {blocks / (len(layers) * whole):.2f}   (goal <= 0.6)")

    @precise_jit
    def product(op, v):
        return flat_operator(op)[0](v)

    _, full, _ = timed(lambda: product(H, ravel_pytree(H.params)[0]), repeats=5)
    for layer in layers:
        block = curvature.restrict(H, layer)
        vector = ravel_pytree(block.params)[0]
        _, block_time, _ = timed(lambda: product(block, vector), repeats=5)
        print(f"  product of block {layer:28s} {block.num_params:>9,} params  {block_time / full:5.2f} x a full HVP")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxnn import data as data_lib, losses, models

    digits = data_lib.load_dataset("digits", seed=0)
    model = models.get_model("mlp", num_classes=10, width=256, depth=2)
    params, state = models.init_model(model, jax.random.PRNGKey(0), digits.input_shape)
    batch = (digits.train.x[:512], digits.train.y[:512])
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    compare("main job MLP 64-256-256-10", losses.make_loss_fn(model.apply, "softmax_cross_entropy", state), params,
            batch, args.iters, repeats=11)  # ~0.1 s calls: a median of 3 moved the ratio 0.23-0.65
    if not args.skip_resnet:
        model = models.get_model("resnet", num_classes=10, depth=20)
        params, state = models.init_model(model, jax.random.PRNGKey(0), (32, 32, 3))
        images = jax.random.normal(jax.random.PRNGKey(1), (32, 32, 32, 3))
        compare("ResNet-20 (CIFAR shape, batch 32)", losses.make_loss_fn(model.apply, "softmax_cross_entropy", state),
                params, (images, jnp.arange(32) % 10), args.iters)


if __name__ == "__main__":
    main()
