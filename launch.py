"""Train (or resume) a run: python launch.py --config=configs/simco_cifar.py --workdir=runs/simco

Overrides: --config.batch_size=128 --config.dataset=npz --config.data_path=cifar100.npz
Multi-host: JAX auto-detects TPU pods and SLURM; elsewhere pass --coordinator_address,
--num_processes and --process_id to every process.
"""

import errno
import importlib.util
import logging
import os
import re
import sys
import traceback

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from simco_jax import (
    checkpointing,
    data,
    domains,
    linear_eval,
    loop,
    parallel,
    train,
    workdir,
    writers,
)
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
    writers.MetricsWriteError,
)
# A full disk can stop any write (the config record, the lock file), not only the checkpoints
# and metrics that name their own error: one line for it wherever it happens.
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


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
    last = re.sub(r"^[\w.]*ConfigError: ", "", lines[-1])  # the config file's own message
    first = lines[0].rstrip(":").replace(": Error whilst parsing config file", "")
    return f"{first}: {last}"


def _overrides(argv) -> list[tuple[str, str]]:
    """(argument, dotted key) of every --config.KEY[=VALUE] argument, in order."""
    found = []
    for arg in argv:
        match = re.match(r"^--?(no)?config\.([^=]*)", arg)
        if match:
            found.append((arg, match.group(2)))
    return found


def _argument_error(argv) -> str | None:
    """What absl would misread or let pass silently: a --no prefix, no key, a repeated key."""
    seen = {}
    for arg, key in _overrides(argv):
        if re.match(r"^--?noconfig\.", arg):
            return f"{arg}: write --config.{key}=False (a --no prefix is not read for config keys)"
        if not key or not all(key.split(".")):
            return f"{arg} names no key; write --config.KEY=VALUE"
        seen[key] = seen.get(key, 0) + 1
    repeated = [key for key, count in seen.items() if count > 1]
    if repeated:
        return f"--config.{repeated[0]} is given {seen[repeated[0]]} times; give each key once"
    return None


def _path_error(argv) -> str | None:
    """The first --config.KEY whose path is not in the config: an unknown key (with the
    closest known one) or a path that runs into a value (--config.batch_size.x)."""
    spec = next((a.split("=", 1)[1] for a in argv if re.match(r"^--?config=", a)), None)
    if spec is None:
        return None
    path, *variant = spec.split(":", 1)
    try:  # the config file again, as config_flags loads it, without the overrides
        module_spec = importlib.util.spec_from_file_location("_launch_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        config = module.get_config(*variant)
    except Exception:  # noqa: BLE001 - absl's own error says what is wrong with the file
        return None
    unknown = []
    for arg, key in _overrides(argv):
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict):
                where = ".".join(parts[:depth])
                return f"{arg}: {where} is a value ({type(node).__name__}), not a group of keys"
            if part not in node:
                unknown.append(".".join(parts[: depth + 1]))
                break
            node = node[part]
    if unknown:
        known = [*domains.flatten(config), *_groups(config)]
        message = domains.unknown_keys_message(unknown, known, flag="--config.")
        where = domains.keys_location("linear_eval" if "pretrained" in config else "")
        return f"{message}; the keys: {where}"
    return None


def _groups(config, prefix="") -> dict:
    """{'evals': None, 'evals.probe': None, ...}: the dotted names of the config's groups."""
    groups = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            groups[f"{prefix}{key}"] = None
            groups.update(_groups(value, f"{prefix}{key}."))
    return groups


def parse_flags(argv):
    """absl's parser, with one line instead of a traceback for any malformed --config.KEY
    override (unknown or repeated key, a path into a value, a wrong type), a config file that
    does not load, or any other bad flag. A period the user sets in one spelling replaces the
    config file's other spelling (`config.prefer_given_periods`)."""
    problem = _argument_error(argv)
    if problem:
        _fail(problem)
    try:
        remaining = flags.FLAGS(argv)
        config = _CONFIG.value
        "pretrained" in config  # noqa: B015 - a config file that failed to load raises when read
    except flags.Error as error:
        _fail(_path_error(argv) or _one_line(str(error)))
    except OSError as error:  # --config=a path that does not exist or cannot be read
        _fail(f"cannot load --config: {str(error).strip().splitlines()[-1].strip()}")
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # ml_collections' own
        _fail(_path_error(argv) or _one_line(str(error)))
    config_lib.prefer_given_periods(config, {key for _, key in _overrides(argv)})
    return remaining


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
    except OSError as error:
        if error.errno not in FULL_DISK:
            raise
        where = f" writing {error.filename}" if error.filename else ""
        _fail(
            f"{error.strerror}{where}. The checkpoints already there are intact; free space, "
            "then rerun the same command to resume."
        )
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
