"""The trainer: `train_and_evaluate(config, workdir)`, read top to bottom.

Sections: checks → mesh → inputs (resident or streaming) → state (fresh or resumed) → jitted
chunk of steps → loop with logging, evaluation, checkpoints, preemption and NaN guards.
`launch.py` only parses flags and calls this; tests and notebooks call it too.
"""

from __future__ import annotations

import json
import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np

from simco_jax import (
    checkpointing,
    evaluate,
    inputs,
    memory,
    parallel,
    progress,
    train_step,
    writers,
)
from simco_jax import config as config_lib
from simco_jax import workdir as workdir_lib

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training diverged; the last good checkpoint is left intact."""


def _all_finite(tree):
    """Whether every floating-point leaf is finite: one fused reduction on the device."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _install_stop_handlers():
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) set a flag; the loop finishes the
    current chunk, checkpoints and stops. A second Ctrl-C aborts at once (KeyboardInterrupt)."""
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


def _total_steps(config, steps_per_epoch: int) -> int:
    schedule_steps = config.max_epochs * steps_per_epoch
    return min(schedule_steps, config.max_steps) if config.max_steps > 0 else schedule_steps


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (or resumes) the configured framework in `workdir`; returns the final summary.

    The summary holds the last logged metrics, `step`, and the final `state`; for a run that was
    already complete, `complete=True` and no state (nothing is loaded or compiled).
    """
    # ---------------------------------------------------------------- checks and workdir
    config_lib.validate(config, num_devices=jax.device_count())
    # One run per workdir. The lock creates it, and removes it again if this start fails
    # before writing anything (no data, a bad config): a failed start leaves no debris.
    lock = workdir_lib.WorkdirLock(workdir, jax.process_index())
    stop_signal, previous_handlers = _install_stop_handlers()  # Ctrl-C while loading, too
    try:
        return _train(config, workdir, stop_signal)
    finally:
        for signum, previous in previous_handlers.items():
            signal.signal(signum, previous)
        lock.release()


def _finished_summary(workdir: str, step: int, total_steps: int) -> dict:
    """A complete run's final metrics, from metrics.jsonl; said at once, nothing is loaded."""
    path = os.path.join(workdir, "metrics.jsonl")
    records = writers.read_metrics(workdir) if os.path.exists(path) else []
    final = {}
    for record in records:  # the last value of each metric, the final evaluation's included
        final.update({k: v for k, v in record.items() if k not in ("images_per_s", "eta_s")})
    final.update(step=step, complete=True)
    if parallel.is_main_process():
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in final.items()
            if k not in ("step", "complete")
        )
        log.info(
            "%s is complete (step %d of %d); nothing to do. Final metrics: %s",
            workdir,
            step,
            total_steps,
            shown or "none logged",
        )
    return final


