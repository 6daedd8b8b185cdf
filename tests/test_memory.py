"""memory.py: the estimate reads the method's own answer about backward passes, and the check
before compiling refuses a train or eval batch that cannot fit."""

import importlib
import importlib.util
import os

import jax
import pytest
from helpers import REPO, framework_config
from test_imagenet import imagenet_config

from simco_jax import config as config_lib
from simco_jax import memory, methods

# Full width at 32 px: the activations, not the augmentation, set the per-image term.
WIDE = dict(backbone_width=64, crop_size=32, synthetic_image_size=32)


def _activation_views(framework, **overrides):
    """Per-image bytes of the backward passes, in units of one view's activations."""
    config = framework_config(framework, **WIDE, **overrides)
    _, per_image = memory.step_terms(config, 10)
    crop = config.crop_size**2 * 3 * 4
    assert per_image > memory.AUG_IMAGE_COPIES * crop  # the activations' term is the max
    return per_image - 2 * crop, config


def test_one_way_simco_without_momentum_encoder_counts_both_backward_passes():
    one_view, _ = _activation_views("simmoco")  # one-way, momentum keys: view 1 only
    one_way_simco, config = _activation_views("simco", symmetric=False)
    assert not config.symmetric and not config.momentum_encoder
    assert one_way_simco == 2 * one_view  # its target, view 2's projection, has gradient
    assert _activation_views("simco")[0] == 2 * one_view  # symmetric


@pytest.mark.parametrize(
    "framework, overrides",
    [("mocov2", {}), ("simco", dict(symmetric=False)), ("simsiam", dict(symmetric=False))],
)
def test_the_estimate_counts_the_methods_backward_views(framework, overrides):
    both_views, _ = _activation_views(framework, symmetric=True)  # the same encoder, two views
    got, config = _activation_views(framework, **overrides)
    assert 2 * got == len(methods.make_method(config, None, 1).backward_views) * both_views


def test_an_eval_batch_that_cannot_fit_is_refused_before_training(tmp_path):
    """An eval_batch_size inside its domain whose evaluation needs more than the device has is
    refused before anything trains, as the train batch is (not a bad_alloc after training)."""
    from simco_jax import config as config_lib
    from simco_jax import train

    config = framework_config("simco", device_memory_gb=0.25, eval_batch_size=2**20)
    fixed, per_image = memory.eval_terms(config, 10, num_devices=1, bank_rows=256)
    assert memory.SAFETY * (fixed + 2**20 * per_image) > 0.25 * 2**30  # too large
    assert memory.SAFETY * (fixed + 64 * per_image) < 0.25 * 2**30  # the smoke value fits
    with pytest.raises(config_lib.ConfigError, match=r"eval_batch_size=1048576 needs about"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )
    memory.check_fits(framework_config("simco", device_memory_gb=0.25), 10, 1, bank_rows=256)


def test_the_knn_bank_and_its_scores_count_only_when_the_knn_monitor_is_on():
    on = framework_config("simco", **WIDE)
    off = framework_config("simco", **WIDE, knn_every_epochs=0)
    fixed_on, per_on = memory.eval_terms(on, 10, num_devices=2, bank_rows=1000)
    fixed_off, per_off = memory.eval_terms(off, 10, num_devices=2, bank_rows=1000)
    rows = 500  # per device
    assert per_on - per_off == memory.KNN_SCORE_COPIES * rows * 4
    assert fixed_on - fixed_off == rows * (512 * 4 + 4)  # ResNet-18 features, float32, labels


# ------------------------------------------------------------ memory.py: the memory check th
def test_memory_check_names_the_largest_batch_that_fits():
    config = imagenet_config("simco", "smoke", batch_size=64)
    fixed, per_image = memory.step_terms(config, 10)
    assert fixed > 0 and per_image > 0
    # A device that holds exactly 5.5 images' worth: per-device batch 5 fits, 8 does not.
    limit = memory.SAFETY * (fixed + 5.5 * per_image)
    config.device_memory_gb = limit / 2**30
    message = r"largest per-device batch that fits is about 5 \(batch_size=40\)"
    with pytest.raises(config_lib.ConfigError, match=message):
        memory.check_fits(config, 10, num_devices=8)
    config.batch_size = 40
    memory.check_fits(config, 10, num_devices=8)  # 5 per device: fits, no error


def test_on_the_cpu_the_memory_check_uses_the_hosts_memory():
    config = imagenet_config("simco", "smoke", batch_size=10**6)
    if jax.default_backend() != "cpu":
        pytest.skip("an accelerator reports its own memory limit")
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert memory.device_memory_bytes(config) == host // jax.local_device_count()
    with pytest.raises(config_lib.ConfigError, match="batch_size=1000000"):
        memory.check_fits(config, 10, num_devices=1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant, overrides",
    [
        ("smoke", {}),  # augmentation-bound: the tiny network's activations are smaller
        ("smoke", dict(backbone_width=16, cifar_stem=True)),  # activation-bound
    ],
)
def test_analytic_memory_model_tracks_xlas_compiled_step(variant, overrides):
    # XLA's memory analysis of the compiled step (as benchmarks/memory_plan.py reads it) at two
    # per-device batches: its per-image growth and the analytic one agree within a factor 2.
    spec = importlib.util.spec_from_file_location(
        "memory_plan", os.path.join(REPO, "benchmarks", "memory_plan.py")
    )
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    config = imagenet_config("simco", variant, **overrides)
    measured = {b: plan.measure(plan.compile_step(config, b)[0]) for b in (8, 16)}
    slope = (measured[16]["program_bytes"] - measured[8]["program_bytes"]) / 8
    _, per_image = memory.step_terms(config, plan.NUM_CLASSES)
    assert 0.5 < per_image / slope < 2.0, (per_image, slope)
    assert measured[16]["flops"] > 1.5 * measured[8]["flops"]


def test_a_batch_too_large_for_the_device_fails_before_compiling(tmp_path):
    from helpers import framework_config

    from simco_jax import train

    config = framework_config("simco", device_memory_gb=1e-3)  # 1 MiB: nothing fits
    with pytest.raises(config_lib.ConfigError, match="largest per-device batch that fits is"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
