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
        connect_collectives(timeout_s=initialization_timeout_s or 300)
    return True


def connect_collectives(timeout_s: int = 300) -> None:
    """Connects the CPU (gloo) communicators of every group of devices the library uses, now.

    XLA:CPU connects a group's gloo communicator at the group's first collective and gives every
    process gloo's fixed 30 s to arrive (not configurable in jaxlib 0.10). Left to the trainer,
    the processes get there minutes apart when one compiles the train step more slowly, and fail
    with `Gloo context initialization failed: DEADLINE_EXCEEDED`. So both groups are connected
    here, each by a tiny program compiled ahead of time and run right after a barrier of the
    coordination service (`timeout_s`; the barrier Orbax also uses): the mesh of every device
    (the train step, evaluation, gathering sharded arrays) and one device per process
    (`multihost_utils.process_allgather` of host values, Orbax's syncs). The communicators are
    cached; later collectives wait up to XLA's `--xla_cpu_collective_timeout_seconds` (30 min).
    """
    from jax._src import distributed

    mesh = make_mesh()
    per_process = Mesh(
        np.asarray(jax.devices()).reshape(jax.process_count(), jax.local_device_count()),
        ("processes", "local_devices"),
    )
    ones = np.ones(jax.local_device_count(), np.int32)
    programs = [  # (compiled program, its argument): compiled before anyone waits on the others
        (jax.jit(jnp.sum, out_shardings=replicated(mesh)), batch_sharded(mesh), ones),
        (  # what process_allgather compiles: the value of each process, replicated
            jax.jit(lambda x: x, out_shardings=NamedSharding(per_process, PartitionSpec())),
            NamedSharding(per_process, PartitionSpec("processes")),
            ones[:1],
        ),
    ]
    runs = []
    for function, sharding, local in programs:
        x = jax.make_array_from_process_local_data(sharding, local)
        runs.append((function.lower(x).compile(), x))
    distributed.global_state.client.wait_at_barrier(
        "simco_jax_connect_collectives", timeout_in_ms=int(timeout_s * 1000)
    )
    count, gathered = (compiled(x) for compiled, x in runs)
    assert int(count.addressable_data(0)) == jax.device_count()
    assert np.asarray(gathered.addressable_data(0)).shape == (jax.process_count(),)


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
