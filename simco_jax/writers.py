"""Metrics to the workdir: JSON lines and TensorBoard events (the terminal: progress.py).

Only the main process writes; the others get a writer that drops everything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time

log = logging.getLogger(__name__)

TENSORBOARD_FLUSH_S = 30.0  # how stale the TensorBoard file may be; metrics.jsonl is per line


class MetricsWriteError(OSError):
    """The metrics could not be written (full disk, read-only or vanished workdir)."""


class MetricWriter:
    """Appends to metrics.jsonl; `resume_step` first drops the records of steps after it (a run
    killed after logging them re-runs those steps from its last checkpoint).

    Everything is written from the calling thread (TensorBoard's events too, with no background
    writer), so a write that fails (a disk that filled) raises MetricsWriteError, one line, at
    the write; `close` after that, or on the way out of any other error, stays quiet.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._failed = False
        self._flushed_at = time.monotonic()
        if not enabled:
            return
        self.path = os.path.join(workdir, "metrics.jsonl")
        with self._errors_named():
            if resume_step is not None and os.path.exists(self.path):
                _truncate_after(self.path, resume_step)
            self._jsonl = open(self.path, "a", buffering=1)
            self._tb = _tensorboard_events(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with self._errors_named():
            self._jsonl.write(json.dumps(record) + "\n")
            if self._tb is not None:
                self._write_events(record)

    def _write_events(self, record: dict) -> None:
        from tensorboardX import summary
        from tensorboardX.proto import event_pb2

        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                event = event_pb2.Event(
                    wall_time=time.time(), step=record["step"], summary=summary.scalar(key, value)
                )
                self._tb.write_event(event)
        if time.monotonic() - self._flushed_at > TENSORBOARD_FLUSH_S:
            self._tb.flush()
            self._flushed_at = time.monotonic()

    def close(self) -> None:
        quiet = self._failed or sys.exc_info()[1] is not None
        try:
            with self._errors_named():
                for f in (self._jsonl, self._tb):
                    if f is not None:
                        f.close()
        except MetricsWriteError:
            if not quiet:
                raise
            # A consequence of the error already on its way (the same full disk), not news.
            log.debug("closing the metrics after an error failed too", exc_info=True)
        finally:
            self._jsonl = self._tb = None

    @contextlib.contextmanager
    def _errors_named(self):
        """An OSError while writing the metrics becomes one MetricsWriteError line."""
        try:
            yield
        except MetricsWriteError:
            raise
        except OSError as error:
            self._failed = True
            raise MetricsWriteError(
                f"cannot write the metrics to {os.path.dirname(self.path)}: "
                f"{error.strerror or error}. The checkpoints already there are intact; free "
                "space or fix the permissions, then rerun the same command to resume.",
            ) from error


def _tensorboard_events(directory: str):
    """An event file written synchronously (tensorboardX's SummaryWriter writes from a thread of
    its own, which on a failed write dies with a traceback and then blocks the next writes)."""
    try:
        from tensorboardX.event_file_writer import EventsWriter
    except ImportError:
        log.warning("tensorboardX is not installed: metrics go to metrics.jsonl only")
        return None
    os.makedirs(directory, exist_ok=True)
    return EventsWriter(os.path.join(directory, "events"))


def _plain(value):
    if isinstance(value, int):  # counts (e.g. probe_examples) stay integers in the JSON
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _record(line: str) -> dict | None:
    """The metrics record on `line`: a JSON object with an integer `step`; else None (a line cut
    short by a kill, or anything else that is not a record)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return None
    return record


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def _warn_not_records(path: str, lines: list[str], what: str) -> None:
    """One line for the valid JSON lines that are not records (a cut-short line, which a kill
    leaves, is expected and not reported)."""
    odd = [i + 1 for i, line in enumerate(lines) if _record(line) is None and _is_json(line)]
    if odd:
        log.warning(
            "%s: %s %d line(s) that are not metric records (a JSON object with an integer "
            "'step'), the first at line %d",
            path,
            what,
            len(odd),
            odd[0],
        )


def _truncate_after(path: str, step: int) -> None:
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        record = _record(line)
        if record is not None and record["step"] <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    _warn_not_records(path, lines, "dropped")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_metrics(workdir: str) -> list[dict]:
    """One record per step, in step order, from a run's metrics.jsonl (for tests, notebooks and
    sweeps). A step's records (training means, evaluation) are merged; a key written twice for a
    step (a step re-run after a kill) keeps its last value. A line cut short is skipped, and so,
    with one warning, is any line that is not a record."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        lines = f.readlines()
    merged: dict[int, dict] = {}
    for line in lines:
        record = _record(line)
        if record is not None:
            merged.setdefault(record["step"], {}).update(record)
    _warn_not_records(path, lines, "skipped")
    return [merged[step] for step in sorted(merged)]
