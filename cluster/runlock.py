"""One driver per run: a lock file in the run directory (`<storage>/<name>/avssl/run.lock`).

Two drivers with the same `trainer.name` and `trainer.storage_path` would write the same
checkpoints, STOP markers and MLflow run. The lock is created with O_CREAT|O_EXCL, which is
atomic on local disks and on NFS (v3 and later), so of two drivers started together exactly one
gets it. It holds the holder's host, pid and start time as JSON, and the holder touches it every
`HEARTBEAT_S` seconds. A lock is stale, and taken over with a warning, when its process is dead
on this host or its heartbeat is older than `timeout_s` (a holder on another host that died, or
a machine that went away). The lock is released when the driver exits, also on errors.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from avssl import AvsslError

log = logging.getLogger("avssl.runlock")

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
TIMEOUT_S = 600.0  # a heartbeat older than this: the holder is gone


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"


class RunLock:
    """`with RunLock(path):` holds the run's lock or raises AvsslError naming the lock and holder."""

    def __init__(self, path: str | Path, timeout_s: float = TIMEOUT_S, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.path = Path(path)
        self.timeout_s, self.heartbeat_s = timeout_s, heartbeat_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict[str, Any] | None, age_s: float) -> str | None:
        """Why the lock at hand is stale, or None when its holder may still be running."""
        if age_s > self.timeout_s:
            return f"no heartbeat for {age_s:.0f} s (timeout {self.timeout_s:.0f} s)"
        if holder is None:
            return None  # being written right now, or unreadable: wait for the heartbeat timeout
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"]):
            return "its process is no longer running"
        return None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": self.token}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(me))
                    f.flush()
                    os.fsync(f.fileno())
                self._start_heartbeat()
                return self
            holder = self._read(self.path)
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            reason = self._stale(holder, age)
            if reason is None:
                raise AvsslError(
                    f"{self.path}: this run (same trainer.name and trainer.storage_path) is already running: "
                    f"{describe(holder or {})}. Wait for it to end, stop it, or pick another trainer.name; "
                    f"delete the lock file only if that process is gone.")
            self._take_over(holder, reason)
        raise AvsslError(f"{self.path}: could not take the run lock (other drivers keep taking it); retry")

    def _take_over(self, holder: dict[str, Any] | None, reason: str) -> None:
        """Move the stale lock aside atomically; if another driver replaced it meanwhile, put that
        fresh lock back (os.link never overwrites)."""
        log.warning("%s: taking over a stale run lock (%s; %s)", self.path, describe(holder or {}), reason)
        aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = self._read(aside)
        if holder is not None and moved is not None and moved.get("token") != holder.get("token"):
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        self._thread = threading.Thread(target=beat, name="avssl-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        holder = self._read(self.path)
        if holder is not None and holder.get("token") == self.token:  # never remove another driver's lock
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
