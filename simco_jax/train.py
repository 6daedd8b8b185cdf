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

from simco_jax import checkpointing, evaluate, inputs, parallel, train_step, writers
from simco_jax import config as config_lib

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training diverged; the last good checkpoint is left intact."""


def _prepare_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise config_lib.ConfigError(
            f"cannot write to --workdir={workdir!r} ({error.strerror}); pass a writable directory"
        ) from error


def _all_finite(tree):
    """Whether every floating-point leaf is finite: one fused reduction on the device."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _install_preemption_handler():
    """SIGTERM (a scheduler's preemption) sets a flag; the loop checkpoints and stops."""
    flag = {"set": False}

    def handler(signum, frame):
        log.warning("received signal %d: checkpointing and stopping", signum)
        flag["set"] = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        return flag, None
    return flag, previous


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (or resumes) the configured framework in `workdir`; returns the final summary."""
    # ---------------------------------------------------------------- checks and workdir
    config_lib.validate(config, num_devices=jax.device_count())
    _prepare_workdir(workdir)
    main = parallel.is_main_process()
    if main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    # ---------------------------------------------------------------- mesh and inputs
    mesh = parallel.make_mesh()
    data = inputs.create(config, mesh)  # resident arrays or a per-process stream: see `inputs`
    steps_per_epoch = data.num_train // config.batch_size
    schedule_steps = config.max_epochs * steps_per_epoch
    total_steps = min(schedule_steps, config.max_steps) if config.max_steps > 0 else schedule_steps

    # ---------------------------------------------------------------- model, optimizer, state
    comps = train_step.build_components(config, data.num_classes, steps_per_epoch)
    replicated = parallel.replicated(mesh)
    init = jax.jit(
        lambda: train_step.create_train_state(config, comps, data.image_shape),
        out_shardings=replicated,
    )
    state = init()
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        checkpointing.compatibility_record(config, data.num_classes),
        max_to_keep=config.keep_checkpoints,
        input_position=data.train.position,
    )
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state = restored
    start_step = int(parallel.to_host(state.step))
    if main:
        log.info(
            "%s (%s): %d train / %d test images, %d classes; %d steps per epoch on %d devices; %s",
            data.name,
            data.mode,
            data.num_train,
            data.test.num_examples,
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
    evaluator = evaluate.Evaluator(config, comps.model, comps.probe, data, mesh)
    state_is_finite = jax.jit(_all_finite, out_shardings=replicated)

    # ---------------------------------------------------------------- train loop
    writer = writers.MetricWriter(workdir, enabled=main)
    progress = writers.Progress(total_steps, config.batch_size, start_step)
    preempted, previous_handler = _install_preemption_handler()
    pending = []  # per-chunk metrics still on the device: fetched only at log/save points
    summary = {"step": start_step}
    step = start_step
    last_log = start_step

    def drain_metrics(step):
        """Fetches pending metrics, stops on a non-finite loss, returns their mean."""
        fetched = parallel.to_host(pending)
        pending.clear()
        if not fetched:
            return {}
        active = np.concatenate([m.pop("active") for m in fetched])
        stacked = {k: np.concatenate([m[k] for m in fetched])[active] for k in fetched[0]}
        if not np.all(np.isfinite(stacked["loss"])):
            raise NonFiniteLossError(
                f"the loss became non-finite by step {step}; stopping without checkpointing "
                f"(the last good checkpoint, step {ckpt.latest_step()}, is intact). Lower lr or "
                "temperature, or use dtype=float32."
            )
        return {k: float(np.mean(v)) for k, v in stacked.items()}

    def save(step):
        drain_metrics(step)  # never checkpoint a diverged state ...
        if not parallel.to_host(state_is_finite(state)):  # ... nor one whose last update blew up
            raise NonFiniteLossError(
                f"the train state became non-finite at step {step} while the losses were still "
                f"finite; stopping without checkpointing (the last good checkpoint, step "
                f"{ckpt.latest_step()}, is intact). Lower lr or temperature, or use dtype=float32."
            )
        ckpt.save(step, state)

    try:
        while step < total_steps:
            next_epoch_end = (step // steps_per_epoch + 1) * steps_per_epoch
            next_checkpoint = (
                step // config.checkpoint_every_steps + 1
            ) * config.checkpoint_every_steps
            stop_at = min(next_epoch_end, next_checkpoint, total_steps)
            state, metrics = chunk(state, data.train.batches(step), np.int32(stop_at))
            pending.append(metrics)
            step = min(step + dispatch_steps, stop_at)

            epoch_done = step % steps_per_epoch == 0 or step == total_steps
            if step // config.log_every_steps > last_log // config.log_every_steps or epoch_done:
                means = drain_metrics(step)
                means.update(progress.update(step))
                means["epoch"] = step / steps_per_epoch
                writer.write(step, means)
                last_log = step
                if main:
                    log.info(
                        "epoch %.2f/%d step %d/%d loss %.4f probe_acc %.3f lr %.5f | %.0f img/s "
                        "| ETA %s",
                        means["epoch"],
                        config.max_epochs,
                        step,
                        total_steps,
                        means["loss"],
                        means["probe_acc"],
                        means["lr"],
                        means["images_per_s"],
                        writers.format_eta(means["eta_s"]),
                    )
                summary.update(means)

            epoch = step // steps_per_epoch
            final = step == total_steps
            if epoch_done and (epoch % config.eval_every_epochs == 0 or final):
                results = evaluator.probe_accuracy(state)
                knn_every = config.knn_every_epochs
                if knn_every > 0 and (epoch % knn_every == 0 or final):
                    results.update(evaluator.knn_accuracy(state))
                writer.write(step, results)
                summary.update(results)
                if main:
                    log.info("eval at epoch %d: %s", epoch, json.dumps(results))
                progress = writers.Progress(total_steps, config.batch_size, step)  # exclude eval
            if step % config.checkpoint_every_steps == 0 or final:
                save(step)
            # Multi-host: SIGTERM may reach the processes at different steps, and all must stop
            # at the same one (the save is collective). They agree where the loop waits for the
            # devices anyway (log points, epoch ends); one process checks at every chunk.
            if jax.process_count() == 1:
                stop = preempted["set"]
            else:
                stop = (last_log == step or final) and parallel.any_process(preempted["set"])
            if stop:
                save(step)
                summary["preempted"] = True
                if main:
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
        ckpt.close()
        writer.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    summary["state"] = state
    return summary
