r"""SimMoCo on CIFAR-100, ResNet-18, batch 256, 200 epochs (the official script's recipe).

    python launch.py --config=configs/simmoco_cifar.py --workdir=runs/simmoco

Published (official README; CIFAR-100, ResNet-18, 200 epochs, online linear probe): 54.11 % top-1.
SimMoCo: momentum encoder, in-batch negatives, dual temperature, one-way loss.
Variants: `:cifar10` (or --config.dataset=cifar10), `:smoke` (a tiny network on synthetic data,
a few steps on a CPU, no download), combined as `:smoke,cifar10`.
"""

from simco_jax import config as config_lib


def get_config(arg=None):
    config = config_lib.base_config()
    # The four settings in which the frameworks differ (simco_jax/config.py).
    config.momentum_encoder = True
    config.queue_size = 0
    config.dt_m = 10.0  # tau_beta / tau_alpha; 1.0 is InfoNCE
    config.symmetric = False
    return config_lib.apply_variants(config, arg, config_lib.CIFAR_VARIANTS)
