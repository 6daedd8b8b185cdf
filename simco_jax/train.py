"""The trainer: `train_and_evaluate(config, workdir)`, read top to bottom.

Sections: checks → resume checks → mesh and inputs → state (fresh or resumed) → jitted chunk of
steps → evaluators → the loop (`loop.Loop`: logging, evaluation, checkpoints, preemption and NaN
guards, shared with the linear evaluation). `launch.py` only parses flags and calls this; tests
and notebooks call it too.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from simco_jax import (
    checkpointing,
    evaluate,
    inputs,
    loop,
    memory,
    parallel,
    population,
    progress,
    train_step,
    writers,
)
from simco_jax import config as config_lib
from simco_jax import workdir as workdir_lib

log = logging.getLogger(__name__)


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
    try:
        with loop.stop_signals() as stop_signal:  # Ctrl-C while loading, too
            return _train(config, workdir, stop_signal)
    finally:
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


def _resume_check(config, workdir: str) -> dict | None:
    """Refuses a rerun that changes what the saved step means, and says when the run is already
    complete (returning its summary), from the checkpoint's small JSON record: before any data
    is read or anything compiled. None: train."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    saved_step, saved = checkpointing.latest_record(ckpt_dir)
    if saved is None:
        return None
    refused, accepted = checkpointing.changes(saved, checkpointing.compatibility_record(config))
    if refused:
        raise checkpointing.incompatible(os.path.abspath(ckpt_dir), saved_step, refused)
    if accepted and parallel.is_main_process():
        log.info(
            "resuming with changed %s",
            ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in accepted.items()),
        )
    if "steps_per_epoch" in saved:
        total = _total_steps(config, saved["steps_per_epoch"])
        if saved_step >= total:
            return _finished_summary(workdir, saved_step, total)
    return None


def _describe(config, data, steps_per_epoch: int, start_step: int) -> None:
    log.info(
        "%s (%s): %d train / %d test images%s, %d classes; %d steps per epoch on %d devices; %s",
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


def _train(config, workdir: str, stop_signal: dict) -> dict:
    main = parallel.is_main_process()
    members = config_lib.member_configs(config)
    # One member is an ordinary run with its values; several train as one population.
    pop = population.Population(config) if len(members) > 1 else None
    if len(members) == 1:
        config = members[0]
    # ---------------------------------------------------------------- resume checks (no data yet)
    finished = _resume_check(config, workdir)
    if finished is not None:
        return finished

    # ---------------------------------------------------------------- mesh and inputs
    mesh = parallel.make_mesh()
    data = inputs.create(config, mesh)  # resident arrays or a per-process stream: see `inputs`
    # An analytic estimate: a batch too large for the device fails here, not after compiling.
    bank_rows = data.knn_bank.num_examples  # the kNN monitor's bank
    memory.check_fits(
        config, data.num_classes, jax.device_count(), bank_rows=bank_rows, members=len(members)
    )
    steps_per_epoch = data.num_train // config.batch_size
    total_steps = _total_steps(config, steps_per_epoch)

    # ---------------------------------------------------------------- model, optimizer, state
    comps = train_step.build_components(
        pop.config if pop else config, data.num_classes, steps_per_epoch
    )
    replicated = parallel.replicated(mesh)
    if pop:  # the members' states stacked on a leading axis
        create = lambda: pop.init(data.num_classes, steps_per_epoch, data.image_shape)  # noqa: E731
    else:
        create = lambda: train_step.create_train_state(config, comps, data.image_shape)  # noqa: E731
    init = jax.jit(create, out_shardings=replicated)
    state = init()
    record = checkpointing.compatibility_record(
        config,
        num_classes=data.num_classes,
        steps_per_epoch=steps_per_epoch,
        train_data=data.identity,
    )
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        record,
        max_to_keep=config.keep_checkpoints,
        input_position=data.train.position,
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
        _describe(config, data, steps_per_epoch, start_step)

    # ---------------------------------------------------------------- jitted chunk of steps
    # 1 on CPU (see steps_per_dispatch) and when streaming (one host batch per step).
    dispatch_steps = train_step.steps_per_dispatch(config) if data.train.fuses_steps else 1
    if pop:  # the same chunk, vmapped over the members
        chunk_fn = pop.make_chunk(
            data.num_classes, steps_per_epoch, chunk_size=dispatch_steps, select=data.train.select
        )
    else:
        step_fn = train_step.make_train_step(config, comps)
        chunk_fn = train_step.make_train_chunk(
            config, comps, step_fn, chunk_size=dispatch_steps, select=data.train.select
        )
    chunk = jax.jit(
        chunk_fn,
        in_shardings=(replicated, data.train.sharding, None),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )

    # ---------------------------------------------------------------- evaluators
    eval_data = evaluate.FeatureBackend(config, comps.model, comps.probe, data, mesh)
    context = evaluate.Context(config, comps, data, mesh, eval_data)
    evaluators = evaluate.make_evaluators(config, context)
    if pop:
        evaluators = pop.evaluators(evaluators)
        if main:
            log.info("training %d members as one population: %s", pop.size, pop.describe())

    # ---------------------------------------------------------------- train loop
    train_loop = loop.Loop(
        lambda state, step, stop_at: chunk(state, data.train.batches(step), np.int32(stop_at)),
        dispatch_steps=dispatch_steps,
        total_steps=total_steps,
        periods=loop.Periods(
            epoch=steps_per_epoch,
            log=config_lib.period_steps(config, "log_every", steps_per_epoch),
            checkpoint=config_lib.period_steps(config, "checkpoint_every", steps_per_epoch),
            evals=config_lib.eval_periods(config, steps_per_epoch),
        ),
        ckpt=ckpt,
        writer=writers.MetricWriter(workdir, enabled=main, resume_step=start_step),
        display=progress.TrainProgress(
            config,
            total_steps=total_steps,
            start_step=start_step,
            steps_per_epoch=steps_per_epoch,
            num_train=data.knn_bank.num_examples,  # the images a kNN evaluation encodes
            num_test=data.test.num_examples,
            enabled=main,
        ),
        stop_signal=stop_signal,
        evaluators=evaluators,
    )
    if pop:  # a non-finite metric names its member; the progress line shows each one's loss
        train_loop.advice = f"The members: {pop.describe()}. {train_loop.advice}"
        train_loop.display.shown = tuple(
            (f"loss{population.member_suffix(i)}", f"loss m{i}", ".4f") for i in range(pop.size)
        )
    try:
        state, summary = train_loop.run(state, start_step)
    finally:
        data.close()
        train_loop.close()
    summary["state"] = state
    return summary
