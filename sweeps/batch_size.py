"""Batch size 64–1024 × the three frameworks: the table of the official README.

    python -m simco_jax.sweep --sweep=sweeps/batch_size.py --workdir=runs/sweep_batch_size

15 runs of 200 epochs on CIFAR-100 (the lr follows 0.03·B/256). `--variant=smoke`: batch 32 and
64 on the tiny synthetic setting, minutes on a CPU; its numbers say nothing about accuracy.
"""


def get_sweep(variant=None):
    batch_sizes = [32, 64] if variant and "smoke" in variant else [64, 128, 256, 512, 1024]
    return {
        "base": "configs/simco_cifar.py",  # replaced per point by `framework`
        "grid": {"framework": ["mocov2", "simmoco", "simco"], "batch_size": batch_sizes},
    }
