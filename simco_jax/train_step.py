"""The pure training step of every framework, and the scan that fuses several of them.

One function serves MoCo v2, SimMoCo, SimCo and any mix of their parts; the config decides:

    two views ──► online encoder (a separate pass per view: per-view BatchNorm statistics)
               └► keys: momentum encoder (stop-gradient)  |  the online projections (with gradient)
    negatives: the queue (K past keys)  |  the other keys of the batch (diagonal removed)
    loss:      InfoNCE (dt_m = 1)  |  dual temperature;  one way (q1·k2)  |  symmetric
    then: online probe on stop-gradient features → SGD → EMA of params → enqueue the keys.

Everything random is drawn from `fold_in(state.rng, state.step)`, and the data order from
`fold_in(state.rng, epoch)`, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from simco_jax import augment, losses, models, schedules

_DATA_STREAM, _STEP_STREAM, _INIT_STREAM = 0, 1, 2


@flax.struct.dataclass
class TrainState:
    """Everything a restart needs, as one pytree."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    momentum_params: Any  # None without a momentum encoder
    momentum_batch_stats: Any
    queue: jax.Array  # (queue_size, proj_output_dim), rows are past keys; None without a queue
    queue_ptr: jax.Array
    probe_params: Any
    probe_opt_state: Any
    rng: jax.Array  # fixed root key; per-step keys are folded from it


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
    # Coupled weight decay (g + wd·θ, as torch.optim.SGD) on every encoder/projector parameter.
    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(lr_schedule(lr), momentum=config.momentum),
    )
    # The probe shares the schedule's shape (and absolute warm-up start), has no weight decay.
    probe_tx = optax.sgd(lr_schedule(config.classifier_lr), momentum=config.momentum)
    return Components(
        model=models.create_encoder(config, dtype=resolve_dtype(config.dtype)),
        probe=models.LinearProbe(num_classes),
        tx=tx,
        probe_tx=probe_tx,
        lr_schedule=lr_schedule(lr),
        aug=augment.AugmentParams.from_config(config),
        steps_per_epoch=steps_per_epoch,
        total_steps=config.max_epochs * steps_per_epoch,
    )


def create_train_state(config, comps: Components, image_shape) -> TrainState:
    """Initial state; pure in the seed. `image_shape` is (H, W, C) of the stored images."""
    rng = jax.random.PRNGKey(config.seed)
    init_rng = jax.random.fold_in(rng, _INIT_STREAM)
    model_rng, probe_rng, queue_rng = jax.random.split(init_rng, 3)
    dummy = jnp.zeros((2, config.crop_size, config.crop_size, image_shape[-1]), jnp.float32)
    variables = comps.model.init(model_rng, dummy, train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    features, _ = comps.model.apply(variables, dummy, train=False)
    probe_params = comps.probe.init(probe_rng, features)["params"]

    queue = None  # in-batch negatives need no queue
    if config.queue_size:  # MoCo's queue starts as random unit vectors
        queue = jax.random.normal(queue_rng, (config.queue_size, config.proj_output_dim))
        queue = queue / jnp.linalg.norm(queue, axis=-1, keepdims=True).clip(1e-12)
    copy = lambda tree: jax.tree.map(jnp.array, tree)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=comps.tx.init(params),
        momentum_params=copy(params) if config.momentum_encoder else None,
        momentum_batch_stats=copy(batch_stats) if config.momentum_encoder else None,
        queue=queue,
        queue_ptr=jnp.zeros((), jnp.int32),
        probe_params=probe_params,
        probe_opt_state=comps.probe_tx.init(probe_params),
        rng=rng,
    )


