"""Momentum of the key encoder: τ_m = 0, 0.9, 0.99, 0.999, constant over training (SimMoCo).

    python -m simco_jax.sweep --sweep=sweeps/momentum.py --workdir=runs/sweep_momentum

τ_m = 0 makes the key encoder a copy of the online one (still without gradient through the keys):
the step from SimMoCo towards SimCo. final_tau_momentum is tied to base_tau_momentum.
`--variant=smoke`: τ_m = 0 and 0.99 on the tiny synthetic setting.
"""


def get_sweep(variant=None):
    smoke = variant and "smoke" in variant
    return {
        "base": "configs/simmoco_cifar.py",
        "grid": {"base_tau_momentum": [0.0, 0.99] if smoke else [0.0, 0.9, 0.99, 0.999]},
        "tied": {"final_tau_momentum": "base_tau_momentum"},
    }
