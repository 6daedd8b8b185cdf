r"""SimMoCo on ImageNet-1k, ResNet-50 at 224 px, batch 256, 200 epochs: MoCo v2's ImageNet recipe.

    python launch.py --config=configs/simmoco_imagenet.py --workdir=runs/simmoco_imagenet \
        --config.data_dir=/path/to/tensorflow_datasets        # tfds imagenet2012, prepared
    python launch.py --config=configs/simmoco_imagenet.py --workdir=runs/simmoco_imagenet \
        --config.dataset=imagefolder --config.data_path=ROOT  # ROOT/{train,val}/<wnid>/*.JPEG

The official SimCo repository publishes no ImageNet recipe. All three ImageNet configs share MoCo
v2's (`config.imagenet_overrides`: SGD lr 0.03·B/256, momentum 0.9, weight decay 1e-4, cosine
over 200 epochs, key momentum 0.999, projector 2048→2048→128; RandomResizedCrop scale (0.2, 1),
colour jitter 0.4/0.4/0.4/0.1 p 0.8, grayscale p 0.2, Gaussian blur σ ~ U(0.1, 2) p 0.5, flip;
ImageNet mean/std) and differ only in the framework keys below; SimCo and SimMoCo keep their
CIFAR τα and dt_m. No result is published for this setting.
SimMoCo: momentum encoder, in-batch negatives, dual temperature (τα = 0.1, dt_m = 10), one-way
loss.
Variants: `:imagenet100` (the 100-class subset of CMC and solo-learn, listed in
configs/imagenet100_classes.txt), `:smoke` (a tiny network on a small image folder, seconds on a
CPU; needs --config.data_path=ROOT), combined as `:imagenet100,smoke`.
"""

import os

from simco_jax import config as config_lib

IMAGENET100 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet100_classes.txt")


def get_config(arg=None):
    config = config_lib.base_config()
    config.update(config_lib.imagenet_overrides())
    # The settings in which the frameworks differ (as in the CIFAR configs), and τ.
    config.momentum_encoder = True
    config.queue_size = 0
    config.dt_m = 10.0  # tau_beta / tau_alpha; 1.0 is InfoNCE
    config.symmetric = False
    config.temperature = 0.1  # tau_alpha
    return config_lib.apply_imagenet_variant(config, arg, IMAGENET100)
