"""The encoder's and the online classifier's optimizers (LARS itself: tests/test_methods.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import framework_config

from simco_jax import optimizers, train_step

FIVE = ("simco", "simmoco", "mocov2", "byol", "simsiam")


def _probe_step(framework, **overrides):
    """One classifier update at the peak lr: (params, grads, updates, config)."""
    config = framework_config(framework, warmup_epochs=0, **overrides)  # step 0 is at the peak
    comps = train_step.build_components(config, num_classes=3, steps_per_epoch=8)
    rng = np.random.default_rng(0)
    params = {"linear": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}}
    params["linear"]["bias"] = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    grads = {"linear": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}}
    grads["linear"]["bias"] = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    updates, _ = comps.probe_tx.update(grads, comps.probe_tx.init(params), params)
    return params, grads, updates, config


@pytest.mark.parametrize("framework", FIVE)
def test_classifier_lr_scales_with_the_batch_where_the_config_says(framework):
    """solo-learn (BYOL, SimSiam) scales classifier_lr by batch/256; the official SimCo scripts
    do not. The bias is exempt from LARS's trust ratio, so its step is −lr·g in every framework."""
    _, grads, updates, config = _probe_step(framework, batch_size=512)
    scaled = framework in ("byol", "simsiam")
    assert config.scale_classifier_lr == scaled
    lr = config.classifier_lr * (2.0 if scaled else 1.0)
    np.testing.assert_allclose(updates["linear"]["bias"], -lr * grads["linear"]["bias"], rtol=1e-6)


@pytest.mark.parametrize("framework", FIVE)
def test_under_lars_the_classifier_weight_gets_the_clipped_trust_ratio(framework):
    """solo-learn trains the classifier inside the encoder's optimizer (weight decay 0): under
    LARS its weight's step is scaled by min(η‖p‖/(‖g‖ + eps)/lr, 1); under SGD it is −lr·g."""
    params, grads, updates, config = _probe_step(framework, batch_size=256)
    lr = config.classifier_lr
    p, g = np.asarray(params["linear"]["kernel"]), np.asarray(grads["linear"]["kernel"])
    ratio = 1.0
    if config.optimizer == "lars":
        ratio = min(config.lars_eta * np.linalg.norm(p) / (np.linalg.norm(g) + 1e-8) / lr, 1.0)
        assert ratio < 1.0  # the clip does not hide the trust ratio here
    assert (config.optimizer == "lars") == (framework == "byol")
    np.testing.assert_allclose(updates["linear"]["kernel"], -lr * ratio * g, rtol=1e-5)


def test_sgd_probe_is_unchanged_by_the_lars_branch():
    """The SGD frameworks' classifier: optax.sgd with the encoder's momentum, no weight decay."""
    params, grads, updates, config = _probe_step("simco")
    expected, _ = optax.sgd(config.classifier_lr, momentum=config.momentum).update(
        grads, optax.sgd(config.classifier_lr, momentum=0.9).init(params), params
    )
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(updates["linear"][name], expected["linear"][name])


# ------------------------------------------------------------ optimizers.py: LARS as solo-le
def _solo_learn_lars_numpy(params, grads_fn, lrs, *, momentum, wd, eta, clip, exclude, eps=1e-8):
    """solo-learn's LARS.step (solo/utils/lars.py) in NumPy, float64, one loop per parameter."""
    params = {k: v.astype(np.float64).copy() for k, v in params.items()}
    buffers = {}
    for lr in lrs:
        grads = grads_fn(params)
        for name, p in params.items():
            d_p = grads[name].copy()
            p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(grads[name])
            if p.ndim != 1 or not exclude:
                if p_norm != 0 and g_norm != 0:
                    lars_lr = p_norm / (g_norm + p_norm * wd + eps)
                    lars_lr *= eta
                    if clip:
                        lars_lr = min(lars_lr / lr, 1)
                    d_p = d_p + wd * p
                    d_p = d_p * lars_lr
            if momentum != 0:
                if name not in buffers:
                    buffers[name] = d_p.copy()
                else:
                    buffers[name] = momentum * buffers[name] + d_p
                d_p = buffers[name]
            params[name] = p - lr * d_p
    return params


