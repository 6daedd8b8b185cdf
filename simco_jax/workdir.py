"""The run's directory: an exclusive lock, and the record of the configs that ran in it.

A workdir belongs to one run at a time. Each process of a run holds `lock.<process_index>`, a
file created with O_CREAT | O_EXCL that names its holder (host, PID, the PID's start time) and
whose modification time a background thread refreshes every `HEARTBEAT_S`. A second run fails at
once, naming the holder. A lock is stale, and is taken over with a warning, when

* its holder ran on this host and that PID is gone (or now belongs to a newer process), or
* its holder ran on another host and the file has not been refreshed for `STALE_AFTER_S`: a
  process on another host cannot be asked whether it lives, so a lock left by a killed run on
  another host blocks a rerun for up to that long (or until the file is deleted).

A lock file that holds no lock record (empty, not JSON, JSON of another shape) is damaged: once
it is older than `WRITE_GRACE_S` (the moment between a starter creating its lock and writing it),
it is replaced with a warning. A lock path that is not a regular file (a directory, a link, a
FIFO) or cannot be read is no lock this project wrote: the run is refused in one line, and nothing
is moved.

The lock also creates the workdir; a run that fails before it wrote anything (no data, a bad
config) removes the directories it created on release, so a failed start leaves no debris.

Shared filesystems: exclusive create is atomic on local filesystems and on NFS v3 and later
(Linux clients since 2.6.5); on filesystems where it is not (GCS FUSE creates objects with
last-writer-wins semantics, NFS v2), the holder's token is read back after writing, which catches
every race but one between starts within the same instant. Staleness across hosts assumes the
hosts' clocks agree to well under `STALE_AFTER_S`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import threading
import time
import uuid

from simco_jax import config as config_lib

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
WRITE_GRACE_S = 5.0

_FILE_TYPES = {
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a device",
    stat.S_IFBLK: "a device",
}


class WorkdirLockError(RuntimeError):
    """Another live run holds the workdir, or its lock path is no lock file."""


def _is_holder(data) -> bool:
    """Whether `data` is a lock record as `WorkdirLock` writes it."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("host"), str)
        and isinstance(data.get("pid"), int)
        and not isinstance(data.get("pid"), bool)
        and isinstance(data.get("token"), str)
    )


def _make_workdir(workdir: str, index: int) -> str | None:
    """Creates `workdir` and checks that it is writable; returns the outermost directory it
    created (None if `workdir` existed)."""
    created = None
    path = os.path.abspath(workdir)
    while not os.path.lexists(path) and path != os.path.dirname(path):
        created, path = path, os.path.dirname(path)
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{index}")
        try:
            with open(probe, "w") as f:
                f.write("ok")
        finally:  # also when the write failed (a full disk): the probe is no debris either
            with contextlib.suppress(OSError):
                os.remove(probe)
    except OSError as error:
        _remove_if_empty(workdir, created)
        raise config_lib.ConfigError(
            f"cannot write to --workdir={workdir!r} ({error.strerror}); pass a writable directory"
        ) from error
    return created


def _remove_if_empty(workdir: str, created: str | None) -> None:
    """Removes the directories from `created` down to `workdir` and below, if they hold no file
    (only directories this run created are ever considered)."""
    if created is None:
        return
    workdir = os.path.abspath(workdir)
    if any(files for _, _, files in os.walk(workdir)):  # stops at the first file it finds
        return
    for root, _, _ in os.walk(workdir, topdown=False):
        try:
            os.rmdir(root)
        except OSError:  # a file written meanwhile (another run's lock): keep the rest
            return
    while workdir != created:
        workdir = os.path.dirname(workdir)
        try:
            os.rmdir(workdir)
        except OSError:
            return


