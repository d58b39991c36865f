"""`launch.py history`: the ledger's cycles, as a table or as JSON (with every file in full)."""

import json
import os
import time

from pipeline.retrain.ledger import Ledger

JSON_COLUMNS = ("partitions", "changed", "quarantined", "waiting", "metrics", "timings")
WHAT_FILES_WERE = {"promoted": "consumed", "skipped": "eligible, not consumed"}


def decoded(row: dict) -> dict:
    """A ledger row with its JSON columns parsed."""
    return {**row, **{k: json.loads(row[k]) for k in JSON_COLUMNS if row.get(k)}}


def read_history(ledger_path: str, feedback_root: str) -> list[dict]:
    if not os.path.exists(ledger_path):
        raise FileNotFoundError(f"no ledger at {ledger_path}: no retrain cycle has run with this retrain.registry_dir")
    ledger = Ledger(ledger_path, feedback_root)
    try:
        return [decoded(cycle) for cycle in ledger.cycles()]
    finally:
        ledger.close()


def history_table(cycles: list[dict]) -> str:
    """One line a cycle (cycle, start time, new rows, decision, held-out accuracy and KL after
    training, model, reason), then indented lines: its files in compact form, what it quarantined,
    consumed files that changed, partitions still waiting to be sealed."""
    lines = [f"{'cycle':>5}  {'started':19}  {'new rows':>8}  {'decision':9}  {'accuracy':>8}  {'kl':>8}  model"]
    for c in cycles:
        after = (c.get("metrics") or {}).get("after") or {}
        accuracy, kl = (f"{after[key]:8.4f}" if key in after else f"{'-':>8}" for key in ("accuracy", "kl"))
        lines.append(f"{c['id']:>5}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(c['started_at']))}  "
                     f"{c['new_rows']:>8}  {c['status']:9}  {accuracy}  {kl}  "
                     f"{c['model_path'] or ''}" + (f"  ({c['reason']})" if c["reason"] else ""))
        if c.get("partitions"):
            lines.append(f"       files ({WHAT_FILES_WERE.get(c['status'], 'read, not consumed')}): "
                         + compact_files(c["partitions"]))
        lines += [f"       quarantined {q['name']}: {q['reason']}" for q in c.get("quarantined") or []]
        lines += [f"       changed since cycle {f['consumed_by_cycle']} consumed it: {f['name']}"
                  for f in c.get("changed") or []]
        lines += [f"       waiting {w['partition']} ({w['files']} files): {w['reason']}" for w in c.get("waiting") or []]
    return "\n".join(lines)


def compact_files(partitions: list[dict], shown: int = 3) -> str:
    """'date=2026-12-01/ (2 files), date=2026-12-02/part-1.parquet, +3 partitions (9 files)'; a
    version-1 row (partitions without their files) shows its partitions' names."""
    parts = []
    for p in partitions:
        files = p.get("files")
        if files is None:
            parts.append(p["name"])
        elif len(files) == 1:
            parts.append(files[0]["name"])
        else:
            parts.append(f"{p['name']}/ ({len(files)} files)")
    more = partitions[shown:]
    if more:
        count = sum(len(p.get("files") or [None]) for p in more)
        parts = parts[:shown] + [f"+{len(more)} partitions ({count} files)"]
    return ", ".join(parts)
