"""Curvature engine benchmarks: both sides run in this one process on the same model, weights and data.

1. HVP time ÷ gradient time (forward-over-reverse; reverse-over-reverse shown for reference) on an MLP and on
   ResNet-20 (jaxnn.models, eval-mode batch norm). Goal ≤ 2.0.
2. Top Hessian eigenvalue of the MLP: PyHessian-style PyTorch power iteration (double backward through a retained
   gradient graph, eager, CPU; and PyHessian's dataloader mode, which rebuilds each batch's graph per product) vs
   jaxnn power_iteration (same algorithm and stopping rule |Δλ| <= 1e-4·|λ|, compiled) and jaxnn Lanczos (20
   steps). Goal: jaxnn ≥ 3× faster, values equal to 1e-3 (checked against a 60-step float32 Lanczos reference).
3. Lanczos, 20 steps over the full data set: one compiled program (scan over batches inside a while loop) vs the
   same algorithm driven from Python with 20 separate full-data HVP calls. Goal: the compiled loop is not slower.
   20 bare HVP calls (no Lanczos arithmetic) are timed too, as the floor.
4. 1× vs 10× data: time of one full-data HVP and the compiled program's memory (XLA memory_analysis: temporary
   working memory vs the argument buffers holding the data). Goal: ~10× time, same working memory.

MLP data: the first N images of the real MNIST test set (../shared/data/mnist) if present, else synthetic data of
MNIST shape. Timings are medians of warm runs (compilation excluded unless a line says "incl. compile").

    python benchmarks/bench_curvature.py            # full size (a few minutes on 2 CPU cores)
    python benchmarks/bench_curvature.py --quick    # smaller sizes (< 3 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import functools
import gzip
import os
import struct
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import jaxnn.curvature as curvature
from jaxnn.curvature import operators

MNIST_IMAGES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist", "t10k-images-idx3-ubyte.gz")


# ------------------------------------------------------------------------------------------------------ helpers


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` (its result is blocked on) over ``repeats`` warm runs."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def load_mnist(num_examples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    images_path = os.path.normpath(MNIST_IMAGES)
    labels_path = images_path.replace("images-idx3", "labels-idx1")
    if os.path.isfile(images_path) and os.path.isfile(labels_path):
        with gzip.open(images_path, "rb") as handle:
            magic, count, rows, cols = struct.unpack(">IIII", handle.read(16))
            assert magic == 0x803, f"{images_path}: expected IDX magic 0x803, got {magic:#x}"
            images = np.frombuffer(handle.read(), dtype=np.uint8).reshape(count, rows * cols)
        with gzip.open(labels_path, "rb") as handle:
            magic, _ = struct.unpack(">II", handle.read(8))
            assert magic == 0x801, f"{labels_path}: expected IDX magic 0x801, got {magic:#x}"
            labels = np.frombuffer(handle.read(), dtype=np.uint8)
        x = (images[:num_examples].astype(np.float32) / 255.0 - 0.1307) / 0.3081
        return x, labels[:num_examples].astype(np.int32), "MNIST t10k (real)"
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, 784)).astype(np.float32)
    return x, rng.integers(0, 10, num_examples).astype(np.int32), "synthetic (MNIST shape)"


def mlp_params(sizes: tuple[int, ...], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        f"dense{i}": {
            "kernel": (rng.normal(size=(a, b)) * np.sqrt(2.0 / a)).astype(np.float32),
            "bias": (0.01 * rng.normal(size=b)).astype(np.float32),
        }
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
    }


def mlp_loss(params, batch):
    x, y = batch
    h = x
    layers = sorted(params, key=lambda name: int(name[5:]))
    for name in layers[:-1]:
        h = jnp.tanh(h @ params[name]["kernel"] + params[name]["bias"])
    logits = h @ params[layers[-1]]["kernel"] + params[layers[-1]]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def random_like(params, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)), params)


# ------------------------------------------------------------------------------------------------------ 1. HVP/grad


@functools.partial(jax.jit, static_argnames=("count",))
def _repeated_products(op, x, count):
    """``count`` products of one linearisation (unrolled: no loop, so XLA:CPU convolutions stay fast)."""
    flat_matvec, _, _ = operators.flat_operator(op)
    for _ in range(count):
        x = flat_matvec(x) * 1e-3
    return x


def hvp_over_gradient(name: str, loss_fn, params, batch, repeats: int) -> None:
    gradient = jax.jit(jax.grad(loss_fn))
    v = random_like(params, 1)
    grad_time = median_seconds(lambda: gradient(params, batch), repeats)
    line = f"  {name:<34s} gradient {grad_time * 1e3:9.2f} ms"
    for mode, label in (("forward-over-reverse", "fwd-rev"), ("reverse-over-reverse", "rev-rev")):
        op = curvature.hessian(loss_fn, params, batch, mode=mode)
        hvp_time = median_seconds(lambda: op(v), repeats)
        line += f" | HVP {label} {hvp_time * 1e3:8.2f} ms ratio {hvp_time / grad_time:5.2f}"
    op = curvature.hessian(loss_fn, params, batch)
    flat_v = jax.flatten_util.ravel_pytree(v)[0]
    linearised = median_seconds(lambda: _repeated_products(op, flat_v, 10), repeats) / 10
    print(line + "   (goal fwd-rev ratio <= 2.0)")
    print(f"  {'':<34s} fwd-rev linearised once, amortised over 10 products (as inside Lanczos / power iteration "
          f"on one batch): {linearised * 1e3:.2f} ms, ratio {linearised / grad_time:.2f}")


def resnet20_loss(batch_size: int):
    """ResNet-20 from jaxnn.models (eval-mode batch norm); a local flax copy if the models package is missing."""
    try:
        from jaxnn import losses
        from jaxnn.models import count_params, get_model, init_model

        model = get_model("resnet20", num_classes=10)
        params, model_state = init_model(model, jax.random.key(0), (32, 32, 3))
        loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", model_state, mode="eval")
        source = "jaxnn.models.get_model('resnet20')"
        size = count_params(params)
    except ImportError:  # pragma: no cover - only before the models package exists
        import flax.linen as nn

        class Block(nn.Module):
            features: int
            stride: int

            @nn.compact
            def __call__(self, x):
                y = nn.Conv(self.features, (3, 3), self.stride, use_bias=False)(x)
                y = nn.relu(nn.GroupNorm(num_groups=None, group_size=self.features)(y))
                y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
                if x.shape != y.shape:
                    x = nn.Conv(self.features, (1, 1), self.stride, use_bias=False)(x)
                return nn.relu(x + y)

        class ResNet20(nn.Module):
            @nn.compact
            def __call__(self, x):
                x = nn.relu(nn.Conv(16, (3, 3), use_bias=False)(x))
                for stage, features in enumerate((16, 32, 64)):
                    for block in range(3):
                        x = Block(features, 2 if stage and not block else 1)(x)
                return nn.Dense(10)(x.mean(axis=(1, 2)))

        model = ResNet20()
        params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]

        def loss_fn(p, batch):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, batch[0]), batch[1]).mean()

        source, size = "local flax ResNet-20 (jaxnn.models missing)", curvature.validation.num_params(params)
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, batch_size).astype(np.int32))
    return loss_fn, params, batch, source, size


# ------------------------------------------------------------------------------------------------------ 2. top-1


def pyhessian_power_iteration(torch, tensors, loss, max_iters: int = 100, tol: float = 1e-3, seed: int = 0):
    """PyHessian's ``hessian.eigenvalues`` (top_n=1) in full-batch mode (``hessian(model, criterion, data=...)``):
    gradient graph built once, then v ← Hv/||Hv|| with Hv = autograd.grad(g, θ, v, retain_graph=True), stop when
    |Δλ|/(|λ|+1e-6) < tol."""
    params = list(tensors)
    grads = torch.autograd.grad(loss(), params, create_graph=True)
    return _power_loop(torch, params, lambda v: torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True),
                       max_iters, tol, seed)


def pyhessian_dataloader_power_iteration(torch, tensors, batch_losses, max_iters=100, tol=1e-3, seed=0):
    """PyHessian in dataloader mode (``hessian(model, criterion, dataloader=...)``): every product loops over the
    batches, rebuilding each batch's gradient graph (forward + backward with create_graph) and differentiating it
    again, weighting by batch size."""
    params = list(tensors)

    def product(v):
        total, count = [torch.zeros_like(p) for p in params], 0
        for loss, size in batch_losses:
            grads = torch.autograd.grad(loss(), params, create_graph=True)
            hv = torch.autograd.grad(grads, params, grad_outputs=v)
            total = [t + h * float(size) for t, h in zip(total, hv)]
            count += size
        return [t / float(count) for t in total]

    return _power_loop(torch, params, product, max_iters, tol, seed)


def _power_loop(torch, params, product, max_iters, tol, seed):
    generator = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator) for p in params]
    norm = torch.sqrt(sum((x * x).sum() for x in v))
    v = [x / norm for x in v]
    eigenvalue = None
    for iteration in range(1, max_iters + 1):
        products = product(v)
        new_eigenvalue = sum((h * x).sum() for h, x in zip(products, v)).item()
        norm = torch.sqrt(sum((h * h).sum() for h in products))
        v = [h.detach() / (norm + 1e-6) for h in products]
        if eigenvalue is not None and abs(eigenvalue - new_eigenvalue) / (abs(eigenvalue) + 1e-6) < tol:
            return new_eigenvalue, iteration
        eigenvalue = new_eigenvalue
    return eigenvalue, max_iters


def torch_mlp(torch, params):
    """The MLP in PyTorch with the same weights: (tensors, make_loss(x, y) -> loss closure)."""
    names = sorted(params, key=lambda name: int(name[5:]))
    tensors = []
    for name in names:
        tensors += [torch.tensor(np.asarray(params[name]["kernel"]), requires_grad=True),
                    torch.tensor(np.asarray(params[name]["bias"]), requires_grad=True)]

    def make_loss(x, y):
        inputs, labels = torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(y).astype(np.int64))

        def loss():
            h = inputs
            for i in range(0, len(tensors) - 2, 2):
                h = torch.tanh(h @ tensors[i] + tensors[i + 1])
            return torch.nn.functional.cross_entropy(h @ tensors[-2] + tensors[-1], labels)

        return loss

    return tensors, make_loss


def _time_runs(run, repeats):
    """(median warm seconds, first-call seconds incl. compilation, outputs)."""
    start = time.perf_counter()
    outputs = [jax.block_until_ready(run(1000))]
    cold = time.perf_counter() - start
    times = []
    for seed in range(repeats):
        start = time.perf_counter()
        outputs.append(jax.block_until_ready(run(seed)))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), cold, outputs


TOL = 1e-4  # power-iteration stopping rule |Δλ| <= tol·|λ| on both sides (PyHessian's default 1e-3 stops short of 1e-3
# accuracy when λ₂/λ₁ is close to 1, as for this MLP)
LANCZOS_STEPS = 20


def top_eigenvalue_vs_pyhessian(params, batches, repeats: int) -> None:
    try:
        import torch
    except ImportError:
        print("  PyTorch is not installed: skipped (pip install 'jaxnn[test]')")
        return
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    tensors, make_loss = torch_mlp(torch, params)
    torch_batches = [(make_loss(bx, by), len(by)) for bx, by in batches]
    torch_full = make_loss(x, y)
    settings = {
        f"one batch of {len(y)}": (
            curvature.hessian(mlp_loss, params, (x, y)),
            lambda seed: pyhessian_power_iteration(torch, tensors, torch_full, tol=TOL, seed=seed),
        ),
        f"{len(batches)} batches of {len(batches[0][1])} (PyHessian dataloader mode)": (
            curvature.hessian(mlp_loss, params, batches),
            lambda seed: pyhessian_dataloader_power_iteration(torch, tensors, torch_batches, tol=TOL, seed=seed),
        ),
    }
    for setting, (op, torch_run) in settings.items():
        reference = float(curvature.lanczos(op, jax.random.key(99), 60, k=1, progress=False).top_eigenvalues[0])
        torch_times, torch_values, torch_iters = [], [], []
        for seed in range(repeats):
            start = time.perf_counter()
            value, iters = torch_run(seed)
            torch_times.append(time.perf_counter() - start)
            torch_values.append(value)
            torch_iters.append(iters)
        torch_time = float(np.median(torch_times))
        worst = lambda values: max(abs(v / reference - 1) for v in values)
        print(f"  {setting}: reference λmax (jaxnn Lanczos, 60 steps) {reference:.6f}")
        print(f"    PyTorch PyHessian-style power iteration  {torch_time * 1e3:9.1f} ms  (iterations {torch_iters}, "
              f"max rel. diff to reference {worst(torch_values):.1e})")
        power = _time_runs(
            lambda seed: curvature.power_iteration(op, jax.random.key(seed), 100, TOL, progress=False), repeats
        )
        lanczos = _time_runs(
            lambda seed: curvature.top_eigenvalues(op, 1, jax.random.key(seed), num_iters=LANCZOS_STEPS, progress=False)[0],
            repeats,
        )
        for name, (warm, cold, outputs), values in (
            ("jaxnn power_iteration (same rule)", power, [float(r.eigenvalues[0]) for r in power[2]]),
            (f"jaxnn Lanczos ({LANCZOS_STEPS} steps)", lanczos, [float(r[0]) for r in lanczos[2]]),
        ):
            extra = f", iterations {int(outputs[0].num_iterations[0])}" if "power" in name else ""
            print(f"    {name:<38s} {warm * 1e3:9.1f} ms  speed-up {torch_time / warm:5.1f}x (first call incl. "
                  f"compile {cold * 1e3:.0f} ms){extra}, max rel. diff to reference {worst(values):.1e}")
    print("  goal: >= 3x faster (warm), same value to 1e-3")


# ------------------------------------------------------------------------------------------------------ 3. and 4.


def python_driven_lanczos(op, v0, num_iters: int):
    """The same Lanczos (full re-orthogonalisation, CGS2) written as a Python loop: one HVP call per step, the
    re-orthogonalisation in eager jax.numpy between calls, Ritz values from the tridiagonal matrix at the end."""
    flat0, unravel = jax.flatten_util.ravel_pytree(v0)
    basis = [flat0 / jnp.linalg.norm(flat0)]
    alphas, betas = [], []
    for j in range(num_iters):
        w = jax.flatten_util.ravel_pytree(op(unravel(basis[j])))[0]
        stacked = jnp.stack(basis)
        first = stacked @ w
        w = w - first @ stacked
        second = stacked @ w
        w = w - second @ stacked
        alphas.append(first[j] + second[j])
        betas.append(jnp.linalg.norm(w))
        basis.append(w / betas[-1])
    tridiagonal = jnp.diag(jnp.stack(alphas)) + jnp.diag(jnp.stack(betas[:-1]), 1) + jnp.diag(jnp.stack(betas[:-1]), -1)
    return jnp.linalg.eigvalsh(tridiagonal)


def lanczos_vs_python_loop(params, batches, repeats: int) -> None:
    op = curvature.hessian(mlp_loss, params, batches)
    v0 = random_like(params, 2)

    def bare_hvps():
        v = v0
        for _ in range(20):
            v = jax.tree.map(lambda leaf: leaf / 100.0, op(v))  # keep the numbers tame; no host sync
        return v

    compiled = lambda: curvature.lanczos(op, jax.random.key(0), 20, k=1, compute_residuals=False, progress=False)
    bare_time = median_seconds(bare_hvps, repeats)
    python_time = median_seconds(lambda: python_driven_lanczos(op, v0, 20), repeats)
    lanczos_time = median_seconds(compiled, repeats)
    top_python = float(python_driven_lanczos(op, v0, 20)[-1])
    top_compiled = float(compiled().top_eigenvalues[0])
    print(f"  {len(batches)} batches, {op.num_examples} examples, {op.num_params} parameters; both Lanczos give "
          f"λmax {top_compiled:.5f} / {top_python:.5f}")
    print(f"  Lanczos k=20 driven from Python (20 separate HVP calls + eager re-orth.) {python_time * 1e3:9.1f} ms")
    print(f"  Lanczos k=20 compiled (one program: scan over batches inside a while loop) {lanczos_time * 1e3:8.1f} ms"
          f"   ratio compiled/Python {lanczos_time / python_time:5.2f}  (goal <= 1.0)")
    print(f"  (20 bare HVP calls, no Lanczos arithmetic: {bare_time * 1e3:.1f} ms; compiled Lanczos / bare HVPs "
          f"{lanczos_time / bare_time:.2f})")


def data_scaling(params, batches, repeats: int) -> None:
    v = random_like(params, 3)
    rows = []
    for factor in (1, 10):
        op = curvature.hessian(mlp_loss, params, batches * factor)
        memory = operators._apply_jit.lower(op, v).compile().memory_analysis()
        seconds = median_seconds(lambda: op(v), repeats)
        rows.append((factor, op.num_batches, seconds, memory))
        print(f"  {factor:2d}x data: {op.num_batches:3d} batches  HVP {seconds * 1e3:9.1f} ms  "
              f"working (temp) memory {memory.temp_size_in_bytes / 2**20:8.2f} MiB  "
              f"arguments (params + data) {memory.argument_size_in_bytes / 2**20:8.2f} MiB")
    (_, _, t1, m1), (_, _, t10, m10) = rows
    print(f"  time ratio 10x/1x {t10 / t1:5.2f} (goal ~10)   working-memory ratio "
          f"{m10.temp_size_in_bytes / max(m1.temp_size_in_bytes, 1):5.2f} (goal 1.0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models and data (< 3 minutes on 2 CPU cores)")
    args = parser.parse_args()
    quick = args.quick
    sizes = (784, 64, 10) if quick else (784, 128, 10)
    num_examples = 1024 if quick else 2048
    batch_size = 256
    repeats = 3 if quick else 5
    x, y, source = load_mnist(num_examples)
    params = jax.tree.map(jnp.asarray, mlp_params(sizes))
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, num_examples, batch_size)]
    full = (x, y)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, float32; MLP {'-'.join(map(str, sizes))} "
          f"({curvature.hessian(mlp_loss, params, batches[0]).num_params} parameters), {source}")

    print("\n1. HVP time / gradient time")
    hvp_over_gradient(f"MLP, batch {num_examples}", mlp_loss, params, full, 10 if quick else 20)
    loss_fn, resnet_params, resnet_batch, resnet_source, resnet_size = resnet20_loss(16 if quick else 64)
    hvp_over_gradient(f"ResNet-20 ({resnet_size} params), batch {resnet_batch[0].shape[0]}", loss_fn, resnet_params,
                      resnet_batch, repeats)
    print(f"  (ResNet-20: {resnet_source}, eval-mode batch norm)")

    print(f"\n2. Top-1 Hessian eigenvalue, MLP, {num_examples} examples: jaxnn vs PyHessian-style PyTorch (CPU)")
    top_eigenvalue_vs_pyhessian(params, [(x[i : i + 128], y[i : i + 128]) for i in range(0, num_examples, 128)], repeats)

    print("\n3. Lanczos k=20 over the full data set vs 20 separate HVP calls")
    lanczos_vs_python_loop(params, batches, repeats)

    print("\n4. 1x vs 10x data (one full-data HVP, scan over batches)")
    data_scaling(params, batches[:4], repeats)


if __name__ == "__main__":
    main()
