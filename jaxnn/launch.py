"""``jaxnn launch``: one multi-host job as several local processes, on JAX's own distributed runtime.

Each process runs ``python -m jaxnn.cli COMMAND ...`` with ``JAXNN_COORDINATOR`` (127.0.0.1 and a free port),
``JAXNN_NUM_PROCESSES`` and ``JAXNN_PROCESS_ID`` set, which the command turns into ``jax.distributed.initialize``
(gloo collectives on CPU); ``--devices-per-process D`` makes each process simulate D CPU devices. No jax is imported
here: the launcher only starts, watches and stops the processes.

Process 0's output goes to this terminal (less gloo's connection notices, which it prints to stdout); the others'
is kept and shown when they fail. When a process fails, the
others get ``grace`` seconds to stop by themselves (JAX's runtime notices a lost peer) and are then terminated, so
the job never hangs; the exit status is the first failure's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_environment(base: dict, port: int, processes: int, index: int, devices_per_process: int | None) -> dict:
    env = dict(base)
    env.update({"JAXNN_COORDINATOR": f"127.0.0.1:{port}", "JAXNN_NUM_PROCESSES": str(processes),
                "JAXNN_PROCESS_ID": str(index), "JAXNN_AUTO_DISTRIBUTED": "0"})
    if devices_per_process is not None:
        from jaxnn.runtime import simulated_device_environment  # standard library only

        env = simulated_device_environment(env, devices_per_process)
    return env


def launch(processes: int, job: list[str], *, devices_per_process: int | None = None, timeout: float | None = None,
           grace: float = 60.0, python: str | None = None) -> int:
    """Run ``jaxnn JOB...`` as ``processes`` local processes of one job; return the job's exit status."""
    job = list(job)
    if job and job[0] == "--":
        job = job[1:]
    if not job:
        raise ValueError("launch: give the jaxnn command to run after --, e.g. `jaxnn launch --processes 2 -- train "
                         "digits_mlp`")
    if job[0] in ("launch", "jaxnn"):
        raise ValueError(f"launch: expected a jaxnn command after -- (run, train, curvature, landscape), got {job[0]!r}")
    if processes < 1:
        raise ValueError(f"launch: --processes must be >= 1, got {processes}")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(f"launch: --devices-per-process must be >= 1, got {devices_per_process}")
    port = free_port()
    logs = [None] + [tempfile.TemporaryFile(mode="w+") for _ in range(processes - 1)]
    started = time.monotonic()
    children = []
    for index in range(processes):
        env = process_environment(os.environ, port, processes, index, devices_per_process)
        out = subprocess.PIPE if index == 0 else logs[index]
        children.append(subprocess.Popen([python or sys.executable, "-m", "jaxnn.cli", *job], env=env, stdout=out,
                                         stderr=None if index == 0 else subprocess.STDOUT, text=index == 0))
    forwarder = threading.Thread(target=_forward, args=(children[0].stdout,), daemon=True)
    forwarder.start()
    status, failed_at = None, None
    try:
        while True:
            codes = [child.poll() for child in children]
            failures = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failures and status is None:
                index, code = failures[0]
                status, failed_at = code, time.monotonic()
                print(f"jaxnn launch: process {index} of {processes} exited with status {code}"
                      + (f":\n{_tail(logs[index])}" if logs[index] is not None else ""), file=sys.stderr)
            if all(code is not None for code in codes):
                break
            if failed_at is not None and time.monotonic() - failed_at > grace:
                print(f"jaxnn launch: stopping the {sum(c is None for c in codes)} process(es) still running "
                      f"{grace:.0f} s after the failure", file=sys.stderr)
                _stop(children)
                break
            if timeout is not None and time.monotonic() - started > timeout:
                print(f"jaxnn launch: the job ran past --timeout {timeout:.0f} s; stopping it", file=sys.stderr)
                _stop(children)
                return 124
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(children)
        return 130
    finally:
        forwarder.join(timeout=5)
        for log in logs[1:]:
            log.close()
    return 128 - status if status is not None and status < 0 else (status or 0)  # killed by signal N: 128 + N


def _forward(stream) -> None:
    """Process 0's stdout to ours, line by line, without gloo's "[Gloo] Rank i is connected ..." notices."""
    for line in stream:
        if not line.startswith("[Gloo]"):
            sys.stdout.write(line)
            sys.stdout.flush()


def _tail(log, lines: int = 20) -> str:
    log.seek(0)
    return "".join([line for line in log.readlines() if not line.startswith("[Gloo]")][-lines:])


def _stop(children: list) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
