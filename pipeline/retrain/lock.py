"""The retraining registry's lock: one cycle at a time (moved here from registry.py)."""

import json
import os
import socket
import threading
import time


class LockHeld(RuntimeError):
    """Another cycle holds the registry's lock and is alive."""


class RetrainLock:
    """An exclusive lock file (created with O_EXCL) holding the owner's host and pid, whose mtime a
    thread refreshes as a heartbeat. A lock is stale, and taken over, when its owner on this host
    is no longer alive, or when its heartbeat is older than `stale_after_s` (an owner on another
    host, or a hung one): a killed cycle never blocks the registry for good."""

    def __init__(self, path: str, stale_after_s: float):
        self.path, self.stale_after_s = path, stale_after_s
        self.recovered: dict = {}  # the stale lock this one replaced, if any
        self._stop = threading.Event()

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
            threading.Thread(target=self._beat, daemon=True).start()
            return self
        raise LockHeld(f"{self.path} was taken by another cycle while this one recovered a stale lock")

    def _take_over_if_stale(self) -> None:
        try:
            with open(self.path) as f:
                owner = json.load(f)
            age = time.time() - os.stat(self.path).st_mtime
        except (FileNotFoundError, json.JSONDecodeError):  # released, or still being written
            time.sleep(0.2)
            return
        alive = owner["host"] != socket.gethostname() or _pid_alive(owner["pid"])
        if alive and age < self.stale_after_s:
            raise LockHeld(
                f"another retrain cycle is running: pid {owner['pid']} on {owner['host']}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner['since']))}, heartbeat {age:.0f} s ago "
                f"(lock file {self.path}). Cycles run one at a time; this one exits without doing anything. "
                f"A lock whose heartbeat is older than retrain.lock_stale_after_s = {self.stale_after_s:g} s, or "
                "whose process on this host has died, is taken over")
        # Stale: move it aside (atomic; of two recovering cycles only one succeeds), then retry.
        try:
            os.rename(self.path, f"{self.path}.stale-{os.getpid()}")
        except FileNotFoundError:
            return
        os.unlink(f"{self.path}.stale-{os.getpid()}")
        self.recovered = {**owner, "heartbeat_age_s": round(age, 1)}

    def _beat(self) -> None:
        while not self._stop.wait(min(10.0, self.stale_after_s / 4)):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def __exit__(self, *exc):
        self._stop.set()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