@pytest.mark.parametrize("clip, exclude", [(True, True), (False, False), (True, False)])
def test_lars_matches_solo_learn_numpy(clip, exclude):
    rng = np.random.default_rng(3)
    params = {
        "kernel": rng.normal(size=(4, 3)),
        "bias": rng.normal(size=(3,)),
        "scale": rng.normal(size=(3,)) * 0.1,
        "zero": np.zeros((2, 2)),  # ‖p‖ = 0: no adaptation, no weight decay
    }
    target = {k: rng.normal(size=v.shape) for k, v in params.items()}

    def grads_fn(p):  # of ½ Σ c·(p − t)², a different curvature per leaf
        return {k: (i + 1.0) * (p[k] - target[k]) for i, k in enumerate(sorted(p))}

    lrs = [0.3, 0.8, 1.0, 0.5, 0.05]  # a schedule: the clip divides by the current lr
    kwargs = dict(momentum=0.9, wd=1e-2, eta=0.02, clip=clip, exclude=exclude)
    expected = _solo_learn_lars_numpy(params, grads_fn, lrs, **kwargs)

    tx = optimizers.lars(
        lambda count: jnp.asarray(lrs)[count],
        momentum=0.9,
        weight_decay=1e-2,
        eta=0.02,
        clip_lr=clip,
        exclude_bias_n_norm=exclude,
    )
    with jax.enable_x64(True):
        p = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
        opt_state = tx.init(p)
        for _ in lrs:
            grads = jax.tree.map(jnp.asarray, grads_fn({k: np.asarray(v) for k, v in p.items()}))
            updates, opt_state = tx.update(grads, opt_state, p)
            p = optax.apply_updates(p, updates)
        got = {k: np.asarray(v) for k, v in p.items()}
    for name in params:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(got["zero"], expected["zero"])


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_simsiam_predictor_keeps_the_peak_lr(optimizer):
    config = framework_config("simsiam", optimizer=optimizer, weight_decay=0.1)
    assert config.pred_fixed_lr
    params = {"backbone": {"kernel": jnp.ones((2, 2))}, "predictor": {"kernel": jnp.ones((2, 2))}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    zero_schedule = lambda count: jnp.zeros((), jnp.float32)  # as at the start of a warm-up from 0
    tx = optimizers.make_optimizer(config, zero_schedule, 2.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["backbone"]["kernel"], 0.0)
    # The predictor steps with lr 2: SGD −2·(g + wd·p); LARS (trust ratio clipped at 1 by lr 2:
    # 0.02·2/(1 + 0.2) / 2 < 1) scales by it.
    expected = -2.0 * (0.5 + 0.1) * np.ones((2, 2))
    if optimizer == "lars":
        expected *= 0.02 * 2.0 / (1.0 + 0.1 * 2.0 + 1e-8) / 2.0
    np.testing.assert_allclose(updates["predictor"]["kernel"], expected, rtol=1e-6)
    no_fixed = optimizers.make_optimizer(
        framework_config("simsiam", pred_fixed_lr=False), zero_schedule, 2.0
    )
    updates, _ = no_fixed.update(grads, no_fixed.init(params), params)
    np.testing.assert_array_equal(updates["predictor"]["kernel"], 0.0)


def test_optax_lars_is_not_solo_learns():
    """Why `optimizers.lars` is not `optax.lars`: one step on the same problem differs."""
    params = {"kernel": jnp.asarray([[1.0, 2.0], [3.0, 4.0]])}
    grads = {"kernel": jnp.asarray([[0.5, -1.0], [2.0, 0.1]])}
    ours = optimizers.lars(1.0, weight_decay=0.1, eta=0.02, momentum=0.9)
    theirs = optax.lars(1.0, weight_decay=0.1, trust_coefficient=0.02, momentum=0.9)
    a, _ = ours.update(grads, ours.init(params), params)
    b, _ = theirs.update(grads, theirs.init(params), params)
    assert not np.allclose(a["kernel"], b["kernel"])
