"""The pure training step of every framework, and the scan that fuses several of them.

One function serves MoCo v2, SimMoCo, SimCo, BYOL, SimSiam and any mix of their parts. What a
framework contributes (targets, negatives, loss, EMA, queue) is a `methods.Method` chosen from the
config; the step below calls it in order and has no framework branches:

    views ──► online encoder (a separate pass per view: per-view BatchNorm statistics)
    targets ◄── momentum encoder | online projections;   negatives ◄── queue | batch | none
    loss(queries, targets, negatives) → optimizer (SGD | LARS) → online probe → EMA, enqueue

Everything random is drawn from `fold_in(state.rng, state.step)`, and the data order from
`fold_in(state.rng, epoch)`, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from simco_jax import augment, methods, models, optimizers, schedules

# Streams folded from the root key; stream 0 is the resident data order (`inputs.gather_batch`).
_STEP_STREAM, _INIT_STREAM = 1, 2

# The four fields the MoCo family's state had at the top of the TrainState before
# `method_state`: checkpoints written then hold them there (`TrainState.from_legacy_layout`).
LEGACY_METHOD_FIELDS = ("momentum_params", "momentum_batch_stats", "queue", "queue_ptr")


@flax.struct.dataclass
class TrainState:
    """Everything a restart needs, as one pytree."""

    step: jax.Array
    params: Any  # online backbone, projector and (BYOL/SimSiam) predictor
    batch_stats: Any
    opt_state: Any
    # What the method keeps (`methods.Method.init_state`): for the MoCo family the momentum
    # encoder's params and BatchNorm statistics (None without one), the queue of past keys
    # (queue_size, proj_output_dim) (None without one) and its pointer.
    method_state: Any
    probe_params: Any
    probe_opt_state: Any
    rng: jax.Array  # fixed root key; per-step keys are folded from it

    def legacy_layout(self) -> dict | None:
        """This state as checkpoints written before `method_state` laid it out: the method's
        fields at the top level. Only the MoCo family's state has one."""
        tree = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        method_state = tree.pop("method_state")
        if not isinstance(method_state, dict) or set(method_state) != set(LEGACY_METHOD_FIELDS):
            return None
        return {**tree, **method_state}

    @classmethod
    def from_legacy_layout(cls, tree: dict) -> TrainState:
        """The state of a checkpoint in the layout before `method_state`, values unchanged."""
        tree = dict(tree)
        method_state = {name: tree.pop(name) for name in LEGACY_METHOD_FIELDS}
        return cls(**tree, method_state=method_state)


class Components(NamedTuple):
    """The static pieces a step needs, built once from the config."""

    model: models.Encoder
    probe: models.LinearProbe
    tx: optax.GradientTransformation
    probe_tx: optax.GradientTransformation
    lr_schedule: Any  # optimizer step -> encoder/projector learning rate
    aug: augment.AugmentParams
    steps_per_epoch: int
    total_steps: int  # of the whole schedule (max_epochs), for lr and momentum schedules
    method: methods.Method


