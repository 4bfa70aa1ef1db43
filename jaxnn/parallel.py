"""Meshes, shardings and multi-host start-up. Multi-device is the default path: one device is a mesh of size 1.

Data parallelism over a 1-D ``data`` mesh axis, three ways that give the same parameters:

* ``jit`` — arrays carry shardings (batch split along ``data``, state replicated or ``sharded``) and XLA inserts
  the gradient all-reduce (and, for sharded parameters, the gathers);
* ``shard_map`` — the per-device step is written out: local gradients, then an explicit ``lax.pmean``;
* ``pmap`` — the same per-device step under ``jax.pmap`` (what pmap-era research code looks like).

Batch norm reads its axis name from the same mesh (:func:`jaxnn.models.layers.batch_norm_axis`), so its statistics
are those of the global batch on every path. Multi-host is JAX's runtime: :func:`initialize_from_environment`
starts ``jax.distributed`` from ``JAXNN_COORDINATOR``/``JAXNN_NUM_PROCESSES``/``JAXNN_PROCESS_ID`` (set by
``jaxnn launch``) or from a cluster's own environment (SLURM, Open MPI, TPU pods), each process holds its slice of
every global batch, and process 0 alone writes logs, plots and JSON.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxnn.config import PARALLEL_MODES, PARAM_LAYOUTS, check_choice, check_parallel

DATA_AXIS = "data"
MODES = PARALLEL_MODES  # the rules live with the config: config.check_parallel
COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = "JAXNN_COORDINATOR", "JAXNN_NUM_PROCESSES", "JAXNN_PROCESS_ID"
INIT_TIMEOUT_ENV, HEARTBEAT_TIMEOUT_ENV = "JAXNN_INIT_TIMEOUT", "JAXNN_HEARTBEAT_TIMEOUT"


class DeviceError(ValueError):
    """A device request that cannot be met (more devices than exist, a batch that cannot be split evenly)."""


def select_devices(count: int | None = None) -> list:
    """The first ``count`` devices of every process (``None`` or -1: all of them), in ``jax.devices()`` order."""
    devices = jax.devices()
    if count is None or count == -1:
        return devices
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise DeviceError(f"parallel.devices: expected -1 (all) or a positive number of devices, got {count!r}")
    if count > len(devices):
        platform = devices[0].platform
        hint = (f" (on a CPU, `--devices {count}` or XLA_FLAGS=--xla_force_host_platform_device_count={count} "
                "set before jax starts simulates them)") if platform == "cpu" else ""
        raise DeviceError(f"parallel.devices={count} asks for {count} devices, but only {len(devices)} "
                          f"{platform} device(s) exist{hint}")
    if jax.process_count() > 1 and count != len(devices):
        raise DeviceError(f"parallel.devices={count}: a multi-process run uses every device of every process "
                          f"({len(devices)}); use -1")
    return devices[:count]


def make_mesh(devices: list | int | None = None) -> Mesh:
    """A 1-D data-parallel mesh over ``devices`` (a list, a count, or None: every device of every process)."""
    if devices is None or isinstance(devices, (int, np.integer)):
        devices = select_devices(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def mesh_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.devices.size)


def cpu_collectives(mesh: Mesh | None) -> bool:
    """Whether programs on ``mesh`` run XLA:CPU collectives (several CPU devices, simulated or across processes).

    There, a small program queued on the outputs of a collective program still in flight can take a device's
    in-flight slot before that device joins the collective, and both wait for ever (seen as an aborted rendezvous
    with 8 simulated devices and as a hung gloo all-reduce across 2 processes, mostly on a loaded machine); the
    loops that dispatch collective programs wait for each before going on when this is true (:func:`settle`)."""
    return mesh is not None and mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"


def settle(tree: Any, mesh: Mesh | None) -> Any:
    """``tree``, once computed when programs on ``mesh`` run XLA:CPU collectives (:func:`cpu_collectives`); at once
    otherwise (asynchronous dispatch as usual). Loops that dispatch collective programs one after another call it
    after each dispatch: training steps and evaluation batches in ``fit``, landscape chunks, curvature products.
    The CLI's simulated devices also turn CPU async dispatch off (:func:`jaxnn.runtime.simulated_device_environment`),
    but a script that sets ``XLA_FLAGS`` itself keeps it on: notebook 04 (``fit`` on 8 simulated devices), run four
    at a time beside the CLI tests on 2 cores, aborted in an all-reduce rendezvous in 7 of 16 runs without these
    waits and in 0 of 12 with them."""
    if cpu_collectives(mesh):
        jax.block_until_ready(tree)
    return tree


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split across the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches stacked on a leading axis (K, B, ...): the batch axis B split across the mesh."""
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of ``tree`` on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh the first array of ``tree`` is placed on (None when it is not on a mesh)."""
    sharding = getattr(jax.tree.leaves(tree)[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def sharded_spec(shape: tuple, devices: int) -> PartitionSpec:
    """FSDP-style: the largest axis divisible by ``devices`` split along ``data``; replicated if there is none."""
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % devices == 0 and size >= devices]
    if devices == 1 or not candidates:
        return PartitionSpec()
    _, axis = max(candidates)
    return PartitionSpec(*([None] * axis + [DATA_AXIS]))


def state_shardings(tree: Any, mesh: Mesh, layout: str = "replicated") -> Any:
    """A sharding for every array of ``tree`` (a TrainState or any pytree): replicated, or ``sharded`` (parameters
    and optimizer state split along ``data`` by :func:`sharded_spec`, scalars and keys replicated)."""
    check_choice("parallel.params", layout, PARAM_LAYOUTS, "parameter layout")
    devices = mesh_size(mesh)

    def spec(leaf):
        shape = tuple(np.shape(leaf))
        if layout == "replicated" or len(shape) == 0:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, sharded_spec(shape, devices))

    return jax.tree.map(spec, tree)


def place_state(tree: Any, mesh: Mesh, layout: str = "replicated") -> Any:
    """``tree`` on the mesh with :func:`state_shardings` (copies only what is not already placed so)."""
    return jax.device_put(tree, state_shardings(tree, mesh, layout))


def nearest_divisible(value: int, divisor: int) -> list[int]:
    below = (value // divisor) * divisor
    return [v for v in (below, below + divisor) if v > 0]


def check_batch_divisible(batch_size: int, mesh: Mesh | int, name: str = "batch_size") -> None:
    """Raise naming both numbers and the nearest valid batch sizes when the batch cannot be split evenly."""
    devices = mesh if isinstance(mesh, int) else mesh_size(mesh)
    if batch_size % devices:
        valid = " or ".join(str(v) for v in nearest_divisible(batch_size, devices))
        raise DeviceError(f"{name}={batch_size} cannot be split evenly over {devices} devices (the global batch is "
                          f"divided along the data axis); nearest valid sizes: {valid}")


def check_mode(mode: str, layout: str) -> None:
    """ConfigError (a ValueError) naming parallel.mode or parallel.params unless the pair is valid."""
    check_parallel(mode, layout)


def is_primary() -> bool:
    """True in the process that writes logs, plots and JSON (process 0; the only one without multi-host)."""
    return jax.process_index() == 0


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int,
                           local_device_ids: list[int] | None = None, timeout_s: int = 60,
                           heartbeat_timeout_s: int = 30) -> None:
    """Start multi-host JAX (one call per process, before any computation). On CPU, gloo collectives are used.

    Afterwards ``jax.devices()`` lists every process's devices and :func:`make_mesh` spans all hosts. A coordinator
    that cannot be reached within ``timeout_s`` seconds is a ``RuntimeError`` naming it; a process that stops
    answering is noticed by the others within ``heartbeat_timeout_s`` seconds (they stop with an error).
    """
    import sys
    import threading

    # Only affects CPU devices; must be set before the backend starts (so no jax.devices() call first).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if process_id != 0:
        _wait_for_coordinator(coordinator_address, timeout_s, process_id, num_processes)
    # JAX's runtime aborts the process (a C++ fatal error) when the job does not assemble in time: say why first.
    notice = threading.Timer(max(0.0, timeout_s - 0.5), lambda: print(
        f"jaxnn: error: process {process_id} of {num_processes}: the job did not assemble within {timeout_s} s "
        f"(coordinator {coordinator_address}); is every process started?", file=sys.stderr, flush=True))
    notice.daemon = True
    notice.start()
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)
    except Exception as error:  # jax raises XlaRuntimeError / RuntimeError with long C++ messages
        raise RuntimeError(f"process {process_id} of {num_processes} could not join the coordinator at "
                           f"{coordinator_address} within {timeout_s} s: {str(error).splitlines()[0]}") from error
    finally:
        notice.cancel()


def _wait_for_coordinator(address: str, timeout_s: float, process_id: int, num_processes: int) -> None:
    """Block until something listens at ``host:port`` (process 0's coordinator), or raise after ``timeout_s``."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1.0):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"process {process_id} of {num_processes} could not reach the coordinator at "
                                   f"{address} within {timeout_s:.0f} s ({error}); is process 0 running?") from None
            time.sleep(0.2)


