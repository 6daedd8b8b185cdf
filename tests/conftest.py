import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests import the library from the checkout they live in.
sys.path.insert(0, REPO)
# Many tests (and the subprocesses they start) compile the same smoke programs: XLA's persistent
# cache turns each repeat from seconds of compiling into a lookup. It lives outside the checkout,
# so a fresh clone (CI) starts warm too; JAX keys each entry by the program, its compile options
# and the JAX/XLA versions, so a changed library or program simply misses. Set before JAX is
# imported; the subprocesses inherit it.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "simco_jax",
        "xla",
    ),
)
# JAX caches only programs that took a second or more to compile; the suite's are mostly smaller,
# and a fresh interpreter (each subprocess test) would compile each of them again.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """The uninterrupted reference run (helpers.reference_config): its workdir and final state.

    One per session: the tests of the trainer, checkpointing and resuming only read it (a test
    that changes a workdir copies it first), and every fault must end equal to it."""
    from helpers import REFERENCE_STEPS, checkpoint_steps, reference_config

    from simco_jax import train

    workdir = tmp_path_factory.mktemp("reference")
    summary = train.train_and_evaluate(reference_config(), str(workdir))
    assert summary["step"] == REFERENCE_STEPS
    assert checkpoint_steps(workdir) == list(range(4, REFERENCE_STEPS + 1, 4))
    return workdir, summary["state"]


def pytest_collection_modifyitems(items):
    """The modules that hold slow tests first, each with its slow tests first: a run of both
    (`-m "slow or not slow"`, as CI runs them) starts its longest tests early instead of leaving
    one worker alone with them at the end, and a module's tests stay together, so a worker
    builds a module's fixtures (reference runs) once for the slow and the default tests."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    position = {}
    for item in items:
        position.setdefault(item.module.__name__, len(position))

    def order(item):
        module = item.module.__name__
        return (module not in slow, position[module], not item.get_closest_marker("slow"))

    items.sort(key=order)
