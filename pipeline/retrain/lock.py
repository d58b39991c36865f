"""The retraining registry's lock: one cycle at a time, on one host or across hosts that share the
registry on a network volume (NFS; a Kubernetes CronJob's pods).

    <registry_dir>/retrain.lock        the lease: {"token", "host", "machine", "pid", "since"}; its mtime is the heartbeat
    <registry_dir>/retrain.lock.guard  never deleted: an fcntl lock on it, held for milliseconds, guards the lease

Why it is built this way:
- Takeover is one atomic decision: taking the lock, the heartbeat and the release read and write the
  lease only while holding the guard, so of many processes that find one stale lease the first
  replaces it, and the others find a fresh lease and refuse. The guard is a POSIX (fcntl) lock, which
  the kernel, or the NFS server (lockd; NFSv4 leases), drops when its process or client dies: it never
  goes stale. SQLite locks the ledger with the same locks, so where they work both are safe.
- The lease is not itself an fcntl lock held for the whole cycle, so that an owner that hangs (alive,
  no heartbeat) is taken over after retrain.lock_stale_after_s, like one that died.
- One clock: a lease's age is the file system's "now" (the guard's mtime, touched under the guard)
  minus the lease's mtime. The file system stamps both (a utime without explicit times sets the
  server's time on NFS); no host's clock is compared with another's. (A volume that stamps client
  times, such as some FUSE object-store mounts, needs a stale age well above the hosts' clock skew.)
- An owner token per acquisition: the heartbeat refreshes, and the release deletes, only a lease that
  holds its token, so a process that lost its lock never touches its successor's.
- A lease without an owner record (empty: a crash between creating and writing it; or garbage) is
  judged by age alone, and a refusal says what the file holds. An owner on this machine (same host,
  boot and pid namespace) whose process is gone is taken over at once.
- The heartbeat cannot die silently: each failure is logged as an error, and the lock is *lost* when
  the lease holds another token or is gone, or when by the next beat no refresh will have succeeded
  for stale_after_s (another cycle may then take it over). A loss is logged at once; `check()` then
  raises LockLost (cycle.py calls it before its ledger commit), and so does leaving the `with`
  block, unless another exception is already on its way out. check() also judges the silence
  itself, so a heartbeat stuck in a call (a hard-mounted NFS server gone) cannot hide a loss.
"""

import contextlib
import fcntl
import json
import logging
import os
import random
import secrets
import socket
import threading
import time

log = logging.getLogger("kto")

GUARD_TIMEOUT_S = 30.0  # the guard is held for milliseconds; waiting longer means its holder hangs
_in_process = threading.Lock()  # fcntl locks do not exclude threads (or two locks) of one process: this does


class LockHeld(RuntimeError):
    """Another cycle holds the registry's lock and is alive."""


class LockLost(RuntimeError):
    """This cycle's lock was taken over, removed, or not refreshed for too long: another cycle may run."""


