"""Training-step throughput, one process, same MLP / data / batch on all sides. Prints ratios.

    python benchmarks/bench_train.py [--steps 500] [--batch 128] [--width 256] [--depth 2]

1. jaxnn's compiled train step (loss, accuracy, lr every step; grad norm and update/weight ratio on the
   steps fit logs, here every 50th) ÷ a minimal
   hand-written flax + optax jitted step.            goal >= 0.95
2. jaxnn's whole ``fit`` call (device-resident batches, logging, no checkpoints), one step per call and
   ``steps_per_call=10``, ÷ the hand loop over pre-placed batches.   goal >= 0.95
3. jaxnn ÷ the same MLP trained in PyTorch eager on CPU. goal >= 1.5
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnn import data as data_lib
from jaxnn import models
from jaxnn.train import create_train_state, fit, make_train_step


class HandMLP(nn.Module):
    width: int
    depth: int
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(self.classes)(x)


def timed(fn, repeats=3):
    """Best wall time of ``repeats`` runs of ``fn`` (which must block until done)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64, help="default: the main job's batch size (digits_mlp)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7, help="alternating timing rounds (best of each side)")
    args = ap.parse_args()
    ds = data_lib.load_dataset("digits", seed=0)
    it = data_lib.batch_iterator(ds.train, args.batch, seed=0, prefetch=0)
    batches = [next(it) for _ in range(args.steps)]
    jax.block_until_ready(batches)
    lr = 1e-3
    print(f"digits MLP 64-{'-'.join([str(args.width)] * args.depth)}-10, batch {args.batch}, {args.steps} steps, "
          f"adam, {jax.devices()[0].platform}, {jax.device_count()} device(s)")

    # --- jaxnn step
    model = models.get_model("mlp", num_classes=10, width=args.width, depth=args.depth, activation="relu")
    state0 = create_train_state(model, optax.adam(lr), ds.input_shape, jax.random.PRNGKey(0))
    step = make_train_step("softmax_cross_entropy", optax.constant_schedule(lr))

    log_every = 50  # as fit calls it: grad norm and update ratio on the logged steps only
    flags = [(i + 1) % log_every == 0 for i in range(len(batches))]

    def run_jaxnn():
        state = jax.tree.map(jnp.copy, state0)
        for b, full in zip(batches, flags):
            state, m = step(state, b, full)
        jax.block_until_ready(state.params)

    run_jaxnn()

    # --- hand-written flax + optax
    hand = HandMLP(args.width, args.depth)
    tx = optax.adam(lr)
    params0 = hand.init(jax.random.PRNGKey(0), batches[0][0])["params"]

    @jax.jit
    def hand_step(params, opt_state, batch):
        x, y = batch

        def loss_fn(p):
            logits = hand.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def run_hand():
        params, opt_state = params0, tx.init(params0)
        for b in batches:
            params, opt_state, loss = hand_step(params, opt_state, b)
        jax.block_until_ready(params)

    run_hand()
    # Alternate the two sides so both see the same machine noise; keep each side's best.
    t_hand = t_jaxnn = float("inf")
    for _ in range(args.rounds):
        t_hand = min(t_hand, timed(run_hand, 1))
        t_jaxnn = min(t_jaxnn, timed(run_jaxnn, 1))

    # --- the whole fit loop (its own batch iterator + host logging every 50 steps)
    schedule = optax.constant_schedule(lr)

    def run_fit(steps_per_call):
        state = jax.tree.map(jnp.copy, state0)
        r = fit(state, ds, batch_size=args.batch, num_steps=args.steps, schedule=schedule,
                log_every=50, eval_every=10 ** 9, progress=False, steps_per_call=steps_per_call)
        jax.block_until_ready(r.state.params)

    t_fit = {}
    for k in (1, 10):
        run_fit(k)
    for _ in range(args.rounds):  # alternated with the hand loop, best of each
        t_hand = min(t_hand, timed(run_hand, 1))
        for k in (1, 10):
            t_fit[k] = min(t_fit.get(k, float("inf")), timed(lambda: run_fit(k), 1))

    print(f"hand flax+optax step : {args.steps / t_hand:9.1f} steps/s")
    print(f"jaxnn train step     : {args.steps / t_jaxnn:9.1f} steps/s   ratio jaxnn/hand = {t_hand / t_jaxnn:.3f} (goal >= 0.95)")
    for k in (1, 10):
        print(f"jaxnn fit loop, {k:2d} step(s) per call: {args.steps / t_fit[k]:9.1f} steps/s   ratio fit/hand = "
              f"{t_hand / t_fit[k]:.3f} (goal >= 0.95; whole fit call: setup, logging every 50 steps, final eval)")

    # --- PyTorch eager
    try:
        import torch
    except ImportError:
        print("torch not installed (pip install -e '.[test]'): PyTorch comparison skipped")
        return
    torch.manual_seed(0)
    layers, fan_in = [], 64
    for _ in range(args.depth):
        layers += [torch.nn.Linear(fan_in, args.width), torch.nn.ReLU()]
        fan_in = args.width
    net = torch.nn.Sequential(torch.nn.Flatten(), *layers, torch.nn.Linear(fan_in, 10))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    tb = [(torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y)).long()) for x, y in batches]

    def run_torch():
        for x, y in tb:
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()

    # PyTorch's best of 1 and 2 intra-op threads (on a busy 2-core machine 2 threads can be 10x slower).
    t_torch, best_threads = float("inf"), 0
    for threads in (1, 2):
        torch.set_num_threads(threads)
        run_torch()
        t = timed(run_torch)
        if t < t_torch:
            t_torch, best_threads = t, threads
    print(f"PyTorch eager step   : {args.steps / t_torch:9.1f} steps/s   ratio jaxnn/torch = {t_torch / t_jaxnn:.2f} "
          f"(goal >= 1.5; torch best with {best_threads} thread(s))")


if __name__ == "__main__":
    main()
