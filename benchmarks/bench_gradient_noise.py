"""Per-example gradient statistics vs one plain gradient of the same batch, in one process.

Issue 22's goal: ``diagnostics.gradient_noise`` (every example's gradient by vmap, their covariance trace, |G|², the
noise scale and per-layer signal-to-noise) costs at most 3x ``jax.grad`` of the batch-mean loss on the same batch.
Both compiled once (compile times printed apart), warm medians of interleaved rounds compared (random order
each round: the machine's slow spells hit both sides). Models: the main job's MLP (digits
64-256-256-10) and LeNet, batch 256; ``--chunk`` is the number of per-example gradients vmapped at a time.

    python benchmarks/bench_gradient_noise.py [--batch 256] [--chunk 256] [--repeats 21]
"""

from __future__ import annotations

import argparse

from _timing import interleaved, timed  # benchmarks/_timing.py: the scripts run from this folder



def compare(label, model, data, batch_size, chunk, repeats) -> None:
    import jax
    import jax.numpy as jnp

    from jaxnn import losses, models
    from jaxnn.diagnostics import gradient_noise

    params = models.init_model(model, jax.random.PRNGKey(0), data.input_shape)[0]
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy")
    batch = (jnp.asarray(data.train.x[:batch_size]), jnp.asarray(data.train.y[:batch_size]))
    grad = jax.jit(jax.grad(loss_fn))
    sides = {"plain": lambda: grad(params, batch),
             "noise": lambda: gradient_noise(loss_fn, params, batch, chunk_size=chunk).noise_scale}
    plain_first, _, _ = timed(sides["plain"], 1)  # compiled here; the warm medians from interleaved rounds
    noise_first, _, _ = timed(sides["noise"], 1)
    warm = interleaved(sides, repeats)
    plain, noise = warm["plain"], warm["noise"]
    print(f"{label}, batch {batch_size}: plain gradient warm {plain * 1e3:7.2f} ms (first {plain_first:.2f} s); "
          f"gradient_noise warm {noise * 1e3:7.2f} ms (first {noise_first:.2f} s)")
    print(f"  RATIO gradient_noise / plain gradient = {noise / plain:.2f}   (goal <= 3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()

    import jax

    from jaxnn import data as data_lib, models

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    digits = data_lib.load_dataset("digits", seed=0)
    compare("main job MLP 64-256-256-10", models.get_model("mlp", num_classes=10, width=256, depth=2), digits,
            args.batch, args.chunk, args.repeats)
    compare("LeNet", models.get_model("lenet", num_classes=10), digits, args.batch, args.chunk, args.repeats)


if __name__ == "__main__":
    main()
