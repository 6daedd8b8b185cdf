"""Worker of tests/test_streaming.py: trains SimCo on an image folder in streaming mode on this
process's devices, recording every file it opens.

    python tests/streaming_worker.py ROOT WORKDIR OUT.npz [COORDINATOR NUM_PROCESSES PROCESS_ID]

The processes of one run share WORKDIR (each writes its part of the checkpoints there).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402


def main(root, workdir, out, coordinator="", num_processes="0", process_id="-1"):
    from simco_jax import parallel

    parallel.initialize_distributed(coordinator, int(num_processes), int(process_id))
    import jax
    from helpers import framework_config
    from test_streaming import STREAMING

    from simco_jax import streaming, train, writers

    opened = []
    decode = streaming.decode_rgb

    def recording_decode(file):
        opened.append(str(file))
        return decode(file)

    streaming.decode_rgb = recording_decode
    overrides = dict(
        data_path=root,
        max_steps=3,
        log_every_steps=1,
        knn_every_epochs=0,  # a kNN pass re-reads the training set in another order
        checkpoint_every_steps=1000,
    )
    config = framework_config("simco", **{**STREAMING, **overrides})
    train.train_and_evaluate(config, workdir)
    records = writers.read_metrics(workdir) if jax.process_index() == 0 else []
    np.savez(
        out,
        losses=np.array([r["loss"] for r in records if "loss" in r]),
        devices=jax.device_count(),
        opened=np.array(sorted(set(opened))),
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
