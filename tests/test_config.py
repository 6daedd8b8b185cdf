"""Bad settings fail before anything is loaded or compiled, and say how to fix them."""

import math

import ml_collections
import pytest
from helpers import FRAMEWORKS, framework_config, reference_config, run_python

from simco_jax import config as config_lib
from simco_jax import train


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


def test_unknown_variant_is_named_in_one_line_before_anything_is_set():
    message = r"unknown config variant 'tiny' \(in 'smoke,tiny'\); known: smoke, cifar10, cifar100"
    with pytest.raises(config_lib.ConfigError, match=message):
        framework_config("simco", "smoke,tiny")
    config = config_lib.base_config()
    with pytest.raises(config_lib.ConfigError, match="unknown config variant 'tiny'"):
        config_lib.apply_variants(config, "smoke,tiny", config_lib.CIFAR_VARIANTS)
    assert config.to_dict() == config_lib.base_config().to_dict()  # nothing applied


def test_one_variant_parser_for_every_config_file():
    from configs import linear_eval

    applied = config_lib.apply_variants(
        config_lib.base_config(), " cifar10 , smoke", config_lib.CIFAR_VARIANTS
    )
    assert (applied.dataset, applied.batch_size) == ("synthetic", 32)  # in order: smoke last
    assert linear_eval.get_config("smoke").linear_max_steps == 4
    with pytest.raises(config_lib.ConfigError, match="unknown config variant 'smok'; known: smoke"):
        linear_eval.get_config("smok")
    marks = []
    config_lib.apply_variants(None, "a,b", {"a": lambda c: marks.append("a"), "b": marks.append})
    assert marks == ["a", None]  # a function variant gets the config


@pytest.mark.parametrize(
    "overrides, num_devices, message",
    [
        (dict(temperature=0.0), 1, r"temperature must be a finite float32 >= 1.18e-38 \(its rec"),
        (dict(temperature=1e39), 1, "temperature must be a finite float32"),
        (dict(dt_m=-1.0), 1, "dt_m must be a finite float32 >= "),
        (dict(temperature=1e-20, dt_m=1e-20), 1, r"temperature \* dt_m = 1e-40 \(τβ\) must"),
        (dict(temperature=1e20, dt_m=1e20), 1, r"temperature \* dt_m = 1e\+40 \(τβ\) must"),
        (
            dict(base_tau_momentum=1.5),
            1,
            r"base_tau_momentum must be a finite number in \[0, 1\], got 1.5",
        ),
        (dict(final_tau_momentum=-0.1), 1, r"final_tau_momentum must be a finite number in \[0"),
        (
            dict(batch_size=30),
            8,
            "batch_size=30 is not divisible by the 8 devices; use a multiple of 8",
        ),
        (dict(queue_size=100), 1, "must be a multiple of the global batch_size=32"),
        (dict(queue_size=-1), 1, r"queue_size must be an integer in \[0, 16777216\], got -1"),
        (dict(backbone="vit"), 1, "backbone must be one of"),
        (dict(dtype="float16"), 1, "dtype must be one of"),
        (dict(lr_schedule_unit="iteration"), 1, "lr_schedule_unit must be one of"),
        (dict(gray_scale_prob=2.0), 1, r"gray_scale_prob must be a finite number in \[0, 1\]"),
        (dict(min_scale=0.0), 1, "min_scale"),
        (dict(shuffle_bn=True, bn_groups=4), 1, "needs momentum_encoder=True"),
        (dict(bn_groups=3), 1, "bn_groups=3 must divide batch_size=32 into sub-batches of at"),
        (dict(negative_groups=32), 1, "negative_groups=32 must divide batch_size=32 into sub-b"),
        (dict(dataset="npz", data_path=""), 1, "dataset='npz' needs --config.data_path="),
        (dict(keep_checkpoints=0), 1, "keep_checkpoints must be an integer >= 1, got 0"),
        (dict(dataset="imagefolder", data_path=""), 1, "needs --config.data_path=ROOT"),
        (
            dict(dataset="imagefolder", data_path="/data", input_mode="resident"),
            1,
            "streams from disk; use input_mode='auto' or 'streaming'",
        ),
    ],
)
def test_bad_settings_fail_with_a_message(overrides, num_devices, message):
    config = framework_config("simco", "smoke", **overrides)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config, num_devices=num_devices)


def test_unknown_key_is_rejected_with_a_did_you_mean_in_one_short_line():
    config = framework_config("simco", "smoke")
    config.unlock()
    config.temprature = 0.2
    config.fo = 1
    message = r"^unknown config keys fo, temprature \(did you mean temperature\?\); the keys: base"
    with pytest.raises(config_lib.ConfigError, match=message) as raised:
        config_lib.validate(config)
    assert len(str(raised.value)) < 200  # the did-you-mean, not every key


