import os
import sys

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
