"""Offline evaluation of a pretrained run: linear classifier on frozen features, and a kNN.

`restore_run(workdir)` is the one place that rebuilds a run's model and TrainState from its
workdir (config.json + Orbax checkpoints), the way train.py does; the linear evaluation, the
export CLI and the notebooks use it. `evaluate_checkpoint(config, workdir)` runs solo-learn's
linear protocol (frozen backbone in inference mode, RandomResizedCrop + flip views, SGD) and the
kNN monitor of training, and writes linear_eval.json / knn_eval.json beside the checkpoint and in
`workdir`. The config is `configs/linear_eval.py` (its keys: `default_config`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from simco_jax import (
    augment,
    checkpointing,
    evaluate,
    inputs,
    models,
    parallel,
    progress,
    train_step,
    writers,
)
from simco_jax import config as config_lib

log = logging.getLogger(__name__)

MODES = ("linear", "knn", "both")
SCHEDULES = ("cosine", "step", "constant")


def default_config() -> ml_collections.ConfigDict:
    """The linear-evaluation keys (solo-learn's CIFAR linear protocol by default)."""
    c = ml_collections.ConfigDict()
    c.pretrained = ""  # the pretraining run's --workdir (holds config.json and checkpoints/)
    c.mode = "both"  # 'linear' | 'knn' | 'both'
    c.linear_epochs = 100
    c.linear_lr = 0.1  # at linear_batch_size, not scaled
    c.linear_batch_size = 256
    c.linear_momentum = 0.9
    c.linear_weight_decay = 0.0
    c.linear_schedule = "cosine"  # 'step': ×0.1 at 60 % and 80 % of the steps (solo-learn's)
    c.linear_min_scale = 0.08  # RandomResizedCrop scale (min, 1); horizontal flip p = 0.5
    c.linear_max_steps = -1  # > 0 stops early (tests); the schedule still spans linear_epochs
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
        "mode": config_lib.one_of(*MODES),
        "linear_epochs": config_lib.integer(1, 100_000),
        "linear_lr": config_lib.LEARNING_RATE,
        "linear_batch_size": config_lib.integer(1, 2**20),
        "linear_momentum": config_lib.real(0.0, 1.0, open_hi=True),
        "linear_weight_decay": config_lib.real(0.0, 1.0),
        "linear_schedule": config_lib.one_of(*SCHEDULES),
        "linear_min_scale": config_lib.real(0.0, 1.0, open_lo=True),
        "linear_max_steps": config_lib.DOMAINS["max_steps"],
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


# --------------------------------------------------------------------------------------------
# Restoring a run from its workdir.
# --------------------------------------------------------------------------------------------


class RestoredRun(NamedTuple):
    config: ml_collections.ConfigDict  # the run's training config (from config.json)
    state: train_step.TrainState  # its latest readable checkpoint
    step: int
    num_classes: int  # of the data set it trained on (its online probe's width)
    comps: train_step.Components
    mesh: Any


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The training config a run wrote to WORKDIR/config.json, on today's defaults."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: --config.pretrained must be a training run's --workdir"
        )
    with open(path) as f:
        saved = json.load(f)
    config = config_lib.base_config()
    for key, value in saved.items():
        if key not in config:
            log.warning("ignoring key %r of %s (not in today's schema)", key, path)
            continue
        config[key] = tuple(value) if isinstance(value, list) else value
    return config


def _saved_num_classes(ckpt: checkpointing.Checkpointer, directory: str) -> int:
    """The class count recorded with the newest checkpoint (no data set needs loading)."""
    for step in sorted(ckpt.manager.all_steps(), reverse=True):
        try:
            record = ckpt.manager.restore(
                step, args=ocp.args.Composite(record=ocp.args.JsonRestore())
            )["record"]
            return int(record["num_classes"])
        except Exception as error:  # noqa: BLE001 - unreadable: restore_latest decides later
            log.warning("cannot read the record of step %d (%s)", step, error)
    raise checkpointing.CheckpointError(f"no readable checkpoint in {directory}")


def restore_run(workdir: str) -> RestoredRun:
    """Rebuilds a run's model and restores its latest TrainState, as train.py does on resume.

    As on resume, an unreadable latest checkpoint is skipped with a warning (and set aside by
    `Checkpointer`) for the one before it.
    """
    config = load_run_config(workdir)
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise checkpointing.CheckpointError(f"{workdir} has no checkpoints/ directory")
    ckpt = checkpointing.Checkpointer(directory, {}, max_to_keep=config.keep_checkpoints)
    try:
        num_classes = _saved_num_classes(ckpt, directory)
        ckpt.record = checkpointing.compatibility_record(config, num_classes)
        mesh = parallel.make_mesh()
        comps = train_step.build_components(config, num_classes, steps_per_epoch=1)
        image_shape = (config.crop_size, config.crop_size, 3)  # only the channel count matters
        template = jax.jit(
            lambda: train_step.create_train_state(config, comps, image_shape),
            out_shardings=parallel.replicated(mesh),
        )()
        state = ckpt.restore_latest(template)
    finally:
        ckpt.close()
    if state is None:
        raise checkpointing.CheckpointError(f"no readable checkpoint in {directory}")
    step = int(parallel.to_host(state.step))
    return RestoredRun(config, state, step, num_classes, comps, mesh)


