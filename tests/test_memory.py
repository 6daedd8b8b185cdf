"""memory.py: the memory check that runs before compiling."""

import importlib
import importlib.util
import os

import jax
import pytest
from helpers import REPO
from test_imagenet import imagenet_config

from simco_jax import config as config_lib
from simco_jax import memory


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


def test_memory_check_is_skipped_where_the_device_reports_no_limit():
    config = imagenet_config("simco", "smoke", batch_size=10**6)
    if (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit"):
        pytest.skip("this backend reports a memory limit")
    assert memory.device_memory_bytes(config) is None
    memory.check_fits(config, 10, num_devices=1)  # no limit known: no check, no error


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
