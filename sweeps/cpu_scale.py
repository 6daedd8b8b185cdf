"""The five frameworks on real CIFAR-100 at a scale a CPU can run: it shows learning, not accuracy.

    python -m simco_jax.sweep --sweep=sweeps/cpu_scale.py --workdir=runs/cpu_scale

Each point is configs/<framework>_cifar.py with only the scale reduced: a ResNet-18 of width 8
(`backbone_width=8`), batch 256, 3 epochs of which 1 is warm-up, seed 15, and the kNN monitor
run every epoch (beside the probe) so that both can be plotted per epoch. Everything else (method
settings, augmentation, optimizer, lr) is the framework's own recipe. This is not the paper's
setting (200 epochs, width 64): the numbers say that each framework learns, not what it reaches.

The data is tfds `cifar100`; to train offline on the same images as an .npz (keys train_images,
train_labels, test_images, test_labels), set SIMCO_CIFAR100_NPZ=/path/to/cifar100.npz.
`docs/figures/cpu_scale.py` draws the per-epoch curves and prints the table of docs/results.md.
"""

import os

FRAMEWORKS = ["simco", "simmoco", "mocov2", "byol", "simsiam"]


def get_sweep(variant=None):
    del variant  # one setting only
    npz = os.environ.get("SIMCO_CIFAR100_NPZ", "")
    data = {"dataset": "npz", "data_path": npz} if npz else {"dataset": "cifar100"}
    return {
        "base": "configs/simco_cifar.py",  # replaced per point by `framework`
        "grid": {"framework": FRAMEWORKS},
        "overrides": {
            "backbone_width": 8,
            "batch_size": 256,
            "max_epochs": 3,
            "warmup_epochs": 1,
            "seed": 15,
            "knn_every_epochs": 1,
            **data,
        },
    }
