"""Offline evaluation of a pretrained run: a linear classifier on frozen features, and a kNN.

`evaluate_checkpoint(config, workdir)` runs solo-learn's linear protocol (frozen backbone in
inference mode, RandomResizedCrop + flip views, SGD) and the kNN monitor of training on the
latest checkpoint of `config.pretrained` (restored by `checkpointing.restore_run`), and writes
linear_eval.json / knn_eval.json into `workdir` and beside the pretrained run's checkpoints. It
is a second setup of the trainer's loop (`loop.Loop`): the classifier trains in its own
`workdir`, which it locks, with checkpoints (every epoch, at the end, on SIGTERM or Ctrl-C) that
a rerun of the same command resumes from, bit for bit. The config is `configs/linear_eval.py`
(its keys: `default_config`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from simco_jax import (
    augment,
    checkpointing,
    evaluate,
    inputs,
    loop,
    models,
    parallel,
    progress,
    train_step,
    writers,
)
from simco_jax import config as config_lib
from simco_jax import workdir as workdir_lib

log = logging.getLogger(__name__)

MODES = ("linear", "knn", "both")
SCHEDULES = ("cosine", "step", "constant")
# The keys that define the classifier's training: a rerun that changes one of them is refused
# (the others, e.g. mode, knn_k, eval_dataset, linear_max_steps, may change on resume).
STATE_KEYS = (
    "pretrained",
    "member",
    "linear_epochs",
    "linear_lr",
    "linear_batch_size",
    "linear_momentum",
    "linear_weight_decay",
    "linear_schedule",
    "linear_min_scale",
    "seed",
)


def default_config() -> ml_collections.ConfigDict:
    """The linear-evaluation keys (solo-learn's CIFAR linear protocol by default)."""
    c = ml_collections.ConfigDict()
    c.pretrained = ""  # the pretraining run's --workdir (holds config.json and checkpoints/)
    c.member = -1  # which member of a population run (config.members) to evaluate; -1: a plain run
    # A run whose training has not reached its last step is refused unless this is set (its
    # latest checkpoint is evaluated then).
    c.allow_unfinished = False
    c.mode = "both"  # 'linear' | 'knn' | 'both'
    c.linear_epochs = 100
    c.linear_lr = 0.1  # at linear_batch_size, not scaled
    c.linear_batch_size = 256
    c.linear_momentum = 0.9
    c.linear_weight_decay = 0.0
    c.linear_schedule = "cosine"  # 'step': ×0.1 at 60 % and 80 % of the steps (solo-learn's)
    c.linear_min_scale = 0.08  # RandomResizedCrop scale (min, 1); horizontal flip p = 0.5
    c.linear_max_steps = -1  # > 0 stops early (tests); the schedule still spans linear_epochs
    c.checkpoint_every_steps = -1  # <= 0: every epoch; plus at the end and on SIGTERM/Ctrl-C
    c.keep_checkpoints = 2
    c.knn_k = 200
    c.knn_temperature = 0.1
    c.eval_batch_size = 1024
    # The test set: a tfds dataset as the training key (e.g. imagenet_v2), '' = the pretraining
    # dataset's own; unset = the pretrained run's eval_dataset.
    c.eval_dataset = ml_collections.config_dict.placeholder(str)
    c.seed = 0
    return c


def _linear_eval_checks(config, num_devices):
    if not config.pretrained:
        yield "set --config.pretrained=WORKDIR, the pretraining run's --workdir"


# The linear-evaluation keys' domains (the training schema does not apply to this config).
SEAM = config_lib.Seam(
    {
        "pretrained": config_lib.TEXT,
        "member": config_lib.integer(-1),
        "mode": config_lib.one_of(*MODES),
        "linear_epochs": config_lib.integer(1, 100_000),
        "linear_lr": config_lib.LEARNING_RATE,
        "linear_batch_size": config_lib.integer(1, 2**20),
        "linear_momentum": config_lib.real(0.0, 1.0, open_hi=True),
        "linear_weight_decay": config_lib.real(0.0, 1.0),
        "linear_schedule": config_lib.one_of(*SCHEDULES),
        "linear_min_scale": config_lib.real(0.0, 1.0, open_lo=True),
        "linear_max_steps": config_lib.DOMAINS["max_steps"],
        "allow_unfinished": config_lib.BOOL,
        "checkpoint_every_steps": config_lib.integer(),  # <= 0: every epoch
        "keep_checkpoints": config_lib.COUNT,
        "knn_k": config_lib.COUNT,
        "knn_temperature": config_lib.DOMAINS["knn_temperature"],
        "eval_batch_size": config_lib.DOMAINS["eval_batch_size"],
        "eval_dataset": config_lib.Domain(
            lambda v: v is None or isinstance(v, str), "None (the run's) or a dataset name"
        ),
        "seed": config_lib.DOMAINS["seed"],
    },
    _linear_eval_checks,
)


def validate(config) -> None:
    """The linear-eval config's domains and checks, by the training config's machinery."""
    config_lib.check(config, [SEAM], what="linear_eval")


def linear_schedule(config, total_steps: int):
    lr = config.linear_lr
    if config.linear_schedule == "cosine":
        return optax.cosine_decay_schedule(lr, max(total_steps, 1))
    if config.linear_schedule == "step":
        milestones = {int(0.6 * total_steps): 0.1, int(0.8 * total_steps): 0.1}
        return optax.piecewise_constant_schedule(lr, milestones)
    return optax.constant_schedule(lr)


# --------------------------------------------------------------------------------------------
# Checks before anything is written.
# --------------------------------------------------------------------------------------------


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def check_workdir(config, workdir: str) -> None:
    """The evaluation's workdir never holds, nor is, its pretrained run's root or one of the
    run's own directories (its config.json, checkpoints and metrics would be overwritten); a
    subdirectory of the run (e.g. PRETRAINED/linear) is fine."""
    ours, run = os.path.realpath(workdir), os.path.realpath(config.pretrained)
    reserved = [os.path.join(run, name) for name in ("checkpoints", "configs", "tensorboard")]
    if _inside(run, ours) or any(_inside(ours, r) for r in reserved):
        where = "is" if ours == run else "holds" if _inside(run, ours) else "is inside a folder of"
        raise config_lib.ConfigError(
            f"--workdir={workdir} {where} the pretrained run's workdir {config.pretrained}; the "
            "evaluation's config.json, metrics and checkpoints must not mix with the run's: use "
            f"another directory, e.g. {os.path.join(config.pretrained, 'linear')}"
        )


def check_finished(config) -> int:
    """The pretrained run's latest step; refuses a run that has not finished training unless
    `config.allow_unfinished`."""
    step, total = checkpointing.run_progress(config.pretrained)
    if total is not None and step < total and not config.allow_unfinished:
        raise config_lib.ConfigError(
            f"{config.pretrained} has not finished training (its latest checkpoint is step "
            f"{step} of {total}): rerun its training command to finish it, or pass "
            "--config.allow_unfinished=true to evaluate step "
            f"{step}"
        )
    return step


def _writable(path: str) -> bool:
    """Whether `path`, or where it would be created, can be written by this process."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _results_directories(config, workdir: str) -> list:
    """Where the JSON results go: `workdir`, and the pretrained run if it can be written."""
    if not _writable(workdir):
        raise config_lib.ConfigError(
            f"cannot write to --workdir={workdir!r} (permission denied or read-only); pass a "
            "writable directory"
        )
    if _writable(config.pretrained):
        return [config.pretrained, workdir]
    log.warning("%s cannot be written: the results go to %s only", config.pretrained, workdir)
    return [workdir]


# --------------------------------------------------------------------------------------------
# The classifier's state and step.
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class LinearState:
    """The linear classifier's training, as one pytree (what a checkpoint holds)."""

    step: jax.Array
    params: Any  # the classifier's
    opt_state: Any
    rng: jax.Array  # the crops' key and the resident order's, from config.seed


def _linear_augment(run_config, config) -> augment.AugmentParams:
    """Frozen backbone: only crop and flip (solo-learn's linear protocol), no colour jitter."""
    aug = augment.AugmentParams.from_config(run_config)
    return augment.AugmentParams(
        crop_size=aug.crop_size,
        min_scale=config.linear_min_scale,
        max_scale=1.0,
        color_jitter_prob=0.0,
        gray_scale_prob=0.0,
        horizontal_flip_prob=0.5,
        mean=aug.mean,
        std=aug.std,
    )


def make_linear_step(model, classifier, tx, aug):
    """(state, (frozen backbone variables, images), labels) -> (state, metrics): one SGD step
    of the classifier on the frozen backbone's inference-mode features of a cropped view."""

    def step(state: LinearState, inputs, targets):
        frozen, images = inputs
        crop = not isinstance(images, tuple)  # streamed: two host crops, the first one serves
        images = images if crop else images[0]
        views = augment.augment_view(jax.random.fold_in(state.rng, state.step), images, aug, crop)
        features, _ = model.apply(frozen, views, train=False)  # frozen, inference-mode BN
        features = jax.lax.stop_gradient(features.astype(jnp.float32))

        def loss_fn(params):
            logits = classifier.apply({"params": params}, features)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            return ce, jnp.mean(jnp.argmax(logits, -1) == targets)

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        return new_state, {"linear_loss": loss, "linear_train_top1": 100.0 * accuracy}

    return step


class _ClassifierEvaluator:
    """The trained classifier's top-1/top-5 on the test set (written as probe_*)."""

    def __init__(self, features: evaluate.FeatureBackend, backbone):
        self.features, self.backbone = features, backbone  # the pretrained state

    def run(self, state, report) -> dict:
        return self.features.probe_topk(self.backbone.replace(probe_params=state.params), report)


class _KnnEvaluator:
    def __init__(self, features: evaluate.FeatureBackend, backbone):
        self.features, self.backbone = features, backbone

    def run(self, state, report) -> dict:
        return self.features.knn_topk(self.backbone, report)


def _device_description() -> str:
    device = jax.devices()[0]
    return f"{jax.device_count()}x {getattr(device, 'device_kind', device.platform)}"


def _write_json(payload: dict, directories, name: str) -> None:
    if not parallel.is_main_process():
        return
    for directory in directories:
        with open(os.path.join(directory, name), "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)


def _last_logged(workdir: str, summary: dict) -> dict:
    """The classifier's last logged loss and accuracy: this run's, or (a rerun of a finished
    evaluation, which trains no step) metrics.jsonl's."""
    if "linear_loss" in summary or not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return summary
    logged = [r for r in writers.read_metrics(workdir) if "linear_loss" in r]
    return logged[-1] if logged else summary


# --------------------------------------------------------------------------------------------
# The evaluation.
# --------------------------------------------------------------------------------------------


def evaluate_checkpoint(config, workdir: str) -> dict:
    """Linear and/or kNN evaluation of `config.pretrained`'s latest checkpoint.

    Writes linear_eval.json / knn_eval.json into `workdir` and into the pretrained workdir (if it
    can be written), and returns {'linear': {...}, 'knn': {...}} for the modes run, or
    {'preempted': signal} when SIGTERM or Ctrl-C stopped the classifier's training (after a
    checkpoint that a rerun resumes from).
    """
    # ---------------------------------------------------------------- checks (nothing written)
    validate(config)
    check_workdir(config, workdir)
    check_finished(config)
    directories = _results_directories(config, workdir)
    record = checkpointing.compatibility_record(config)
    record = {k: record[k] for k in STATE_KEYS}
    record["pretrained"] = os.path.realpath(config.pretrained)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    saved_step, saved = checkpointing.latest_record(ckpt_dir)
    if saved is not None:
        refused, _ = checkpointing.changes(saved, record)
        if refused:
            raise checkpointing.incompatible(os.path.abspath(ckpt_dir), saved_step, refused)
    # An existing workdir is locked at once (a second evaluation is refused before loading).
    lock = None
    if os.path.isdir(workdir):
        lock = workdir_lib.WorkdirLock(workdir, jax.process_index())
    try:
        with loop.stop_signals() as stop_signal:
            run = checkpointing.restore_run(config.pretrained, config.member)
            data, eval_config = _inputs(config, run)
            if lock is None:  # every check passed: the workdir is made now
                os.makedirs(workdir, exist_ok=True)
                lock = workdir_lib.WorkdirLock(workdir, jax.process_index())
            return _evaluate(
                config, workdir, run, data, eval_config, record, directories, stop_signal
            )
    finally:
        if lock is not None:
            lock.release()


def _inputs(config, run):
    """The linear classifier's inputs (its own batch size, crop scale, epochs and order seed;
    the run's seed stays: synthetic data is generated from it), and the evaluation config: the
    evaluation settings on top of the pretrained run's (data, crop, normalisation)."""
    eval_config = ml_collections.ConfigDict(run.config.to_dict())
    eval_config.update(
        knn_k=config.knn_k,
        knn_temperature=config.knn_temperature,
        eval_batch_size=config.eval_batch_size,
        knn_bank_size=0,  # the offline kNN's bank is the whole training set
    )
    if config.eval_dataset is not None:
        eval_config.eval_dataset = config.eval_dataset
    input_config = ml_collections.ConfigDict(eval_config.to_dict())
    input_config.update(
        batch_size=config.linear_batch_size,
        min_scale=config.linear_min_scale,
        max_scale=1.0,
        max_epochs=config.linear_epochs,
        max_steps=config.linear_max_steps,
    )
    data = inputs.create(input_config, run.mesh, order_seed=config.seed)
    if data.num_train // config.linear_batch_size == 0:
        data.close()
        raise config_lib.ConfigError(
            f"linear_batch_size={config.linear_batch_size} exceeds the {data.num_train} "
            "training images"
        )
    return data, eval_config


def _evaluate(config, workdir, run, data, eval_config, record, directories, stop_signal) -> dict:
    main = parallel.is_main_process()
    mesh, model = run.mesh, run.comps.model
    replicated = parallel.replicated(mesh)
    linear, knn = config.mode in ("linear", "both"), config.mode in ("knn", "both")
    steps_per_epoch = data.num_train // config.linear_batch_size
    schedule_steps = config.linear_epochs * steps_per_epoch
    total_steps = schedule_steps if linear else 0
    if linear and config.linear_max_steps > 0:
        total_steps = min(schedule_steps, config.linear_max_steps)

    # ---------------------------------------------------------------- classifier and state
    classifier = models.LinearProbe(data.num_classes)
    tx = optax.chain(
        optax.add_decayed_weights(config.linear_weight_decay),
        optax.sgd(linear_schedule(config, schedule_steps), momentum=config.linear_momentum),
    )
    feature_dim = models.feature_dim(run.config.backbone, run.config.backbone_width)

    def init():
        rng = jax.random.PRNGKey(config.seed)
        params = classifier.init(jax.random.fold_in(rng, 1), jnp.zeros((1, feature_dim)))
        params = params["params"]
        return LinearState(jnp.zeros((), jnp.int32), params, tx.init(params), rng)

    state = jax.jit(init, out_shardings=replicated)()
    record.update(
        pretrained_step=run.step,
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
        data.close()
        raise
    state = state if restored is None else restored
    start_step = int(parallel.to_host(state.step))
    if main:
        workdir_lib.write_config(workdir, config, start_step)
        log.info(
            "evaluating %s at step %d on %s; %s",
            config.pretrained,
            run.step,
            data.name,
            f"resumed at step {start_step}" if start_step else "fresh start",
        )

    # ---------------------------------------------------------------- jitted chunk of steps
    dispatch_steps = train_step.steps_per_dispatch(run.config) if data.train.fuses_steps else 1

    def select(state, chunk_data, i):
        # The frozen variables ride with the batch: an argument, not a constant of the program.
        frozen, batch = chunk_data
        images, labels = data.train.select(state, batch, i)
        return (frozen, images), labels

    step_fn = make_linear_step(model, classifier, tx, _linear_augment(run.config, config))
    chunk = jax.jit(
        # `select` gives every step its batch: the chunk needs no training config.
        train_step.make_train_chunk(None, None, step_fn, chunk_size=dispatch_steps, select=select),
        in_shardings=(replicated, (replicated, data.train.sharding), None),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    frozen = {"params": run.state.params, "batch_stats": run.state.batch_stats}

    # ---------------------------------------------------------------- evaluators
    features = evaluate.FeatureBackend(
        eval_config, run.comps.model, models.LinearProbe(data.num_classes), data, mesh
    )
    evaluators, evaluations = {}, {}
    if linear:
        evaluators["probe"] = _ClassifierEvaluator(features, run.state)
        evaluations["probe"] = ([total_steps], data.test.num_examples)
    if knn:
        evaluators["knn"] = _KnnEvaluator(features, run.state)
        evaluations["knn"] = ([total_steps], data.num_train + data.test.num_examples)

    # ---------------------------------------------------------------- loop
    checkpoint_every = config.checkpoint_every_steps
    linear_loop = loop.Loop(
        lambda state, step, stop_at: chunk(
            state, (frozen, data.train.batches(step)), np.int32(stop_at)
        ),
        dispatch_steps=dispatch_steps,
        total_steps=total_steps,
        periods=loop.Periods(
            epoch=steps_per_epoch,
            log=steps_per_epoch,
            checkpoint=checkpoint_every if checkpoint_every > 0 else steps_per_epoch,
            evals={name: 0 for name in evaluators},  # after the last step only
        ),
        ckpt=ckpt,
        writer=writers.MetricWriter(workdir, enabled=main, resume_step=start_step),
        display=progress.LoopProgress(
            "linear eval",
            total_steps=total_steps,
            start_step=start_step,
            steps_per_epoch=steps_per_epoch,
            batch_size=config.linear_batch_size,
            max_epochs=config.linear_epochs,
            evaluations=evaluations,
            shown=(("linear_loss", "loss", ".4f"), ("linear_train_top1", "train_top1", ".2f")),
            enabled=main,
        ),
        stop_signal=stop_signal,
        evaluators=evaluators,
        advice="Lower linear_lr.",
    )
    start = time.perf_counter()
    try:
        state, summary = linear_loop.run(state, start_step)
        if summary.get("preempted"):
            return {"preempted": summary["preempted"]}
        results, step = {}, summary["step"]
        for name in evaluators:  # one at a time, so each one's wall time is its own
            results[name] = (linear_loop.evaluate(state, step, [name]), time.perf_counter())
    finally:
        data.close()
        linear_loop.close()

    # ---------------------------------------------------------------- results
    common = {
        "pretrained": os.path.abspath(config.pretrained),
        "pretrained_step": run.step,
        "dataset": data.name,
        "eval_dataset": eval_config.eval_dataset or data.name,
        "device": _device_description(),
    }
    # A population's members are evaluated one at a time: their results must not overwrite
    # each other beside the run's checkpoint.
    suffix = ""
    if config.member >= 0:
        common["member"], suffix = config.member, f"_m{config.member}"
    written = " and ".join(directories)
    output = {}
    if linear:
        scores, end = results["probe"]
        logged = _last_logged(workdir, summary)
        output["linear"] = {
            "top1": scores["probe_top1"],
            "top5": scores["probe_top5"],
            "eval_examples": scores["probe_examples"],  # the test images scored
            "final_loss": logged.get("linear_loss"),
            "final_train_top1": logged.get("linear_train_top1"),
            "steps": total_steps,
            "epochs": total_steps / steps_per_epoch,
            "lr": config.linear_lr,
            "batch_size": config.linear_batch_size,
            "schedule": config.linear_schedule,
            **common,
            "wall_s": end - start,
        }
        start = end
    if knn:
        scores, end = results["knn"]
        output["knn"] = {
            "top1": scores["knn_top1"],
            "top5": scores["knn_top5"],
            "eval_examples": scores["knn_examples"],
            "k": min(config.knn_k, data.num_train),
            "temperature": config.knn_temperature,
            **common,
            "wall_s": end - start,
        }
    for mode, values in output.items():
        _write_json(values, directories, name=f"{mode}_eval{suffix}.json")
        if main:
            log.info(
                "%s eval: top-1 %.2f top-5 %.2f on %d test images; wrote %s_eval%s.json to %s",
                "linear" if mode == "linear" else "kNN",
                values["top1"],
                values["top5"],
                values["eval_examples"],
                mode,
                suffix,
                written,
            )
    return output
