"""Devices, meshes and host/device transfer, for one device, one host or many hosts.

The whole library uses one 1-D mesh with a `data` axis over every device of every process: the
batch is split along it, the train state and the dataset are replicated. BatchNorm statistics and
in-batch negatives then span the global batch, exactly as the official single-GPU run.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def _cluster_env_is_multi_process() -> bool:
    """Whether a cluster launcher announces more than one process (then JAX auto-detects)."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return True
    return "MEGASCALE_COORDINATOR_ADDRESS" in env


def initialize_distributed(
    coordinator: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    *,
    heartbeat_timeout_s: int | None = None,
    initialization_timeout_s: int | None = None,
) -> bool:
    """Starts jax.distributed for a multi-process run; returns whether it did.

    Explicit arguments win; what is left unset JAX auto-detects (Cloud TPU pods, SLURM, Open MPI).
    A single-process run without either does nothing. `heartbeat_timeout_s`: a process that sends
    no heartbeat for this long counts as dead, and the survivors stop with an error instead of
    waiting forever in a collective (None: JAX's default, 100 s). `initialization_timeout_s`: how
    long each process waits for all the others to connect (None: JAX's default, 300 s); raise it
    when hosts start far apart.
    """
    explicit = bool(coordinator) or num_processes > 1
    if not (explicit or _cluster_env_is_multi_process()):
        return False
    # Cross-process collectives on CPU need an implementation; gloo (TCP) is JAX's default
    # since 0.4.3x, set here for a JAX whose default is none. GPUs and TPUs are not affected.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(
        coordinator_address=coordinator or None,
        num_processes=num_processes if num_processes > 0 else None,
        process_id=process_id if process_id >= 0 else None,
    )
    if heartbeat_timeout_s is not None:
        kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout_s)
    if initialization_timeout_s is not None:
        kwargs["initialization_timeout"] = int(initialization_timeout_s)
    jax.distributed.initialize(**kwargs)
    if jax.default_backend() == "cpu":
        connect_collectives()
    return True


def connect_collectives() -> None:
    """Runs one all-reduce over the mesh of every device, while the processes are in step.

    On CPUs, XLA connects the gloo (TCP) communicators of a group of devices at the first
    collective that the group runs, and gives every process only gloo's fixed 30 s to arrive
    there (not configurable in jaxlib 0.10). Left to the train step, whose compilation can take
    minutes longer on one host than on another, that fails with `Gloo context initialization
    failed: DEADLINE_EXCEEDED`. Here, just after `jax.distributed.initialize` returned on every
    process, they arrive within a second. The communicators are cached per group of devices, and
    every collective of the library spans this mesh; later collectives wait for a slow process
    for `--xla_cpu_collective_timeout_seconds` (XLA's default, 30 min).
    """
    mesh = make_mesh()
    ones = np.ones(jax.local_device_count(), np.int32)
    count = jax.jit(jnp.sum, out_shardings=replicated(mesh))(
        jax.make_array_from_process_local_data(batch_sharded(mesh), ones)
    )
    assert int(count.addressable_data(0)) == jax.device_count()


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


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process. Collective: every process must call it together."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def is_main_process() -> bool:
    return jax.process_index() == 0
