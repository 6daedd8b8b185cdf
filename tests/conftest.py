import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests import the library from the checkout they live in.
sys.path.insert(0, REPO)
# Many tests (and the subprocesses they start) compile the same smoke programs: XLA's persistent
# cache turns each repeat from ~15 s of compiling into a lookup. Set before JAX is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".pytest_cache", "xla"))