def _train(config, workdir: str, stop_signal: dict) -> dict:
    main = parallel.is_main_process()
    # ---------------------------------------------------------------- resume checks (no data yet)
    # A rerun that changes what the saved step means is refused, and a rerun of a finished run
    # says so, from the checkpoint's small JSON record: before any data is read or compiled.
    ckpt_dir = os.path.join(workdir, "checkpoints")
    saved_step, saved = checkpointing.latest_record(ckpt_dir)
    if saved is not None:
        refused, accepted = checkpointing.changes(saved, checkpointing.compatibility_record(config))
        if refused:
            raise checkpointing.incompatible(os.path.abspath(ckpt_dir), saved_step, refused)
        if accepted and main:
            log.info(
                "resuming with changed %s",
                ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in accepted.items()),
            )
        if "steps_per_epoch" in saved:
            total = _total_steps(config, saved["steps_per_epoch"])
            if saved_step >= total:
                return _finished_summary(workdir, saved_step, total)

    # ---------------------------------------------------------------- mesh and inputs
    mesh = parallel.make_mesh()
    data = inputs.create(config, mesh)  # resident arrays or a per-process stream: see `inputs`
    # An analytic estimate: a batch too large for the device fails here, not after compiling.
    bank_rows = data.train_eval.num_examples  # the kNN monitor's bank
    memory.check_fits(config, data.num_classes, jax.device_count(), bank_rows=bank_rows)
    steps_per_epoch = data.num_train // config.batch_size
    total_steps = _total_steps(config, steps_per_epoch)

    # ---------------------------------------------------------------- model, optimizer, state
    comps = train_step.build_components(config, data.num_classes, steps_per_epoch)
    replicated = parallel.replicated(mesh)
    init = jax.jit(
        lambda: train_step.create_train_state(config, comps, data.image_shape),
        out_shardings=replicated,
    )
    state = init()
    record = checkpointing.compatibility_record(
        config,
        num_classes=data.num_classes,
        steps_per_epoch=steps_per_epoch,
        train_data=data.identity,
    )
    ckpt = checkpointing.Checkpointer(
        ckpt_dir, record, max_to_keep=config.keep_checkpoints, input_position=data.train.position
    )
    try:
        restored = ckpt.restore_latest(state)
    except checkpointing.CheckpointError:
        ckpt.close()
        raise
    if restored is not None:
        state = restored
    start_step = int(parallel.to_host(state.step))
    if main:  # every check passed and the run starts: record the config it runs with
        workdir_lib.write_config(workdir, config, start_step)
    if main:
        log.info(
            "%s (%s): %d train / %d test images%s, %d classes; %d steps per epoch on %d "
            "devices; %s",
            data.name,
            data.mode,
            data.num_train,
            data.test.num_examples,
            f" of {config.eval_dataset}" if config.eval_dataset else "",
            data.num_classes,
            steps_per_epoch,
            jax.device_count(),
            f"resumed at step {start_step}" if start_step else "fresh start",
        )

    # ---------------------------------------------------------------- jitted chunk of steps
    step_fn = train_step.make_train_step(config, comps)
    # 1 on CPU (see steps_per_dispatch) and when streaming (one host batch per step).
    dispatch_steps = train_step.steps_per_dispatch(config) if data.train.fuses_steps else 1
    chunk = jax.jit(
        train_step.make_train_chunk(
            config,
            comps,
            step_fn,
            chunk_size=dispatch_steps,
            select=data.train.select,
        ),
        in_shardings=(replicated, data.train.sharding, None),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    state_is_finite = jax.jit(_all_finite, out_shardings=replicated)

    # ---------------------------------------------------------------- evaluators and periods
    eval_data = evaluate.FeatureBackend(config, comps.model, comps.probe, data, mesh)
    context = evaluate.Context(config, comps, data, mesh, eval_data)
    evaluators = evaluate.make_evaluators(config, context)
    eval_every = config_lib.eval_periods(config, steps_per_epoch)  # name -> steps (<= 0: never)
    log_every = config_lib.period_steps(config, "log_every", steps_per_epoch)
    checkpoint_every = config_lib.period_steps(config, "checkpoint_every", steps_per_epoch)

    def next_multiple(step, period):
        return (step // period + 1) * period

    # ---------------------------------------------------------------- train loop
    writer = writers.MetricWriter(workdir, enabled=main, resume_step=start_step)
    display = progress.TrainProgress(
        config,
        total_steps=total_steps,
        start_step=start_step,
        steps_per_epoch=steps_per_epoch,
        num_train=data.knn_bank.num_examples,  # the training images a kNN evaluation encodes
        num_test=data.test.num_examples,
        enabled=main,
    )
    in_flight = None  # (step, metrics) of the newest chunk, which the display does not wait for
    pending = []  # per-chunk metrics still on the device: fetched only at log/save points
    summary = {"step": start_step}
    step = start_step
    last_log = start_step

    def last_good():
        latest = ckpt.latest_step()
        if latest is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint, step {latest}, is intact"

    def drain_metrics(step):
        """Fetches pending metrics, stops on a non-finite loss, returns their mean."""
        fetched = parallel.to_host(pending)
        pending.clear()
        if not fetched:
            return {}
        active = np.concatenate([m.pop("active") for m in fetched])
        stacked = {k: np.concatenate([m[k] for m in fetched])[active] for k in fetched[0]}
        # Every logged value, the probe's loss included: a diverged probe is as unusable.
        diverged = [k for k, v in stacked.items() if not np.all(np.isfinite(v))]
        if diverged:
            raise NonFiniteLossError(
                f"{' and '.join(diverged)} became non-finite by step {step}; stopping without "
                f"checkpointing ({last_good()}). Lower lr, classifier_lr or temperature, or use "
                "dtype=float32."
            )
        return {k: float(np.mean(v)) for k, v in stacked.items()}

    def save(step):
        drain_metrics(step)  # never checkpoint a diverged state ...
        if not parallel.to_host(state_is_finite(state)):  # ... nor one whose last update blew up
            raise NonFiniteLossError(
                f"the train state became non-finite at step {step} while the losses were still "
                f"finite; stopping without checkpointing ({last_good()}). Lower lr or "
                "temperature, or use dtype=float32."
            )
        ckpt.save(step, state)

    try:
        while step < total_steps:
            # A chunk ends where the host has work: an epoch end, a checkpoint, an evaluation.
            periods = [
                steps_per_epoch,
                checkpoint_every,
                *(p for p in eval_every.values() if p > 0),
            ]
            stop_at = min(total_steps, *(next_multiple(step, p) for p in periods))
            state, metrics = chunk(state, data.train.batches(step), np.int32(stop_at))
            pending.append(metrics)
            step = min(step + dispatch_steps, stop_at)
            if in_flight is not None:  # the display follows the chunk before, one stays queued
                jax.block_until_ready(in_flight[1])
                display.advance(in_flight[0])
            in_flight = (step, metrics)

            epoch_done = step % steps_per_epoch == 0 or step == total_steps
            if step // log_every > last_log // log_every or epoch_done:
                means = drain_metrics(step)
                display.advance(step, means, line=epoch_done)
                in_flight = None
                means.update(display.timing(), epoch=step / steps_per_epoch)
                writer.write(step, means)
                last_log = step
                summary.update(means)

            final = step == total_steps
            results = {}
            for name, evaluator in evaluators.items():
                period = eval_every[name]
                if period > 0 and (step % period == 0 or final):
                    with display.evaluation(name) as report:
                        values = evaluator.run(state, report)
                    results.update({f"{name}_{k}": v for k, v in values.items()})
            if results:
                writer.write(step, results)
                summary.update(results)
                if main:
                    log.info("eval at epoch %g: %s", step / steps_per_epoch, json.dumps(results))
            if step % checkpoint_every == 0 or final:
                with display.paused():
                    save(step)
            # Multi-host: SIGTERM may reach the processes at different steps, and all must stop
            # at the same one (the save is collective). They agree where the loop waits for the
            # devices anyway (log points, epoch ends); one process checks at every chunk.
            signum = stop_signal["signal"]
            if jax.process_count() == 1:
                stop = signum is not None
            else:
                stop = (last_log == step or final) and parallel.any_process(signum is not None)
            if stop:
                save(step)
                summary["preempted"] = signum or signal.SIGTERM  # launch.py exits 128 + it
                if main and signum != signal.SIGINT:  # a Ctrl-C said so when pressed
                    log.warning(
                        "preempted: saved the checkpoint of step %d/%d; rerun the same command "
                        "to resume",
                        step,
                        total_steps,
                    )
                break
        summary["step"] = step
    finally:
        data.close()
        display.close()
        ckpt.close()
        writer.close()
    summary["state"] = state
    return summary
