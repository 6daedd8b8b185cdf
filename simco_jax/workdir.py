"""The run's directory: an exclusive lock, and the record of the configs that ran in it.

A workdir belongs to one run at a time. Each process of a run holds `lock.<process_index>`, a
file created with O_CREAT | O_EXCL that names its holder (host, PID, the PID's start time) and
whose modification time a background thread refreshes every `HEARTBEAT_S`. A second run fails at
once, naming the holder. A lock is stale, and is taken over with a warning, when

* its holder ran on this host and that PID is gone (or now belongs to a newer process), or
* its holder ran on another host and the file has not been refreshed for `STALE_AFTER_S`: a
  process on another host cannot be asked whether it lives, so a lock left by a killed run on
  another host blocks a rerun for up to that long (or until the file is deleted).

Shared filesystems: exclusive create is atomic on local filesystems and on NFS v3 and later
(Linux clients since 2.6.5); on filesystems where it is not (GCS FUSE creates objects with
last-writer-wins semantics, NFS v2), the holder's token is read back after writing, which catches
every race but one between starts within the same instant. Staleness across hosts assumes the
hosts' clocks agree to well under `STALE_AFTER_S`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class WorkdirLockError(RuntimeError):
    """Another live run holds the workdir."""


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
        self.path = os.path.join(os.path.abspath(workdir), f"lock.{index}")
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start_time": _process_start_time(os.getpid()),
            "token": uuid.uuid4().hex,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        self._stop = threading.Event()
        self._acquire()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock")
        self._thread.start()

    def _read(self, path=None) -> dict | None:
        try:
            with open(path or self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or garbage: judged by its age below

    def _acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
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
        if holder.get("host") == self.holder["host"] and "pid" in holder:
            return not _alive(int(holder["pid"]), holder.get("pid_start_time"))
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return True
        return age > STALE_AFTER_S

    def _take_over_if_stale(self) -> None:
        holder = self._read()
        if holder is None:  # released meanwhile: try again
            return
        if not self._stale(holder):
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
        log.warning(
            "took over the stale workdir lock %s of %s (PID %s), which is no longer running",
            self.path,
            holder.get("host", "an unknown host"),
            holder.get("pid", "?"),
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
        self._stop.set()
        if (self._read() or {}).get("token") == self.holder["token"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


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
