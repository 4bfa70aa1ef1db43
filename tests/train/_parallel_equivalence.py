"""Run by test_parallel.py in a subprocess with 8 forced CPU devices: 20 training steps on 1 device and on 8 devices
along every data-parallel path, printed as JSON (max absolute parameter/state differences)."""

import json
import os
import sys

from jaxnn.runtime import simulated_device_environment  # noqa: E402  (standard library only)

os.environ.update(simulated_device_environment(os.environ, 8))
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxnn import data as data_lib, models, parallel  # noqa: E402
from jaxnn.curvature import kfac_preconditioner  # noqa: E402
from jaxnn.train import create_train_state, fit  # noqa: E402

PATHS = [("jit", "replicated"), ("shard_map", "replicated"), ("pmap", "replicated"), ("jit", "sharded")]
MODELS = {
    "mlp_bn": dict(name="mlp", num_classes=10, width=32, depth=2, norm="batch"),
    "mlp": dict(name="mlp", num_classes=10, width=32, depth=2),
    "resnet_bn": dict(name="resnet", num_classes=10, depth=8, base_width=4),
    # the sequence models (a scan; attention) and an NNX module: no batch norm, so the data-parallel paths that
    # differ most for them are shard_map (the gradient summed over devices) and jit with the kernels sharded
    "lstm": dict(name="lstm", num_classes=10, hidden=8),
    "transformer": dict(name="transformer", num_classes=10, dim=8, depth=1, num_heads=2, mlp_dim=16, max_len=8),
    "nnx_mlp": dict(name="nnx_mlp", num_classes=10, width=16, depth=2),
}


def train(dataset, model_kwargs, optimizer, devices, mode, layout, needs_batch=False):
    mesh = parallel.make_mesh(devices)
    state = create_train_state(models.get_model(**model_kwargs), optimizer, dataset.input_shape,
                               jax.random.PRNGKey(0), mesh=mesh)
    state = parallel.place_state(state, mesh, layout)
    result = fit(state, dataset, batch_size=64, num_steps=20, log_every=10, eval_every=20, progress=False, mesh=mesh,
                 mode=mode, needs_batch=needs_batch)
    return jax.tree.map(np.asarray, (result.state.params, result.state.model_state)), result.state.params


def max_difference(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
    precision = sys.argv[1]
    jax.config.update("jax_enable_x64", precision == "float64")
    dataset = data_lib.load_dataset("digits", seed=0)
    optimizers = {"sgd": lambda: optax.sgd(0.1, momentum=0.9), "adam": lambda: optax.adam(1e-2),
                  # Adam divides the rounding noise of coordinates whose exact gradient is 0 (the biases and the
                  # per-channel mean direction of the kernels in front of batch norm) by sqrt(nu) + eps: with the
                  # default eps 1e-8 any two summation orders (1 device or 8) end ~1e-10 apart there.
                  "adam_eps": lambda: optax.adam(1e-2, eps=1e-4),
                  # In float32 that noise is ~1e-8 per step: eps 1e-4 still turns it into ~1e-6 per step on those
                  # function-neutral coordinates (1.2e-5 after 20 steps); eps 1e-3 keeps it under the 1e-5 budget.
                  "adam_eps3": lambda: optax.adam(1e-2, eps=1e-3),
                  # K-FAC's statistics (empirical Fisher: deterministic) summed over the devices of a per-device step
                  # (the jit path's global program needs no sum: left out for the suite's time)
                  "kfac": lambda: optax.chain(kfac_preconditioner(damping=1.0, inverse_every=5, kind="empirical"),
                                              optax.sgd(0.1, momentum=0.9))}
    # Float64: both optimizer families and batch norm on every path, convolutions on the two paths that differ for
    # them (shard_map: batch norm's statistics over the devices by axis_name; jit with the kernels sharded: GSPMD's
    # partitioned convolutions); float32 checks the tolerance of batch norm's statistics summed over 8 devices.
    # Dropped to keep the suite's time (each ResNet path compiles for ~10 s): the plain MLP (MLP + BN runs the same
    # layers and more), MLP + SGD (MLP + BN + SGD covers it), MLP + BN + default-eps Adam (the adam_eps program), the
    # ResNet on the replicated jit and pmap paths (the MLP + BN cases run batch norm there), the float32 ResNet.
    cases = ([("mlp_bn", "sgd", PATHS), ("mlp_bn", "adam_eps", PATHS),
              ("resnet_bn", "adam_eps", [("shard_map", "replicated"), ("jit", "sharded")])]
             + [(name, "adam_eps", [("shard_map", "replicated"), ("jit", "sharded")])
                for name in ("lstm", "transformer", "nnx_mlp")]
             if precision == "float64" else [("mlp_bn", "adam_eps3", PATHS),
                                             ("mlp", "kfac", [("shard_map", "replicated")])])
    results = []
    for model_name, optimizer_name, paths in cases:
        needs_batch = optimizer_name == "kfac"
        reference, _ = train(dataset, MODELS[model_name], optimizers[optimizer_name](), 1, "jit", "replicated",
                             needs_batch)
        for mode, layout in paths:
            values, params = train(dataset, MODELS[model_name], optimizers[optimizer_name](), 8, mode, layout,
                                   needs_batch)
            specs = sorted({str(leaf.sharding.spec) for leaf in jax.tree.leaves(params)})
            results.append({"model": model_name, "optimizer": optimizer_name, "mode": mode, "layout": layout,
                            "diff": max_difference(reference, values), "specs": specs})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
