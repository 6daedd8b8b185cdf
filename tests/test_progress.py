"""The progress display: rates and ETAs on a fake clock, plain lines, the live rich display."""

import io
import logging
import math
import re
import sys

import pytest
from helpers import framework_config
from rich.console import Console

from simco_jax import progress, sweep

# What a plain training line looks like: step, epoch, last logged metrics, throughput, ETA.
TRAIN_LINE = re.compile(
    r"train (?P<step>\d+)/(?P<total>\d+) epoch [\d.]+/\d+ \| (?P<speed>[\d.]+|\?) img/s "
    r"\| ETA (?P<eta>\d+:\d\d:\d\d|\?)(?: \| loss (?P<loss>[\d.]+) probe_train_top1 [\d.]+ "
    r"lr [\d.]+)?$"
)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _train_progress(clock, **kwargs):
    # Smoke settings: batch 32, 2 epochs of 8 steps, probe and kNN after every epoch.
    config = framework_config("simco")
    assert (config.batch_size, config.eval_every_epochs, config.knn_every_epochs) == (32, 1, 1)
    return progress.TrainProgress(
        config,
        total_steps=16,
        start_step=0,
        steps_per_epoch=8,
        num_train=256,
        num_test=64,
        clock=clock,
        **kwargs,
    )


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "simco_jax.progress"]


def test_format_eta():
    assert progress.format_eta(3725.4) == "1:02:05"
    assert progress.format_eta(59.6) == "0:01:00"
    assert progress.format_eta(math.nan) == "?" and progress.format_eta(math.inf) == "?"


def test_rate_starts_after_the_first_unit_and_leaves_out_pauses():
    clock = FakeClock()
    rate = progress.Rate(clock)
    clock.now = 100.0  # the first unit: 100 s of compile
    rate.update(4)
    assert rate.per_s is None
    clock.now = 102.0
    rate.update(8)
    assert rate.per_s == 2.0  # 4 units in 2 s: the compile is not counted
    rate.pause()
    clock.now = 150.0
    rate.resume()
    clock.now = 152.0
    rate.update(12)
    assert rate.per_s == 2.0  # 8 units in 4 s of work: the 48 s pause is not counted


def test_eval_steps_are_the_trainers():
    assert progress.eval_steps(20, 8) == [8, 16, 20]  # the last, partial epoch too
    assert progress.eval_steps(40, 16) == [16, 32, 40]
    assert progress.eval_steps(16, 24) == [16]
    assert progress.eval_steps(16, 0) == []  # kNN off


def test_each_evaluator_runs_on_its_own_period():
    config = framework_config("simco", max_epochs=8, eval_every_epochs=2, knn_every_epochs=3)
    config.evals.norm = dict(type="feature_norm_evaluator", every_steps=20)
    display = progress.TrainProgress(
        config, total_steps=64, start_step=0, steps_per_epoch=8, num_train=256, num_test=64
    )
    assert display.eval_steps == {
        "probe": [16, 32, 48, 64],
        "knn": [24, 48, 64],
        "norm": [20, 40, 60, 64],
    }
    assert display.eval_images == {"probe": 64, "knn": 256 + 64, "norm": 64}


def test_plain_lines_have_step_loss_throughput_and_an_eta_without_compile(caplog):
    caplog.set_level(logging.INFO, logger="simco_jax")
    clock = FakeClock()
    display = _train_progress(clock)

    clock.now = 100.0  # the first chunk ends: compile time, no rate yet
    display.advance(4)
    assert display.timing() == {}
    clock.now = 102.0  # epoch end, a log point: 4 steps in 2 s
    display.advance(8, {"loss": 3.5, "probe_train_top1": 12.5, "lr": 0.003}, line=True)
    # 8 steps at 2 steps/s, plus two probes (64 images) and two kNNs (256 + 64 images) at the
    # training rate of 64 images/s: 4 + 2 * 1 + 2 * 5 = 16 s.
    assert display.timing() == {"images_per_s": 64.0, "eta_s": 16.0}

    with display.evaluation("probe") as report:
        report(0, 3)  # the line appears before the first batch
        for done, clock.now in ((1, 112.0), (2, 113.0), (3, 114.0)):  # first batch compiles
            report(done, 3)
    with display.evaluation("knn") as report:
        clock.now = 120.0
        report(1, 1)  # one batch, the first kNN: compile and work cannot be told apart
    assert display.eval_s == {"probe": 3.0}  # 3 batches at the 1 batch/s of the warm ones

    clock.now = 122.0  # 8 steps since the first chunk in 22 s, of which 18 s evaluated
    display.advance(12)
    # 4 steps at 2 steps/s + one probe as measured (3 s) + one kNN at the encode rate the probe
    # measured (64 images in 3 s: 320 images in 15 s).
    assert display.eta_s(12) == 20.0
    clock.now = 125.0
    display.advance(14)  # 3 s after the last line: no new line

    lines = _lines(caplog)
    assert lines == [
        "train 4/16 epoch 0.50/2 | ? img/s | ETA ?",
        "train 8/16 epoch 1.00/2 | 64.0 img/s | ETA 0:00:16 | loss 3.5000 probe_train_top1 12.5 "
        "lr 0.00300",
        "probe eval 1/3 | ? batches/s | ETA ?",  # its first batch took 10 s
        # 20 s since the last line: a line between milestones, with the last logged metrics.
        "train 12/16 epoch 1.50/2 | 64.0 img/s | ETA 0:00:20 | loss 3.5000 probe_train_top1 12.5 "
        "lr 0.00300",
    ]
    parsed = [TRAIN_LINE.match(line).groupdict() for line in lines if line.startswith("train")]
    assert parsed == [
        {"step": "4", "total": "16", "speed": "?", "eta": "?", "loss": None},
        {"step": "8", "total": "16", "speed": "64.0", "eta": "0:00:16", "loss": "3.5000"},
        {"step": "12", "total": "16", "speed": "64.0", "eta": "0:00:20", "loss": "3.5000"},
    ]
    display.close()


