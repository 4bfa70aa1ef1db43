"""Sequence models: training-step throughput of the LSTM and the Transformer, and the Transformer's HVP cost.
Both sides of each ratio run in this one process on the same model, data and batch; prints ratios.

    python benchmarks/bench_sequence.py [--steps 200] [--batch 64] [--length 32] [--features 16]

For each model (LSTM: 1 layer of 128 units; Transformer: 2 pre-LN blocks, dim 64, 4 heads, MLP 128, learned
positions, mean-pooled), on random sequences (batch, length, features) with random labels (a timing only):
1. jaxnn's compiled train step (``make_train_step``: loss, accuracy and lr every step, the norms every 50th) ÷ a
   minimal hand-written step on the same Flax module (jit of ``value_and_grad`` + ``optax.adam``).  goal >= 0.95
   Also shown: jaxnn's step without donating the state (``donate=False``, ``fit(..., donate=False)``; by default
   fit donates, which on CPU costs the LSTM's step and saves a small MLP's: see ``make_train_step``).
2. jaxnn ÷ the same architecture in PyTorch eager (``nn.LSTM``; ``nn.TransformerEncoder`` with ``norm_first``,
   GELU), best of 1 and 2 threads.  (reported)
Tokens per second = batch · length · steps per second. Compile time (the first call) is reported apart.
3. Transformer: one Hessian-vector product (``curvature.hessian``, forward-over-reverse) ÷ one gradient, both
   jitted, medians of interleaved warm calls; and the cost of one product among 20 at the same parameters (the way
   Lanczos and power iteration apply it: the passes at θ linearised once, each product the tangent pass).
   goal <= 2.5
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from _timing import interleaved
from jaxnn import curvature, losses, models
from jaxnn.curvature.products import linearize_hessian
from jaxnn.train import create_train_state, make_train_step

LR = 1e-3


def _steps_runner(step_fn, state0, batches, flags=None):
    def run():
        state = jax.tree.map(jnp.copy, state0)
        for i, b in enumerate(batches):
            state = step_fn(state, b, flags[i]) if flags is not None else step_fn(state, b)
        return jax.tree.leaves(state)[0]
    return run


def bench_model(name, model, torch_builder, batches, args):
    x0 = batches[0][0]
    state0 = create_train_state(model, optax.adam(LR), x0.shape[1:], jax.random.PRNGKey(0))
    step = make_train_step("softmax_cross_entropy", optax.constant_schedule(LR))
    kept = make_train_step("softmax_cross_entropy", optax.constant_schedule(LR), donate=False)
    flags = [(i + 1) % 50 == 0 for i in range(len(batches))]
    jaxnn_step = lambda s, b, full: step(s, b, full)[0]  # noqa: E731

    tx = optax.adam(LR)

    @jax.jit
    def hand_step(carry, batch):
        params, opt_state = carry
        x, y = batch

        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    hand0 = (state0.params, tx.init(state0.params))
    started = time.perf_counter()
    jax.block_until_ready(step(jax.tree.map(jnp.copy, state0), batches[0], True))
    jax.block_until_ready(step(jax.tree.map(jnp.copy, state0), batches[0], False))
    compile_jaxnn = time.perf_counter() - started
    started = time.perf_counter()
    jax.block_until_ready(hand_step(hand0, batches[0]))
    compile_hand = time.perf_counter() - started
    jax.block_until_ready(kept(jax.tree.map(jnp.copy, state0), batches[0], True))
    jax.block_until_ready(kept(jax.tree.map(jnp.copy, state0), batches[0], False))
    times = interleaved({"jaxnn": _steps_runner(jaxnn_step, state0, batches, flags),
                         "jaxnn, donate=False": _steps_runner(lambda s, b, f: kept(s, b, f)[0], state0, batches,
                                                             flags),
                         "hand": _steps_runner(hand_step, hand0, batches)}, repeats=args.rounds)
    steps = len(batches)
    tokens = args.batch * args.length
    print(f"\n{name} ({sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state0.params)):,} parameters), batch "
          f"{args.batch} x {args.length} steps x {args.features} features, {steps} optimizer steps")
    print(f"  compile: jaxnn step {compile_jaxnn:.2f} s (both metric variants), hand step {compile_hand:.2f} s")
    for side in ("hand", "jaxnn", "jaxnn, donate=False"):
        print(f"  {side:24s} : {steps / times[side]:8.1f} steps/s  {steps * tokens / times[side]:10.0f} tokens/s")
    print(f"  RATIO jaxnn / hand-written flax+optax step: {times['hand'] / times['jaxnn']:.3f}   (goal >= 0.95); "
          f"with donate=False {times['hand'] / times['jaxnn, donate=False']:.3f}")

    try:
        import torch
    except ImportError:
        print("  torch not installed (pip install -e '.[test]'): PyTorch comparison skipped")
        return state0
    torch.manual_seed(0)
    net = torch_builder(torch)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    tb = [(torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y)).long()) for x, y in batches]

    def run_torch():
        for x, y in tb:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

    best, best_threads = float("inf"), 0
    for threads in (1, 2):
        torch.set_num_threads(threads)
        run_torch()
        for _ in range(args.rounds):
            started = time.perf_counter()
            run_torch()
            elapsed = time.perf_counter() - started
            if elapsed < best:
                best, best_threads = elapsed, threads
    print(f"  {'torch':24s} : {steps / best:8.1f} steps/s  {steps * tokens / best:10.0f} tokens/s  (eager, {best_threads} "
          f"thread(s))")
    print(f"  RATIO jaxnn / PyTorch eager: {best / times['jaxnn']:.2f}   (reported)")
    return state0


def torch_lstm(args):
    def build(torch):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lstm = torch.nn.LSTM(args.features, 128, batch_first=True)
                self.head = torch.nn.Linear(128, 10)

            def forward(self, x):
                out, _ = self.lstm(x)
                return self.head(out[:, -1])
        return Net()
    return build


def torch_transformer(args):
    def build(torch):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.Linear(args.features, 64)
                self.positions = torch.nn.Parameter(0.02 * torch.randn(args.length, 64))
                layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, activation="gelu",
                                                         batch_first=True, norm_first=True)
                self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
                self.norm = torch.nn.LayerNorm(64)
                self.head = torch.nn.Linear(64, 10)

            def forward(self, x):
                h = self.norm(self.encoder(self.embed(x) + self.positions))
                return self.head(h.mean(1))
        return Net()
    return build


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median; PyTorch: best)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    batches = [(jnp.asarray(rng.normal(size=(args.batch, args.length, args.features)), jnp.float32),
                jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)) for _ in range(args.steps)]
    jax.block_until_ready(batches)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s))")

    bench_model("LSTM", models.get_model("lstm", num_classes=10, hidden=128), torch_lstm(args), batches, args)
    transformer = models.get_model("transformer", num_classes=10, dim=64, depth=2, num_heads=4, mlp_dim=128,
                                   max_len=args.length)
    state = bench_model("Transformer", transformer, torch_transformer(args), batches, args)

    loss_fn = losses.make_loss_fn(transformer.apply, "softmax_cross_entropy", {})
    v = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), state.params)
    grad = jax.jit(jax.grad(loss_fn))
    started = time.perf_counter()
    jax.block_until_ready(grad(state.params, batches[0]))
    compile_grad = time.perf_counter() - started
    started = time.perf_counter()
    operator = curvature.hessian(loss_fn, state.params, batches[0])  # forward-over-reverse, compiled on first use
    jax.block_until_ready(operator(v))
    compile_hvp = time.perf_counter() - started
    products = 20

    @jax.jit
    def krylov_products(params, batch, vectors):
        """``products`` HVPs in a loop at the same θ, as Lanczos and power iteration run them: the forward and
        backward passes at θ linearised once, each product then the tangent pass only."""
        hvp = linearize_hessian(loss_fn, params, batch)
        return jax.lax.map(hvp, vectors)

    vectors = jax.tree.map(lambda leaf: jnp.stack([leaf] * products), v)
    started = time.perf_counter()
    jax.block_until_ready(krylov_products(state.params, batches[0], vectors))
    compile_krylov = time.perf_counter() - started
    times = interleaved({"grad": lambda: grad(state.params, batches[0]), "hvp": lambda: operator(v),
                         "krylov": lambda: krylov_products(state.params, batches[0], vectors)}, repeats=30)
    per_product = times["krylov"] / products
    print(f"\nTransformer HVP: gradient {times['grad'] * 1e3:.2f} ms, one HVP {times['hvp'] * 1e3:.2f} ms, one of "
          f"{products} HVPs at the same parameters {per_product * 1e3:.2f} ms (compile {compile_grad:.2f} s / "
          f"{compile_hvp:.2f} s / {compile_krylov:.2f} s)")
    print(f"  RATIO HVP / gradient, one product alone (forward, backward and tangent passes): "
          f"{times['hvp'] / times['grad']:.2f}   (goal <= 2.5)")
    print(f"  RATIO HVP / gradient, per product of a {products}-step Krylov loop (the estimators' use; the passes at "
          f"the parameters once): {per_product / times['grad']:.2f}   (reported; the goal is the line above)")


if __name__ == "__main__":
    main()
