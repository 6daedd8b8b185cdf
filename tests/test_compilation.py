"""One compilation per run: the train chunk compiles once, whatever the epochs, evals and tails.

JAX logs "Compiling <module> with global shapes ..." each time it lowers a jitted function for a
new signature (a recompile); the test listens to that logger at DEBUG level, so it needs no JAX
flag and counts also what XLA's persistent cache then serves from disk.
"""

import collections
import logging
import re

import pytest

from simco_jax import train
from tests.helpers import framework_config

_COMPILING = re.compile(r"^Compiling (?:jit\(|jit_)?(\w+)")  # jit(f) or jit_f, by version
_JAX_LOGGER = "jax._src.interpreters.pxla"


class _CompileCounter(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.counts = collections.Counter()

    def emit(self, record):
        match = _COMPILING.match(record.getMessage())
        if match:
            self.counts[match.group(1)] += 1


@pytest.fixture
def compile_counts():
    logger = logging.getLogger(_JAX_LOGGER)
    counter = _CompileCounter()
    saved = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # keep JAX's debug lines out of the test output
    logger.addHandler(counter)
    try:
        yield counter.counts
    finally:
        logger.removeHandler(counter)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def test_three_epochs_with_evals_compile_the_train_chunk_once(tmp_path, compile_counts):
    # 8 steps per epoch in chunks of 3: every epoch ends in a short chunk (3, 3, 2), checkpoints
    # cut chunks too, and each epoch evaluates (probe and kNN): every place a recompile could
    # hide. MoCo v2 adds the momentum encoder and the queue to the state.
    config = framework_config(
        "mocov2", max_epochs=3, steps_per_dispatch=3, eval_every_epochs=1, knn_every_epochs=1
    )
    summary = train.train_and_evaluate(config, str(tmp_path))

    assert summary["step"] == 3 * 8
    assert "knn_top1" in summary and "probe_top1" in summary
    assert compile_counts["chunk"] == 1, dict(compile_counts)
    # Evaluation: compiled at the first epoch's eval, never again (3 evals ran). Features are
    # computed for two array sizes (train set for kNN, test set), hence at most two signatures.
    assert 1 <= compile_counts["features"] <= 2, dict(compile_counts)
    assert compile_counts["probe_counts"] == 1, dict(compile_counts)
    assert compile_counts["knn_counts"] == 1, dict(compile_counts)
