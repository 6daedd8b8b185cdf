"""Progress of long work on the terminal: training, evaluation, linear evaluation and sweeps.

On an interactive terminal each piece of work is a live bar of `rich` (https://rich.readthedocs.io)
refreshed as it advances, and log lines scroll above the bars. Elsewhere (a log file, a pipe, a
notebook) it is a plain log line at each milestone (an epoch end) and at most every
`PLAIN_INTERVAL_S` seconds in between. Only the main process of a multi-host run shows progress.

Throughputs and ETAs leave out compilation: the first unit of work after a (re)start (a train
chunk, an evaluation batch) includes XLA's compile, which later units do not pay again, so the
clock of `Rate` starts when that unit ends. The training ETA adds the evaluations still to come
(`LoopProgress`: measured ones as long as their last run, the others at the measured encode rate).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time

from rich import console as rich_console
from rich import progress as rich_progress
from rich import table as rich_table
from rich import text as rich_text

from simco_jax import config as config_lib

log = logging.getLogger(__name__)

PLAIN_INTERVAL_S = 10.0  # plain mode: at most one line per this many seconds between milestones


def format_eta(seconds: float) -> str:
    """'H:MM:SS', or '?' while unknown (the first unit after a start is still compiling)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Rate:
    """Units of work per second, counted from the end of the first unit after a (re)start.

    `update(done)` is called whenever `done` units have finished; `pause()`/`resume()` leave out
    time spent on something else (evaluations, which are estimated on their own).
    """

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.origin = None  # (done, time) when the first unit (compile included) ended
        self.last = None
        self.excluded_s = 0.0
        self._paused_at = None

    def update(self, done: int) -> None:
        now = self.clock()
        if self.origin is None:
            self.origin = (done, now)
        self.last = (done, now)

    def pause(self) -> None:
        self._paused_at = self.clock()

    def resume(self) -> None:
        if self._paused_at is not None and self.origin is not None:
            self.excluded_s += self.clock() - self._paused_at
        self._paused_at = None

    @property
    def per_s(self) -> float | None:
        """None until a unit after the first has finished."""
        if self.origin is None or self.last[0] == self.origin[0]:
            return None
        seconds = self.last[1] - self.origin[1] - self.excluded_s
        return (self.last[0] - self.origin[0]) / max(seconds, 1e-9)


# --------------------------------------------------------------------------------------------
# The display: one rich Progress shared by every open task, or plain log lines.
# --------------------------------------------------------------------------------------------

_live = {"progress": None, "tasks": 0, "handlers": []}


def terminal_console():
    """A rich Console on stderr if it is an interactive terminal (not a notebook), else None."""
    console = rich_console.Console(stderr=True)
    if console.is_terminal and not console.is_dumb_terminal and not console.is_jupyter:
        return console
    return None


class _StatusColumn(rich_progress.ProgressColumn):
    """The task's status on one line, cut with '…' where the terminal is too narrow."""

    def render(self, task):
        return rich_text.Text(task.fields["status"], no_wrap=True, overflow="ellipsis")


def _open_live(console):
    fixed = rich_table.Column(no_wrap=True)  # the status column gives way, these do not
    progress = rich_progress.Progress(
        rich_progress.TextColumn("{task.description}", markup=False, table_column=fixed),
        rich_progress.BarColumn(bar_width=16, table_column=fixed),
        rich_progress.MofNCompleteColumn(table_column=fixed),
        _StatusColumn(),
        console=console,
        refresh_per_second=4,
        transient=True,  # what lasts is in the log lines
    )
    progress.start()
    # Log handlers hold the stream they were made with (absl's wraps a StreamHandler); while the
    # bars are live they write through rich's proxy of stderr, so lines land above the bars.
    for handler in logging.getLogger().handlers:
        handler = getattr(handler, "python_handler", handler)
        if isinstance(handler, logging.StreamHandler) and handler.stream in (
            sys.__stderr__,
            getattr(sys.stderr, "rich_proxied_file", None),
        ):
            _live["handlers"].append((handler, handler.setStream(sys.stderr)))
    _live["progress"] = progress


def _close_live():
    for handler, stream in reversed(_live["handlers"]):
        handler.setStream(stream)
    _live["handlers"].clear()
    _live["progress"].stop()
    _live["progress"] = None