# At least one bad value for every key of base_config(): its type, range, finiteness,
# divisibility, or a constraint with another key (on the smoke config: batch 32, 2 epochs).
BAD_VALUES = {
    "dataset": ["", 3],
    "data_path": [None],
    "data_dir": [1.0],
    "class_list": [3],
    "eval_dataset": [None],
    "tfds_download": ["yes", 1],
    "input_mode": ["stream", ""],
    "input_threads": [-1, 1.5],
    "max_unreadable_fraction": [-0.1, 1.5, math.nan],
    "synthetic_num_train": [0, 10**9],
    "synthetic_num_test": [0],
    "synthetic_num_classes": [1],
    "synthetic_image_size": [0],
    "backbone": ["vit"],
    "backbone_width": [0, -4, 4.0],
    "cifar_stem": [1],
    "proj_hidden_dim": [0],
    "proj_output_dim": [0],
    "projector": ["mlp4", None],
    "predictor": ["yes"],
    "pred_hidden_dim": [0, 2.0],
    "pred_fixed_lr": [1],
    "pred_hidden_bias": [1],
    "momentum_encoder": ["True"],
    "base_tau_momentum": [1.5, math.nan],
    "final_tau_momentum": [-0.1],
    "queue_size": [-1, 48, 2**30],
    "temperature": [0.0, -0.1, math.inf, math.nan, "0.1", 1e39, 1e-39],
    "dt_m": [0.0, math.inf, 1e39, 1e-39],
    "symmetric": [None],
    "loss": ["mse"],
    "bn_groups": [0, 3, 32],
    "shuffle_bn": ["no"],
    "negative_groups": [0, 3, 32],
    "batch_size": [0, 1, 2.5],
    "max_epochs": [0, 1.5],
    "lr": [0.0, -5.0, 1e30, math.inf],
    "scale_lr": ["x"],
    "scale_classifier_lr": ["no"],
    "classifier_lr": [-5.0, 1e30, 0.0, math.nan],
    "momentum": [1.0, -0.1],
    "weight_decay": [-1e-4, math.nan],
    "warmup_epochs": [-1, 3],
    "warmup_start_lr": [-0.1, math.inf],
    "min_lr": [-0.1],
    "lr_schedule_unit": ["iteration"],
    "optimizer": ["adam"],
    "lars_eta": [0.0, math.inf],
    "lars_clip_lr": ["x"],
    "lars_exclude_bias_n_norm": [None],
    "crop_size": [0],
    "min_scale": [0.0, 1.5],
    "max_scale": [1.5, 0.05],
    "brightness": [-0.1, 1e39],
    "contrast": [math.inf],
    "saturation": [-1.0],
    "hue": [0.6],
    "color_jitter_prob": [1.5],
    "gray_scale_prob": [-0.1],
    "horizontal_flip_prob": [2.0],
    "gaussian_prob": [math.nan],
    "solarization_prob": [-1.0],
    "mean": [(0.5, 0.5), (2.0, 0.0, 0.0)],
    "std": [(0.2, 0.2, 0.0), (0.2, 0.2, math.inf), (0.2, 0.2, 1e-39)],
    "evals": [
        {"probe": {"every_steps": 4}},  # no type
        {"mine": {"type": "no_such_evaluator_module"}},
        {"probe": {"type": "probe", "every_steps": 4, "every_epochs": 1.0}},
        {"probe": {"type": "probe", "every_epoch": 1.0}},  # a typo in a built-in's entry
        {"knn": {"type": "knn", "every_steps": 1.5}},
        {"knn": {"type": "knn", "every_epochs": 1e39}},
    ],
    "eval_every_epochs": [0.5, None],
    "knn_k": [0],
    "knn_temperature": [0.0, 0.001, math.inf],
    "knn_every_epochs": [1.5, "10"],
    "eval_batch_size": [0],
    "knn_bank_dtype": ["float16"],
    "knn_bank_size": [-1, 2.5],
    "seed": [-1, 2**40],
    "dtype": ["float16"],
    "steps_per_dispatch": [0],
    "log_every_steps": [0, None],  # None: and log_every_epochs unset
    "log_every_epochs": [0.0, -1.0, "1"],
    "checkpoint_every_steps": [0, 2.0],
    "checkpoint_every_epochs": [math.nan],
    "keep_checkpoints": [0, -1],
    "device_memory_gb": [-1.0, math.inf],
    "max_steps": [0, -2],
    "members": [
        {"batch_size": [32, 64]},  # a shape: members cannot differ in it
        {"seed": []},
        {"tempreature": [0.1, 0.2]},
        {"temperature": [0.1, -1.0]},  # member 1's own config is refused
    ],
}


def test_every_key_has_a_domain_and_a_bad_value_here():
    keys = set(config_lib.base_config().keys())
    assert set(config_lib.DOMAINS) == keys
    assert set(BAD_VALUES) == keys


def _with(key, value):
    """The smoke config with `key` set to `value`, whatever its type (no type-safe assignment)."""
    return ml_collections.ConfigDict({**framework_config("simco", "smoke").to_dict(), key: value})


