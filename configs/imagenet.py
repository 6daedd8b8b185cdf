r"""SimCo, SimMoCo or MoCo v2 on ImageNet-1k, ResNet-50 at 224 px, batch 256, 200 epochs: MoCo v2's
ImageNet recipe, the framework picked by the `framework=` variant (default simco).

    python launch.py --config=configs/imagenet.py:framework=simco --workdir=runs/simco_imagenet \
        --config.data_dir=/path/to/tensorflow_datasets        # tfds imagenet2012, prepared
    python launch.py --config=configs/imagenet.py:framework=mocov2 --workdir=runs/mocov2_imagenet \
        --config.dataset=imagefolder --config.data_path=ROOT  # ROOT/{train,val}/<wnid>/*.JPEG

The official SimCo repository publishes no ImageNet recipe. The three frameworks share MoCo v2's
(`config.imagenet_overrides`: SGD lr 0.03·B/256, momentum 0.9, weight decay 1e-4, cosine over
200 epochs, key momentum 0.999, projector 2048→2048→128; RandomResizedCrop scale (0.2, 1), colour
jitter 0.4/0.4/0.4/0.1 p 0.8, grayscale p 0.2, Gaussian blur σ ~ U(0.1, 2) p 0.5, flip; ImageNet
mean/std) and differ only in the five keys of `FRAMEWORKS`; SimCo and SimMoCo keep their CIFAR τα
and dt_m. No result is published for this setting. The kNN monitor (every 10 epochs) compares with
a fixed, seeded subset of about 100 training images per class (`knn_bank_size`), not with all
1.28 M; the offline kNN evaluation uses them all.

* simco: no momentum encoder, in-batch negatives, dual temperature (τα = 0.1, dt_m = 10),
  symmetric loss;
* simmoco: momentum encoder, in-batch negatives, dual temperature (τα = 0.1, dt_m = 10), one-way
  loss;
* mocov2: momentum encoder, a 65,536-key queue, InfoNCE (dt_m = 1) at τ = 0.2, one-way loss.

Variants, comma-separated: `framework=NAME`, `imagenet100` (the 100-class subset of CMC and
solo-learn, listed in configs/imagenet100_classes.txt), `smoke` (a tiny network on a small
generated image folder: seconds on a CPU, no data needed), e.g. `:framework=mocov2,imagenet100`.
configs/{simco,simmoco,mocov2}_imagenet.py are this file with the framework fixed.
"""

import os

from simco_jax import config as config_lib

IMAGENET100 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet100_classes.txt")

# The settings in which the frameworks differ (as in the CIFAR configs), and τ.
FRAMEWORKS = {
    "simco": dict(momentum_encoder=False, queue_size=0, dt_m=10.0, symmetric=True, temperature=0.1),
    "simmoco": dict(
        momentum_encoder=True, queue_size=0, dt_m=10.0, symmetric=False, temperature=0.1
    ),
    "mocov2": dict(
        momentum_encoder=True, queue_size=65536, dt_m=1.0, symmetric=False, temperature=0.2
    ),
}


def get_config(arg=None, framework="simco"):
    """`arg`: the variants above; `framework`: the one used when `arg` names none."""
    rest = []
    for variant in filter(None, (arg or "").split(",")):
        key, _, value = variant.partition("=")
        if key != "framework":
            rest.append(variant)
        elif value in FRAMEWORKS:
            framework = value
        else:
            raise config_lib.ConfigError(
                f"unknown framework {value!r}; known: {', '.join(FRAMEWORKS)}"
            )
    config = config_lib.base_config()
    config.update(config_lib.imagenet_overrides())
    config.update(FRAMEWORKS[framework])
    config = config_lib.apply_imagenet_variant(config, ",".join(rest), IMAGENET100)
    classes = 100 if config.class_list else 1000
    config.knn_bank_size = 100 * classes  # the monitor's bank; the smoke folder's is smaller
    return config
