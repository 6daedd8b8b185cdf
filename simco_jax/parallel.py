"""Devices, meshes and host/device transfer, for one device, one host or many hosts.

The whole library uses one 1-D mesh with a `data` axis over every device of every process: the
batch is split along it, the train state and the dataset are replicated. BatchNorm statistics and
in-batch negatives then span the global batch, exactly as the official single-GPU run.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# Environment variables by which cluster launchers announce a multi-process job.
_CLUSTER_ENV = (
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def initialize_distributed(
    coordinator: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    *,
    heartbeat_timeout_s: int | None = None,
) -> bool:
    """Starts jax.distributed for a multi-process run; returns whether it did.

    Explicit arguments win; otherwise JAX auto-detects Cloud TPU pods and cluster launchers
    (SLURM, Open MPI). A single-process run without either does nothing.
    """
    explicit = bool(coordinator) or num_processes > 1
    slurm_multi = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    auto = slurm_multi or any(k in os.environ for k in _CLUSTER_ENV[1:])
    if not (explicit or auto):
        return False
    kwargs = {}
    if explicit:
        kwargs = dict(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    if heartbeat_timeout_s is not None:
        kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout_s
    try:
        jax.distributed.initialize(**kwargs)
    except TypeError:  # a JAX without the heartbeat argument
        kwargs.pop("heartbeat_timeout_seconds", None)
        jax.distributed.initialize(**kwargs)
    return True


def make_mesh() -> Mesh:
    """A 1-D data-parallel mesh over all devices of all processes."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def put_replicated(tree, mesh: Mesh):
    """Host arrays present in full on every process → one replicated global array each."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


def to_host(tree):
    """Global arrays → NumPy on this process. Replicated arrays need no communication."""

    def fetch(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)


def is_main_process() -> bool:
    return jax.process_index() == 0
