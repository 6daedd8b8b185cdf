"""The encoder's optimizer: SGD (the official SimCo/MoCo recipe) or LARS (solo-learn's BYOL).

`config.optimizer` picks one for the encoder and, as solo-learn's parameter group of the online
classifier, for the probe; both take the learning-rate schedule as a function of the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from simco_jax import registry

OPTIMIZERS = registry.OPTIMIZERS


def make_optimizer(config, learning_rate, base_lr: float) -> optax.GradientTransformation:
    """The optimizer of `config.optimizer` at the schedule `learning_rate(step)`.

    With `pred_fixed_lr` the predictor keeps `base_lr` (the schedule's peak) throughout (SimSiam,
    Chen & He 2021, §4.2, "fixing the learning rate of the predictor"; solo-learn's `static_lr`).
    """
    if config.predictor and config.pred_fixed_lr:
        transforms = {
            "scheduled": _optimizer(config, learning_rate),
            "fixed": _optimizer(config, base_lr),
        }
        labels = lambda params: {k: "fixed" if k == "predictor" else "scheduled" for k in params}
        return optax.multi_transform(transforms, labels)
    return _optimizer(config, learning_rate)


def make_probe_optimizer(config, learning_rate) -> optax.GradientTransformation:
    """The online classifier's optimizer at the schedule `learning_rate(step)`, no weight decay.

    solo-learn trains the classifier inside the encoder's optimizer, as a parameter group of its
    own lr and weight decay 0: under LARS its weight gets the (clipped) trust ratio, its bias is
    exempt as a 1-d tensor (with `lars_exclude_bias_n_norm`); under SGD it is plain momentum SGD.
    """
    if config.optimizer == "lars":
        return _optimizer(config, learning_rate, weight_decay=0.0)
    return optax.sgd(learning_rate, momentum=config.momentum)


def _optimizer(config, learning_rate, weight_decay=None) -> optax.GradientTransformation:
    weight_decay = config.weight_decay if weight_decay is None else weight_decay
    if config.optimizer == "sgd":
        # Coupled weight decay (g + wd·θ, as torch.optim.SGD) on every encoder/projector parameter.
        return optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.sgd(learning_rate, momentum=config.momentum),
        )
    if config.optimizer == "lars":
        return lars(
            learning_rate,
            momentum=config.momentum,
            weight_decay=weight_decay,
            eta=config.lars_eta,
            clip_lr=config.lars_clip_lr,
            exclude_bias_n_norm=config.lars_exclude_bias_n_norm,
        )
    raise ValueError(f"unknown optimizer {config.optimizer!r}; allowed: {OPTIMIZERS}")


def lars(
    learning_rate,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eta: float = 1e-3,
    clip_lr: bool = False,
    exclude_bias_n_norm: bool = False,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """LARS (You et al. 2017) as solo-learn has it (solo/utils/lars.py, from Lightning Bolts).

    For each parameter p with gradient g, at the step's learning rate lr:

        if (p.ndim > 1 or not exclude_bias_n_norm) and ‖p‖ > 0 and ‖g‖ > 0:
            r = eta·‖p‖ / (‖g‖ + wd·‖p‖ + eps)
            r = min(r / lr, 1)                         if clip_lr
            d = r·(g + wd·p)
        else:                                          # biases and BatchNorm: plain SGD, no wd
            d = g
        v = μ·v + d,   p = p − lr·v                    (PyTorch SGD momentum: v starts at d)

    `optax.lars` is a different LARS: its trust ratio divides by ‖g + wd·p‖ rather than
    ‖g‖ + wd·‖p‖, it has no `clip_lr`, keeps the weight decay on zero-norm parameters, and scales
    by the learning rate before the momentum (which differs once the rate changes). So this one is
    solo-learn's trust ratio followed by optax's `trace` and `scale_by_learning_rate`.
    """
    schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params):
        lr = schedule(state.count)

        def scale(g, p):
            p_norm = jnp.sqrt(jnp.sum(jnp.square(p)))
            g_norm = jnp.sqrt(jnp.sum(jnp.square(g)))
            ratio = eta * p_norm / (g_norm + weight_decay * p_norm + eps)
            if clip_lr:
                ratio = jnp.minimum(ratio / lr, 1.0)
            adapted = ratio * (g + weight_decay * p)
            adapt = (p_norm > 0) & (g_norm > 0)
            if exclude_bias_n_norm and p.ndim == 1:
                return g
            return jnp.where(adapt, adapted, g).astype(g.dtype)

        updates = jax.tree.map(scale, updates, params)
        return updates, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))

    return optax.chain(
        optax.GradientTransformation(init, update),
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(schedule),
    )