class RetrainLock:
    """`with RetrainLock(path, stale_after_s) as lock:` holds the registry for one cycle; raises LockHeld
    when a live owner holds it. `lock.recovered` describes the stale owner it replaced ({} if none);
    `lock.lost` says why the lock was lost (None while held)."""

    def __init__(self, path: str, stale_after_s: float):
        self.path, self.stale_after_s = path, stale_after_s
        self.guard_path = f"{path}.guard"
        self.token = secrets.token_hex(16)
        self.recovered: dict = {}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._period = min(10.0, stale_after_s / 4)  # between heartbeats
        self._last_refresh = 0.0  # time.monotonic() of the last heartbeat

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with self._guard() as now:
            lease, age = self._read_lease(now)
            if lease is not None:
                self._take_over_if_stale(lease, age)
            self._write_lease()
        self._last_refresh = time.monotonic()
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat of {self.path}", daemon=True)
        self._heartbeat.start()
        return self

    def __exit__(self, exc_type, *_):
        self._stop.set()
        self._heartbeat.join()
        try:
            with self._guard() as now:
                lease, _ = self._read_lease(now)
                if lease is not None and lease.get("token") == self.token:
                    os.unlink(self.path)
                elif not self.lost:
                    self._lose(f"at release the lock file {self._holds(lease)}")
        except (OSError, LockHeld) as error:
            self._lose(f"could not release it: {error}")
        if exc_type is None:
            self.check()
        return False

    def check(self) -> None:
        """Raise LockLost once the lock is lost: call it before a step that must run under the lock. It
        also judges the heartbeat's silence itself, for a heartbeat stuck in a call (a hung NFS server)."""
        silent = time.monotonic() - self._last_refresh
        if not self.lost and silent + self._period >= self.stale_after_s:
            self._lose(f"no heartbeat for {silent:.0f} s (the heartbeat is stuck)")
        if self.lost:
            raise LockLost(f"the retrain lock {self.path} was lost: {self.lost}. Another cycle may have run at the "
                           "same time as this one; see `launch.py history`")

    def _take_over_if_stale(self, lease: dict, age: float) -> None:
        limit = f"retrain.lock_stale_after_s = {self.stale_after_s:g} s"
        if "problem" in lease:
            if age < self.stale_after_s:
                raise LockHeld(f"the lock file {self.path} {lease['problem']}; last written {age:.0f} s ago. It is "
                               f"taken over once older than {limit}; if no cycle is running, delete it to retrain now")
            why = f"the lock file {lease['problem']}"
        elif _same_machine(lease) and not _pid_alive(lease["pid"]):
            why = "its process had died"
        elif age >= self.stale_after_s:
            why = f"no heartbeat for {age:.0f} s"
        else:
            raise LockHeld(
                f"another retrain cycle is running: pid {lease['pid']} on {lease['host']}, since "
                f"{_local_time(lease.get('since'))}, heartbeat {age:.0f} s ago (lock file {self.path}). Cycles run "
                f"one at a time; this one exits without doing anything. A lock whose heartbeat is older than {limit}, "
                "or whose process on this host has died, is taken over")
        self.recovered = {"host": lease.get("host"), "pid": lease.get("pid"), "since": lease.get("since"),
                          "heartbeat_age_s": round(age, 1), "why": why}

    def _beat(self) -> None:
        """Refresh the lease's mtime while it holds our token; every failure is logged, a loss is final."""
        while not self._stop.wait(self._period):
            try:
                with self._guard() as now:
                    lease, _ = self._read_lease(now)
                    if lease is None or lease.get("token") != self.token:
                        return self._lose(f"the lock file {self._holds(lease)}")
                    os.utime(self.path)
                self._last_refresh = time.monotonic()
            except Exception as error:  # any error: the holder must hear of it
                silent = time.monotonic() - self._last_refresh
                log.error("could not refresh the retrain lock %s (%s: %s); no heartbeat for %.1f s, it can be taken "
                          "over after %g s", self.path, type(error).__name__, error, silent, self.stale_after_s)
                if silent + self._period >= self.stale_after_s:  # by the next beat, another cycle may take it over
                    return self._lose(f"no heartbeat could be written for {silent:.0f} s (last error: {error})")

    def _lose(self, why: str) -> None:
        self.lost = why
        log.error("retrain lock %s lost: %s. Another cycle may be running; this one fails as it leaves the lock",
                  self.path, why)

    def _holds(self, lease: dict | None) -> str:
        if lease is None:
            return "was removed"
        if "problem" in lease:
            return lease["problem"]
        return f"holds another owner: pid {lease['pid']} on {lease['host']}"

    @contextlib.contextmanager
    def _guard(self):
        """Hold the guard; yields the file system's time now (the guard's mtime, just touched)."""
        with _in_process:
            fd = os.open(self.guard_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                deadline = time.monotonic() + GUARD_TIMEOUT_S
                while True:
                    try:
                        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
                        if time.monotonic() > deadline:
                            raise LockHeld(f"{self.guard_path} has been locked for over {GUARD_TIMEOUT_S:g} s (it is "
                                           "held for milliseconds): a process hangs while holding it") from None
                        time.sleep(0.002 + 0.008 * random.random())
                os.utime(fd)
                yield os.fstat(fd).st_mtime
            finally:
                os.close(fd)  # releases the fcntl lock

    def _read_lease(self, now: float) -> tuple[dict | None, float]:
        """The lease's owner record (or {"problem": what the file holds instead}; None if there is no
        lease) and its age by the file system's clock. open() + fstat: fresh attributes on NFS too."""
        try:
            with open(self.path, "rb") as f:
                raw, mtime = f.read(4096), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None, 0.0
        return _owner_record(raw), max(0.0, now - mtime)

    def _write_lease(self) -> None:
        record = {"token": self.token, "host": socket.gethostname(), "machine": _this_machine(), "pid": os.getpid(),
                  "since": time.time()}
        with open(self.path, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())


def _owner_record(raw: bytes) -> dict:
    if not raw.strip():
        return {"problem": "is empty (a cycle crashed between creating it and writing its owner, or is writing it)"}
    try:
        owner = json.loads(raw)
    except ValueError:
        owner = None
    if isinstance(owner, dict) and type(owner.get("pid")) is int and owner["pid"] > 0 and "host" in owner:
        return owner
    return {"problem": f"holds no owner record (it starts {raw[:40]!r})"}


def _local_time(since) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    except (TypeError, ValueError, OverflowError, OSError):  # a record this module did not write
        return "?"


def _this_machine() -> str:
    """Where a pid names the same process: host name, boot and pid namespace (containers that share a
    host name but not their pids differ)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return " ".join(parts)


def _same_machine(owner: dict) -> bool:
    if "machine" in owner:
        return owner["machine"] == _this_machine()
    return owner["host"] == socket.gethostname()  # a lease written before "machine" was recorded


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
