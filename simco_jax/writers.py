"""Metrics to the workdir: JSON lines and TensorBoard events (the terminal: progress.py).

Only the main process writes; the others get a writer that drops everything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import struct
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
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if scalars:
            self._tb.write_scalars(record["step"], scalars)
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


def _tensorboard_events(directory: str) -> EventFile:
    os.makedirs(directory, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    return EventFile(os.path.join(directory, name))


class EventFile:
    """A TensorBoard event file of scalars, written from the calling thread (tensorboardX's
    writer writes from a thread of its own, which on a failed write dies with a traceback and
    then blocks the next writes; and importing tensorboardX imports torch where it is
    installed, seconds of every launch's start-up).

    The format TensorBoard reads: TFRecord framing (the length, the data, each with a masked
    CRC-32C) around `Event` protocol buffers, encoded here by hand: `wall_time` (field 1,
    double), `step` (2, int64), `file_version` (3, string) and `summary` (5) holding one
    `Summary.Value` per scalar: `tag` (1, string) and `simple_value` (2, float)."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "wb")
        self._write_event(_field(3, b"brain.Event:2"))

    def write_scalars(self, step: int, scalars: dict) -> None:
        values = b"".join(
            _field(1, _field(1, tag.encode()) + b"\x15" + _float32(value))
            for tag, value in scalars.items()
        )
        self._write_event(b"\x10" + _varint(step) + _field(5, values))

    def _write_event(self, fields: bytes) -> None:
        event = b"\x09" + struct.pack("<d", time.time()) + fields
        header = struct.pack("<Q", len(event))
        self._file.write(header + _masked_crc(header) + event + _masked_crc(event))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # an int64: a negative one as its two's complement
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # beyond float32's range: shown as infinite, as the float32 it is
        return struct.pack("<f", math.copysign(math.inf, value))


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protocol buffer field (wire type 2): a string or a message."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    """TFRecord's checksum: the CRC-32C rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


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
