"""Contrastive vs negative-free: MoCo v2, SimMoCo, SimCo, BYOL and SimSiam at batch 64–1024.

    python -m simco_jax.sweep --sweep=sweeps/cl_vs_noncl.py --workdir=runs/sweep_cl_vs_noncl

The paper's closing claim is that dual temperature "bridges the gap between CL and non-CL
frameworks": SimCo should hold its accuracy at small batch as BYOL and SimSiam do (they use no
negatives), where InfoNCE (MoCo v2 without its queue's benefit, SimMoCo's one-way loss) falls.
Each point is configs/<framework>_cifar.py at that batch: the same ResNet-18, augmentation,
schedule, 200 epochs and evaluation; only the method settings differ (the lr follows lr·B/256).
15 runs. `--variant=smoke`: batch 32 and 64 on the tiny synthetic setting, minutes on a CPU; its
numbers say nothing about accuracy.
"""


def get_sweep(variant=None):
    batch_sizes = [32, 64] if variant and "smoke" in variant else [64, 256, 1024]
    return {
        "base": "configs/simco_cifar.py",  # replaced per point by `framework`
        "grid": {
            "framework": ["mocov2", "simmoco", "simco", "byol", "simsiam"],
            "batch_size": batch_sizes,
        },
    }
