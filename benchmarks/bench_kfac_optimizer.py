"""K-FAC vs Adam vs SGD with momentum: steps and wall time to a target training loss, in one process.

Issue 22 asks for the K-FAC optimizer (``optimizer.name: kfac``) compared with Adam and SGD on the digits MLP and
LeNet. Each optimizer trains the same initial weights on the same batch stream (batch 64) through ``fit``, at each of
a few learning rates (the best one is reported: an untuned baseline would flatter K-FAC), for at most ``--steps``
steps; the full-batch training loss is measured every ``--every`` steps. Reported per optimizer: the first measured
step at which the training loss is below ``--target``, the wall time to it (steady state: a throwaway first chunk
compiles every program, its time is printed apart), and the final loss. K-FAC's damping is fixed (``--damping``): no adaptive damping yet.

    python benchmarks/bench_kfac_optimizer.py [--steps 600] [--target 0.05] [--damping 1.0]
"""

from __future__ import annotations

import argparse
import time


def run_one(model, data, tx, needs_batch, steps, every, target, key):
    """(first measured step with the full training loss < target or None, seconds to it, the first chunk's seconds
    (with compilation), the last measured loss)."""
    import jax
    import jax.numpy as jnp

    from jaxnn import losses
    from jaxnn.train import NonFiniteLossError, create_train_state, fit

    def fresh():  # the same initial weights each time (fit donates the state it trains)
        return create_train_state(model, tx, data.input_shape, key)

    loss_fn = jax.jit(losses.make_loss_fn(model.apply, "softmax_cross_entropy"))
    x, y = jnp.asarray(data.train.x), jnp.asarray(data.train.y)
    started = time.perf_counter()  # a throwaway first chunk compiles every program the timed run uses
    jax.block_until_ready(fit(fresh(), data, batch_size=64, num_steps=every, log_every=every, eval_every=10**9,
                              progress=False, needs_batch=needs_batch, nan_guard=False).state.params)
    compile_seconds = time.perf_counter() - started
    state, elapsed, step, reached, loss = fresh(), 0.0, 0, None, float("nan")
    while step < steps:
        started = time.perf_counter()
        try:
            state = fit(state, data, batch_size=64, num_steps=step + every, start_step=step, log_every=every,
                        eval_every=10**9, progress=False, needs_batch=needs_batch).state
        except NonFiniteLossError:  # this learning rate diverged
            return None, None, compile_seconds, float("nan")
        jax.block_until_ready(state.params)
        elapsed += time.perf_counter() - started
        step += every
        loss = float(loss_fn(state.params, (x, y)))
        if loss < target:
            reached = (step, elapsed)
            break
    return (reached[0] if reached else None), (reached[1] if reached else None), compile_seconds, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--target", type=float, default=0.05)
    parser.add_argument("--damping", type=float, default=1.0)
    args = parser.parse_args()

    import jax
    import optax

    from jaxnn import data as data_lib, models
    from jaxnn.curvature import kfac_preconditioner

    digits = data_lib.load_dataset("digits", seed=0)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; digits, {len(digits.train)} training images, "
          f"batch 64, target full-batch training loss < {args.target}, at most {args.steps} steps")
    optimizers = {
        "sgd+momentum": ([0.03, 0.1, 0.3], lambda lr: optax.sgd(lr, momentum=0.9), False),
        "adam": ([1e-3, 3e-3, 1e-2], lambda lr: optax.adam(lr), False),
        "kfac": ([0.1, 0.3, 1.0], lambda lr: optax.chain(kfac_preconditioner(damping=args.damping),
                                                         optax.sgd(lr, momentum=0.9)), True),
    }
    for label, model in (("MLP 64-256-256-10", models.get_model("mlp", num_classes=10, width=256, depth=2)),
                         ("LeNet", models.get_model("lenet", num_classes=10))):
        print(f"\n{label}:")
        print(f"  {'optimizer':<14} {'best lr':>8} {'steps to target':>16} {'seconds to it':>14} {'1st chunk s':>11} "
              f"{'final loss':>11}")
        for name, (rates, build, needs_batch) in optimizers.items():
            results = [(lr, *run_one(model, digits, build(lr), needs_batch, args.steps, args.every, args.target,
                                     jax.random.PRNGKey(0))) for lr in rates]
            reached = [r for r in results if r[1] is not None]
            lr, steps, seconds, compile_seconds, final = (min(reached, key=lambda r: r[1]) if reached else min(
                results, key=lambda r: r[4] if r[4] == r[4] else float("inf")))
            print(f"  {name:<14} {lr:>8g} {steps if steps else 'not reached':>16} "
                  f"{'' if seconds is None else f'{seconds:.2f}':>14} {compile_seconds:>11.2f} {final:>11.4f}")


if __name__ == "__main__":
    main()
