"""A run killed with SIGKILL mid-training and resumed reaches bit-identical parameters (CPU, float32)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxnn.train import load_run

OVERRIDES = ["train.steps=1500", "train.batch_size=32", "train.eval_every=50", "train.log_every=50",
             "checkpoint.keep_last=2", "model.kwargs={width: 64, depth: 2, dropout: 0.1}",
             "optimizer.schedule=cosine", "train.progress=false"]


def _train_cmd(run_dir, resume=False):
    cmd = [sys.executable, "-m", "jaxnn.cli", "train", "digits_mlp", "--run-dir", str(run_dir)]
    for o in OVERRIDES:
        cmd += ["--set", o]
    return cmd + (["--resume"] if resume else [])


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the same single-device program in both runs
    return env


def _steps(run_dir):
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_train_cmd(reference), check=True, env=_env(), capture_output=True, timeout=600)

    proc = subprocess.Popen(_train_cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(s >= 300 for s in _steps(killed)):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_at_kill = _steps(killed)
    assert steps_at_kill and max(steps_at_kill) < 1500

    done = subprocess.run(_train_cmd(killed, resume=True), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from_step"] == max(steps_at_kill)

    a, b = load_run(reference), load_run(killed)
    assert a.step == b.step == 1500
    for (pa, la), (pb, lb) in zip(_leaves(a.state.params), _leaves(b.state.params)):
        assert pa == pb
        assert la.dtype == np.float32
        np.testing.assert_array_equal(la, lb)
    # The metrics history of the resumed run has each logged step once, in order.
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 1500


def _leaves(tree):
    import jax
    return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def test_resume_refusals(tmp_path):
    from jaxnn.config import load_config
    from jaxnn.train import RunFolderError, train_from_config
    cfg = load_config("digits_mlp", overrides=["train.steps=20", "train.eval_every=10", "train.progress=false",
                                                "model.kwargs={width: 16, depth: 1}"])
    with pytest.raises(RunFolderError, match="nothing to resume"):
        train_from_config(cfg, run_dir=tmp_path / "r", resume=True)
    train_from_config(cfg, run_dir=tmp_path / "r")
    with pytest.raises(RunFolderError, match="already holds a run with checkpoints: add --resume"):
        train_from_config(cfg, run_dir=tmp_path / "r")
    with pytest.raises(RunFolderError, match="optimizer.lr"):
        train_from_config(cfg.replace(**{"optimizer.lr": 0.5}), run_dir=tmp_path / "r", resume=True)
