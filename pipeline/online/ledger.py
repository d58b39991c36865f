"""The online run's ledger: one SQLite row a round, in the run directory (`online.sqlite`), the
same design as the retraining ledger (pipeline/retrain/ledger.py): explicit transactions, the
rollback journal (it works on network volumes), a finished row never rewritten.

A round moves forward through its phases and never back:

    started -> sampled -> labelled -> trained -> done      (or -> skipped, from labelled)

each phase's outputs written (atomically) before the ledger says the phase is over, so a killed run
resumes a round at its first unfinished phase: samples are never drawn again once `sampled` (the
same rows are labelled and trained), and a `trained` round is never trained again. Round 0 is the
start model's held-out pass rate, the curve's first point.
"""

import json
import os
import socket
import sqlite3
import time
from typing import Optional

PHASES = ("started", "sampled", "labelled", "trained", "done", "skipped")
FINISHED = ("done", "skipped")
# Each phase's one way on (round 0 is measured only: started -> done)
NEXT = {"started": ("sampled", "done"), "sampled": ("labelled",), "labelled": ("trained", "skipped"),
        "trained": ("done",)}
JSON_FIELDS = ("counts", "held_out", "metrics", "timings")
SCHEMA = """CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,              -- 0: the start model, measured only
    status TEXT NOT NULL CHECK (status IN ('started', 'sampled', 'labelled', 'trained', 'done', 'skipped')),
    started_at REAL NOT NULL,
    finished_at REAL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    policy_model TEXT NOT NULL,             -- the weights the round samples from
    reference_model TEXT NOT NULL,
    model_path TEXT,                        -- the round's trained policy
    counts TEXT NOT NULL DEFAULT '{}',      -- JSON: prompts, samples, labels, quarantined
    held_out TEXT,                          -- JSON: the pass rate of the round's trained policy
    metrics TEXT,                           -- JSON: the round's last training step
    timings TEXT NOT NULL DEFAULT '{}',     -- JSON: seconds per phase
    reason TEXT                             -- why it was skipped
)"""


class RoundLedger:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=DELETE")
        self.db.execute(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def get(self, round_number: int) -> Optional[dict]:
        row = self.db.execute("SELECT * FROM rounds WHERE round = ?", (round_number,)).fetchone()
        return _decoded(row) if row else None

    def rounds(self) -> list[dict]:
        return [_decoded(row) for row in self.db.execute("SELECT * FROM rounds ORDER BY round")]

    def begin(self, round_number: int, policy: str, reference: str) -> dict:
        """The round's row (a new one, or the one a killed run left: then this process takes it over)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if self.get(round_number) is None:
                self.db.execute("INSERT INTO rounds (round, status, started_at, host, pid, policy_model, "
                                "reference_model) VALUES (?, 'started', ?, ?, ?, ?, ?)",
                                (round_number, time.time(), socket.gethostname(), os.getpid(), policy, reference))
            else:
                self.db.execute("UPDATE rounds SET host = ?, pid = ? WHERE round = ? AND status NOT IN (?, ?)",
                                (socket.gethostname(), os.getpid(), round_number, *FINISHED))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return self.get(round_number)

    def advance(self, round_number: int, status: str, **fields) -> dict:
        """Move the round forward to `status`, merging the JSON fields given (counts, timings ...) into
        what is recorded. Refuses any move but the next phase's (NEXT): no phase is recorded twice, and a
        finished round is never touched."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.get(round_number)
            if row is None or status not in NEXT.get(row["status"], ()):
                raise RuntimeError(f"online ledger {self.path}: round {round_number} is "
                                   f"{row and row['status']}; it cannot move to {status}")
            values = {"status": status}
            for name, value in fields.items():
                if name in JSON_FIELDS:
                    value = json.dumps({**(row[name] or {}), **value} if isinstance(value, dict) else value)
                values[name] = value
            if status in FINISHED:
                values["finished_at"] = time.time()
            assignments = ", ".join(f"{name} = ?" for name in values)
            self.db.execute(f"UPDATE rounds SET {assignments} WHERE round = ?", (*values.values(), round_number))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return self.get(round_number)

    def latest_model(self, up_to_round: int = 2**62) -> Optional[str]:
        """The policy after the last trained round up to `up_to_round` (None: still the start model)."""
        row = self.db.execute("SELECT model_path FROM rounds WHERE model_path IS NOT NULL AND status IN "
                              "('trained', 'done') AND round <= ? ORDER BY round DESC LIMIT 1",
                              (up_to_round,)).fetchone()
        return row[0] if row else None


def _decoded(row: sqlite3.Row) -> dict:
    out = dict(row)
    for name in JSON_FIELDS:
        out[name] = json.loads(out[name]) if out[name] else None
    return out