def _l2_normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def encode(model, params, batch_stats, images, *, groups: int = 1, train: bool = True):
    """One forward pass in train mode; BatchNorm statistics over `groups` equal sub-batches.

    Returns (features, normalised projections, updated batch_stats). groups > 1 mimics a
    multi-GPU PyTorch run without SyncBN: each sub-batch normalises with its own statistics, and
    the running statistics are the mean of the sub-batches' updates.
    """

    def apply(x):
        (features, projections), updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=train, mutable=["batch_stats"]
        )
        return features, _l2_normalize(projections), updates["batch_stats"]

    if groups == 1:
        return apply(images)
    batch = images.shape[0]
    grouped = images.reshape(groups, batch // groups, *images.shape[1:])
    features, projections, stats = jax.vmap(apply)(grouped)
    stats = jax.tree.map(lambda s: s.mean(axis=0), stats)
    return features.reshape(batch, -1), projections.reshape(batch, -1), stats


def shuffled_encode(model, params, batch_stats, images, perm, *, groups: int):
    """MoCo's ShuffleBN for the key encoder: group BatchNorm over the batch reordered by `perm`.

    Sub-batch g normalises images perm[g·B/G : (g+1)·B/G]: a key's statistics come from a random
    mix of images, not from its query's sub-batch, so BN cannot leak which key is the positive.
    Returns the normalised projections back in the original order, and the updated batch_stats.
    """
    _, keys, batch_stats = encode(model, params, batch_stats, images[perm], groups=groups)
    return keys[jnp.argsort(perm)], batch_stats


def enqueue(queue, ptr, keys):
    """FIFO ring buffer: `keys` overwrite the oldest rows, the pointer advances by the batch."""
    # Both start indices in the pointer's dtype: a literal 0 is int64 under jax_enable_x64.
    start = (ptr, jnp.zeros_like(ptr))
    queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), start)
    return queue, (ptr + keys.shape[0]) % queue.shape[0]


def make_train_step(config, comps: Components):
    """Returns the pure step (state, uint8 images, labels) -> (state, metrics)."""
    model, probe = comps.model, comps.probe
    groups = config.bn_groups

    def contrastive_loss(query, key, queue):
        kwargs = dict(temperature=config.temperature, negative_groups=config.negative_groups)
        if config.dt_m == 1.0:  # InfoNCE is the dual-temperature loss with weight exactly 1
            return losses.infonce(query, key, queue, **kwargs)
        return losses.dual_temperature_infonce(query, key, queue, dt_m=config.dt_m, **kwargs)

    def momentum_keys(state, view1, view2, rng):
        """Keys from the momentum encoder, in train mode (its own BatchNorm statistics).

        Both views pass through it even for a one-way loss, which reads only k2: the official
        code does so, and view 1's pass moves the key encoder's BatchNorm running statistics,
        which an evaluation or export of the momentum encoder reads.
        """
        params, stats = state.momentum_params, state.momentum_batch_stats
        keys = []
        for view, view_rng in zip((view1, view2), jax.random.split(rng), strict=True):
            if config.shuffle_bn:  # MoCo's ShuffleBN: sub-batches mix images across groups
                perm = jax.random.permutation(view_rng, view.shape[0])
                k, stats = shuffled_encode(model, params, stats, view, perm, groups=groups)
            else:
                _, k, stats = encode(model, params, stats, view, groups=groups)
            keys.append(jax.lax.stop_gradient(k))
        return keys[0], keys[1], stats

    def train_step(state: TrainState, images, labels):
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, _STEP_STREAM), state.step)
        aug_rng, key_rng = jax.random.split(rng)
        view1, view2 = augment.two_views(aug_rng, images, comps.aug)

        if config.momentum_encoder:
            k1, k2, momentum_stats = momentum_keys(state, view1, view2, key_rng)
        else:
            momentum_stats = state.momentum_batch_stats
        queue = jax.lax.stop_gradient(state.queue) if config.queue_size else None

        def loss_fn(params):
            # Separate passes: each view's BatchNorm statistics come from B images, not 2B.
            f1, q1, stats = encode(model, params, state.batch_stats, view1, groups=groups)
            f2, q2, stats = encode(model, params, stats, view2, groups=groups)
            key1, key2 = (k1, k2) if config.momentum_encoder else (q1, q2)  # SimCo: with gradient
            loss = contrastive_loss(q1, key2, queue)
            if config.symmetric:
                loss = 0.5 * (loss + contrastive_loss(q2, key1, queue))
            return loss, (stats, jax.lax.stop_gradient((f1, f2)), jax.lax.stop_gradient(key2))

        (loss, (batch_stats, (f1, f2), new_keys)), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(state.params)
        updates, opt_state = comps.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        # Online linear probe: labels reach only this classifier, through stop-gradient features.
        def probe_loss_fn(probe_params):
            logits = probe.apply({"params": probe_params}, jnp.concatenate([f1, f2]))
            targets = jnp.concatenate([labels, labels])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            return ce, jnp.mean(jnp.argmax(logits, -1) == targets)

        (probe_loss, probe_acc), probe_grads = jax.value_and_grad(probe_loss_fn, has_aux=True)(
            state.probe_params
        )
        probe_updates, probe_opt_state = comps.probe_tx.update(
            probe_grads, state.probe_opt_state, state.probe_params
        )
        probe_params = optax.apply_updates(state.probe_params, probe_updates)

        tau = schedules.momentum_schedule(
            state.step,
            max_steps=comps.total_steps,
            base_tau=config.base_tau_momentum,
            final_tau=config.final_tau_momentum,
        )
        momentum_params = state.momentum_params
        if config.momentum_encoder:  # EMA of parameters only; BN statistics come from its passes
            momentum_params = jax.tree.map(
                lambda m, o: tau * m + (1.0 - tau) * o, state.momentum_params, params
            )

        queue, queue_ptr = state.queue, state.queue_ptr
        if config.queue_size:  # after the loss: this step's keys were not its own negatives
            queue, queue_ptr = enqueue(queue, queue_ptr, new_keys)

        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            momentum_params=momentum_params,
            momentum_batch_stats=momentum_stats,
            queue=queue,
            queue_ptr=queue_ptr,
            probe_params=probe_params,
            probe_opt_state=probe_opt_state,
        )
        # Accuracies in percent, as the evaluations and the paper's tables; τ only where it acts.
        metrics = dict(
            loss=loss,
            probe_loss=probe_loss,
            probe_train_top1=100.0 * probe_acc,
            lr=comps.lr_schedule(state.step),
        )
        if config.momentum_encoder:
            metrics["tau"] = tau
        return new_state, metrics

    return train_step


