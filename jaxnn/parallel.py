"""Meshes and shardings. Multi-device is the default path: one device is a mesh of size 1.

Batches are split along their leading axis over the ``data`` mesh axis; the train state is replicated.
jit follows the arrays' shardings, so the same compiled step runs on 1 or N devices (XLA inserts the
gradient all-reduce).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D data-parallel mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split across the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of ``tree`` on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh the first array of ``tree`` is placed on (None when it is not on a mesh)."""
    sharding = getattr(jax.tree.leaves(tree)[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def check_batch_divisible(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(f"{name}={batch_size} must be divisible by the number of devices ({n}) to shard the batch")


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int,
                           local_device_ids: list[int] | None = None) -> None:
    """Start multi-host JAX (one call per process, before any computation). On CPU, gloo collectives are used.

    Afterwards ``jax.devices()`` lists every process's devices and :func:`make_mesh` spans all hosts.
    """
    # Only affects CPU devices; must be set before the backend starts (so no jax.devices() call first).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)


def host_local_batch_to_global(batch: Any, mesh: Mesh) -> Any:
    """Assemble each process's slice of the batch (leading axis) into one global array sharded over ``mesh``."""
    sharding = batch_sharding(mesh)

    def to_global(local):
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return jax.tree.map(to_global, batch)