# --------------------------------------------------------------------------------------------
# Linear evaluation.
# --------------------------------------------------------------------------------------------


def linear_schedule(config, total_steps: int):
    lr = config.linear_lr
    if config.linear_schedule == "cosine":
        return optax.cosine_decay_schedule(lr, max(total_steps, 1))
    if config.linear_schedule == "step":
        milestones = {int(0.6 * total_steps): 0.1, int(0.8 * total_steps): 0.1}
        return optax.piecewise_constant_schedule(lr, milestones)
    return optax.constant_schedule(lr)


def _train_linear(
    config, run: RestoredRun, data, evaluator, workdir: str, *, knn_follows: bool = False
) -> dict:
    """Trains a fresh linear classifier on frozen features; returns top-1/top-5 and a summary.

    `data` (from `inputs.create` at the linear batch size, scale and seed) feeds the steps:
    resident rows gathered and cropped on the device, or streamed host crops (view 1).
    """
    mesh, model = run.mesh, run.comps.model
    batch = config.linear_batch_size
    num_train = data.num_train
    steps_per_epoch = num_train // batch
    if steps_per_epoch == 0:
        raise config_lib.ConfigError(
            f"linear_batch_size={batch} exceeds the {num_train} training images"
        )
    schedule_steps = config.linear_epochs * steps_per_epoch
    total_steps = schedule_steps
    if config.linear_max_steps > 0:
        total_steps = min(schedule_steps, config.linear_max_steps)
    # Frozen backbone: only crop and flip (solo-learn's linear protocol), no colour jitter.
    aug = augment.AugmentParams.from_config(run.config)
    aug = augment.AugmentParams(
        crop_size=aug.crop_size,
        min_scale=config.linear_min_scale,
        max_scale=1.0,
        color_jitter_prob=0.0,
        gray_scale_prob=0.0,
        horizontal_flip_prob=0.5,
        mean=aug.mean,
        std=aug.std,
    )
    classifier = models.LinearProbe(data.num_classes)
    tx = optax.chain(
        optax.add_decayed_weights(config.linear_weight_decay),
        optax.sgd(linear_schedule(config, schedule_steps), momentum=config.linear_momentum),
    )
    replicated = parallel.replicated(mesh)
    variables = {"params": run.state.params, "batch_stats": run.state.batch_stats}
    feature_dim = models.feature_dim(run.config.backbone, run.config.backbone_width)
    rng = jax.random.PRNGKey(config.seed)
    params = jax.jit(
        lambda: classifier.init(jax.random.fold_in(rng, 1), jnp.zeros((1, feature_dim)))["params"],
        out_shardings=replicated,
    )()
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)

    def step_fn(params, opt_state, step, variables, batch_data):
        # The resident order is drawn from this rng, as the pretraining's from its state's.
        order = types.SimpleNamespace(step=step, rng=rng)
        images, targets = data.train.select(order, batch_data, 0)
        crop = not isinstance(images, tuple)  # streamed: two host crops, the first one serves
        images = images if crop else images[0]
        views = augment.augment_view(jax.random.fold_in(rng, step), images, aug, crop)
        features, _ = model.apply(variables, views, train=False)  # frozen, inference-mode BN
        features = jax.lax.stop_gradient(features.astype(jnp.float32))

        def loss_fn(p):
            logits = classifier.apply({"params": p}, features)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            return ce, jnp.mean(jnp.argmax(logits, -1) == targets)

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    step_jit = jax.jit(
        step_fn,
        in_shardings=(replicated,) * 4 + (data.train.sharding,),
        out_shardings=(replicated,) * 4,
        donate_argnums=(0, 1),
    )
    main = parallel.is_main_process()
    writer = writers.MetricWriter(workdir, enabled=main)
    rate = progress.Rate()
    task = progress.Task(
        "linear eval", total_steps, enabled=main, status="(the first steps compile)"
    )
    losses, accuracies = [], []
    shown = ""  # the last logged loss and accuracy
    knn_images = data.num_train + data.test.num_examples if knn_follows else 0

    def status(done):
        """ETA: the steps left at the measured rate (compile left out), plus the test-set
        evaluation (and the kNN's encoding of both sets, when it follows) at the same rate per
        image: an upper bound, as an evaluation image is one clean forward pass."""
        per_s, epoch = rate.per_s, f"epoch {done / steps_per_epoch:.2f}/{config.linear_epochs}"
        if per_s is None:
            return f"{epoch} | ? img/s | ETA ?{shown}"
        images_left = data.test.num_examples + knn_images
        eta = (total_steps - done) / per_s + images_left / (per_s * batch)
        return f"{epoch} | {per_s * batch:.1f} img/s | ETA {progress.format_eta(eta)}{shown}"

    try:
        for step in range(total_steps):
            params, opt_state, loss, accuracy = step_jit(
                params, opt_state, np.int32(step), variables, data.train.batches(step)
            )
            if losses:  # the display follows the step before: one stays queued on the device
                jax.block_until_ready(losses[-1])
                rate.update(step)
                task.update(step, status(step))
            losses.append(loss)
            accuracies.append(accuracy)
            if (step + 1) % steps_per_epoch == 0 or step + 1 == total_steps:
                loss_mean = float(np.mean(parallel.to_host(losses)))
                acc_mean = 100 * float(np.mean(parallel.to_host(accuracies)))
                writer.write(step + 1, {"linear_loss": loss_mean, "linear_train_top1": acc_mean})
                shown = f" | loss {loss_mean:.4f} train_top1 {acc_mean:.2f}"
                rate.update(step + 1)
                task.update(step + 1, status(step + 1), line=True)
                losses, accuracies = [], []
        task.close()
        report = progress.EvalProgress("test-set eval", enabled=main)
        try:
            results = evaluator.probe_accuracy(run.state.replace(probe_params=params), report)
        finally:
            report.close()
        writer.write(total_steps, results)
    finally:
        task.close()
        writer.close()
    return {
        "top1": results["probe_top1"],
        "top5": results["probe_top5"],
        "eval_examples": results["probe_examples"],  # test images scored: the test set's size
        "final_loss": loss_mean,
        "final_train_top1": acc_mean,
        "steps": total_steps,
        "epochs": total_steps / steps_per_epoch,
        "lr": config.linear_lr,
        "batch_size": batch,
        "schedule": config.linear_schedule,
    }


