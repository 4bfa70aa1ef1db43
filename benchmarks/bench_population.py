"""A vmapped population against the same members one at a time, in one process.

Training: 16 seeds of the main job's model (digits MLP 64-256-256-10, Adam 2e-3, batch 64; ``--width`` changes
it) for ``--steps`` steps as one population (``train_population``, one compiled program for all members) vs 16
sequential ``fit`` runs (the compiled step is cached after the first, as a user's loop over seeds would get).
Goal: >= 4x, compile included; compile and steady state are also printed apart.

Curvature: lambda_max of those 16 members on 4 batches of 64, in one program (``population_sharpness``) vs 16
single-model Lanczos calls (``curvature.top_eigenvalues``) — both at 20 Lanczos steps, and the single calls also at
their adaptive default (stop at a 1e-3 residual bound), which is what a user would run. Goal: >= 3x.

    python benchmarks/bench_population.py [--members 16] [--steps 300]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=256, help="hidden width of the MLP (the main job: 256)")
    args = parser.parse_args()

    import jax
    import numpy as np
    import optax

    from jaxnn import curvature, data as data_lib, losses, models
    from jaxnn.curvature.population import population_sharpness
    from jaxnn.train import create_train_state, fit
    from jaxnn.train.population import train_population

    digits = data_lib.load_dataset("digits", seed=0)
    model = models.get_model("mlp", num_classes=10, width=args.width, depth=2, kernel_init="he")
    seeds = list(range(args.members))
    print(f"{args.members} members, MLP 64-{args.width}-{args.width}-10, {args.steps} steps of batch 64, "
          f"{jax.devices()[0].platform}")

    started = time.perf_counter()
    result = train_population(model, optax.adam, digits, members={"seed": seeds, "learning_rate": [2e-3] * len(seeds)},
                              num_steps=args.steps, batch_size=64, progress=False)
    population_total = time.perf_counter() - started

    started = time.perf_counter()
    first_fit = None
    for seed in seeds:
        state = create_train_state(model, optax.adam(2e-3), digits.input_shape, jax.random.PRNGKey(seed))
        one = time.perf_counter()
        fit(state, digits, batch_size=64, num_steps=args.steps, log_every=args.steps, eval_every=args.steps,
            progress=False)
        first_fit = first_fit or time.perf_counter() - one
    sequential_total = time.perf_counter() - started
    per_fit_steady = (sequential_total - first_fit) / max(1, len(seeds) - 1)

    print(f"train   population: {population_total:6.2f} s total (compile {result.compile_s:.2f} s, "
          f"steps {result.run_s:.2f} s, rest is init and evaluation)")
    print(f"train   sequential: {sequential_total:6.2f} s total (first fit {first_fit:.2f} s, "
          f"then {per_fit_steady:.2f} s each)")
    print(f"train   speed-up, compile included: {sequential_total / population_total:5.2f}x   (goal >= 4x)")
    print(f"train   speed-up, steady state:     {per_fit_steady * len(seeds) / result.run_s:5.2f}x   "
          "(16 warm fits / the population's compiled steps)")

    x, y = data_lib.host_stacked_batches(digits.train, 64, 4, seed=0)
    batches = [(x[i], y[i]) for i in range(4)]
    timings = {}
    for label, run in [
        ("population, 20 steps", lambda: population_sharpness(result.state, batches, num_iters=20)),
    ]:
        started = time.perf_counter()
        values = run()
        first = time.perf_counter() - started
        started = time.perf_counter()
        run()
        timings[label] = (first, time.perf_counter() - started, np.asarray(values)[:, 0])

    def singles(**kwargs):
        out = []
        for index in range(len(seeds)):
            member = result.member_state(index)
            loss_fn = losses.make_loss_fn(member.apply_fn, "softmax_cross_entropy", member.model_state)
            op = curvature.hessian(loss_fn, member.params, batches)
            out.append(float(curvature.top_eigenvalues(op, k=1, progress=False, **kwargs).values[0]))
        return np.asarray(out)

    for label, kwargs in [("single, 20 steps", dict(num_iters=20, tol=None)), ("single, adaptive", {})]:
        started = time.perf_counter()
        values = singles(**kwargs)
        first = time.perf_counter() - started
        started = time.perf_counter()
        singles(**kwargs)
        timings[label] = (first, time.perf_counter() - started, values)
    population_first, population_warm, population_values = timings["population, 20 steps"]
    for label, (first, warm, values) in timings.items():
        gap = np.max(np.abs(values - population_values) / np.abs(population_values))
        print(f"lambda_max {label:22s} first call {first:6.2f} s, again {warm:6.2f} s; "
              f"max relative gap to the population {gap:.1e}")
    for label in ("single, 20 steps", "single, adaptive"):
        first, warm, _ = timings[label]
        print(f"lambda_max speed-up vs {label:18s} first call {first / population_first:5.2f}x, "
              f"again {warm / population_warm:5.2f}x   (goal >= 3x)")


if __name__ == "__main__":
    main()
