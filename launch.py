"""Train (or resume) a run: python launch.py --config=configs/simco_cifar.py --workdir=runs/simco

Overrides: --config.batch_size=128 --config.dataset=npz --config.data_path=cifar100.npz
Multi-host: JAX auto-detects TPU pods and SLURM; elsewhere pass --coordinator_address,
--num_processes and --process_id to every process.
"""

import difflib
import logging
import os
import sys
import traceback

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from simco_jax import checkpointing, data, linear_eval, loop, parallel, train, workdir
from simco_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in a multi-host run.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    None,
    "Multi-host: seconds without a heartbeat after which a process counts as dead and the others "
    "stop with an error (default: JAX's, 100).",
)
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Print the full traceback of expected errors too (bad config, data, ...)."
)
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout_s",
    None,
    "Multi-host: seconds each process waits for all the others to connect (default: JAX's, 300).",
)
flags.mark_flags_as_required(["config", "workdir"])

# What a user can cause and fix: one line `error: <message>`, exit 2 (--verbose: the traceback
# too). Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (
    config_lib.ConfigError,
    data.DataError,
    checkpointing.CheckpointError,
    checkpointing.CheckpointSaveError,
    loop.NonFiniteLossError,
    workdir.WorkdirLockError,
)


def _fail(message: str, *, code: int = 2):
    if "--verbose" in sys.argv or "--verbose=true" in sys.argv:
        traceback.print_exc()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def _one_line(message: str) -> str:
    """A multi-line message (a config file's traceback inside a flag error) as its first and
    last lines: where, and what."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return message.strip()
    return f"{lines[0].rstrip(':')}: {lines[-1]}"


def parse_flags(argv):
    """absl's parser, with one line instead of a traceback for an unknown --config.KEY, a
    config file that does not load, or any other bad flag."""
    try:
        remaining = flags.FLAGS(argv)
        "pretrained" in _CONFIG.value  # noqa: B015 - a config file that failed to load raises when read
        return remaining
    except (AttributeError, KeyError):  # what ml_collections raises for an unknown field
        known = sorted(config_lib.base_config().keys())
        names = [a[len("--config.") :].split("=")[0] for a in argv if a.startswith("--config.")]
        unknown = [n for n in names if n.split(".")[0] not in known]
        if not unknown:
            raise
        hints = [difflib.get_close_matches(n, known, n=1) for n in unknown]
        close = [f"--config.{h[0]}" for h in hints if h]
        _fail(
            f"unknown config key(s) {unknown}"
            + (f"; did you mean {close}?" if close else ".")
            + f" Known keys: {known}"
        )
    except flags.Error as error:
        _fail(_one_line(str(error)))
    except OSError as error:  # --config=a path that does not exist or cannot be read
        _fail(f"cannot load --config: {str(error).strip().splitlines()[-1].strip()}")


def main(argv):
    del argv
    parallel.initialize_distributed(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        heartbeat_timeout_s=_HEARTBEAT.value,
        initialization_timeout_s=_INIT_TIMEOUT.value,
    )
    absl_logging.set_verbosity(absl_logging.WARNING)  # quiet Orbax; our progress stays at INFO
    logging.getLogger("simco_jax").setLevel(logging.INFO)
    try:
        if "pretrained" in _CONFIG.value:  # configs/linear_eval.py: evaluate a finished run
            summary = linear_eval.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
        else:
            summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except EXPECTED_ERRORS as error:
        _fail(str(error))
    except KeyboardInterrupt:  # a second Ctrl-C: the first one's checkpoint may not exist
        _fail("aborted by a second Ctrl-C; a rerun resumes from the last checkpoint", code=130)
    except jax.errors.JaxRuntimeError:
        if jax.process_count() == 1:
            raise
        # A collective failed: most often another process died (lost host, OOM, kill -9).
        # Say so, and exit now: JAX's shutdown barrier would wait for the dead process and abort.
        traceback.print_exc()
        sys.stderr.write(
            f"FATAL process {jax.process_index()}/{jax.process_count()}: a collective with the "
            "other processes failed, most likely because one of them died (see its log). Rerun "
            "the same command on every host: training resumes from the last checkpoint.\n"
        )
        sys.stderr.flush()
        os._exit(1)
    if summary.get("preempted"):  # stopped by SIGTERM or Ctrl-C after checkpointing
        raise SystemExit(128 + summary["preempted"])  # 143 or 130: rerun the same command


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
