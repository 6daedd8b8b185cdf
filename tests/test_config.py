"""Bad settings fail before anything is loaded or compiled, and say how to fix them."""

import pytest
from helpers import FRAMEWORKS, framework_config

from simco_jax import config as config_lib


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("variant", ["smoke", None, "cifar10", "smoke,cifar10"])
def test_shipped_configs_are_valid(framework, variant):
    config = framework_config(framework, variant)
    config_lib.validate(config, num_devices=1)
    if variant and "cifar10" in variant:
        assert config.dataset == "cifar10"


def test_frameworks_differ_only_in_the_four_settings_of_the_paper():
    configs = {f: framework_config(f, None).to_dict() for f in FRAMEWORKS}
    differing = {k for k in configs["simco"] if len({repr(c[k]) for c in configs.values()}) > 1}
    assert differing == {"momentum_encoder", "queue_size", "dt_m", "symmetric"}


def test_official_recipe_defaults():
    c = framework_config("simco", None)
    assert (c.batch_size, c.max_epochs, c.lr, c.weight_decay, c.temperature, c.dt_m) == (
        256,
        200,
        0.03,
        5e-4,
        0.1,
        10.0,
    )
    assert (c.proj_hidden_dim, c.proj_output_dim, c.seed, c.min_scale) == (128, 128, 15, 0.08)
    assert framework_config("mocov2", None).queue_size == 65536


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="unknown config variant 'tiny'"):
        framework_config("simco", "tiny")


@pytest.mark.parametrize(
    "overrides, num_devices, message",
    [
        (dict(temperature=0.0), 1, "temperature must be > 0"),
        (dict(dt_m=-1.0), 1, "dt_m must be > 0"),
        (dict(base_tau_momentum=1.5), 1, r"base_tau_momentum must lie in \[0, 1\]"),
        (dict(final_tau_momentum=-0.1), 1, r"final_tau_momentum must lie in \[0, 1\]"),
        (dict(batch_size=30), 8, "not divisible by the 8 devices"),
        (dict(queue_size=100), 1, "must be a multiple of the global batch_size=32"),
        (dict(queue_size=-1), 1, "queue_size must be >= 0"),
        (dict(backbone="vit"), 1, "backbone must be one of"),
        (dict(dtype="float16"), 1, "dtype must be one of"),
        (dict(lr_schedule_unit="iteration"), 1, "lr_schedule_unit must be one of"),
        (dict(gray_scale_prob=2.0), 1, "gray_scale_prob is a probability"),
        (dict(min_scale=0.0), 1, "min_scale"),
        (dict(shuffle_bn=True, bn_groups=4), 1, "needs momentum_encoder=True"),
        (dict(bn_groups=3), 1, "bn_groups=3 must be >= 1 and divide batch_size=32"),
        (dict(dataset="npz", data_path=""), 1, "needs --config.data_path"),
    ],
)
def test_bad_settings_fail_with_a_message(overrides, num_devices, message):
    config = framework_config("simco", "smoke", **overrides)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config, num_devices=num_devices)


def test_unknown_key_is_rejected_with_the_known_ones():
    config = framework_config("simco", "smoke")
    config.unlock()
    config.temprature = 0.2
    with pytest.raises(config_lib.ConfigError, match=r"unknown config keys \['temprature'\]"):
        config_lib.validate(config)
