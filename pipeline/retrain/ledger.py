"""The retraining ledger: one SQLite database that says which feedback files have been trained on,
by which cycle, with what result, and which files are quarantined and why. It is the source of
truth of the registry: `current` is re-derived from it at the start of every cycle.

The guarantee that nothing is lost or counted twice rests on one transaction: a cycle's files are
marked consumed (one row a file, the file its primary key) in the same commit that records the
cycle as promoted, and only while the cycle is still 'running'. A finished cycle's status is never
rewritten. A cycle that crashes, is killed or fails the gate commits no consumed rows, so the next
cycle sees the same files again.

Journal mode: rollback (DELETE), not WAL. WAL keeps its index in shared memory, which processes on
different hosts of a network filesystem do not share (SQLite's docs: WAL does not work over a
network filesystem); the rollback journal needs only the POSIX locks that the volume must provide
anyway. A ledger that an older version switched to WAL is switched back when no other connection
has it open.

Migrations run under BEGIN IMMEDIATE and re-read the schema version inside the transaction, so of
several processes opening an old ledger at once exactly one applies each step (the `migrations`
table records who did). Schema version 2 tracks consumption per file; its migration lists each
partition that version 1 had consumed as it is on disk at that moment and records all of its files
as consumed (files that arrived in such a folder after its cycle and before the migration count
as consumed; the migration logs the partitions whose content differs from what was consumed).
"""

import hashlib
import json
import logging
import os
import socket
import sqlite3
import time
from typing import Optional

from pipeline.retrain.partitions import list_partitions
from pipeline.retrain.reading import Unreadable, read_rows

log = logging.getLogger("kto")
SCHEMA_VERSION = 2
STATUSES = ("running", "promoted", "rejected", "skipped", "failed")
V1 = ["""CREATE TABLE cycles (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        started_at REAL NOT NULL,
        finished_at REAL,
        status TEXT NOT NULL CHECK (status IN ('running', 'promoted', 'rejected', 'skipped', 'failed')),
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        start_model TEXT NOT NULL,           -- the policy the cycle starts from
        reference_model TEXT NOT NULL,
        partitions TEXT NOT NULL,            -- JSON: the new partitions (v2: each with its files)
        new_rows INTEGER NOT NULL,
        replay_rows INTEGER NOT NULL DEFAULT 0,
        changed TEXT NOT NULL DEFAULT '[]',  -- JSON: consumed files whose content has changed since
        model_path TEXT,                     -- the candidate (promoted, or kept for inspection)
        metrics TEXT,                        -- JSON: held-out checks before and after, the gate
        reason TEXT,                         -- why it was skipped, rejected or failed
        timings TEXT                         -- JSON: seconds per phase
    )""",
      """CREATE TABLE consumed (
        partition TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, signature TEXT NOT NULL, rows INTEGER NOT NULL,
        cycle_id INTEGER NOT NULL REFERENCES cycles(id)
    )"""]
V2 = ["ALTER TABLE cycles ADD COLUMN quarantined TEXT NOT NULL DEFAULT '[]'",  # files this cycle quarantined
      "ALTER TABLE cycles ADD COLUMN waiting TEXT NOT NULL DEFAULT '[]'",  # partitions not sealed yet
      """CREATE TABLE consumed_files (
        file TEXT PRIMARY KEY,               -- path relative to retrain.feedback_root
        partition TEXT NOT NULL,
        fingerprint TEXT NOT NULL,           -- blake2b of its bytes when it was consumed
        signature TEXT NOT NULL,             -- its size and mtime then
        rows INTEGER NOT NULL,
        cycle_id INTEGER NOT NULL REFERENCES cycles(id)
    )""",
      """CREATE TABLE quarantine (
        file TEXT NOT NULL, partition TEXT NOT NULL, fingerprint TEXT NOT NULL, signature TEXT NOT NULL,
        reason TEXT NOT NULL, cycle_id INTEGER NOT NULL REFERENCES cycles(id),
        PRIMARY KEY (file, fingerprint)      -- new bytes: a new fingerprint, eligible again
    )""",
      """CREATE TABLE migrations (
        version INTEGER NOT NULL, applied_at REAL NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, note TEXT
    )"""]