CLUSTER_MARKERS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize_from_environment() -> bool:
    """Join a multi-process run if the environment describes one; returns whether it did.

    ``JAXNN_COORDINATOR`` (host:port), ``JAXNN_NUM_PROCESSES`` and ``JAXNN_PROCESS_ID`` (what ``jaxnn launch``
    sets) are used when present; otherwise a SLURM job, an Open MPI launch or a TPU pod slice is left to
    ``jax.distributed.initialize()``'s own detection. ``JAXNN_INIT_TIMEOUT`` bounds the wait for the coordinator
    (seconds, default 60), ``JAXNN_HEARTBEAT_TIMEOUT`` how soon a lost process is noticed (default 30).
    """
    timeout = int(os.environ.get(INIT_TIMEOUT_ENV, "60"))
    heartbeat = int(os.environ.get(HEARTBEAT_TIMEOUT_ENV, "30"))
    if os.environ.get(COORDINATOR_ENV):
        try:
            num_processes = int(os.environ[NUM_PROCESSES_ENV])
            process_id = int(os.environ[PROCESS_ID_ENV])
        except (KeyError, ValueError) as error:
            raise ValueError(f"{COORDINATOR_ENV} is set, so {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} must be "
                             f"integers too ({error})") from None
        initialize_distributed(os.environ[COORDINATOR_ENV], num_processes, process_id, timeout_s=timeout,
                               heartbeat_timeout_s=heartbeat)
        return True
    if any(marker in os.environ for marker in CLUSTER_MARKERS) and os.environ.get("JAXNN_AUTO_DISTRIBUTED", "1") == "1":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(initialization_timeout=timeout)
        return jax.process_count() > 1
    return False


