"""workdir: a damaged lock of any shape is handled in one line and nothing is moved or left
behind; a start that fails before writing anything leaves no workdir."""

import contextlib
import json
import logging
import os
import socket
import subprocess
import time

import pytest

from simco_jax import config as config_lib
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