def _device_description() -> str:
    device = jax.devices()[0]
    return f"{jax.device_count()}x {getattr(device, 'device_kind', device.platform)}"


def _write_json(payload: dict, *directories: str, name: str) -> None:
    if not parallel.is_main_process():
        return
    for directory in directories:
        with open(os.path.join(directory, name), "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)


def evaluate_checkpoint(config, workdir: str) -> dict:
    """Linear and/or kNN evaluation of `config.pretrained`'s latest checkpoint.

    Writes linear_eval.json / knn_eval.json into the pretrained workdir and into `workdir`, and
    returns {'linear': {...}, 'knn': {...}} for the modes run.
    """
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    if parallel.is_main_process():
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    run = restore_run(config.pretrained)
    # The evaluation settings on top of the pretrained run's (data, crop, normalisation).
    eval_config = ml_collections.ConfigDict(run.config.to_dict())
    eval_config.update(
        knn_k=config.knn_k,
        knn_temperature=config.knn_temperature,
        eval_batch_size=config.eval_batch_size,
        knn_bank_size=0,  # the offline kNN's bank is the whole training set
    )
    if config.eval_dataset is not None:
        eval_config.eval_dataset = config.eval_dataset
    # The linear classifier's input: its own batch size, crop scale, epochs and order seed (the
    # run's seed stays: synthetic data is generated from it).
    input_config = ml_collections.ConfigDict(eval_config.to_dict())
    input_config.update(
        batch_size=config.linear_batch_size,
        min_scale=config.linear_min_scale,
        max_scale=1.0,
        max_epochs=config.linear_epochs,
        max_steps=config.linear_max_steps,
    )
    data = inputs.create(input_config, run.mesh, order_seed=config.seed)
    evaluator = evaluate.FeatureBackend(
        eval_config, run.comps.model, models.LinearProbe(data.num_classes), data, run.mesh
    )
    common = {
        "pretrained": os.path.abspath(config.pretrained),
        "pretrained_step": run.step,
        "dataset": data.name,
        "eval_dataset": eval_config.eval_dataset or data.name,
        "device": _device_description(),
    }
    log.info("evaluating %s at step %d on %s", config.pretrained, run.step, data.name)
    results = {}
    if config.mode in ("linear", "both"):
        start = time.perf_counter()
        linear = _train_linear(
            config, run, data, evaluator, workdir, knn_follows=config.mode == "both"
        )
        linear.update(common, wall_s=time.perf_counter() - start)
        _write_json(linear, config.pretrained, workdir, name="linear_eval.json")
        log.info(
            "linear eval: top-1 %.2f top-5 %.2f on %d test images",
            linear["top1"],
            linear["top5"],
            linear["eval_examples"],
        )
        results["linear"] = linear
    if config.mode in ("knn", "both"):
        start = time.perf_counter()
        report = progress.EvalProgress("kNN eval", enabled=parallel.is_main_process())
        try:
            knn = evaluator.knn_accuracy(run.state, report)
        finally:
            report.close()
        knn = {
            "top1": knn["knn_top1"],
            "top5": knn["knn_top5"],
            "eval_examples": knn["knn_examples"],
            "k": min(config.knn_k, data.num_train),
            "temperature": config.knn_temperature,
            **common,
            "wall_s": time.perf_counter() - start,
        }
        _write_json(knn, config.pretrained, workdir, name="knn_eval.json")
        log.info(
            "kNN eval: top-1 %.2f top-5 %.2f on %d test images",
            knn["top1"],
            knn["top5"],
            knn["eval_examples"],
        )
        results["knn"] = knn
    data.close()
    return results
