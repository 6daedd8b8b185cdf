"""Worker of tests/test_streaming.py: evaluates a pretrained streaming run on this process's
devices, the way training evaluates (the probe and kNN evaluators on the restored state) and the
way `configs/linear_eval.py` does (a linear classifier, then the kNN), and writes what it got.

    python tests/eval_worker.py PRETRAINED OUT_DIR [COORDINATOR NUM_PROCESSES PROCESS_ID]

Every process writes OUT_DIR/p<process index>.json; the processes of one run share OUT_DIR (the
offline evaluation's workdir is OUT_DIR/linear; PRETRAINED gets its linear_eval.json and
knn_eval.json).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The offline evaluation of the test: 2 steps of the linear classifier at batch 32, then the kNN;
# eval batches of 16 (the pretrained run's eval_batch_size too).
LINEAR = dict(linear_batch_size=32, linear_max_steps=2, knn_k=10, eval_batch_size=16)


def evaluate(pretrained: str, out_dir: str) -> dict:
    """{'devices', 'processes', 'probe', 'knn', 'linear'} of this process; written to
    OUT_DIR/p<index>.json."""
    import importlib

    import jax

    from simco_jax import checkpointing, inputs, linear_eval
    from simco_jax import evaluate as evaluate_lib

    run = checkpointing.restore_run(pretrained)
    data = inputs.create(run.config, run.mesh)
    assert data.mode == "streaming", data.mode
    evaluator = evaluate_lib.FeatureBackend(
        run.config, run.comps.model, run.comps.probe, data, run.mesh
    )
    result = {
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "probe": evaluator.probe_accuracy(run.state),
        "knn": evaluator.knn_accuracy(run.state),
    }
    data.close()
    config = importlib.import_module("configs.linear_eval").get_config("smoke")
    config.update(pretrained=pretrained, **LINEAR)
    offline = linear_eval.evaluate_checkpoint(config, os.path.join(out_dir, "linear"))
    drop = ("wall_s", "device", "pretrained")  # what differs between the runs by design
    result["linear"] = {
        mode: {k: v for k, v in values.items() if k not in drop} for mode, values in offline.items()
    }
    with open(os.path.join(out_dir, f"p{jax.process_index()}.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    return result


def main(pretrained, out_dir, coordinator="", num_processes="0", process_id="-1"):
    from helpers import DEADLINE_S

    from simco_jax import parallel

    parallel.initialize_distributed(
        coordinator,
        int(num_processes),
        int(process_id),
        initialization_timeout_s=int(DEADLINE_S),  # one process may start minutes late
    )
    evaluate(pretrained, out_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])
