"""The method seam: what a framework adds to the shared train step, chosen by config data.

Every framework is the same step (`train_step.make_train_step`), read top to bottom:

    two views ─► online encoder: features, projections z and queries q (q = predictor(z), or z)
    targets:   the momentum encoder's projections (stop-gradient)  [momentum_encoder]
             | the online projections (with gradient: SimCo; stop-gradient: negative-free losses)
    negatives: the queue of past keys [queue_size > 0] | the batch's other keys | none
    loss:      L(q1, k2) one way, or w·(L(q1, k2) + L(q2, k1)) [symmetric]
    after the optimizer: EMA of the momentum encoder, then this step's keys enter the queue

`make_method` picks each part once, from the config keys, and returns them as a `Method`: the
step calls its functions and never branches on a framework. Each idea of a paper lives in one
place here (or in the module named):

    momentum encoder and its EMA (MoCo, BYOL) ....... `_momentum_targets`, `post_update`
    ShuffleBN (MoCo) ................................ `shuffled_encode`
    queue of past keys as negatives (MoCo) .......... `_queue_negatives`, `enqueue`, `post_update`
    dual temperature (SimCo, SimMoCo) ............... `LOSSES['contrastive']` (`losses`)
    normalised MSE (BYOL), negative cosine (SimSiam)  `LOSSES['normalized_mse' | 'negative_cosine']`
    stop-gradient on online targets (SimSiam) ....... `Loss.stop_gradient_targets`
    predictor on the online branch (BYOL, SimSiam) .. `models.Predictor` (config.predictor)
    its fixed lr (SimSiam); LARS (BYOL) ............. `optimizers`

Adding a framework is a config file when it is a mix of these parts; a new part (a loss, a kind of
target) is one entry here. A method outside this family is another `Method` value, given to the
step as `train_step.Components.method`: it declares its views, whether its heads are
L2-normalised, which views its loss differentiates (what `memory` and
`benchmarks/throughput.py` count) and its own state (`TrainState.method_state`, saved in every
checkpoint); tests/test_methods.py trains a VICReg-style one through the step. The MoCo family's
state is {momentum_params, momentum_batch_stats, queue, queue_ptr}, the four `TrainState`
fields of earlier releases, whose checkpoints still restore (`TrainState.from_legacy_layout`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from simco_jax import losses, schedules


def _l2_normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def encode(
    model,
    params,
    batch_stats,
    images,
    *,
    groups: int = 1,
    train: bool = True,
    predict=False,
    normalize: bool = True,
):
    """One forward pass in train mode; BatchNorm statistics over `groups` equal sub-batches.

    Returns (features, projections, updated batch_stats), or with predict=True (features,
    projections, predictions, updated batch_stats); the heads L2-normalised when `normalize`
    (in float32), else as the model gives them. groups > 1
    mimics a multi-GPU PyTorch run without SyncBN: each sub-batch normalises with its own
    statistics, and the running statistics are the mean of the sub-batches' updates.
    """

    def apply(x):
        (features, *heads), updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=train,
            predict=predict,
            mutable=["batch_stats"],
        )
        heads = [_l2_normalize(h) if normalize else h for h in heads]
        return (features, *heads, updates["batch_stats"])

    if groups == 1:
        return apply(images)
    batch = images.shape[0]
    grouped = images.reshape(groups, batch // groups, *images.shape[1:])
    *outputs, stats = jax.vmap(apply)(grouped)
    stats = jax.tree.map(lambda s: s.mean(axis=0), stats)
    return (*[o.reshape(batch, -1) for o in outputs], stats)


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


def encoder_part(tree):
    """The online variables without the predictor: what the momentum encoder copies (BYOL's
    target network has no predictor)."""
    return {name: value for name, value in tree.items() if name != "predictor"}


# ---------------------------------------------------------------- losses


class Loss(NamedTuple):
    """One loss of the config space. `fn(queries, keys, negatives, config)` -> scalar."""

    fn: Callable
    # The symmetric loss is direction_weight·(L(q1, k2) + L(q2, k1)): ½ (a mean, as the official
    # SimCo and SimSiam code) or 1 (BYOL sums its two directions, L + L̃).
    direction_weight: float
    uses_negatives: bool
    # Online targets (no momentum encoder) without gradient: SimSiam's stop-gradient, without
    # which a negative-free loss collapses. SimCo's contrastive keys keep their gradient.
    stop_gradient_targets: bool


def _contrastive(queries, keys, negatives, config):
    # dt_m = 1 is InfoNCE (MoCo v2) exactly: the dual-temperature weight is then 1.
    return losses.dual_temperature_infonce(
        queries,
        keys,
        negatives,
        temperature=config.temperature,
        dt_m=config.dt_m,
        negative_groups=config.negative_groups,
    )


LOSSES = {
    "contrastive": Loss(_contrastive, 0.5, uses_negatives=True, stop_gradient_targets=False),
    "normalized_mse": Loss(
        lambda q, k, _, config: losses.normalized_mse(q, k),
        1.0,
        uses_negatives=False,
        stop_gradient_targets=True,
    ),
    "negative_cosine": Loss(
        lambda q, k, _, config: losses.negative_cosine(q, k),
        0.5,
        uses_negatives=False,
        stop_gradient_targets=True,
    ),
}


# ---------------------------------------------------------------- the method


class Method(NamedTuple):
    """What a method asks of the step, and the parts it contributes, as pure functions.

    The step encodes `num_views` augmented views with the online encoder, one pass each, and
    differentiates the loss through the passes of `backward_views` only (the others run for
    their BatchNorm statistics and the probe's features); `method_state` is the pytree of
    `init_state`, carried in the TrainState and its checkpoints.
    """

    num_views: int
    # L2-normalise the projections and predictions before targets and loss (every contrastive
    # and BYOL/SimSiam loss here); False hands the loss the raw heads (VICReg-style losses).
    normalize_heads: bool
    # Indices of the views whose online pass gets a backward pass.
    backward_views: tuple[int, ...]
    # (rng, params, batch_stats) -> method_state.
    init_state: Callable
    # (method_state, views, rng) -> (momentum keys or None, method_state after those passes).
    momentum_keys: Callable
    # (online projections per view, momentum keys) -> the targets of the loss, per view.
    targets: Callable
    # (method_state) -> the negatives shared by all anchors (the queue), or None.
    negatives: Callable
    # (queries per view, targets per view, negatives) -> scalar loss.
    loss: Callable
    # (step) -> the method's own metrics (τ_m where a momentum encoder acts).
    metrics: Callable
    # (method_state, step, new params, stop-gradient targets) -> method_state after the update.
    post_update: Callable


def make_method(config, model, total_steps: int) -> Method:
    """The MoCo/SimCo/BYOL/SimSiam method the config describes; `total_steps` spans τ_m."""
    loss_spec = LOSSES[config.loss]
    groups = config.bn_groups

    def init_state(rng, params, batch_stats):
        queue = None  # in-batch negatives need no queue
        if config.queue_size:  # MoCo's queue starts as random unit vectors
            queue = jax.random.normal(rng, (config.queue_size, config.proj_output_dim))
            queue = queue / jnp.linalg.norm(queue, axis=-1, keepdims=True).clip(1e-12)
        copy = lambda tree: jax.tree.map(jnp.array, encoder_part(tree))
        momentum = config.momentum_encoder
        return dict(
            momentum_params=copy(params) if momentum else None,
            momentum_batch_stats=copy(batch_stats) if momentum else None,
            queue=queue,
            queue_ptr=jnp.zeros((), jnp.int32),
        )

    def _momentum_targets(method_state, views, rng):
        """Keys from the momentum encoder, in train mode (its own BatchNorm statistics).

        Both views pass through it even for a one-way loss, which reads only k2: the official
        code does so, and view 1's pass moves the key encoder's BatchNorm running statistics,
        which an evaluation or export of the momentum encoder reads.
        """
        params, stats = method_state["momentum_params"], method_state["momentum_batch_stats"]
        keys = []
        for view, view_rng in zip(views, jax.random.split(rng), strict=True):
            if config.shuffle_bn:  # MoCo's ShuffleBN: sub-batches mix images across groups
                perm = jax.random.permutation(view_rng, view.shape[0])
                k, stats = shuffled_encode(model, params, stats, view, perm, groups=groups)
            else:
                _, k, stats = encode(model, params, stats, view, groups=groups)
            keys.append(jax.lax.stop_gradient(k))
        return (keys[0], keys[1]), dict(method_state, momentum_batch_stats=stats)

    def _no_momentum_targets(method_state, views, rng):
        return None, method_state

    def _momentum_keys_as_targets(projections, momentum_keys):
        return momentum_keys

    def _online_targets(projections, momentum_keys):
        if loss_spec.stop_gradient_targets:  # SimSiam
            return jax.lax.stop_gradient(projections)
        return projections  # SimCo: the keys are the online projections, with gradient

    def _queue_negatives(method_state):
        return jax.lax.stop_gradient(method_state["queue"])

    def loss(queries, keys, negatives):
        (q1, q2), (k1, k2) = queries, keys
        value = loss_spec.fn(q1, k2, negatives, config)
        if config.symmetric:
            value = loss_spec.direction_weight * (value + loss_spec.fn(q2, k1, negatives, config))
        return value

    def tau(step):
        return schedules.momentum_schedule(
            step,
            max_steps=total_steps,
            base_tau=config.base_tau_momentum,
            final_tau=config.final_tau_momentum,
        )

    def post_update(method_state, step, params, keys):
        updates = {}
        if config.momentum_encoder:  # EMA of parameters only; BN statistics come from its passes
            t = tau(step)
            updates["momentum_params"] = jax.tree.map(
                lambda m, o: t * m + (1.0 - t) * o,
                method_state["momentum_params"],
                encoder_part(params),
            )
        if config.queue_size:  # after the loss: this step's keys were not its own negatives
            updates["queue"], updates["queue_ptr"] = enqueue(
                method_state["queue"], method_state["queue_ptr"], keys[1]
            )
        return dict(method_state, **updates)

    # View 2's online pass is differentiated when the loss reads its query (symmetric) or when
    # it is view 1's target with gradient (SimCo's one-way loss without a momentum encoder).
    second_view_target = not config.momentum_encoder and not loss_spec.stop_gradient_targets
    return Method(
        num_views=2,
        normalize_heads=True,
        backward_views=(0, 1) if config.symmetric or second_view_target else (0,),
        init_state=init_state,
        momentum_keys=_momentum_targets if config.momentum_encoder else _no_momentum_targets,
        targets=_momentum_keys_as_targets if config.momentum_encoder else _online_targets,
        negatives=_queue_negatives if config.queue_size else (lambda method_state: None),
        loss=loss,
        metrics=(lambda step: {"tau": tau(step)}) if config.momentum_encoder else (lambda step: {}),
        post_update=post_update,
    )