def test_only_the_main_process_shows_progress(caplog):
    caplog.set_level(logging.INFO, logger="simco_jax")
    clock = FakeClock()
    display = _train_progress(clock, enabled=False)
    for step, clock.now in ((4, 100.0), (8, 102.0)):
        display.advance(step, {"loss": 1.0}, line=True)
    assert _lines(caplog) == []
    assert display.timing()["images_per_s"] == 64.0  # metrics.jsonl still gets its timing


def test_live_display_on_a_terminal_keeps_log_lines_above_the_bar(monkeypatch):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    monkeypatch.setattr(progress, "terminal_console", lambda: console)
    handler = logging.StreamHandler(sys.stderr)  # as logging.basicConfig or absl set it up
    logging.getLogger().addHandler(handler)
    try:
        clock = FakeClock()
        display = _train_progress(clock)
        assert display.task.live
        clock.now = 100.0
        display.advance(4)
        clock.now = 102.0
        display.advance(8, {"loss": 3.5, "probe_train_top1": 12.5, "lr": 0.003})
        logging.getLogger("simco_jax.test").warning("a log line during training")
        with display.evaluation("probe") as report:  # a second bar joins the first
            report(1, 1)
            assert progress._live["tasks"] == 2
        display.close()
    finally:
        logging.getLogger().removeHandler(handler)
    assert progress._live == {"progress": None, "tasks": 0, "handlers": []}
    assert handler.stream is sys.stderr  # the handler writes where it wrote before
    text = out.getvalue()
    assert "a log line during training" in text  # through rich, above the bar
    assert "8/16" in text and "64.0 img/s | ETA 0:00:16 | loss 3.5000" in text


def test_sweep_eta_from_the_points_trained_so_far():
    assert math.isnan(sweep.sweep_eta_s([], points_left=3))
    assert sweep.sweep_eta_s([10.0, 30.0], points_left=2) == 60.0  # 3 points of 20 s


@pytest.mark.parametrize("enabled", [True, False])
def test_eval_progress_seconds_leave_out_the_first_batch(enabled, caplog):
    caplog.set_level(logging.INFO, logger="simco_jax")
    clock = FakeClock()
    report = progress.EvalProgress("probe eval", enabled=enabled, clock=clock)
    for done, clock.now in ((1, 30.0), (2, 31.0), (3, 31.5), (4, 32.0)):
        report(done, 4)
    assert report.seconds == 4 * 2 / 3  # 3 warm batches in 2 s, first (compile) excluded
    report.close()
    # 30 s after its start the first report is due a line; the others come < 10 s later.
    assert _lines(caplog) == (["probe eval 1/4 | ? batches/s | ETA ?"] if enabled else [])


def test_with_no_step_left_the_eta_is_the_evaluations_own_not_the_training_bound(monkeypatch):
    # The last step's line, before any evaluation ran: the bound from the training rate (a kNN
    # of 320 images at 64 images/s) is no estimate once no step is left, so the ETA is unknown
    # until the evaluation measures its own rate; then the training bar shows that estimate.
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    monkeypatch.setattr(progress, "terminal_console", lambda: console)
    config = framework_config("simco", max_epochs=2, eval_every_epochs=2, knn_every_epochs=2)
    clock = FakeClock()
    display = progress.TrainProgress(
        config,
        total_steps=16,
        start_step=0,
        steps_per_epoch=8,
        num_train=256,
        num_test=64,
        clock=clock,
    )
    clock.now = 100.0
    display.advance(8)
    clock.now = 102.0
    display.advance(12)  # 2 steps/s, 64 images/s
    # 4 steps (2 s) + a probe (64 images, 1 s) + a kNN (320 images, 5 s) at the training rate.
    assert display.eta_s(12) == 8.0
    clock.now = 104.0
    display.advance(16)
    assert math.isnan(display.eta_s(16)) and "ETA ?" in display.status()
    assert "eta_s" not in display.timing()  # nothing unknown goes to metrics.jsonl
    with display.evaluation("probe") as report:
        report(0, 4)
        for done, clock.now in ((1, 130.0), (2, 130.5), (3, 131.0)):  # the first compiles
            report(done, 4)
        # The probe's last batch at its 2 batches/s (0.5 s) + the kNN at the probe's encode
        # rate: 4 batches of 16 images in 2 s, 320 images in 10 s.
        assert display.eta_s(16) == 10.5
        assert "ETA 0:00:10" in display.task.line(16, display.status())
        clock.now = 131.5
        report(4, 4)
    assert display.eval_s == {"probe": 2.0}
    assert display.eta_s(16) == 10.0  # the kNN, at the measured encode rate
    display.close()
