r"""BYOL on CIFAR-100, ResNet-18, batch 256, 200 epochs, in the shared recipe of this library.

    python launch.py --config=configs/byol_cifar.py --workdir=runs/byol

BYOL (Grill et al., NeurIPS 2020): a momentum (target) encoder, no negatives, a predictor on the
online branch, the normalised-MSE loss summed over both directions. The method and optimizer
settings are solo-learn's CIFAR recipe, scripts/pretrain/cifar/byol.yaml (vturrisi/solo-learn):
projector 4096 → 256 with BatchNorm, predictor hidden 4096, τ_m 0.99 → 1.0 (cosine), LARS with lr
1.0 (× batch/256), weight decay 1e-5, η 0.02, clip_lr, biases and BatchNorm excluded, classifier lr
0.1 (× batch/256; the classifier trains inside LARS, weight decay 0). Backbone, augmentation
(symmetric), lr schedule (10 warm-up epochs, stepped per epoch), 200 epochs and evaluation stay
those of the SimCo configs, so that the five frameworks differ only in their method settings
(solo-learn's recipe trains 1000 epochs with asymmetric blur/solarisation and a per-step schedule).
Variants: `:cifar10`, `:smoke` (a tiny network on synthetic data, no download), `:smoke,cifar10`.
"""

from simco_jax import config as config_lib


def get_config(arg=None):
    config = config_lib.base_config()
    # The settings in which the frameworks differ.
    config.momentum_encoder = True
    config.queue_size = 0
    config.symmetric = True
    config.loss = "normalized_mse"
    config.predictor = True
    config.pred_hidden_dim = 4096
    config.projector = "mlp_bn"
    config.proj_hidden_dim = 4096
    config.proj_output_dim = 256
    config.base_tau_momentum = 0.99
    config.final_tau_momentum = 1.0
    # solo-learn's LARS recipe.
    config.optimizer = "lars"
    config.lr = 1.0
    config.weight_decay = 1e-5
    config.classifier_lr = 0.1
    config.scale_classifier_lr = True  # solo-learn scales it by batch_size / 256, as the lr
    config.lars_eta = 0.02
    config.lars_clip_lr = True
    config.lars_exclude_bias_n_norm = True
    return config_lib.apply_variants(config, arg, config_lib.CIFAR_VARIANTS)
