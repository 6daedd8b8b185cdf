"""Dictionary (queue) size with InfoNCE (dt_m = 1) and with dual temperature (dt_m = 10).

    python -m simco_jax.sweep --sweep=sweeps/dictionary_size.py --workdir=runs/sweep_dictionary

The paper's question: MoCo needs a large dictionary; does a second temperature remove the need?
Momentum encoder on (SimMoCo's base config, one-way loss, batch 256); queue_size = 0 is in-batch
negatives (B − 1 of them). dt_m = 1 with a queue is MoCo v2; dt_m = 10 with queue 0 is SimMoCo.
`--variant=smoke`: batch 32, queues 0 / 64 / 256 (a queue must be a multiple of the batch).
"""


def get_sweep(variant=None):
    smoke = variant and "smoke" in variant
    queues = [0, 64, 256] if smoke else [0, 256, 1024, 4096, 16384, 65536]
    return {
        "base": "configs/simmoco_cifar.py",
        "grid": {"queue_size": queues, "dt_m": [1.0, 10.0]},
    }
