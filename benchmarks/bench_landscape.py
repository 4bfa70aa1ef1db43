"""51×51 loss+accuracy surface of an MNIST-sized MLP over 2,000 examples: jaxnn vs a per-point loop.

The per-point loop has the reference tool's structure (tomgoldstein/loss-landscape): for each grid point set the
weights θ + αd₁ + βd₂, evaluate loss and accuracy on the data, repeat. To make it fair it is a single jitted
function per point (weights set and loss+accuracy evaluated in one compiled call, all 2,000 examples as one batch,
asynchronous dispatch, one sync at the end) — faster than the reference tool itself, which evaluates in
mini-batches with a host sync per batch. Because it is slow, the loop is timed on a subset of the grid points and
extrapolated to all of them (the printout says so). jaxnn: ``plane_surface`` (one compiled program, vmapped chunks,
lax.map over chunks, scan over batches), with and without ``factor_linear_ops``. On a CPU the per-point forward pass
is compute-bound, so vmapping alone gains nothing (the "without factoring" row); the gain comes from computing the
parameter-linear first layer once per direction instead of once per point, so it is largest when that layer
dominates the FLOPs (784-512-10) and smaller when a hidden 128x128 layer remains per point (784-128-128-10).

Data: the first 2,000 images of the real MNIST test set (../shared/data/mnist, IDX gzipped) if present, else
synthetic data of MNIST shape. Parameters: He-initialised, directions filter-normalised (Li et al.).

    python benchmarks/bench_landscape.py            # both MLPs, 51×51, ~2-3 minutes on 2 CPU cores
    python benchmarks/bench_landscape.py --quick    # 784-512-10 only, 21×21
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.landscape import filter_normalized_direction, plane_surface

MNIST_IMAGES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist",
                            "t10k-images-idx3-ubyte.gz")


def load_data(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    images_path = os.path.normpath(MNIST_IMAGES)
    labels_path = images_path.replace("images-idx3", "labels-idx1")
    if os.path.isfile(images_path) and os.path.isfile(labels_path):
        with gzip.open(images_path, "rb") as handle:
            magic, count, rows, cols = struct.unpack(">IIII", handle.read(16))
            assert magic == 0x803, f"{images_path}: expected IDX image magic 0x803, got {magic:#x}"
            images = np.frombuffer(handle.read(), dtype=np.uint8).reshape(count, rows * cols)
        with gzip.open(labels_path, "rb") as handle:
            magic, count = struct.unpack(">II", handle.read(8))
            assert magic == 0x801, f"{labels_path}: expected IDX label magic 0x801, got {magic:#x}"
            labels = np.frombuffer(handle.read(), dtype=np.uint8)
        x = images[:num_examples].astype(np.float32) / 255.0
        x = (x - 0.1307) / 0.3081
        return x, labels[:num_examples].astype(np.int32), "MNIST t10k (real)"
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(num_examples, 784)).astype(np.float32),
            rng.integers(0, 10, num_examples).astype(np.int32), "synthetic (MNIST shape)")


def init_mlp(key: jax.Array, sizes: list[int]) -> list[dict]:
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"kernel": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), "bias": jnp.zeros(b)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def logits_fn(params: list[dict], x: jax.Array) -> jax.Array:
    for index, layer in enumerate(params):
        x = x @ layer["kernel"] + layer["bias"]
        if index < len(params) - 1:
            x = jax.nn.relu(x)
    return x


def loss_fn(params, batch):
    x, y = batch
    log_probs = jax.nn.log_softmax(logits_fn(params, x))
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def accuracy_fn(params, batch):
    x, y = batch
    return jnp.mean((jnp.argmax(logits_fn(params, x), axis=-1) == y).astype(jnp.float32))


def per_point_loop(params, d1, d2, data, points: np.ndarray) -> tuple[np.ndarray, float]:
    """Reference-tool structure: per point, set weights and evaluate (one jitted call); returns values, seconds."""

    @jax.jit
    def set_weights_and_evaluate(alpha, beta):
        point = jax.tree.map(lambda t, u, v: t + alpha * u + beta * v, params, d1, d2)
        return loss_fn(point, data), accuracy_fn(point, data)

    jax.block_until_ready(set_weights_and_evaluate(0.0, 0.0))  # compile outside the timing
    start = time.perf_counter()
    results = [set_weights_and_evaluate(float(a), float(b)) for a, b in points]
    results = jax.block_until_ready(results)
    seconds = time.perf_counter() - start
    return np.array([[float(l), float(a)] for l, a in results]), seconds


def run_model(sizes: list[int], x: np.ndarray, y: np.ndarray, grid: int, subset: int, chunk_size: int,
              batch_size: int, repeats: int, skip_unfactored: bool) -> dict:
    params = init_mlp(jax.random.key(0), sizes)
    d1 = filter_normalized_direction(jax.random.key(1), params)
    d2 = filter_normalized_direction(jax.random.key(2), params)
    coordinates = np.linspace(-1.0, 1.0, grid)
    grid_a, grid_b = np.meshgrid(coordinates, coordinates, indexing="ij")
    all_points = np.stack([grid_a.ravel(), grid_b.ravel()], axis=1)
    subset_index = np.linspace(0, len(all_points) - 1, min(subset, len(all_points))).round().astype(int)
    full = (jnp.asarray(x), jnp.asarray(y))
    batches = [(jnp.asarray(x[i:i + batch_size]), jnp.asarray(y[i:i + batch_size]))
               for i in range(0, len(x), batch_size)]
    num_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    print(f"\nMLP {'-'.join(map(str, sizes))} ({num_params:,} parameters), {len(x)} examples, {grid}x{grid} = "
          f"{len(all_points)} points; jaxnn: chunk_size={chunk_size}, {len(batches)} batch(es) of {batch_size}")

    loop_seconds, jaxnn_runs, plain_runs = [], [], []
    surface = None
    for repeat in range(repeats):  # interleaved, best of `repeats`, to be fair under a shared, noisy machine
        loop_values, seconds = per_point_loop(params, d1, d2, full, all_points[subset_index])
        loop_seconds.append(seconds)
        surface = plane_surface(loss_fn, params, d1, d2, coordinates, coordinates, batches, accuracy_fn=accuracy_fn,
                                chunk_size=chunk_size, progress=False)
        jaxnn_runs.append(surface.timing)
        if not skip_unfactored:  # slow (as slow as the loop on CPU): a 17x17 sub-grid, extrapolated
            sub = coordinates[np.linspace(0, grid - 1, min(grid, 17)).round().astype(int)]
            plain = plane_surface(loss_fn, params, d1, d2, sub, sub, batches, accuracy_fn=accuracy_fn,
                                  chunk_size=chunk_size, factor_linear_ops=False, progress=False)
            plain_runs.append({k: v * len(all_points) / sub.size**2 if k == "run_seconds" else v
                               for k, v in plain.timing.items()})
    loop_per_point = min(loop_seconds) / len(subset_index)
    loop_total = loop_per_point * len(all_points)
    best = min(jaxnn_runs, key=lambda t: t["run_seconds"])
    grid_losses = surface.losses.ravel()[subset_index]
    grid_accuracy = surface.accuracies.ravel()[subset_index]
    loss_diff = float(np.max(np.abs(grid_losses - loop_values[:, 0]) / np.maximum(1.0, np.abs(loop_values[:, 0]))))
    accuracy_diff = float(np.max(np.abs(grid_accuracy - loop_values[:, 1])))
    print(f"  per-point loop (jitted set-weights+evaluate): {min(loop_seconds):.3f} s for {len(subset_index)} points "
          f"(timed subset) -> {loop_per_point * 1e3:.3f} ms/point -> {loop_total:.2f} s extrapolated to "
          f"{len(all_points)} points")
    print(f"  jaxnn plane_surface (factor_linear_ops=True):  run {best['run_seconds']:.3f} s, "
          f"compile {best['compile_seconds']:.3f} s")
    result = {"loop_total": loop_total, "jaxnn_run": best["run_seconds"], "jaxnn_compile": best["compile_seconds"]}
    if plain_runs:
        plain_best = min(plain_runs, key=lambda t: t["run_seconds"])
        print(f"  jaxnn plane_surface (factor_linear_ops=False): run {plain_best['run_seconds']:.3f} s "
              f"(timed on a 17x17 sub-grid, extrapolated), compile {plain_best['compile_seconds']:.3f} s")
        result["plain_run"] = plain_best["run_seconds"]
    print(f"  agreement on the {len(subset_index)} common points: max relative loss difference {loss_diff:.2e}, "
          f"max accuracy difference {accuracy_diff:.2e} (float32)")
    print(f"  RATIO per-point loop / jaxnn (run time):             {loop_total / best['run_seconds']:.1f}x")
    print(f"  RATIO per-point loop / jaxnn (jaxnn incl. compile):  "
          f"{loop_total / (best['run_seconds'] + best['compile_seconds']):.1f}x")
    if plain_runs:
        print(f"  RATIO per-point loop / jaxnn without factoring (run): {loop_total / result['plain_run']:.1f}x")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="784-512-10,784-128-128-10")
    parser.add_argument("--grid", type=int, default=51)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--subset", type=int, default=300, help="grid points timed in the per-point loop")
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=250, help="jaxnn's batches (the loop uses one batch)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-unfactored", action="store_true")
    parser.add_argument("--quick", action="store_true", help="784-512-10 only, 21x21, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.models, args.grid, args.repeats, args.subset = "784-512-10", 21, 1, 100
    x, y, source = load_data(args.examples, seed=0)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPU cores visible); data: {source}")
    for model in args.models.split(","):
        run_model([int(s) for s in model.split("-")], x, y, args.grid, args.subset, args.chunk_size,
                  args.batch_size, args.repeats, args.skip_unfactored)


if __name__ == "__main__":
    main()
