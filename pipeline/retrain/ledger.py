"""The retraining ledger: one SQLite database that says which feedback partitions have been
trained on, by which cycle, with what result. It is the source of truth of the registry: the
`current` pointer is re-derived from it at the start of every cycle.

The guarantee that nothing is lost or counted twice rests on one transaction: a cycle's
partitions are marked consumed in the same commit that records the cycle as promoted. A cycle
that crashes, is killed or fails the gate commits no consumed rows, so the next cycle sees the
same partitions again.
"""

import json
import os
import socket
import sqlite3
import time
from typing import Optional

SCHEMA_VERSION = 1
SCHEMA = [  # index i: the statements that take the database from version i to i + 1
    ["""CREATE TABLE cycles (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        started_at REAL NOT NULL,
        finished_at REAL,
        status TEXT NOT NULL CHECK (status IN ('running', 'promoted', 'rejected', 'skipped', 'failed')),
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        start_model TEXT NOT NULL,           -- the policy the cycle starts from
        reference_model TEXT NOT NULL,
        partitions TEXT NOT NULL,            -- JSON [{name, fingerprint, signature, rows}]: the new partitions
        new_rows INTEGER NOT NULL,
        replay_rows INTEGER NOT NULL DEFAULT 0,
        changed TEXT NOT NULL DEFAULT '[]',  -- JSON: consumed partitions whose content has changed since
        model_path TEXT,                     -- the candidate (promoted, or kept for inspection)
        metrics TEXT,                        -- JSON: held-out checks before and after, the gate
        reason TEXT,                         -- why it was skipped, rejected or failed
        timings TEXT                         -- JSON: seconds per phase
    )""",
     """CREATE TABLE consumed (
        partition TEXT PRIMARY KEY,          -- path relative to retrain.feedback_root
        fingerprint TEXT NOT NULL,           -- hash of its files' names and bytes when it was consumed
        signature TEXT NOT NULL,             -- hash of its files' names, sizes and mtimes then
        rows INTEGER NOT NULL,
        cycle_id INTEGER NOT NULL REFERENCES cycles(id)
    )"""],
]
STATUSES = ("running", "promoted", "rejected", "skipped", "failed")


class Ledger:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)  # transactions are explicit
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"ledger {self.path} has schema version {version}, newer than this code's "
                               f"{SCHEMA_VERSION}: upgrade the pipeline before running it on this registry")
        for step in range(version, SCHEMA_VERSION):
            with self.transaction():
                for statement in SCHEMA[step]:
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {step + 1}")

    def transaction(self):
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()

    def consumed(self) -> dict[str, sqlite3.Row]:
        return {row["partition"]: row for row in self.db.execute("SELECT * FROM consumed")}

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

    def begin(self, start_model: str, reference_model: str, partitions: list[dict], replay_rows: int,
              changed: list[dict]) -> int:
        with self.transaction():
            cursor = self.db.execute(
                "INSERT INTO cycles (started_at, status, host, pid, start_model, reference_model, partitions, "
                "new_rows, replay_rows, changed) VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), socket.gethostname(), os.getpid(), start_model, reference_model,
                 json.dumps(partitions), sum(p["rows"] for p in partitions), replay_rows, json.dumps(changed)))
            return cursor.lastrowid

    def finish(self, cycle_id: int, status: str, *, model_path: Optional[str] = None, metrics: Optional[dict] = None,
               reason: Optional[str] = None, timings: Optional[dict] = None, consume: list[dict] = ()) -> None:
        """Close a cycle; with `consume` (a promoted cycle only), mark its partitions consumed in
        the same transaction."""
        assert status in STATUSES[1:] and (not consume or status == "promoted")
        with self.transaction():
            self.db.execute(
                "UPDATE cycles SET status = ?, finished_at = ?, model_path = ?, metrics = ?, reason = ?, timings = ? "
                "WHERE id = ?", (status, time.time(), model_path, json.dumps(metrics) if metrics else None, reason,
                                 json.dumps(timings) if timings else None, cycle_id))
            self.db.executemany(
                "INSERT INTO consumed (partition, fingerprint, signature, rows, cycle_id) VALUES (?, ?, ?, ?, ?)",
                [(p["name"], p["fingerprint"], p["signature"], p["rows"], cycle_id) for p in consume])

    def cycles(self) -> list[dict]:
        return [dict(row) for row in self.db.execute("SELECT * FROM cycles ORDER BY id")]


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