def epoch_batch_indices(rng, epoch, num_examples: int, steps_per_epoch: int, batch_size: int):
    """The epoch's shuffled order from the seed, as (steps_per_epoch, batch) indices.

    The tail that does not fill a batch is dropped, as the official DataLoader(drop_last=True).
    """
    data_rng = jax.random.fold_in(jax.random.fold_in(rng, _DATA_STREAM), epoch)
    order = jax.random.permutation(data_rng, num_examples)
    return order[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)


def steps_per_dispatch(config) -> int:
    """Steps fused into one dispatch: `config.steps_per_dispatch`, but 1 on the CPU backend.

    XLA:CPU runs convolutions inside loop bodies and conditional branches through a slow generic
    path (jax-ml/jax#12868; a ResNet-18 step ran ~20× slower inside lax.scan or lax.cond here),
    so on CPU each dispatch is one plain step. A step takes far longer than a dispatch there, and
    every step runs the same compiled program, so a resumed run stays bit-identical.
    """
    return 1 if jax.default_backend() == "cpu" else config.steps_per_dispatch


def gather_batch(state: TrainState, data, *, steps_per_epoch: int, batch: int, batch_sharding=None):
    """The resident step's batch: rows of the on-device training set `data` = (images, labels)
    at this step's slot of its epoch's order (`epoch_batch_indices`)."""
    images, labels = data
    epoch = state.step // steps_per_epoch
    indices = epoch_batch_indices(state.rng, epoch, images.shape[0], steps_per_epoch, batch)[
        state.step % steps_per_epoch
    ]
    if batch_sharding is not None:
        indices = jax.lax.with_sharding_constraint(indices, batch_sharding)
    return images[indices], labels[indices]


def make_train_chunk(
    config, comps: Components, train_step, *, chunk_size: int, batch_sharding=None, select=None
):
    """Fuses `chunk_size` steps into one lax.scan; steps at or past `stop_at` are skipped.

    `chunk(state, data, stop_at)`: `select(state, data, i)` gives the i-th step's (images, labels)
    from the chunk's `data` (see `inputs`); by default `data` is the resident training set and
    `gather_batch` picks the step's rows.

    The skip keeps one compiled function for every chunk of the run (epoch ends, the last steps),
    so the host dispatches once per chunk and never recompiles. `chunk_size` 1 (the CPU choice of
    `steps_per_dispatch`) is one step with neither loop nor cond around it; a select discards it
    past `stop_at`.
    """
    if select is None:
        gather = dict(
            steps_per_epoch=comps.steps_per_epoch,
            batch=config.batch_size,
            batch_sharding=batch_sharding,
        )
        select = lambda state, data, i: gather_batch(state, data, **gather)

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