class Ledger:
    def __init__(self, path: str, feedback_root: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.feedback_root = path, feedback_root
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)  # transactions are explicit
        self.db.row_factory = sqlite3.Row
        self._rollback_journal()
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _rollback_journal(self) -> None:
        if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            return
        try:
            self.db.execute("PRAGMA journal_mode=DELETE")
        except sqlite3.OperationalError as error:  # another connection has it open in WAL mode
            log.warning("ledger %s stays in WAL mode for now (%s); it switches to the rollback journal at an "
                        "open that no other process shares", self.path, error)

    def _migrate(self) -> None:
        for step in range(self._version(), SCHEMA_VERSION):
            with self.transaction():
                version = self._version()  # again, inside the lock: another process may have migrated
                if version > step:
                    continue
                note = self._migration(step)
                if step >= 1:
                    self.db.execute("INSERT INTO migrations VALUES (?, ?, ?, ?, ?)",
                                    (step + 1, time.time(), socket.gethostname(), os.getpid(), note))
                self.db.execute(f"PRAGMA user_version = {step + 1}")

    def _version(self) -> int:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"ledger {self.path} has schema version {version}, newer than this code's "
                               f"{SCHEMA_VERSION}: upgrade the pipeline before running it on this registry")
        return version

    def _migration(self, step: int) -> Optional[str]:
        for statement in (V1, V2)[step]:
            self.db.execute(statement)
        return self._consumed_partitions_to_files() if step == 1 else None

    def _consumed_partitions_to_files(self) -> str:
        """v1 -> v2: each consumed partition's files, as they are on disk now, consumed by its cycle."""
        consumed = {row["partition"]: row for row in self.db.execute("SELECT * FROM consumed")}
        if consumed and not os.path.isdir(self.feedback_root):
            raise FileNotFoundError(f"ledger {self.path} needs migrating to schema version 2, which lists the consumed "
                               f"partitions' files under retrain.feedback_root = {self.feedback_root!r}, not a "
                               "folder here: run it where the feedback volume is mounted")
        differ = []
        for partition in list_partitions(self.feedback_root) if consumed else []:
            record = consumed.get(partition.name)
            if record is None:
                continue
            if _v1_fingerprint(partition) != record["fingerprint"]:
                differ.append(partition.name)
            self.db.executemany("INSERT INTO consumed_files VALUES (?, ?, ?, ?, ?, ?)",
                                [(f.name, f.partition, f.fingerprint, f.signature, _rows_or_zero(f),
                                  record["cycle_id"]) for f in partition.files])
        self.db.execute("DROP TABLE consumed")
        if differ:
            log.warning("ledger migration: partitions %s changed after their cycle consumed them; all of their files "
                        "as they are now are recorded as consumed", differ)
        return json.dumps({"consumed_partitions": len(consumed), "changed_since_consumed": differ})

    def transaction(self):
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()

    def consumed(self) -> dict[str, dict]:
        return {row["file"]: dict(row) for row in self.db.execute("SELECT * FROM consumed_files")}

    def quarantine(self) -> dict[str, list[dict]]:
        """file -> its quarantine rows, one per fingerprint it was quarantined with."""
        out: dict[str, list[dict]] = {}
        for row in self.db.execute("SELECT * FROM quarantine ORDER BY cycle_id"):
            out.setdefault(row["file"], []).append(dict(row))
        return out

    def promoted_model(self) -> Optional[str]:
        row = self.db.execute("SELECT model_path FROM cycles WHERE status = 'promoted' ORDER BY id DESC LIMIT 1"
                              ).fetchone()
        return row["model_path"] if row else None

    def fail_unfinished(self, reason: str) -> list[int]:
        """Cycles left 'running' by a process that died: only the lock holder calls this."""
        with self.transaction():
            ids = [row["id"] for row in self.db.execute("SELECT id FROM cycles WHERE status = 'running'")]
            self.db.execute("UPDATE cycles SET status = 'failed', finished_at = ?, reason = ? WHERE status = 'running'",
                            (time.time(), reason))
        return ids

    def begin(self, start_model: str, reference_model: str) -> int:
        """The cycle's row, before it reads any feedback file: whatever happens next is recorded."""
        with self.transaction():
            return self.db.execute(
                "INSERT INTO cycles (started_at, status, host, pid, start_model, reference_model, partitions, "
                "new_rows) VALUES (?, 'running', ?, ?, ?, ?, '[]', 0)",
                (time.time(), socket.gethostname(), os.getpid(), start_model, reference_model)).lastrowid

    def record_inputs(self, cycle_id: int, partitions: list[dict], replay_rows: int, changed: list[dict],
                      quarantined: list[dict], waiting: list[dict]) -> None:
        """What the cycle found; its quarantined files are quarantined from now on, whatever the
        cycle's outcome."""
        with self.transaction():
            self.db.execute(
                "UPDATE cycles SET partitions = ?, new_rows = ?, replay_rows = ?, changed = ?, quarantined = ?, "
                "waiting = ? WHERE id = ?", (json.dumps(partitions), sum(p["rows"] for p in partitions), replay_rows,
                                             json.dumps(changed), json.dumps(quarantined), json.dumps(waiting),
                                             cycle_id))
            self.db.executemany(
                "INSERT OR IGNORE INTO quarantine VALUES (?, ?, ?, ?, ?, ?)",
                [(q["name"], q["partition"], q["fingerprint"], q["signature"], q["reason"], cycle_id)
                 for q in quarantined])

    def finish(self, cycle_id: int, status: str, *, model_path: Optional[str] = None, metrics: Optional[dict] = None,
               reason: Optional[str] = None, timings: Optional[dict] = None, consume: list[dict] = ()) -> bool:
        """Close a running cycle; with `consume` (a promoted cycle only), mark its files consumed
        in the same transaction. A cycle already closed is left as it is (False); consuming for
        one that is no longer running (another process recorded it as failed) raises and commits
        nothing."""
        assert status in STATUSES[1:] and (not consume or status == "promoted")
        with self.transaction():
            updated = self.db.execute(
                "UPDATE cycles SET status = ?, finished_at = ?, model_path = ?, metrics = ?, reason = ?, timings = ? "
                "WHERE id = ? AND status = 'running'",
                (status, time.time(), model_path, json.dumps(metrics) if metrics else None, reason,
                 json.dumps(timings) if timings else None, cycle_id)).rowcount == 1
            if consume and not updated:
                raise RuntimeError(f"cycle {cycle_id} is no longer running in the ledger (another cycle recorded it "
                                   "as failed after taking over its lock): its files are not consumed")
            self.db.executemany(
                "INSERT INTO consumed_files VALUES (?, ?, ?, ?, ?, ?)",
                [(f["name"], f["partition"], f["fingerprint"], f["signature"], f["rows"], cycle_id) for f in consume])
        return updated

    def cycles(self) -> list[dict]:
        return [dict(row) for row in self.db.execute("SELECT * FROM cycles ORDER BY id")]


def _v1_fingerprint(partition) -> str:
    """Version 1's partition fingerprint: its files' names (relative to the partition) and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for file in partition.files:
        digest.update(os.path.relpath(file.name, partition.name).encode() + b"\0")
        with open(file.path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _rows_or_zero(file) -> int:
    try:
        return read_rows(file)
    except Unreadable:
        return 0


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception: all of it or none of it."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, error, traceback):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False
