"""Data parallelism on 8 simulated CPU devices (subprocesses: the device flag must precede jax's import): every path
(jit, shard_map, pmap, sharded parameters) trains like one device; curvature and landscapes split their data over
the devices and give the single-device numbers; bad requests fail with one clear line."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxnn.runtime import simulated_device_environment

pytestmark = pytest.mark.multidevice

HELPER = pathlib.Path(__file__).with_name("_parallel_equivalence.py")
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _equivalence(precision):
    out = subprocess.run([sys.executable, str(HELPER), precision], capture_output=True, text=True, env=ENV,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_eight_devices_train_like_one_on_every_path_float64():
    """20 steps, batch 64, digits: MLP + batch norm (global-batch statistics on every path) with SGD + momentum and
    with Adam, ResNet-8 with batch norm, an LSTM, a Transformer and an NNX MLP on the shard_map and sharded-jit
    paths. Oracle: the same training on one
    device."""
    results = _equivalence("float64")
    paths = {(r["model"], r["optimizer"]): set() for r in results}
    for r in results:
        paths[(r["model"], r["optimizer"])].add((r["mode"], r["layout"]))
    every_path = {("jit", "replicated"), ("shard_map", "replicated"), ("pmap", "replicated"), ("jit", "sharded")}
    two_paths = {("shard_map", "replicated"), ("jit", "sharded")}
    assert paths == {("mlp_bn", "sgd"): every_path, ("mlp_bn", "adam_eps"): every_path,
                     ("resnet_bn", "adam_eps"): two_paths, ("lstm", "adam_eps"): two_paths,
                     ("transformer", "adam_eps"): two_paths, ("nnx_mlp", "adam_eps"): two_paths}
    for r in results:
        # Adam with eps 1e-4 in front of batch norm ("adam_eps"): the default eps turns the rounding noise of
        # exactly-zero gradient coordinates (biases before batch norm) into ~1e-10 updates on any summation order.
        assert r["diff"] < 1e-12, r
        if r["layout"] == "sharded":
            assert any("data" in spec for spec in r["specs"]), r  # the parameters really are split
        else:
            assert r["specs"] == ["P()"], r


def test_eight_devices_train_like_one_on_every_path_float32():
    """MLP + batch norm with Adam eps 1e-3 (in float32 a smaller eps turns the rounding noise of the biases in front
    of batch norm, whose exact gradient is 0, into updates up to the learning rate's size); the K-FAC optimizer on
    shard_map, whose per-device statistics are summed over the devices (measured 8.7e-7)."""
    results = _equivalence("float32")
    assert {(r["optimizer"], r["mode"]) for r in results if r["optimizer"] == "kfac"} == {("kfac", "shard_map")}
    for r in results:
        assert r["diff"] < 1e-5, r


def _jaxnn(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "jaxnn.cli", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


def test_curvature_and_landscape_on_eight_devices_equal_one_device(analysed_run, tmp_path):
    """The CLI on 8 simulated devices vs 1 device (conftest's reference), float64: top-5 eigenvalues, trace, density
    (data split along the batch axis) and a 2-D landscape grid split by data and by grid point (25 points: padded to
    8 × 4) to 1e-10."""
    import numpy as np

    run_dir, one_dir = analysed_run.run, analysed_run.one_device
    CURVATURE, LANDSCAPE = analysed_run.curvature, analysed_run.landscape

    def plane_of(out_dir):
        saved = np.load(out_dir / "landscape.npz")
        return saved[[k for k in saved.files if "plane" in k and "loss" in k][0]]

    out_dir = tmp_path / "8"
    for command, options in (("curvature", CURVATURE), ("landscape", LANDSCAPE)):
        out = _jaxnn(command, str(run_dir), *options, "--devices", "8", "--out", str(out_dir))
        assert out.returncode == 0, out.stderr[-3000:]
    out = _jaxnn("landscape", str(run_dir), *LANDSCAPE, "--devices", "8", "--split", "points",
                 "--out", str(tmp_path / "points"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "points" / "landscape.json").read_text())["config"]["split"] == "points"
    one, eight = (json.loads((d / "curvature.json").read_text()) for d in (one_dir, out_dir))
    plane1, plane8 = plane_of(one_dir), plane_of(out_dir)
    for key in ("top", "bottom"):
        assert one["eigenvalues"][key] == pytest.approx(eight["eigenvalues"][key], rel=1e-10, abs=1e-12)
    assert one["trace"]["estimate"] == pytest.approx(eight["trace"]["estimate"], rel=1e-10)
    assert one["density"]["nodes"][0] == pytest.approx(eight["density"]["nodes"][0], rel=1e-9, abs=1e-12)
    assert abs(plane1 - plane8).max() <= 1e-10 * abs(plane1).max()
    assert abs(plane1 - plane_of(tmp_path / "points")).max() <= 1e-10 * abs(plane1).max()


@pytest.mark.parametrize("args, words", [
    (["--set", "parallel.devices=9"], "asks for 9 devices, but only 8 cpu device(s) exist"),
    (["--devices", "8", "--set", "train.batch_size=100"], "nearest valid sizes: 96 or 104"),
    (["--devices", "8", "--set", "parallel.mode=mpi"], "valid modes: jit, shard_map, pmap"),
    (["--devices", "8", "--set", "parallel.params=sharded", "--set", "parallel.mode=pmap"], "need parallel.mode jit"),
])
def test_bad_device_requests_are_one_clear_line(args, words, tmp_path):
    env = simulated_device_environment(ENV, 8)
    out = _jaxnn("train", "digits_mlp", "--run-dir", str(tmp_path / "r"), "--set", "train.steps=2", *args, env=env)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.startswith("jaxnn: error:") and words in out.stderr and "Traceback" not in out.stderr


SETTLE = """
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # as a user's script does: async dispatch on
import jax, jax.numpy as jnp, optax
from jaxnn import data, models, parallel
from jaxnn.train import create_train_state, fit

slow = jax.jit(lambda x: jax.lax.fori_loop(0, 40, lambda i, y: jnp.tanh(y @ y), x))  # ~0.3 s
mesh = parallel.make_mesh()
on_mesh = jax.device_put(jnp.eye(512) * 0.5, parallel.replicated(mesh))
out = {"devices": int(mesh.devices.size), "mesh_ready": parallel.settle(slow(on_mesh), mesh).is_ready()}
alone = jnp.eye(512) * 0.5
slow(alone).block_until_ready()
out["alone_ready"] = parallel.settle(slow(alone), None).is_ready()
calls, original = [], parallel.settle
def recording(tree, mesh):
    result = original(tree, mesh)
    calls.append([parallel.mesh_size(mesh), all(a.is_ready() for a in jax.tree.leaves(result) if hasattr(a, "is_ready"))])
    return result
parallel.settle = recording
ds = data.load_dataset("digits", seed=0)
state = create_train_state(models.get_model("mlp", num_classes=10, width=16, depth=1), optax.sgd(0.1),
                           ds.input_shape, jax.random.key(0))
fit(state, ds, batch_size=64, num_steps=6, log_every=3, eval_every=3, eval_batch_size=128, progress=False)
out["calls"], out["val_batches"] = calls, -(-len(ds.val) // 128)
print(json.dumps(out))
"""


def test_collective_programs_are_waited_for_on_cpu_devices():
    """On several CPU devices each collective program is waited for before the next is queued (a queued program
    could hold a device's slot and abort the all-reduce rendezvous, see jaxnn.parallel.settle); on one device
    dispatch stays asynchronous. fit on 8 devices waits after each of its 6 steps and each evaluation batch."""
    out = subprocess.run([sys.executable, "-c", SETTLE], capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["mesh_ready"] and not result["alone_ready"]
    assert result["calls"] == [[8, True]] * (6 + 2 * result["val_batches"])
