"""Metrics to the workdir: JSON lines and TensorBoard events (the terminal: progress.py).

Only the main process writes; the others get a writer that drops everything.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)


class MetricWriter:
    """Appends to metrics.jsonl; `resume_step` first drops the records of steps after it (a run
    killed after logging them re-runs those steps from its last checkpoint)."""

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(path):
            _truncate_after(path, resume_step)
        self._jsonl = open(path, "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:
            log.warning("tensorboardX is not installed: metrics go to metrics.jsonl only")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    if isinstance(value, int):  # counts (e.g. probe_examples) stay integers in the JSON
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _truncate_after(path: str, step: int) -> None:
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and _step_of(line) <= step]
    if len(kept) == len(lines):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill: dropped
        return 2**62


def read_metrics(workdir: str) -> list[dict]:
    """One record per step, in step order, from a run's metrics.jsonl (for tests, notebooks and
    sweeps). A step's records (training means, evaluation) are merged; a key written twice for a
    step (a step re-run after a kill) keeps its last value. A line cut short is skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    merged: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            merged.setdefault(int(record["step"]), {}).update(record)
    return [merged[step] for step in sorted(merged)]
