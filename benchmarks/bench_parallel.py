"""Data-parallel overhead on this machine's cores: every path on N simulated CPU devices vs one device.

For the main job's model (digits MLP 64-256-256-10, global batch 64, Adam) and for one data-set HVP (the same MLP,
4 batches of 64): the time of a training step on 1 device, then on N simulated devices with the batch split over
them — ``jit`` (XLA inserts the all-reduce), ``shard_map`` and ``pmap`` (explicit ``lax.pmean``), ``jit`` with
sharded parameters — printed as the ratio to one device. Goal: <= 1.15x. The devices share the same cores (each
simulated device computes single-threaded, one device uses every core), so this measures the cost of splitting,
not a speed-up. Every step and product is waited for before the next is dispatched, on one device as on N (XLA:CPU can
hang a collective program queued behind another on simulated devices; see ``jaxnn.parallel.cpu_collectives``). On a
machine with accelerators the script also reports the per-device throughput of N devices
against one (weak scaling, global batch N x 64; goal >= 0.9); without one it says it was not measured.

    python benchmarks/bench_parallel.py [--devices 2,8] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = "--child"


def child(devices: int, steps: int, batch: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from jaxnn import curvature, data as data_lib, losses, models, parallel
    from jaxnn.train import create_train_state, make_train_step

    ds = data_lib.load_dataset("digits", seed=0)
    model = models.get_model("mlp", num_classes=10, width=256, depth=2)
    it = data_lib.batch_iterator(ds.train, batch, seed=0, prefetch=0)
    host_batches = [tuple(map(jax.device_get, next(it))) for _ in range(steps)]
    results = {"platform": jax.devices()[0].platform, "devices": jax.device_count()}
    paths = [("jit", "replicated")] if devices == 1 else [("jit", "replicated"), ("shard_map", "replicated"),
                                                         ("pmap", "replicated"), ("jit", "sharded")]
    mesh = parallel.make_mesh(devices)
    for mode, layout in paths:
        state0 = parallel.place_state(create_train_state(model, optax.adam(1e-3), ds.input_shape,
                                                         jax.random.PRNGKey(0), mesh=mesh), mesh, layout)
        step = make_train_step("softmax_cross_entropy", optax.constant_schedule(1e-3), mode=mode,
                               mesh=None if mode == "jit" else mesh)
        sharding = None if mode == "pmap" else parallel.batch_sharding(mesh)
        batches = [b if mode == "pmap" else jax.device_put(b, sharding) for b in host_batches]

        def run():
            state = jax.tree.map(jnp.copy, state0)
            for b in batches:
                state, _ = step(state, b, False)
                jax.block_until_ready(state.params)  # every step: see jaxnn.parallel.cpu_collectives

        run()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        results[f"step/{mode}/{layout}"] = best / steps
    params, model_state = models.init_model(model, jax.random.PRNGKey(0), ds.input_shape)
    params = parallel.replicate(params, mesh)
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", parallel.replicate(model_state, mesh))
    x, y = data_lib.host_stacked_batches(ds.train, 64, 4, seed=0)
    op = curvature.hessian(loss_fn, params, list(zip(x, y)))
    v = jax.tree.map(jnp.ones_like, params)
    jax.block_until_ready(op(v))
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        out = v
        for _ in range(20):
            out = jax.block_until_ready(op(out))
        best = min(best, (time.perf_counter() - start) / 20)
    results["hvp"] = best
    return results


def spawn(devices: int, steps: int, batch: int) -> dict:
    from jaxnn.runtime import simulated_device_environment

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if devices > 1 and batch == 64:  # simulated CPU devices (real accelerators ignore the flag)
        env = simulated_device_environment(env, devices)
    out = subprocess.run([sys.executable, __file__, CHILD, str(devices), str(steps), str(batch)], capture_output=True,
                         text=True, env=env)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        print(json.dumps(child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="2,8")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    one = spawn(1, args.steps, 64)
    print(f"{one['platform']}, {os.cpu_count()} cores; digits MLP 64-256-256-10, global batch 64, Adam; best of 5 x "
          f"{args.steps} steps. One device: step {one['step/jit/replicated'] * 1e3:.3f} ms, "
          f"data-set HVP {one['hvp'] * 1e3:.3f} ms")
    for n in (int(v) for v in args.devices.split(",")):
        many = spawn(n, args.steps, 64)
        print(f"\n{n} simulated devices (ratio to one device; goal <= 1.15):")
        for key in sorted(k for k in many if k.startswith("step/")):
            _, mode, layout = key.split("/")
            print(f"  train step, {mode:9s} {layout:10s} {many[key] * 1e3:8.3f} ms   RATIO "
                  f"{many[key] / one['step/jit/replicated']:.2f}x")
        print(f"  data-set HVP (jit, data split)   {many['hvp'] * 1e3:8.3f} ms   RATIO {many['hvp'] / one['hvp']:.2f}x")
    if one["platform"] == "cpu" or one["devices"] < 2:
        print("\nweak scaling on accelerators (per-device throughput of N devices vs one, goal >= 0.9): not measured "
              f"({'no accelerator' if one['platform'] == 'cpu' else 'one accelerator'} on this machine)")
        return
    n = one["devices"]
    scaled = spawn(n, args.steps, 64 * n)  # real devices: N x 64 examples per step
    efficiency = one["step/jit/replicated"] / scaled["step/jit/replicated"]
    print(f"\nweak scaling, {n} {one['platform']} devices, global batch {64 * n}: per-device throughput "
          f"{efficiency:.2f} of one device (goal >= 0.9)")


if __name__ == "__main__":
    main()