class Task:
    """One line of progress: a bar on a terminal, else log lines (see the module docstring).

    `update(completed, status)` shows `description completed/total status`; with `line=True` (a
    milestone) the line is also logged on a terminal, where it stays above the bars.
    """

    def __init__(
        self,
        description: str,
        total: int,
        *,
        completed: int = 0,
        enabled: bool = True,
        clock=time.perf_counter,
        interval_s: float = PLAIN_INTERVAL_S,
        started: float | None = None,
        status: str = "",
    ):
        self.description, self.total, self.enabled = description, total, enabled
        self.clock, self.interval_s = clock, interval_s
        self._last_line = clock() if started is None else started  # when the work began
        self._id = None
        if not enabled:
            return
        console = terminal_console() if _live["progress"] is None else _live["progress"].console
        if console is not None:
            if _live["progress"] is None:
                _open_live(console)
            _live["tasks"] += 1
            self._id = _live["progress"].add_task(
                description, total=total, completed=completed, status=status
            )

    @property
    def live(self) -> bool:
        return self._id is not None

    def line(self, completed: int, status: str) -> str:
        return f"{self.description} {completed}/{self.total} {status}"

    def update(self, completed: int, status: str, *, line: bool = False) -> None:
        if not self.enabled:
            return
        if self.live:
            _live["progress"].update(self._id, completed=completed, status=status)
        now = self.clock()
        if line or (not self.live and now - self._last_line >= self.interval_s):
            log.info("%s", self.line(completed, status))
            self._last_line = now

    def refresh(self, status: str) -> None:
        """A new status on the bar, without a log line (nothing in plain mode)."""
        if self.live:
            _live["progress"].update(self._id, status=status)

    def close(self) -> None:
        if not self.live:
            return
        _live["progress"].remove_task(self._id)
        self._id = None
        _live["tasks"] -= 1
        if _live["tasks"] == 0:
            _close_live()


class EvalProgress:
    """The line of one evaluation, fed by the Evaluator's `report(done, total)` per batch.

    `seconds` is how long the evaluation took with its first batch (compile) left out: the
    measured rate of the other batches times the batch count; with a single batch, its time.
    """

    def __init__(self, description: str, *, enabled: bool = True, clock=time.perf_counter):
        self.description, self.enabled, self.clock = description, enabled, clock
        self.rate = Rate(clock)
        self.start = clock()
        self.total = None
        self.done = 0
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        """`done` of `total` batches have finished; 0 shows the line before the first."""
        self.total, self.done = total, done
        if self.task is None:
            self.task = Task(
                self.description,
                total,
                enabled=self.enabled,
                clock=self.clock,
                started=self.start,
                status="(starting)",
            )
        if not done:
            return
        self.rate.update(done)
        per_s = self.rate.per_s
        eta = (total - done) / per_s if per_s else math.nan
        rate = f"{per_s:.1f} batches/s" if per_s else "? batches/s"
        self.task.update(done, f"| {rate} | ETA {format_eta(eta)}")

    @property
    def seconds(self) -> float:
        per_s = self.rate.per_s
        if per_s and self.total:
            return self.total / per_s
        return self.clock() - self.start

    def close(self) -> None:
        if self.task is not None:
            self.task.close()


def eval_steps(total_steps: int, period: int) -> list[int]:
    """The steps after which the trainer runs an evaluator of `period` steps: every `period`
    steps and the last step (none if `period` <= 0, the evaluator is off)."""
    if period <= 0:
        return []
    return sorted(set(range(period, total_steps, period)) | {total_steps})


