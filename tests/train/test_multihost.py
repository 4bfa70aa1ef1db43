"""Multi-host on one machine: `jaxnn launch` starts local processes of one jax.distributed job (gloo collectives on
127.0.0.1). Training, checkpoints across device counts and topologies, analysis, and the faults: a coordinator that
cannot be reached, a process killed mid-training. Every test starts and stops its processes itself, with timeouts."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest


pytestmark = pytest.mark.multidevice

ENV = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXNN_COORDINATOR")}
READER = pathlib.Path(__file__).with_name("_read_checkpoint.py")
# A constant learning rate: a run stopped early and resumed with more steps then follows the uninterrupted one.
TRAIN = ["train", "digits_mlp", "--set", "train.progress=false", "--set", "train.eval_every=20",
         "--set", "checkpoint.every_steps=20", "--set", "model.kwargs={width: 32, depth: 1}",
         "--set", "optimizer.schedule=constant"]


def _jaxnn(*args, env=None, timeout=300):
    out = subprocess.run([sys.executable, "-m", "jaxnn.cli", *map(str, args)], capture_output=True, text=True,
                         env=env or ENV, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _checkpoints(tmp_path, *wanted):
    """The checkpoint trees of ``wanted`` (run_dir, step) pairs, restored onto one device, read in one process."""
    paths = [tmp_path / f"{run_dir.name}-{step}.npy" for run_dir, step in wanted]
    triples = [str(item) for (run_dir, step), path in zip(wanted, paths) for item in (run_dir, step, path)]
    out = subprocess.run([sys.executable, str(READER), *triples], capture_output=True, text=True, env=ENV,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return [np.load(path) for path in paths]


def test_two_processes_train_like_one_process_and_checkpoints_move_between_topologies(tmp_path):
    """1 process x 8 devices vs 2 processes x 4 devices (same global mesh size): the same training to 1e-5
    (float32; the cross-process all-reduce sums in another order). A checkpoint saved on 8 devices restores on 1
    device bit for bit; resuming on the topology that wrote it continues bit-identically; a 1-device checkpoint
    resumes on 2x4 to 1e-5."""
    eight, two, halfway = tmp_path / "eight", tmp_path / "two", tmp_path / "halfway"
    _jaxnn(*TRAIN, "--devices", 8, "--run-dir", eight, "--set", "train.steps=40")
    _jaxnn("launch", "--processes", 2, "--devices-per-process", 4, "--timeout", 240, "--",
           *TRAIN, "--run-dir", two, "--set", "train.steps=40")
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == sorted({r["step"] for r in records})  # written once, by process 0
    # stop an 8-device run at 20 and continue it on 8 devices
    _jaxnn(*TRAIN, "--devices", 8, "--run-dir", halfway, "--set", "train.steps=20")
    _jaxnn(*TRAIN, "--devices", 8, "--run-dir", halfway, "--set", "train.steps=40", "--resume")
    moved = tmp_path / "moved"
    _jaxnn(*TRAIN, "--devices", 1, "--run-dir", moved, "--set", "train.steps=20")  # written on 1 device
    _jaxnn("launch", "--processes", 2, "--devices-per-process", 4, "--timeout", 240, "--",
           *TRAIN, "--run-dir", moved, "--set", "train.steps=40", "--resume")  # 1 -> 2x4
    # every checkpoint is read on one device (8 -> 1 and 2x4 -> 1), all in one reader process
    final_eight, final_two, step20, halfway20, halfway40, moved40 = _checkpoints(
        tmp_path, (eight, 40), (two, 40), (eight, 20), (halfway, 20), (halfway, 40), (moved, 40))
    np.testing.assert_allclose(final_two, final_eight, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(halfway20, step20)
    np.testing.assert_array_equal(halfway40, final_eight)  # resumed on 8 devices: bit-identical
    np.testing.assert_allclose(moved40, final_eight, rtol=0, atol=1e-5)


def test_curvature_and_landscape_on_two_processes_equal_one_device(analysed_run, tmp_path):
    """2 processes x 2 devices vs one device (conftest's reference), float64: eigenvalues, trace, a 2-D landscape
    split by data and by grid point over the hosts, to 1e-10."""
    run, one_dir = analysed_run.run, analysed_run.one_device
    two_dir = tmp_path / "two"
    for command, options in (("curvature", analysed_run.curvature), ("landscape", analysed_run.landscape)):
        _jaxnn("launch", "--processes", 2, "--devices-per-process", 2, "--timeout", 240, "--",
               command, run, *options, "--out", two_dir)
    _jaxnn("launch", "--processes", 2, "--devices-per-process", 2, "--timeout", 240, "--",
           "landscape", run, *analysed_run.landscape, "--split", "points", "--out", tmp_path / "points")

    def plane_of(out_dir):
        saved = np.load(out_dir / "landscape.npz")
        return saved[[k for k in saved.files if "plane" in k and "loss" in k][0]]

    one, two = (json.loads((d / "curvature.json").read_text()) for d in (one_dir, two_dir))
    plane1, plane2, plane_points = plane_of(one_dir), plane_of(two_dir), plane_of(tmp_path / "points")
    for key in ("top", "bottom"):
        assert one["eigenvalues"][key] == pytest.approx(two["eigenvalues"][key], rel=1e-10, abs=1e-12)
    assert one["trace"]["estimate"] == pytest.approx(two["trace"]["estimate"], rel=1e-10)
    assert np.abs(plane1 - plane2).max() <= 1e-10 * np.abs(plane1).max()
    assert np.abs(plane1 - plane_points).max() <= 1e-10 * np.abs(plane1).max()  # grid points split over hosts


def test_unreachable_coordinator_is_one_clear_line_within_the_timeout(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(ENV, JAXNN_COORDINATOR=f"127.0.0.1:{port}", JAXNN_NUM_PROCESSES="2", JAXNN_PROCESS_ID="1",
               JAXNN_INIT_TIMEOUT="4")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "jaxnn.cli", *TRAIN, "--run-dir", str(tmp_path / "r")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and time.monotonic() - start < 30
    assert out.stderr.startswith("jaxnn: error:") and f"127.0.0.1:{port} within 4 s" in out.stderr


def test_a_killed_process_stops_the_job_and_both_resume_bit_identically(tmp_path):
    """Kill process 1 once a checkpoint exists: the job stops with an error within the heartbeat timeout plus the
    launcher's grace; the last complete checkpoint restores; resuming with both processes ends where an
    uninterrupted 2-process run ends, bit for bit."""
    steps = ["--set", "train.steps=400", "--set", "checkpoint.every_steps=20", "--set", "train.eval_every=20"]
    env = dict(ENV, JAXNN_HEARTBEAT_TIMEOUT="5")
    killed = tmp_path / "killed"
    job = subprocess.Popen([sys.executable, "-m", "jaxnn.cli", "launch", "--processes", "2", "--devices-per-process",
                            "2", "--grace", "20", "--", *TRAIN, *steps, "--run-dir", str(killed)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (killed / "checkpoints" / "40").is_dir():
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        victim = _process_one_of(job.pid)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0 and time.monotonic() - killed_at < 60
    assert "process 1 of 2 exited with status -9" in err
    last = max(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    # resume with both processes to a fixed end, and compare with an uninterrupted 2-process run to the same end
    end = ["--set", f"train.steps={last + 40}"]
    _jaxnn("launch", "--processes", 2, "--devices-per-process", 2, "--timeout", 240, "--", *TRAIN, *steps[2:], *end,
           "--run-dir", killed, "--resume", env=env)
    whole = tmp_path / "whole"
    _jaxnn("launch", "--processes", 2, "--devices-per-process", 2, "--timeout", 300, "--", *TRAIN, *steps[2:], *end,
           "--run-dir", whole, env=env)
    # the last checkpoint before the kill restores (checkpoint.keep_last=3 keeps it through the 2 saves since)
    at_kill, resumed, uninterrupted = _checkpoints(tmp_path, (killed, last), (killed, last + 40), (whole, last + 40))
    assert at_kill.size == resumed.size and np.all(np.isfinite(at_kill))
    np.testing.assert_array_equal(resumed, uninterrupted)


def _process_one_of(launcher_pid: int) -> int:
    """The pid of the launcher's child with JAXNN_PROCESS_ID=1."""
    for _ in range(100):
        for child in pathlib.Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
            environ = pathlib.Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if b"JAXNN_PROCESS_ID=1" in environ:
                return int(child)
        time.sleep(0.1)
    raise AssertionError("process 1 not found")
