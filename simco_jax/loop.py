"""The loop of jitted steps shared by the trainer and the linear evaluation.

A setup (`train.py`, `linear_eval.py`) builds the state, a jitted chunk of steps, the evaluators
and the checkpointer; `Loop.run` drives them from the start step to the last one:

* dispatch a chunk of steps, ending where the host has work (an epoch end, a checkpoint, an
  evaluation), while the display follows the chunk before it (the newest stays queued);
* fetch the metrics only at log and save points, and stop on a non-finite one (the divergence
  guard: a diverged state is never checkpointed);
* run the evaluators that are due, write every record to metrics.jsonl, show progress;
* checkpoint periodically, at the end, and on SIGTERM (preemption) or Ctrl-C; on several hosts,
  agree first on the step to stop at.

The metrics fetched at a save but not logged yet (a checkpoint between two log points) are saved
with the checkpoint, so the next log point averages the same steps after a resume as without one:
metrics.jsonl is the same across interruptions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from simco_jax import parallel

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training diverged; the last good checkpoint is left intact."""


def all_finite(tree):
    """Whether every floating-point leaf is finite: one fused reduction on the device."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def install_stop_handlers():
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) set a flag; the loop finishes the
    current chunk, checkpoints and stops. A second Ctrl-C aborts at once (KeyboardInterrupt).
    Returns the flag ({'signal': None | signum}) and the handlers it replaced."""
    flag = {"signal": None}

    def handler(signum, frame):
        flag["signal"] = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next press aborts
            log.warning(  # the one line a Ctrl-C prints: the stop says nothing more
                "Ctrl-C: stopping after the current steps with a checkpoint (rerun the same "
                "command to resume); press Ctrl-C again to abort"
            )
        else:
            log.warning("received signal %d: checkpointing and stopping", signum)

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        return flag, {}
    return flag, previous


@contextlib.contextmanager
def stop_signals():
    """`install_stop_handlers` for the enclosed block; yields the flag."""
    flag, previous = install_stop_handlers()
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Periods(NamedTuple):
    """Steps between the host's work; a period <= 0 never comes."""

    epoch: int  # steps per epoch: a chunk ends, and a log line stays, at every epoch end
    log: int
    checkpoint: int
    evals: dict  # evaluator name -> steps