def _process_start_time(pid: int) -> str | None:
    """The PID's start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    now = _process_start_time(pid)
    return start_time is None or now is None or now == start_time


class WorkdirLock:
    """`lock.<index>` in `workdir`, held until `release()`; raises WorkdirLockError if taken."""

    def __init__(self, workdir: str, index: int = 0):
        """Creates `workdir` if needed (ConfigError if it cannot be written), then locks it."""
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, f"lock.{index}")
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start_time": _process_start_time(os.getpid()),
            "token": uuid.uuid4().hex,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        self._stop = threading.Event()
        self._created = _make_workdir(workdir, index)
        try:
            self._acquire()
        except BaseException:
            _remove_if_empty(self.workdir, self._created)
            raise
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock")
        self._thread.start()

    def _read(self, path=None) -> dict | None:
        """The lock's holder; None if there is no lock, {} if the file holds no lock record
        (being written, or damaged). Refuses a path that no run of this project leaves: not a
        regular file (never opened, so a FIFO cannot block), or unreadable."""
        path = path or self.path
        try:
            kind = stat.S_IFMT(os.lstat(path).st_mode)
            if kind != stat.S_IFREG:
                self._refuse(path, f"is {_FILE_TYPES.get(kind, 'not a regular file')}")
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:  # not JSON (empty, cut short, garbage), not UTF-8
            return {}
        except OSError as error:
            self._refuse(path, f"cannot be read ({error.strerror})")
        return data if _is_holder(data) else {}

    def _refuse(self, path: str, problem: str):
        raise WorkdirLockError(
            f"the workdir lock {path} {problem}, so it was not written by a run; remove it if no "
            f"run uses {self.workdir}, or use another --workdir."
        )

    def _acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except FileNotFoundError:  # a failed start beside us removed the workdir it made
                os.makedirs(self.workdir, exist_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.holder, f)
                f.flush()
                os.fsync(f.fileno())
            if (self._read() or {}).get("token") == self.holder["token"]:
                return
            self._fail(self._read() or {})  # lost a race on a filesystem without O_EXCL
        self._fail(self._read() or {})

    def _stale(self, holder: dict) -> bool:
        if holder["host"] == self.holder["host"]:
            return not _alive(holder["pid"], holder.get("pid_start_time"))
        return self._age() > STALE_AFTER_S

    def _age(self) -> float:
        try:
            return time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return float("inf")

    def _take_over_if_stale(self) -> None:
        holder = self._read()
        if holder is None:  # released meanwhile: try again
            return
        if not holder:  # no lock record: being written by a starter beside us, or damaged
            if self._age() < WRITE_GRACE_S:
                time.sleep(WRITE_GRACE_S - self._age())
                return  # judged again, by what it holds now
        elif not self._stale(holder):
            self._fail(holder)
        # Move it aside under a name of our own, then check that what moved is the stale lock
        # (another starter may have taken it over in between); only then delete it.
        aside = f"{self.path}.stale-{self.holder['token']}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = self._read(aside)
        if moved != holder and moved:
            os.rename(aside, self.path)  # a live lock: put it back
            self._fail(moved)
        os.remove(aside)
        if not holder:
            log.warning(
                "replaced the damaged workdir lock %s, which held no lock record", self.path
            )
            return
        log.warning(
            "took over the stale workdir lock %s of %s (PID %s), which is no longer running",
            self.path,
            holder["host"],
            holder["pid"],
        )

    def _fail(self, holder: dict):
        raise WorkdirLockError(
            f"{os.path.dirname(self.path)} is in use by another run: host "
            f"{holder.get('host', '?')}, PID {holder.get('pid', '?')}, since "
            f"{holder.get('since', '?')} (lock file {self.path}). Wait for it to finish, or use "
            "another --workdir; if that process is gone (e.g. its host was lost), delete the lock "
            "file."
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as error:  # the workdir went away: nothing left to protect
                log.warning("cannot refresh the workdir lock %s: %s", self.path, error)

    def release(self) -> None:
        """Removes the lock, and the workdir too if this lock created it and the run wrote
        nothing into it (a start that failed its checks)."""
        self._stop.set()
        try:
            mine = (self._read() or {}).get("token") == self.holder["token"]
        except WorkdirLockError:  # replaced by something else meanwhile: not ours to remove
            mine = False
        if mine:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        _remove_if_empty(self.workdir, self._created)


def write_config(workdir: str, config, step: int) -> None:
    """`config.json` (the current run's) and `configs/<step>.json` (one per start), atomically:
    export and evaluation read `config.json`, so it is never half written."""
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    history = os.path.join(workdir, "configs")
    os.makedirs(history, exist_ok=True)
    for path in (os.path.join(history, f"{step}.json"), os.path.join(workdir, "config.json")):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
