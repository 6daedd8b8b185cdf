"""writers.py: the metrics file."""

import json

from simco_jax import writers


def test_metrics_have_one_record_per_step_after_a_resume(tmp_path):
    # A run killed after logging steps 5-6 past its checkpoint of step 4 re-runs them.
    lines = [
        {"step": 2, "loss": 2.0},
        {"step": 4, "loss": 1.5},
        {"step": 4, "probe_top1": 10.0},  # the evaluation at the same step
        {"step": 6, "loss": 9.9},  # re-run after the resume
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "lo')  # cut short
    writer = writers.MetricWriter(str(tmp_path), resume_step=4)
    writer.write(6, {"loss": 1.0})
    writer.close()
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert raw == [*lines[:3], {"step": 6, "loss": 1.0}]  # truncated past the restored step
    assert writers.read_metrics(str(tmp_path)) == [
        {"step": 2, "loss": 2.0},
        {"step": 4, "loss": 1.5, "probe_top1": 10.0},
        {"step": 6, "loss": 1.0},
    ]
    # Readers also merge a file written by an older version: the last value of a step wins.
    path.write_text("".join(json.dumps(r) + "\n" for r in [*lines, {"step": 6, "loss": 1.0}]))
    assert writers.read_metrics(str(tmp_path))[-1] == {"step": 6, "loss": 1.0}
