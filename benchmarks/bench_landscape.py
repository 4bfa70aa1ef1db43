"""2-D loss+accuracy surfaces over 2,000 real MNIST images: jaxnn vs the reference tool's structure in PyTorch, and vs a
jitted per-point loop in JAX. Prints ratios (both sides in this one process, same weights, directions and data).

Sides, per model:
* jaxnn ``plane_surface`` (strategy "auto": vmapped chunks for dense nets, one compiled call per point for
  convolutional nets on CPU; the parameter-linear first layer factored out of the grid either way);
* the reference tool's structure (tomgoldstein/loss-landscape ``eval_loss``), PyTorch eager: for each grid point set
  the weights θ + αd₁ + βd₂ in place, then loop over a mini-batch loader summing ``loss.item()·B`` and
  ``correct.item()``; PyTorch at its best of 1 and 2 threads;
* a plain jitted per-point loop in JAX (weights set and loss + accuracy evaluated in one compiled call per point).
The two loops are slow, so they are timed on a subset of the grid points and extrapolated to the whole grid (the
printout says so); their values are checked against jaxnn's on those points (losses to 1e-5 relative).

Models: 784-512-10 and 784-128-128-10 MLPs (He init) and a LeNet (jaxnn.models "lenet": conv5x5 6 - pool - conv5x5
16 - pool - 120 - 84 - 10, SAME padding) on 28x28 images. Directions filter-normalised (Li et al.).
Goals (CPU): LeNet >= 1x the PyTorch loop, MLPs >= 5x; on accelerators >= 10x (report when measured).

    python benchmarks/bench_landscape.py            # all three models, ~5 minutes on 2 CPU cores
    python benchmarks/bench_landscape.py --quick    # smaller grids and subsets
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

from jaxnn import losses, models
from jaxnn.landscape import filter_normalized_direction, plane_surface

MNIST_IMAGES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist",
                            "t10k-images-idx3-ubyte.gz")


def load_data(num_examples: int, seed: int, mnist_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    images_path = os.path.normpath(MNIST_IMAGES if mnist_dir is None else
                                   os.path.join(mnist_dir, os.path.basename(MNIST_IMAGES)))
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


# ------------------------------------------------------------------------------------------------ models, both sides


def jax_model(name: str):
    """(params, loss_fn, accuracy_fn, input shape) of a jaxnn model, eval mode."""
    if name == "lenet":
        model, shape = models.get_model("lenet", num_classes=10), (28, 28, 1)
    else:
        widths = [int(s) for s in name.split("-")[1:-1]]
        model, shape = models.get_model("mlp", num_classes=10, features=widths, kernel_init="he"), (784,)
    params, state = models.init_model(model, jax.random.key(0), shape)
    return (params, losses.make_loss_fn(model.apply, "softmax_cross_entropy", state),
            losses.make_metric_fn(model.apply, state), shape)


def torch_model(torch, name: str, params):
    """The same network in PyTorch (float32) with jaxnn's weights; returns (module, [(torch param, jax path)])."""
    nn, F = torch.nn, torch.nn.functional
    pairs = []

    def dense(p, key):
        layer = nn.Linear(*np.shape(p[key]["kernel"]))
        pairs.extend([(layer.weight, (key, "kernel", "dense")), (layer.bias, (key, "bias", "vector"))])
        return layer

    if name == "lenet":
        class LeNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.convs = nn.ModuleList()
                for i in range(2):
                    kernel = np.shape(params[f"conv_{i}"]["kernel"])
                    conv = nn.Conv2d(kernel[2], kernel[3], kernel[0], padding=kernel[0] // 2)
                    pairs.extend([(conv.weight, (f"conv_{i}", "kernel", "conv")),
                                  (conv.bias, (f"conv_{i}", "bias", "vector"))])
                    self.convs.append(conv)
                self.dense = nn.ModuleList([dense(params, "dense_0"), dense(params, "dense_1"), dense(params, "head")])

            def forward(self, x):
                for conv in self.convs:
                    x = F.max_pool2d(F.relu(conv(x)), 2)
                x = x.permute(0, 2, 3, 1).flatten(1)  # jaxnn flattens NHWC features in (H, W, C) order
                x = F.relu(self.dense[0](x))
                x = F.relu(self.dense[1](x))
                return self.dense[2](x)

        module = LeNet()
    else:
        layers, names = [], [k for k in params if k.startswith("dense_")] + ["head"]
        for index, key in enumerate(names):
            layers.append(dense(params, key))
            if index < len(names) - 1:
                layers.append(nn.ReLU())
        module = nn.Sequential(*layers)
    return module.eval(), pairs


def torch_layout(array, kind):
    array = np.asarray(array, dtype=np.float32)
    if kind == "dense":
        return array.T.copy()
    if kind == "conv":
        return array.transpose(3, 2, 0, 1).copy()
    return array.copy()


# ------------------------------------------------------------------------------------------------ the loops


def torch_reference_loop(torch, module, pairs, params, d1, d2, x, y, batch_size, points, device="cpu"):
    """loss-landscape's structure: per point set the weights in place, then eval_loss over a mini-batch loader.
    On a GPU the model, the directions and the whole loader are placed on it once (stronger than the tool, which
    copies each batch to the GPU inside the loop)."""
    F = torch.nn.functional
    module.to(device)
    as_torch = lambda tree: [torch.from_numpy(torch_layout(tree[key][leaf], kind)).to(device)
                             for _, (key, leaf, kind) in pairs]
    theta, u, v = as_torch(params), as_torch(d1), as_torch(d2)
    loader = [(torch.from_numpy(x[i:i + batch_size]).to(device),
               torch.from_numpy(y[i:i + batch_size].astype(np.int64)).to(device))
              for i in range(0, len(x), batch_size)]
    values = []
    with torch.no_grad():
        for alpha, beta in points:
            for (param, _), t0, t1, t2 in zip(pairs, theta, u, v):
                param.copy_(t0 + float(alpha) * t1 + float(beta) * t2)
            total_loss, correct, total = 0.0, 0, 0
            for inputs, targets in loader:
                outputs = module(inputs)
                total_loss += F.cross_entropy(outputs, targets).item() * len(targets)
                correct += outputs.argmax(1).eq(targets).sum().item()
                total += len(targets)
            values.append((total_loss / total, correct / total))
    return np.array(values)


def jax_point_loop(loss_fn, accuracy_fn, params, d1, d2, data, points):
    @jax.jit
    def set_weights_and_evaluate(alpha, beta):
        point = jax.tree.map(lambda t, u, v: t + alpha * u + beta * v, params, d1, d2)
        return loss_fn(point, data), accuracy_fn(point, data)

    jax.block_until_ready(set_weights_and_evaluate(0.0, 0.0))  # compile outside the timing
    start = time.perf_counter()
    results = jax.block_until_ready([set_weights_and_evaluate(float(a), float(b)) for a, b in points])
    return np.array([[float(l), float(a)] for l, a in results]), time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ one model


def run_model(name, x, y, grid, subset, batch_size, chunk_size, repeats, torch, torch_device="cpu"):
    params, loss_fn, accuracy_fn, shape = jax_model(name)
    xs = x.reshape((-1, *shape))
    d1 = filter_normalized_direction(jax.random.key(1), params)
    d2 = filter_normalized_direction(jax.random.key(2), params)
    coordinates = np.linspace(-1.0, 1.0, grid)
    grid_a, grid_b = np.meshgrid(coordinates, coordinates, indexing="ij")
    all_points = np.stack([grid_a.ravel(), grid_b.ravel()], axis=1)
    subset_index = np.linspace(0, len(all_points) - 1, min(subset, len(all_points))).round().astype(int)
    batches = [(xs[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(xs), batch_size)]
    num_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    print(f"\n{name} ({num_params:,} parameters), {len(x)} examples in batches of {batch_size}, {grid}x{grid} = "
          f"{len(all_points)} points; loops timed on {len(subset_index)} of them and extrapolated")

    jaxnn_runs, loop_runs, torch_runs = [], [], []
    surface = None
    for _ in range(repeats):  # interleaved, best of `repeats` each
        surface = plane_surface(loss_fn, params, d1, d2, coordinates, coordinates, batches, accuracy_fn=accuracy_fn,
                                chunk_size=chunk_size, progress=False)
        jaxnn_runs.append(surface.timing)
        loop_values, seconds = jax_point_loop(loss_fn, accuracy_fn, params, d1, d2, (jnp.asarray(xs), jnp.asarray(y)),
                                              all_points[subset_index])
        loop_runs.append(seconds)
        if torch is not None:
            best = None
            for threads in (1, 2) if torch_device == "cpu" else (None,):
                if threads is not None:
                    torch.set_num_threads(threads)
                module, pairs = torch_model(torch, name, params)
                start = time.perf_counter()
                torch_values = torch_reference_loop(torch, module, pairs, params, d1, d2,
                                                    np.asarray(xs.transpose(0, 3, 1, 2) if name == "lenet" else xs),
                                                    y, batch_size, all_points[subset_index], torch_device)
                elapsed = time.perf_counter() - start
                best = elapsed if best is None else min(best, elapsed)
            torch_runs.append(best)
    run = min(jaxnn_runs, key=lambda t: t["run_seconds"])
    strategy = "python" if run.get("python_loop") else "vmap"
    scale = len(all_points) / len(subset_index)
    loop_total = min(loop_runs) * scale
    losses_on_subset = surface.losses.ravel()[subset_index]
    loop_diff = float(np.max(np.abs(losses_on_subset - loop_values[:, 0]) / np.abs(loop_values[:, 0])))
    print(f"  jaxnn plane_surface ({strategy}): run {run['run_seconds']:.2f} s, compile {run['compile_seconds']:.2f} s")
    print(f"  JAX jitted per-point loop: {loop_total:.2f} s extrapolated (max rel. loss diff to jaxnn {loop_diff:.1e})")
    if torch is not None:
        torch_total = min(torch_runs) * scale
        accuracy_diff = float(np.max(np.abs(surface.accuracies.ravel()[subset_index] - torch_values[:, 1])))
        torch_diff = float(np.max(np.abs(losses_on_subset - torch_values[:, 0]) / np.abs(torch_values[:, 0])))
        print(f"  PyTorch reference structure (eager on {torch_device}, weights set per point, loader of {batch_size}): "
              f"{torch_total:.2f} s extrapolated (max rel. loss diff {torch_diff:.1e}, accuracy diff "
              f"{accuracy_diff:.1e})")
        print(f"  RATIO PyTorch loop / jaxnn (run):           {torch_total / run['run_seconds']:6.2f}x")
        print(f"  RATIO PyTorch loop / jaxnn (incl. compile): "
              f"{torch_total / (run['run_seconds'] + run['compile_seconds']):6.2f}x")
    print(f"  RATIO JAX per-point loop / jaxnn (run):     {loop_total / run['run_seconds']:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp-512-10,mlp-128-128-10,lenet")
    parser.add_argument("--grid", type=int, default=51, help="points per axis for the MLPs")
    parser.add_argument("--lenet-grid", type=int, default=21, help="points per axis for the LeNet")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--subset", type=int, default=60, help="grid points timed in the loops")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="21x21 / 9x9 grids, 20-point subsets, one repeat")
    parser.add_argument("--mnist-dir", default=None, help="folder of t10k-images-idx3-ubyte.gz and its labels "
                        "(default: ../shared/data/mnist)")
    parser.add_argument("--torch-device", default=None, help="PyTorch's device (default: cuda when PyTorch sees a "
                        "GPU, else cpu)")
    args = parser.parse_args()
    if args.quick:
        args.grid, args.lenet_grid, args.subset, args.repeats = 21, 9, 20, 1
    try:
        import torch
    except ImportError:
        torch = None
        print("PyTorch is not installed (pip install -e '.[test]'): the reference-structure side is skipped")
    torch_device = args.torch_device or ("cuda" if torch is not None and torch.cuda.is_available() else "cpu")
    x, y, source = load_data(args.examples, seed=0, mnist_dir=args.mnist_dir)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPU cores visible); data: {source}")
    for name in args.models.split(","):
        run_model(name, x, y, args.lenet_grid if name == "lenet" else args.grid, args.subset, args.batch_size,
                  args.chunk_size, args.repeats, torch, torch_device)


if __name__ == "__main__":
    main()