def resolve_dtype(name: str):
    """'auto': bfloat16 on accelerators (the loss computes in float32 inside), float32 on CPU."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def build_components(config, num_classes: int, steps_per_epoch: int) -> Components:
    def lr_schedule(base_lr):
        def schedule(count):
            epoch = schedules.epoch_of_step(count, steps_per_epoch, config.lr_schedule_unit)
            return schedules.warmup_cosine(
                epoch,
                base_lr=base_lr,
                max_epochs=config.max_epochs,
                warmup_epochs=config.warmup_epochs,
                warmup_start_lr=config.warmup_start_lr,
                min_lr=config.min_lr,
            )

        return schedule

    lr = schedules.scaled_lr(config.lr, config.batch_size) if config.scale_lr else config.lr
    classifier_lr = config.classifier_lr
    if config.scale_classifier_lr:  # solo-learn scales it as the lr; the official SimCo does not
        classifier_lr = schedules.scaled_lr(classifier_lr, config.batch_size)
    # The probe shares the schedule's shape (and absolute warm-up start), has no weight decay.
    probe_tx = optimizers.make_probe_optimizer(config, lr_schedule(classifier_lr))
    model = models.create_encoder(config, dtype=resolve_dtype(config.dtype))
    total_steps = config.max_epochs * steps_per_epoch
    return Components(
        model=model,
        probe=models.LinearProbe(num_classes),
        tx=optimizers.make_optimizer(config, lr_schedule(lr), lr),
        probe_tx=probe_tx,
        lr_schedule=lr_schedule(lr),
        aug=augment.AugmentParams.from_config(config),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        method=methods.make_method(config, model, total_steps),
    )


def create_train_state(config, comps: Components, image_shape) -> TrainState:
    """Initial state; pure in the seed. `image_shape` is (H, W, C) of the stored images."""
    rng = jax.random.PRNGKey(config.seed)
    init_rng = jax.random.fold_in(rng, _INIT_STREAM)
    model_rng, probe_rng, method_rng = jax.random.split(init_rng, 3)
    dummy = jnp.zeros((2, config.crop_size, config.crop_size, image_shape[-1]), jnp.float32)
    predict = bool(comps.model.pred_hidden_dim)  # creates the predictor's variables too
    variables = comps.model.init(model_rng, dummy, train=False, predict=predict)
    params, batch_stats = variables["params"], variables["batch_stats"]
    features = comps.model.apply(variables, dummy, train=False)[0]
    probe_params = comps.probe.init(probe_rng, features)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=comps.tx.init(params),
        method_state=comps.method.init_state(method_rng, params, batch_stats),
        probe_params=probe_params,
        probe_opt_state=comps.probe_tx.init(probe_params),
        rng=rng,
    )


def augment_views(rng, images, aug: augment.AugmentParams, num_views: int):
    """`num_views` augmented views of the batch, each from its own key stream (two: the official
    recipe's `augment.two_views`, which also takes a pair of host crops)."""
    if num_views == 2:
        return augment.two_views(rng, images, aug)
    if isinstance(images, tuple):
        raise ValueError(f"streamed host crops come as two views; the method asks {num_views}")
    return tuple(augment.augment_view(key, images, aug) for key in jax.random.split(rng, num_views))


def make_train_step(config, comps: Components):
    """Returns the pure step (state, uint8 images, labels) -> (state, metrics)."""
    model, probe, method = comps.model, comps.probe, comps.method
    groups = config.bn_groups
    predict = bool(model.pred_hidden_dim)
    backward_views = set(method.backward_views)
    encode = methods.encode

    def train_step(state: TrainState, images, labels):
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, _STEP_STREAM), state.step)
        aug_rng, key_rng = jax.random.split(rng)
        views = augment_views(aug_rng, images, comps.aug, method.num_views)
        momentum_keys, method_state = method.momentum_keys(state.method_state, views, key_rng)
        negatives = method.negatives(method_state)

        def loss_fn(params):
            # Separate passes: each view's BatchNorm statistics come from B images, not 2B.
            stats, features, projections, queries = state.batch_stats, [], [], []
            for index, view in enumerate(views):
                # A view outside `backward_views` is forward-only (for its BatchNorm statistics
                # and the probe's features): the method says so, memory.py counts it so.
                view_params = params if index in backward_views else jax.lax.stop_gradient(params)
                f, z, *p, stats = encode(
                    model,
                    view_params,
                    stats,
                    view,
                    groups=groups,
                    predict=predict,
                    normalize=method.normalize_heads,
                )
                features.append(f)
                projections.append(z)
                queries.append(p[0] if predict else z)  # BYOL/SimSiam: the predictor's output
            keys = method.targets(tuple(projections), momentum_keys)
            loss = method.loss(tuple(queries), keys, negatives)
            aux = (stats, jax.lax.stop_gradient(tuple(features)), jax.lax.stop_gradient(keys))
            return loss, aux

        (loss, (batch_stats, features, new_keys)), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(state.params)
        updates, opt_state = comps.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        # Online linear probe: labels reach only this classifier, through stop-gradient features.
        def probe_loss_fn(probe_params):
            logits = probe.apply({"params": probe_params}, jnp.concatenate(features))
            targets = jnp.concatenate([labels] * len(features))
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            return ce, jnp.mean(jnp.argmax(logits, -1) == targets)

        (probe_loss, probe_acc), probe_grads = jax.value_and_grad(probe_loss_fn, has_aux=True)(
            state.probe_params
        )
        probe_updates, probe_opt_state = comps.probe_tx.update(
            probe_grads, state.probe_opt_state, state.probe_params
        )
        probe_params = optax.apply_updates(state.probe_params, probe_updates)

        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            # EMA of the momentum encoder, enqueue (MoCo family).
            method_state=method.post_update(method_state, state.step, params, new_keys),
            probe_params=probe_params,
            probe_opt_state=probe_opt_state,
        )
        # Accuracies in percent, as the evaluations and the paper's tables; τ only where it acts.
        metrics = dict(
            loss=loss,
            probe_loss=probe_loss,
            probe_train_top1=100.0 * probe_acc,
            lr=comps.lr_schedule(state.step),
            **method.metrics(state.step),  # τ_m where a momentum encoder acts
        )
        return new_state, metrics

    return train_step


def steps_per_dispatch(config) -> int:
    """Steps fused into one dispatch: `config.steps_per_dispatch`, but 1 on the CPU backend.

    XLA:CPU runs convolutions inside loop bodies and conditional branches through a slow generic
    path (jax-ml/jax#12868; a ResNet-18 step ran ~20× slower inside lax.scan or lax.cond here),
    so on CPU each dispatch is one plain step. A step takes far longer than a dispatch there, and
    every step runs the same compiled program, so a resumed run stays bit-identical.
    """
    return 1 if jax.default_backend() == "cpu" else config.steps_per_dispatch


def make_train_chunk(config, comps: Components, train_step, *, chunk_size: int, select):
    """Fuses `chunk_size` steps into one lax.scan; steps at or past `stop_at` are skipped.

    `chunk(state, data, stop_at)`: `select(state, data, i)` gives the i-th step's (images, labels)
    from the chunk's `data` (the training input's `select`, see `inputs`).

    The skip keeps one compiled function for every chunk of the run (epoch ends, the last steps),
    so the host dispatches once per chunk and never recompiles. `chunk_size` 1 (the CPU choice of
    `steps_per_dispatch`) is one step with neither loop nor cond around it; a select discards it
    past `stop_at`.
    """
    del config, comps  # unused since the resident gather moved to `inputs`; callers pass them

    def chunk(state: TrainState, data, stop_at):
        def run(state, i):
            images, labels = select(state, data, i)
            new_state, metrics = train_step(state, images, labels)
            return new_state, dict(metrics, active=jnp.ones((), jnp.bool_))

        def skip(state, i):
            _, metrics = jax.eval_shape(run, state, i)
            zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics)
            return state, zeros

        if chunk_size == 1:
            active = state.step < stop_at
            new_state, metrics = run(state, 0)
            keep = lambda new, old: jnp.where(active, new, old)
            metrics = {k: keep(m, jnp.zeros_like(m))[None] for k, m in metrics.items()}
            return jax.tree.map(keep, new_state, state), metrics

        def body(state, i):
            return jax.lax.cond(state.step < stop_at, run, skip, state, i)

        return jax.lax.scan(body, state, jnp.arange(chunk_size))

    return chunk
