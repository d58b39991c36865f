"""The retraining registry on disk: the feedback partitions a cycle can consume, the lock that
keeps cycles one at a time, and the `current` pointer to the promoted model.

    <registry_dir>/ledger.sqlite            the ledger (pipeline/ledger.py)
    <registry_dir>/retrain.lock             held while a cycle runs: host, pid, heartbeat
    <registry_dir>/current -> cycles/cycle-000003/model
    <registry_dir>/cycles/cycle-000003/     a cycle's run directory (feedback/, model/, summary.json, ...)
"""

import functools
import gzip
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass

import pyarrow.parquet as pq

from pipeline.data.formats import FEEDBACK_SUFFIXES


@dataclass
class Partition:
    """A file directly under the feedback root, or a folder there (a hive partition such as
    date=2026-11-26/) with every feedback file below it.

    `signature` (names, sizes, modification times) is cheap and read for every partition at every
    cycle; `fingerprint` (a hash of the bytes) and `rows` are computed only when needed: for new
    partitions, and for consumed ones whose signature has changed."""
    name: str  # relative to the root
    path: str
    files: tuple  # absolute paths, sorted
    signature: str

    @functools.cached_property
    def fingerprint(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        for file in self.files:
            digest.update(os.path.relpath(file, self.path).encode() + b"\0")
            with open(file, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()

    @functools.cached_property
    def rows(self) -> int:
        return sum(map(count_rows, self.files))

    def describe(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "signature": self.signature, "rows": self.rows}


def discover_partitions(root: str) -> list[Partition]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"retrain.feedback_root {root!r} is not a folder; point it at the folder your "
                                "feedback partitions (files, or folders such as date=2026-11-26/) arrive in")
    partitions = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(os.path.abspath(root), name)
        if name.startswith((".", "_")):  # hidden files and writers' _SUCCESS / _temporary markers
            continue
        if os.path.isdir(path):
            files = sorted(os.path.join(folder, f) for folder, _, names in os.walk(path) for f in names
                           if f.endswith(FEEDBACK_SUFFIXES) and not f.startswith((".", "_")))
        else:
            files = [path] if name.endswith(FEEDBACK_SUFFIXES) else []
        if files:
            stats = [(os.path.relpath(f, path), stat.st_size, stat.st_mtime_ns) for f in files for stat in [os.stat(f)]]
            signature = hashlib.blake2b(repr(stats).encode(), digest_size=16).hexdigest()
            partitions.append(Partition(name, path, tuple(files), signature))
    return partitions


def count_rows(file: str) -> int:
    """Input rows of one feedback file: Parquet from its footer, JSON lines by line, JSON by list."""
    if file.endswith(".parquet"):
        return pq.ParquetFile(file).metadata.num_rows
    opener = gzip.open if file.endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8") as f:
        if file.endswith((".jsonl", ".jsonl.gz")):
            return sum(1 for line in f if line.strip())
        rows = json.load(f)
    return len(rows) if isinstance(rows, list) else 1


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


def point_current(registry_dir: str, model_path: str) -> None:
    """Switch `current` to model_path atomically: a new relative symlink renamed over the old one,
    so a reader sees the old model or the new one, never neither."""
    link = os.path.join(registry_dir, "current")
    target = os.path.relpath(model_path, registry_dir)
    if os.path.islink(link) and os.readlink(link) == target:
        return
    staging = f"{link}.new-{os.getpid()}"
    if os.path.lexists(staging):
        os.unlink(staging)
    os.symlink(target, staging)
    os.replace(staging, link)
