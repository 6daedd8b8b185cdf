"""workdir: a damaged lock of any shape is handled in one line and nothing is moved or left
behind; a start that fails before writing anything leaves no workdir."""

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from helpers import reference_config

from simco_jax import config as config_lib
from simco_jax import train
from simco_jax import workdir as workdir_lib

# Lock files that hold no lock record, by family: nothing, not JSON, JSON of another shape.
DAMAGED = {
    "empty": "",
    "garbage": "\x00\x13 not json",
    "cut short": '{"host": "a", "pi',
    "list": "[]",
    "number": "3",
    "string": '"x"',
    "null": "null",
    "object without a holder": "{}",
    "holder of wrong types": json.dumps({"host": 1, "pid": "42", "token": None}),
}


def _old(path):
    old = time.time() - workdir_lib.WRITE_GRACE_S - 1
    os.utime(path, (old, old))


@pytest.mark.parametrize("content", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_damaged_lock_file_is_replaced_in_one_line(content, tmp_path, caplog):
    path = tmp_path / "lock.0"
    path.write_text(content)
    _old(path)
    caplog.set_level(logging.INFO, logger="simco_jax")
    lock = workdir_lib.WorkdirLock(str(tmp_path))
    assert [r.getMessage() for r in caplog.records] == [
        f"replaced the damaged workdir lock {path}, which held no lock record"
    ]
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert os.listdir(tmp_path) == []  # nothing renamed aside, nothing left behind


def test_a_lock_being_written_is_waited_for_not_replaced(tmp_path, monkeypatch):
    # A starter creates its lock empty and writes it a moment later: within the grace period an
    # empty lock is that starter's, and judged again by what it then holds.
    monkeypatch.setattr(workdir_lib, "WRITE_GRACE_S", 0.5)
    path = tmp_path / "lock.0"
    path.write_text("")
    slept = []

    def write_meanwhile(seconds):
        slept.append(seconds)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": "theirs"}
        path.write_text(json.dumps(holder))

    monkeypatch.setattr(workdir_lib.time, "sleep", write_meanwhile)
    with pytest.raises(workdir_lib.WorkdirLockError, match=f"PID {os.getpid()}"):
        workdir_lib.WorkdirLock(str(tmp_path))
    assert len(slept) == 1 and 0 < slept[0] <= 0.5
    assert json.loads(path.read_text())["token"] == "theirs"


def _directory(path, monkeypatch):
    path.mkdir()
    (path / "inside").write_text("kept")


def _fifo(path, monkeypatch):
    os.mkfifo(path)


def _dangling_link(path, monkeypatch):
    os.symlink(path.parent / "gone", path)


def _unreadable(path, monkeypatch):
    path.write_text("{}")
    os.chmod(path, 0)
    if os.access(path, os.R_OK):  # root reads it anyway: its open fails as a user's would

        def denied(name, *args, **kwargs):
            if os.fspath(name) == str(path):
                raise PermissionError(13, "Permission denied", str(name))
            return open(name, *args, **kwargs)

        monkeypatch.setattr(workdir_lib, "open", denied, raising=False)


NOT_A_LOCK = {
    "directory": (_directory, "is a directory"),
    "fifo": (_fifo, "is a FIFO"),  # opening it would block
    "dangling link": (_dangling_link, "is a symbolic link"),
    "unreadable": (_unreadable, "cannot be read (Permission denied)"),
}


@pytest.mark.parametrize("make, problem", NOT_A_LOCK.values(), ids=NOT_A_LOCK.keys())
def test_a_lock_path_that_is_no_lock_file_is_refused_in_one_line_and_left_alone(
    make, problem, tmp_path, monkeypatch
):
    path = tmp_path / "lock.0"
    make(path, monkeypatch)
    if os.path.lexists(path) and not os.path.islink(path):
        _old(path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(workdir_lib.WorkdirLockError) as raised:
        workdir_lib.WorkdirLock(str(tmp_path))
    assert str(raised.value) == (
        f"the workdir lock {path} {problem}, so it was not written by a run; remove it if no run "
        f"uses {tmp_path}, or use another --workdir."
    )
    assert sorted(os.listdir(tmp_path)) == before  # nothing renamed


def test_a_failed_start_removes_the_workdir_it_created(tmp_path):
    workdir = tmp_path / "runs" / "new"
    lock = workdir_lib.WorkdirLock(str(workdir))
    (workdir / "checkpoints").mkdir()  # created by the checks, left empty by the failure
    lock.release()
    assert os.listdir(tmp_path) == []  # `runs` too: this start created it

    # A workdir that existed is kept, and so is one the run wrote into.
    existing = tmp_path / "existing"
    existing.mkdir()
    workdir_lib.WorkdirLock(str(existing)).release()
    lock = workdir_lib.WorkdirLock(str(tmp_path / "started"))
    (tmp_path / "started" / "config.json").write_text("{}")
    lock.release()
    assert sorted(os.listdir(tmp_path)) == ["existing", "started"]
    assert os.listdir(tmp_path / "started") == ["config.json"]


def test_a_workdir_that_cannot_be_written_is_refused_and_leaves_nothing(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(config_lib.ConfigError, match=r"\(Not a directory\); pass a writable"):
        workdir_lib.WorkdirLock(str(tmp_path / "a_file" / "run"))
    assert os.listdir(tmp_path) == ["a_file"]


def test_a_workdir_on_a_full_disk_is_refused_and_leaves_nothing(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with contextlib.suppress(OSError), open(small / "filler", "wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
        with pytest.raises(config_lib.ConfigError, match=r"\(No space left on device\); pass"):
            workdir_lib.WorkdirLock(str(small / "run"))
        assert os.listdir(small) == ["filler"]  # no workdir, no write probe
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


# ------------------------------------------------------------ workdir.py: a workdir belongs
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
