r"""SimSiam on CIFAR-100, ResNet-18, batch 256, 200 epochs, in the shared recipe of this library.

    python launch.py --config=configs/simsiam_cifar.py --workdir=runs/simsiam

SimSiam (Chen & He, CVPR 2021): no momentum encoder, no negatives, a predictor on the online
branch, the negative cosine loss averaged over both directions, stop-gradient on the targets. The
method and optimizer settings are solo-learn's CIFAR recipe, scripts/pretrain/cifar/simsiam.yaml
(vturrisi/solo-learn): three-layer projector 2048 → 2048 → 2048 with BatchNorm, predictor hidden
512 (its first Linear without bias), SGD lr 0.5 (× batch/256), weight decay 1e-5, classifier lr 0.1
(× batch/256). Backbone, augmentation, lr schedule (10 warm-up epochs, stepped per epoch), 200
epochs and evaluation stay those of the SimCo configs, so that the five frameworks differ only in
their method settings (solo-learn's recipe trains 1000 epochs with a per-step schedule). The
predictor's lr stays at its peak (SimSiam §4.2, solo-learn's `static_lr`).
Variants: `:cifar10`, `:smoke` (a tiny network on synthetic data, no download), `:smoke,cifar10`.
"""

from simco_jax import config as config_lib


def get_config(arg=None):
    config = config_lib.base_config()
    # The settings in which the frameworks differ.
    config.momentum_encoder = False
    config.queue_size = 0
    config.symmetric = True
    config.loss = "negative_cosine"
    config.predictor = True
    config.pred_hidden_dim = 512
    config.pred_fixed_lr = True
    config.pred_hidden_bias = False  # solo-learn: Linear(bias=False) → BN → ReLU → Linear
    config.projector = "mlp3_bn"
    config.proj_hidden_dim = 2048
    config.proj_output_dim = 2048
    # solo-learn's SGD recipe.
    config.lr = 0.5
    config.weight_decay = 1e-5
    config.classifier_lr = 0.1
    config.scale_classifier_lr = True  # solo-learn scales it by batch_size / 256, as the lr
    return config_lib.apply_variants(config, arg, config_lib.CIFAR_VARIANTS)
