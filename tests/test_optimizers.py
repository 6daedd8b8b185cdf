"""The encoder's and the online classifier's optimizers (LARS itself: tests/test_methods.py)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import framework_config

from simco_jax import train_step

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
