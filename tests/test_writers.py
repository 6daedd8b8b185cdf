"""writers: metrics.jsonl lines that are not records, and a write that fails (a full disk)."""

import errno
import json
import logging
import os
import subprocess

import numpy as np
import pytest

from simco_jax import writers

# Valid JSON that is not a record, by family: another type, an object without a usable step.
NOT_RECORDS = ["[]", "3", '"x"', "null", "{}", '{"loss": 1.0}', '{"step": "4"}', '{"step": true}']


@pytest.mark.parametrize("line", NOT_RECORDS)
def test_a_line_that_is_not_a_record_is_skipped_with_one_warning(line, tmp_path, caplog):
    good = [{"step": 4, "loss": 2.0}, {"step": 8, "loss": 1.0}]
    lines = [json.dumps(good[0]), line, json.dumps(good[1]), '{"step": 12, "lo']  # cut by a kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    caplog.set_level(logging.WARNING, logger="simco_jax")
    assert writers.read_metrics(str(tmp_path)) == good
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'metrics.jsonl'}: skipped 1 line(s) that are not metric records (a JSON "
        "object with an integer 'step'), the first at line 2"
    ]

    # A resume drops it with the steps after the checkpoint, and leaves no file behind.
    caplog.clear()
    writers.MetricWriter(str(tmp_path), resume_step=4).close()
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps(good[0]) + "\n"
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "tensorboard"]
    assert len(caplog.records) == 1 and "dropped 1 line(s)" in caplog.records[0].getMessage()


class _FullDisk:
    """A file on a disk that is full: every write and the final flush fail."""

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _message(workdir):
    return (
        f"cannot write the metrics to {workdir}: No space left on device. The checkpoints "
        "already there are intact; free space or fix the permissions, then rerun the same "
        "command to resume."
    )


def test_a_write_to_a_full_disk_fails_in_one_line_and_the_close_stays_quiet(tmp_path):
    writer = writers.MetricWriter(str(tmp_path))
    writer.write(1, {"loss": 1.0})
    writer._jsonl.close()
    writer._jsonl = _FullDisk()
    with pytest.raises(writers.MetricsWriteError) as raised:
        writer.write(2, {"loss": 1.0})
    assert str(raised.value) == _message(tmp_path)
    writer.close()  # the same full disk again: not a second error


def test_closing_on_the_way_out_of_another_error_keeps_that_error(tmp_path):
    writer = writers.MetricWriter(str(tmp_path))
    writer._tb.close()
    writer._tb = _FullDisk()  # TensorBoard's final flush meets the full disk
    with pytest.raises(ValueError, match="the real error") as raised:
        try:
            raise ValueError("the real error")
        finally:
            writer.close()
    assert raised.value.__context__ is None  # nothing chained onto it
    # Without an error on its way, a failed final flush is the error, in one line.
    writer = writers.MetricWriter(str(tmp_path))
    writer._tb.close()
    writer._tb = _FullDisk()
    with pytest.raises(writers.MetricsWriteError, match="No space left on device"):
        writer.close()


def test_a_disk_that_fills_fails_the_write_not_a_background_thread(tmp_path, capfd):
    # A real full filesystem: a small tmpfs (root only).
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        writer = writers.MetricWriter(str(small))
        with pytest.raises(writers.MetricsWriteError) as raised:
            for step in range(100_000):
                writer.write(step, {"loss": 1.0, "probe_top1": 2.0, "lr": 0.1})
        assert str(raised.value) == _message(small)
        writer.close()
    finally:  # lazily: a file left open by a failure must not keep the mount
        subprocess.run(["umount", "-l", str(small)], check=True)
    assert capfd.readouterr().err == ""  # no thread died with a traceback


# ------------------------------------------------------------ writers.py: the metrics file.
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


def test_tensorboard_reads_the_scalars_of_each_step(tmp_path):
    from tensorboard.backend.event_processing import event_file_loader

    writer = writers.MetricWriter(str(tmp_path))
    writer.write(3, {"loss": 1.5, "probe_top1": 20, "lr": 0.1, "note": "not a scalar"})
    writer.write(2**40, {"loss": 1e39, "knn_top1": -0.25})  # beyond float32: infinite
    writer.close()
    (name,) = os.listdir(tmp_path / "tensorboard")
    assert name.startswith("events.out.tfevents.")  # what TensorBoard looks for
    loader = event_file_loader.LegacyEventFileLoader(str(tmp_path / "tensorboard" / name))
    events = list(loader.Load())  # a record whose checksum is wrong would end the file here
    assert events[0].file_version == "brain.Event:2"
    got = [(e.step, [(v.tag, v.simple_value) for v in e.summary.value]) for e in events[1:]]
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    assert got == [
        (3, [("loss", 1.5), ("probe_top1", 20.0), ("lr", f32(0.1))]),
        (2**40, [("loss", float("inf")), ("knn_top1", -0.25)]),
    ]


def test_crc32c_is_the_castagnoli_checksum():
    assert writers.crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert writers.crc32c(b"") == 0
