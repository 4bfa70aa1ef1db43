"""Multi-device data parallelism on 8 forced CPU devices (subprocess: the flag must precede jax's import),
and two-process multi-host start-up through jax.distributed with gloo collectives."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.multidevice

EIGHT_DEVICES = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import json, jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    from jaxnn import data as data_lib, models, parallel
    from jaxnn.train import create_train_state, fit, make_train_step
    assert jax.device_count() == 8
    ds = data_lib.load_dataset("digits", seed=0)
    model = models.get_model("mlp", num_classes=10, width=32, depth=1)
    batch = next(data_lib.batch_iterator(ds.train, 64, seed=0, prefetch=0))
    batch = (jnp.asarray(batch[0], jnp.float64), batch[1])
    one = parallel.make_mesh(jax.devices()[:1])
    eight = parallel.make_mesh()
    step = make_train_step("softmax_cross_entropy", donate=False)
    s1 = create_train_state(model, optax.sgd(0.1), ds.input_shape, jax.random.PRNGKey(0), mesh=one)
    s8 = create_train_state(model, optax.sgd(0.1), ds.input_shape, jax.random.PRNGKey(0), mesh=eight)
    b8 = jax.device_put(batch, parallel.batch_sharding(eight))
    n1, m1 = step(s1, jax.device_put(batch, parallel.batch_sharding(one)))
    n8, m8 = step(s8, b8)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(n1.params), jax.tree.leaves(n8.params)))
    shards = len(b8[0].sharding.device_set)
    r = fit(s8, ds, batch_size=64, num_steps=40, eval_every=20, progress=False, mesh=eight)
    print(json.dumps({"diff": diff, "loss_diff": abs(float(m1["loss"]) - float(m8["loss"])), "shards": shards,
                      "param_devices": len(jax.tree.leaves(r.state.params)[0].sharding.device_set),
                      "val_acc": r.history[-1]["val_accuracy"]}))
""")


def test_eight_device_step_equals_single_device_step():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shards"] == 8 and result["param_devices"] == 8
    assert result["diff"] < 1e-12 and result["loss_diff"] < 1e-12
    assert result["val_acc"] > 0.7


TWO_HOSTS = textwrap.dedent("""
    import sys, json
    port, pid = sys.argv[1], int(sys.argv[2])
    from jaxnn import parallel
    parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import jax, jax.numpy as jnp, numpy as np
    mesh = parallel.make_mesh()
    # Each host holds its own half of a global batch; the sum over the mesh needs a cross-host all-reduce.
    local = np.arange(4, dtype=np.float32) + 4 * pid
    global_x = parallel.host_local_batch_to_global(local, mesh)
    total = jax.jit(lambda x: jnp.sum(x ** 2), out_shardings=parallel.replicated(mesh))(global_x)
    print(json.dumps({"pid": pid, "devices": jax.device_count(), "local": jax.local_device_count(),
                      "processes": jax.process_count(), "total": float(total)}))
""")


def test_two_process_multihost_all_reduce():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-c", TWO_HOSTS, str(port), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for r in results:
        assert r["processes"] == 2 and r["devices"] == 2 and r["local"] == 1
        assert r["total"] == pytest.approx(float(sum(i * i for i in range(8))))