def host_local_batch_to_global(batch: Any, mesh: Mesh) -> Any:
    """Assemble each process's slice of the batch (leading axis) into one global array sharded over ``mesh``."""
    sharding = batch_sharding(mesh)

    def to_global(local):
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return jax.tree.map(to_global, batch)


def global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full (each takes the shards of its devices)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(tree: Any) -> Any:
    """``jax.device_get`` that also reads replicated arrays spanning several processes (from a local copy)."""
    def get(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                raise ValueError(f"to_host: an array of shape {leaf.shape} is split over several processes; "
                                 "gather it first (jax.experimental.multihost_utils.process_allgather)")
            return np.asarray(leaf.addressable_shards[0].data)
        return jax.device_get(leaf)

    return jax.tree.map(get, tree)


def process_slice(batch_size: int) -> slice:
    """The rows of a global batch this process holds (equal, contiguous slices in process order)."""
    count, index = jax.process_count(), jax.process_index()
    if batch_size % count:
        raise DeviceError(f"batch_size={batch_size} cannot be split evenly over {count} processes; nearest valid "
                          f"sizes: {' or '.join(str(v) for v in nearest_divisible(batch_size, count))}")
    per = batch_size // count
    return slice(index * per, (index + 1) * per)


def describe(mesh: Mesh) -> str:
    devices = mesh.devices.ravel()
    return f"{len(devices)} {devices[0].platform} device(s) in {jax.process_count()} process(es)"