class LoopProgress:
    """The line of a loop of steps: step, epoch, the last logged metrics, images/s and the ETA.

    ETA = the steps left at the measured step rate (`Rate`: compile, evaluations and checkpoint
    writes left out) + the evaluations left. An evaluation of a kind that ran before is as long
    as its last run (`EvalProgress.seconds`, compile left out); one that has not is estimated
    from the images it encodes (`evaluations`) at the encode rate (seconds per image) of the
    last evaluation measured, the running one included. Before any was measured, and only while
    steps are left, it is bounded by the training rate per image (a training image costs at
    least one forward pass more than an evaluation image); with no step left the ETA is unknown
    ('?') until the running evaluation has measured its rate, and its own line shows its progress.

    `evaluations`: {kind: (steps after which it runs, images it encodes)}; `shown`: the logged
    metrics on the line, as (key, label, format) triples.
    """

    def __init__(
        self,
        description: str,
        *,
        total_steps: int,
        start_step: int,
        steps_per_epoch: int,
        batch_size: int,
        max_epochs: int,
        evaluations: dict,
        shown: tuple = (),
        enabled: bool = True,
        clock=time.perf_counter,
    ):
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.batch_size, self.max_epochs = batch_size, max_epochs
        self.shown = shown
        self.enabled, self.clock = enabled, clock
        self.rate = Rate(clock)
        self.eval_steps = {kind: steps for kind, (steps, _) in evaluations.items()}
        self.eval_images = {kind: images for kind, (_, images) in evaluations.items()}
        self.eval_s = {}  # kind -> seconds of its last run, compile left out
        self.evaluated_at = {}  # kind -> step of its last run
        self.s_per_image = None  # the encode rate of the last evaluation measured
        self.running = None  # (kind, EvalProgress) of the evaluation under way
        self.metrics = {}  # the last logged metrics
        self.step = start_step
        self.task = Task(
            description,
            total_steps,
            completed=start_step,
            enabled=enabled,
            clock=clock,
            status="(the first steps compile)",
        )

    @property
    def images_per_s(self) -> float | None:
        per_s = self.rate.per_s
        return None if per_s is None else per_s * self.batch_size

    def _estimate_s(self, kind: str, step: int) -> float:
        """Seconds of one run of `kind` (see the class docstring)."""
        if kind in self.eval_s:
            return self.eval_s[kind]
        if self.s_per_image is not None:
            return self.eval_images[kind] * self.s_per_image
        if step < self.total_steps and self.images_per_s:
            return self.eval_images[kind] / self.images_per_s  # an upper bound
        return math.nan

    def _running_left_s(self, step: int) -> float:
        kind, report = self.running
        per_s, total = report.rate.per_s, report.total
        if per_s and total:
            return (total - report.done) / per_s
        fraction_left = 1 - report.done / total if total else 1
        return fraction_left * self._estimate_s(kind, step)

    def eval_eta_s(self, step: int) -> float:
        """Seconds of the evaluations still to run at or after `step`."""
        total = 0.0
        for kind, steps in self.eval_steps.items():
            left = sum(s > step or (s == step and self.evaluated_at.get(kind) != s) for s in steps)
            if self.running is not None and self.running[0] == kind and left:
                total += self._running_left_s(step)
                left -= 1
            if left:
                total += left * self._estimate_s(kind, step)
        return total

    def eta_s(self, step: int) -> float:
        per_s = self.rate.per_s
        if per_s is None:
            return math.nan
        return (self.total_steps - step) / per_s + self.eval_eta_s(step)

    def timing(self) -> dict:
        """images_per_s and eta_s (where known) for metrics.jsonl, once measured."""
        if self.rate.per_s is None:
            return {}
        eta = self.eta_s(self.step)
        return {"images_per_s": self.images_per_s, **({"eta_s": eta} if math.isfinite(eta) else {})}

    def status(self) -> str:
        """'epoch E/N | R img/s | ETA H:MM:SS | <shown metrics>' (the metrics of the last log
        point; a narrow terminal cuts the end)."""
        speed = self.images_per_s
        parts = [
            f"epoch {self.step / self.steps_per_epoch:.2f}/{self.max_epochs}",
            f"| {speed:.1f} img/s" if speed else "| ? img/s",
            f"| ETA {format_eta(self.eta_s(self.step))}",
        ]
        shown = [(label, self.metrics.get(key), fmt) for key, label, fmt in self.shown]
        shown = [f"{label} {value:{fmt}}" for label, value, fmt in shown if value is not None]
        if shown:
            parts.append("| " + " ".join(shown))
        return " ".join(parts)

    def advance(self, step: int, metrics: dict | None = None, *, line: bool = False) -> None:
        """`step` steps have finished (with their metrics at a log point)."""
        self.rate.update(step)
        self.step = step
        if metrics:
            self.metrics = dict(metrics)
        self.task.update(step, self.status(), line=line)

    @contextlib.contextmanager
    def paused(self):
        """Leaves the enclosed time out of the training rate (checkpoint writes: the first one
        compiles a check of the state; later ones are short next to the steps between them)."""
        self.rate.pause()
        try:
            yield
        finally:
            self.rate.resume()

    @contextlib.contextmanager
    def evaluation(self, kind: str):
        """Times one evaluation out of the training rate; yields its per-batch `report`, which
        also refreshes this line's ETA on a terminal.

        A first run with a single batch cannot separate its compile: its time is not used, and
        the estimate stays per image until the next run of that kind.
        """
        report = EvalProgress(f"{kind} eval", enabled=self.enabled, clock=self.clock)
        self.running = (kind, report)

        def update(done: int, total: int) -> None:
            report(done, total)
            if report.rate.per_s:
                self.s_per_image = total / (report.rate.per_s * self.eval_images[kind])
            self.task.refresh(self.status())

        with self.paused():
            try:
                yield update
            finally:
                report.close()
                self.running = None
        if report.rate.per_s or kind in self.evaluated_at:
            self.eval_s[kind] = report.seconds
        self.evaluated_at[kind] = self.step

    def close(self) -> None:
        self.task.close()


class TrainProgress(LoopProgress):
    """The trainer's line: the evaluators of `config.evals` on their periods, and the loss, the
    online probe's training accuracy and the learning rate."""

    def __init__(
        self,
        config,
        *,
        total_steps: int,
        start_step: int,
        steps_per_epoch: int,
        num_train: int,
        num_test: int,
        enabled: bool = True,
        clock=time.perf_counter,
    ):
        periods = config_lib.eval_periods(config, steps_per_epoch)  # config.evals, in steps
        # The images an evaluation encodes: the test set; a kNN also the training set.
        evaluations = {
            name: (
                eval_steps(total_steps, period),
                num_test + (num_train if config.evals[name].type == "knn" else 0),
            )
            for name, period in periods.items()
        }
        super().__init__(
            "train",
            total_steps=total_steps,
            start_step=start_step,
            steps_per_epoch=steps_per_epoch,
            batch_size=config.batch_size,
            max_epochs=config.max_epochs,
            evaluations=evaluations,
            shown=(
                ("loss", "loss", ".4f"),
                ("probe_train_top1", "probe_train_top1", ".1f"),
                ("lr", "lr", ".5f"),
            ),
            enabled=enabled,
            clock=clock,
        )