class Loop:
    """Runs `dispatch(state, step, stop_at) -> (state, metrics)` from a start step to
    `total_steps`; see the module docstring.

    `dispatch` runs the steps from `step` (up to `dispatch_steps` of them, none at or past
    `stop_at`); its metrics hold one row per step and an `active` mask of the steps it ran.
    `ckpt` is a `checkpointing.Checkpointer`, `writer` a `writers.MetricWriter`, `display` a
    `progress.LoopProgress`, `evaluators` {name: object with `run(state, report) -> dict`}.
    `close()` closes the display, the checkpointer and the writer.
    """

    def __init__(
        self,
        dispatch: Callable,
        *,
        dispatch_steps: int,
        total_steps: int,
        periods: Periods,
        ckpt,
        writer,
        display,
        stop_signal: dict,
        evaluators: dict | None = None,
        advice: str = "Lower lr, classifier_lr or temperature, or use dtype=float32.",
    ):
        self.dispatch, self.dispatch_steps = dispatch, dispatch_steps
        self.total_steps, self.periods = total_steps, periods
        self.ckpt, self.writer, self.display = ckpt, writer, display
        self.stop_signal = stop_signal
        self.evaluators = evaluators or {}
        self.advice = advice  # what to change when a value became non-finite
        self._device_metrics = []  # per-chunk metrics still on the device
        self._host_metrics = {}  # name -> fetched values of the steps since the last log point
        self._state_is_finite = jax.jit(all_finite)

    # ---------------------------------------------------------------- metrics

    def _last_good(self) -> str:
        latest = self.ckpt.latest_step()
        if latest is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint, step {latest}, is intact"

    def _fetch(self, step: int) -> None:
        """Moves the metrics of the dispatched steps to the host; stops on a non-finite one
        (every logged value, the probe's loss included: a diverged probe is as unusable)."""
        fetched = parallel.to_host(self._device_metrics)
        self._device_metrics.clear()
        if not fetched:
            return
        active = np.concatenate([m.pop("active") for m in fetched])
        new = {k: np.concatenate([m[k] for m in fetched])[active] for k in fetched[0]}
        diverged = [k for k, v in new.items() if not np.all(np.isfinite(v))]
        if diverged:
            raise NonFiniteLossError(
                f"{' and '.join(diverged)} became non-finite by step {step}; stopping without "
                f"checkpointing ({self._last_good()}). {self.advice}"
            )
        for k, v in new.items():
            self._host_metrics[k] = np.concatenate([self._host_metrics.get(k, v[:0]), v])

    def _means(self, step: int) -> dict:
        """The mean of each metric over the steps since the last log point."""
        self._fetch(step)
        means = {k: float(np.mean(v)) for k, v in self._host_metrics.items() if len(v)}
        self._host_metrics = {}
        return means

    # ---------------------------------------------------------------- checkpoints

    def _save(self, state, step: int) -> None:
        self._fetch(step)  # never checkpoint a diverged state ...
        if not parallel.to_host(self._state_is_finite(state)):  # ... nor a blown-up update
            raise NonFiniteLossError(
                f"the train state became non-finite at step {step} while the losses were still "
                f"finite; stopping without checkpointing ({self._last_good()}). {self.advice}"
            )
        unlogged = {
            k: {"dtype": v.dtype.name, "values": v.tolist()} for k, v in self._host_metrics.items()
        }
        self.ckpt.save(step, state, metrics=unlogged)

    def _restore_unlogged(self, step: int) -> None:
        saved = self.ckpt.restore_metrics(step) or {}
        self._host_metrics = {k: np.asarray(v["values"], v["dtype"]) for k, v in saved.items()}

    # ---------------------------------------------------------------- evaluations

    def evaluate(self, state, step: int, names) -> dict:
        """Runs the evaluators `names` on `state`; writes and logs their metrics at `step`."""
        results = {}
        for name in names:
            with self.display.evaluation(name) as report:
                values = self.evaluators[name].run(state, report)
            results.update({f"{name}_{k}": v for k, v in values.items()})
        if results:
            self.writer.write(step, results)
            if parallel.is_main_process():
                log.info("eval at epoch %g: %s", step / self.periods.epoch, json.dumps(results))
        return results

    def _due(self, step: int) -> list:
        final = step == self.total_steps
        return [
            name
            for name in self.evaluators
            if (period := self.periods.evals[name]) > 0 and (step % period == 0 or final)
        ]

    # ---------------------------------------------------------------- the loop

    def _stop_at(self, step: int) -> int:
        """A chunk ends where the host has work: an epoch end, a checkpoint, an evaluation."""
        p = self.periods
        periods = [p.epoch, p.checkpoint, *(e for e in p.evals.values() if e > 0)]
        return min(self.total_steps, *((step // q + 1) * q for q in periods if q > 0))

    def _should_stop(self, step: int, logged: bool) -> bool:
        """Multi-host: SIGTERM may reach the processes at different steps, and all must stop
        at the same one (the save is collective). They agree where the loop waits for the
        devices anyway (log points, the end); one process checks at every chunk."""
        asked = self.stop_signal["signal"] is not None
        if jax.process_count() == 1:
            return asked
        return (logged or step == self.total_steps) and parallel.any_process(asked)

    def run(self, state, start_step: int) -> tuple[Any, dict]:
        """Steps `state` (at `start_step`) to the end or to a stop; returns (state, summary):
        the last logged metrics and evaluations, `step`, and `preempted` (the signal) if a
        signal stopped it."""
        p, display, total = self.periods, self.display, self.total_steps
        if start_step:
            self._restore_unlogged(start_step)
        in_flight = None  # (step, metrics) of the newest chunk, which the display does not wait for
        summary = {"step": start_step}
        step = last_log = start_step
        while step < total:
            stop_at = self._stop_at(step)
            state, metrics = self.dispatch(state, step, stop_at)
            self._device_metrics.append(metrics)
            step = min(step + self.dispatch_steps, stop_at)
            if in_flight is not None:  # the display follows the chunk before, one stays queued
                jax.block_until_ready(in_flight[1])
                display.advance(in_flight[0])
            in_flight = (step, metrics)

            epoch_done = step % p.epoch == 0 or step == total
            logged = step // p.log > last_log // p.log or epoch_done
            if logged:
                means = self._means(step)
                display.advance(step, means, line=epoch_done)
                in_flight = None
                means.update(display.timing(), epoch=step / p.epoch)
                self.writer.write(step, means)
                last_log = step
                summary.update(means)

            summary.update(self.evaluate(state, step, self._due(step)))
            if step % p.checkpoint == 0 or step == total:
                with display.paused():
                    self._save(state, step)
            if self._should_stop(step, logged):
                signum = self.stop_signal["signal"] or signal.SIGTERM
                self._save(state, step)
                summary["preempted"] = signum  # launch.py exits 128 + it
                if parallel.is_main_process() and signum != signal.SIGINT:  # Ctrl-C said so
                    log.warning(
                        "preempted: saved the checkpoint of step %d/%d; rerun the same command "
                        "to resume",
                        step,
                        total,
                    )
                break
        summary["step"] = step
        return state, summary

    def close(self) -> None:
        try:
            self.display.close()
            self.ckpt.close()
        finally:
            self.writer.close()
