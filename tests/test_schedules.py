import numpy as np
import pytest

from simco_jax import schedules

RECIPE = dict(base_lr=0.03, max_epochs=200, warmup_epochs=10, warmup_start_lr=0.003, min_lr=0.0)


@pytest.mark.parametrize(
    "epoch, expected",
    [(0, 0.003), (1, 0.006), (9, 0.03), (10, 0.03), (50, 0.02684), (100, 0.01624), (150, 0.00484)],
)
def test_per_epoch_lr_matches_the_official_schedule(epoch, expected):
    assert float(schedules.warmup_cosine(epoch, **RECIPE)) == pytest.approx(expected, abs=5e-6)


def test_last_epoch_lr_is_about_2e_6():
    expected = 0.5 * 0.03 * (1 + np.cos(np.pi * 189 / 190))
    assert float(schedules.warmup_cosine(199, **RECIPE)) == pytest.approx(expected, rel=1e-4)
    assert 1.5e-6 < expected < 2.5e-6


def test_warmup_is_linear_from_the_absolute_start():
    lrs = np.array([float(schedules.warmup_cosine(e, **RECIPE)) for e in range(10)])
    np.testing.assert_allclose(np.diff(lrs), (0.03 - 0.003) / 9, rtol=1e-5)


def test_per_step_option_interpolates_within_an_epoch():
    per_epoch = schedules.epoch_of_step(1.5 * 195, 195, "epoch")
    per_step = schedules.epoch_of_step(1.5 * 195, 195, "step")
    assert float(per_epoch) == 1.0 and float(per_step) == pytest.approx(1.5)
    lr = float(schedules.warmup_cosine(per_step, **RECIPE))
    assert lr == pytest.approx(0.003 + 1.5 * 0.003, rel=1e-5)


def test_linear_scaling_rule():
    assert schedules.scaled_lr(0.03, 256) == pytest.approx(0.03)
    assert schedules.scaled_lr(0.03, 64) == pytest.approx(0.0075)
    assert schedules.scaled_lr(0.03, 1024) == pytest.approx(0.12)


def test_momentum_schedule_runs_from_base_to_final_on_a_cosine():
    kwargs = dict(max_steps=100, base_tau=0.99, final_tau=1.0)
    assert float(schedules.momentum_schedule(0, **kwargs)) == pytest.approx(0.99)
    assert float(schedules.momentum_schedule(50, **kwargs)) == pytest.approx(0.995)
    assert float(schedules.momentum_schedule(100, **kwargs)) == pytest.approx(1.0)
    constant = dict(max_steps=100, base_tau=0.99, final_tau=0.99)
    assert float(schedules.momentum_schedule(37, **constant)) == pytest.approx(0.99)
