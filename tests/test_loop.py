"""The loop shared by the trainer and the linear evaluation: what an interruption leaves behind."""

import json
import os
import signal

import jax
import numpy as np
from helpers import framework_config

from simco_jax import checkpointing, train

TIMING_KEYS = ("images_per_s", "eta_s")  # wall-clock measurements: the only values that differ


def _records(workdir):
    """metrics.jsonl line by line, the timing left out."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in lines]


def test_sigterm_between_log_points_leaves_the_metrics_of_an_uninterrupted_run(
    tmp_path, monkeypatch
):
    # Log points at steps 4, 8 (an epoch end) and 12; checkpoints every 3 steps, so that both
    # the periodic saves (3, 9) and the preemption (6) fall between log points.
    config = framework_config("simco", max_steps=12, log_every_steps=4, checkpoint_every_steps=3)
    full = train.train_and_evaluate(config, str(tmp_path / "full"))

    save = checkpointing.Checkpointer.save

    def save_then_preempt(self, step, state, **kwargs):
        save(self, step, state, **kwargs)
        if step == 6:  # a scheduler's SIGTERM, right after the checkpoint of step 6
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpointing.Checkpointer, "save", save_then_preempt)
    workdir = str(tmp_path / "run")
    stopped = train.train_and_evaluate(config, workdir)
    assert stopped["preempted"] == signal.SIGTERM and stopped["step"] == 6
    assert [r["step"] for r in _records(workdir)] == [4]  # steps 5 and 6 are not logged yet
    monkeypatch.undo()

    resumed = train.train_and_evaluate(config, workdir)
    assert resumed["step"] == 12
    jax.tree.map(np.testing.assert_array_equal, resumed["state"], full["state"])
    # The log at step 8 averages steps 5 to 8 in both runs: 5 and 6 came with the checkpoint.
    assert _records(workdir) == _records(tmp_path / "full")
    assert [r["step"] for r in _records(workdir) if "loss" in r] == [4, 8, 12]
