"""Train (or resume) a run: python launch.py --config=configs/simco_cifar.py --workdir=runs/simco

Overrides: --config.batch_size=128 --config.dataset=npz --config.data_path=cifar100.npz
Multi-host: JAX auto-detects TPU pods and SLURM; elsewhere pass --coordinator_address,
--num_processes and --process_id to every process.
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from simco_jax import parallel, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in a multi-host run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    absl_logging.set_verbosity(absl_logging.WARNING)  # quiet Orbax; our progress stays at INFO
    logging.getLogger("simco_jax").setLevel(logging.INFO)
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if summary.get("preempted"):
        raise SystemExit(143)  # stopped by SIGTERM after checkpointing: rerun the same command


if __name__ == "__main__":
    app.run(main)
