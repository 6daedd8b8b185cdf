"""workdir.py: a workdir belongs to one run (the lock), and one that cannot be written says so."""

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from helpers import (
    reference_config,
)

from simco_jax import config as config_lib
from simco_jax import train


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    message = r"cannot write to --workdir=.*a_file/run' \(Not a directory\); pass a writable"
    with pytest.raises(config_lib.ConfigError, match=message):
        train.train_and_evaluate(reference_config(), str(blocker / "run"))


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=600)
    return process.pid


def _write_lock(workdir, **holder):
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "lock.0")
    with open(path, "w") as f:
        json.dump({"since": "earlier", "token": "theirs", **holder}, f)
    return path


def test_workdir_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, caplog):
    from simco_jax import workdir as workdir_lib

    host = socket.gethostname()
    held = workdir_lib.WorkdirLock(str(tmp_path))
    with pytest.raises(workdir_lib.WorkdirLockError) as raised:  # a second run, at once
        workdir_lib.WorkdirLock(str(tmp_path))
    assert re.fullmatch(
        rf"{tmp_path} is in use by another run: host {re.escape(host)}, PID {os.getpid()}, "
        r"since .* \(lock file .*lock\.0\)\. Wait for it to finish, or use another --workdir; "
        r"if that process is gone \(e\.g\. its host was lost\), delete the lock file\.",
        str(raised.value),
    )
    held.release()
    assert not os.path.exists(held.path)
    workdir_lib.WorkdirLock(str(tmp_path)).release()  # free again

    # A killed run's lock on this host: its PID is gone, so the lock is taken over.
    path = _write_lock(tmp_path, host=host, pid=_dead_pid(), pid_start_time="1")
    caplog.set_level(logging.WARNING, logger="simco_jax")
    lock = workdir_lib.WorkdirLock(str(tmp_path))
    assert "took over the stale workdir lock" in caplog.text
    assert json.load(open(path))["pid"] == os.getpid()
    lock.release()
    # A PID reused by a newer process is not the holder either.
    _write_lock(tmp_path, host=host, pid=os.getpid(), pid_start_time="-1")
    workdir_lib.WorkdirLock(str(tmp_path)).release()

    # Another host: alive while it refreshes the file, stale once it stopped for long enough.
    path = _write_lock(tmp_path, host="node-7", pid=4242)
    with pytest.raises(workdir_lib.WorkdirLockError, match="host node-7, PID 4242"):
        workdir_lib.WorkdirLock(str(tmp_path))
    old = time.time() - workdir_lib.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    workdir_lib.WorkdirLock(str(tmp_path)).release()