@pytest.mark.parametrize(
    "key, value", [(k, v) for k, values in BAD_VALUES.items() for v in values], ids=repr
)
def test_every_bad_value_fails_in_validate_naming_its_key(key, value, tmp_path, monkeypatch):
    from simco_jax import sources, train

    def no_data(config):
        raise AssertionError("data was read before the config was checked")

    monkeypatch.setattr(sources, "load_dataset", no_data)
    workdir = tmp_path / "run"
    with pytest.raises(config_lib.ConfigError) as raised:
        train.train_and_evaluate(_with(key, value), str(workdir))
    message = str(raised.value)
    assert key in message and "\n" not in message, message
    assert not workdir.exists()  # checked before the workdir was touched


def test_domain_bounds_are_inclusive_where_they_say_so():
    ok = dict(momentum=0.0, hue=0.5, min_scale=1.0, keep_checkpoints=1, max_steps=-1, lr=100.0)
    ok.update(knn_every_epochs=0, warmup_epochs=2, knn_temperature=0.012, seed=2**31 - 1)
    ok.update(eval_every_epochs=-1, temperature=1.2e-38 / 0.1, std=(3e38, 1.0, 1.0))
    config_lib.validate(ml_collections.ConfigDict({**_with("lr", 0.1).to_dict(), **ok}))
    config_lib.validate(_with("queue_size", 64))  # a multiple of the batch
    config_lib.validate(_with("negative_groups", 16))  # sub-batches of 2


def test_importing_the_config_and_checking_it_imports_no_jax():
    code = (
        "import sys, importlib\n"
        "from simco_jax import config\n"
        "for f in ('simco', 'mocov2', 'simmoco', 'byol', 'simsiam'):\n"
        "    config.validate(importlib.import_module(f'configs.{f}_cifar').get_config('smoke'))\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax'))\n"
        "print(heavy)\n"
    )
    result = run_python(["-c", code])
    assert result.stdout.strip() == "[]", result.stdout


def test_every_key_belongs_to_exactly_one_seam():
    seams = [set(seam.domains) for seam in config_lib.SEAMS.values()]
    assert sum(map(len, seams)) == len(set().union(*seams)) == len(config_lib.DOMAINS)


def test_a_period_the_user_sets_replaces_the_config_files_other_spelling():
    config = framework_config("simco", "smoke")  # the file sets log_every_steps=4
    config.evals.probe.every_steps = 3
    config.log_every_epochs, config.evals.probe.every_epochs = 1.0, 0.5
    with pytest.raises(config_lib.ConfigError, match="are both set; set only one"):
        config_lib.validate(config)
    given = {"log_every_epochs", "evals.probe.every_epochs", "checkpoint_every_steps"}
    config_lib.prefer_given_periods(config, given)
    config_lib.validate(config)
    assert (config.log_every_steps, config.evals.probe.every_steps) == (None, None)
    assert config_lib.period_steps(config, "log_every", 8) == 8
    assert config_lib.eval_periods(config, 8)["probe"] == 4
    assert config.checkpoint_every_steps == 8  # given, and its other spelling was unset anyway
    config.log_every_epochs = None  # neither spelling: refused (the trainer logs on a period)
    with pytest.raises(config_lib.ConfigError, match="set log_every_steps or log_every_epochs"):
        config_lib.validate(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(momentum=1.5), r"momentum must be a finite number in \[0, 1\), got 1.5"),
        (dict(momentum=-0.1), r"momentum must be a finite number in \[0, 1\), got -0.1"),
        (
            dict(temperature=-0.1),
            r"temperature must be a finite float32 >= 1.18e-38 \(its reciprocal .*\), got -0.1",
        ),
        (
            dict(dt_m=0.0),
            r"dt_m must be a finite float32 >= 1.18e-38 \(its reciprocal .*\), got 0.0",
        ),
        (
            dict(temperature=float("inf")),
            r"temperature must be a finite float32 >= 1.18e-38 \(its reciprocal .*\), got inf",
        ),
        (dict(queue_size=48), "queue_size=48 must be a multiple of the global batch_size=32"),
    ],
)
def test_bad_values_fail_before_the_workdir_is_touched(overrides, message, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(config_lib.ConfigError, match=message):
        train.train_and_evaluate(reference_config(**overrides), str(workdir))
    assert not workdir.exists()


def test_unknown_key_fails_through_train_and_evaluate(tmp_path):
    config = reference_config()
    config.unlock()
    config.lr_warmup = 5
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key lr_warmup;"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_the_trainer_checks_the_batch_against_its_devices(tmp_path, monkeypatch):
    # The device count the batch must divide is the trainer's own (8 simulated devices here).
    import jax

    from simco_jax import train

    monkeypatch.setattr(jax, "device_count", lambda *args: 8)
    workdir = tmp_path / "run"
    message = "batch_size=30 is not divisible by the 8 devices; use a multiple of 8"
    with pytest.raises(config_lib.ConfigError, match=message):
        train.train_and_evaluate(framework_config("simco", "smoke", batch_size=30), str(workdir))
    assert not workdir.exists()
