"""Learning-rate and momentum-coefficient schedules of the official recipe (solo-learn's, as in
github.com/ChaoningZhang/Dual-temperature).

All are pure functions of the step, traceable inside jit, so a resumed run sees the same values.
"""

from __future__ import annotations

import jax.numpy as jnp


def scaled_lr(lr: float, batch_size: int, reference_batch: int = 256) -> float:
    """Linear scaling rule: lr · B / 256 (the paper's 0.03 · B/256)."""
    return lr * batch_size / reference_batch


def warmup_cosine(epoch, *, base_lr, max_epochs, warmup_epochs, warmup_start_lr, min_lr=0.0):
    """Linear warm-up from `warmup_start_lr`, then cosine to `min_lr` (as pl_bolts' scheduler).

    `epoch` may be an integer (the official per-epoch stepping) or fractional (per-step option).
    Warm-up: ``start + e·(L − start)/(W − 1)`` for e < W, so epoch W − 1 reaches L exactly;
    then ``min + ½(L − min)(1 + cos(π (e − W)/(E − W)))``.
    """
    epoch = jnp.asarray(epoch, jnp.float32)
    warm = warmup_start_lr + epoch * (base_lr - warmup_start_lr) / max(warmup_epochs - 1, 1)
    progress = (epoch - warmup_epochs) / max(max_epochs - warmup_epochs, 1)
    # ½(1 + cos πp) written as cos²(πp/2): float32 keeps its precision near the end (~2e-6).
    cosine = min_lr + (base_lr - min_lr) * jnp.cos(0.5 * jnp.pi * progress) ** 2
    return jnp.where(epoch < warmup_epochs, warm, cosine)


def epoch_of_step(step, steps_per_epoch: int, unit: str = "epoch"):
    """The schedule's time: the integer epoch (official) or the fractional epoch (per step)."""
    step = jnp.asarray(step, jnp.float32)
    epoch = step / steps_per_epoch
    return jnp.floor(epoch) if unit == "epoch" else epoch


def momentum_schedule(step, *, max_steps: int, base_tau: float, final_tau: float):
    """τ_m = τ_final − (τ_final − τ_base)·(cos(π·step/max_steps) + 1)/2 (BYOL/solo-learn)."""
    progress = jnp.asarray(step, jnp.float32) / max(max_steps, 1)
    return final_tau - (final_tau - base_tau) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0
