"""Recurring retraining: real SQLite ledgers, real partitions and broken files on disk, real
processes, the tiny model. The fault-injection life of one registry runs `launch.py retrain`
processes that are killed at each phase of a cycle (SIGKILL: no clean-up runs), and cycles in this
process on the session's Ray; the lifecycle, quarantine, gate, ledger and migration facts that need
no training are proved without Ray."""

import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT, launch_here, write_feedback
from pipeline.retrain.cycle import gate
from pipeline.retrain.ledger import V1, Ledger
from pipeline.retrain.partitions import survey
from pipeline.retrain.reading import MAX_DEPTH, ROW_LIMIT

HOUR = 3600


@pytest.fixture
def registry(tmp_path, tiny_model):
    """A config whose cycles train the tiny model 2 steps on what arrives under tmp/feedback."""
    (tmp_path / "feedback").mkdir()
    config = {
        "data": {"kl_block_size": 4, "generate_demo": False},
        "model": {"name_or_path": tiny_model, "cache_dir": str(tmp_path / "models")},
        "reference": {"cache_dir": str(tmp_path / "cache")},
        "kto": {"max_length": 64, "max_prompt_length": 32},
        "training": {"learning_rate": 1e-3, "warmup_ratio": 0.0, "per_device_train_batch_size": 4, "max_steps": 2},
        "eval": {"path": write_feedback(str(tmp_path / "held_out.parquet"), rows=8, seed=99)},
        # The accuracy side of the gate is checked with hand numbers below; here only drift decides.
        "retrain": {"feedback_root": str(tmp_path / "feedback"), "registry_dir": str(tmp_path / "registry"),
                    "gate_accuracy_tolerance": 1.0, "keep_models": 2},
        "output": {"report_to": []},
    }
    path = tmp_path / "retrain.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path), tmp_path


def _partition(root, day: str, seed: int, rows: int = 16, part: int = 0, sealed: bool = True) -> str:
    """A hive partition's Parquet file, and (sealed) its writer's _SUCCESS marker written after it."""
    path = write_feedback(str(root / "feedback" / f"date={day}" / f"part-{part}.parquet"), rows=rows, seed=seed)
    if sealed:
        _seal(root / "feedback" / f"date={day}")
    return path


def _seal(folder) -> None:
    (folder / "_SUCCESS").write_text("")
    later = time.time() + 1  # the marker is written after the files, also where mtimes have 1 s resolution
    os.utime(folder / "_SUCCESS", (later, later))


def _age(path, seconds: float) -> None:
    """Set an mtime `seconds` in the past (a file written then and left alone since)."""
    os.utime(path, (time.time() - seconds, time.time() - seconds))


def _age_tree(root) -> None:
    """Everything under root (symlinks themselves, not their targets) last changed an hour ago."""
    then = time.time() - HOUR
    for folder, folders, names in os.walk(root):
        for name in folders + names:
            os.utime(os.path.join(folder, name), (then, then), follow_symlinks=False)
        os.utime(folder, (then, then))


def _retrain(config: str, *overrides: str) -> dict:
    """One cycle in this process, on the session's Ray (`launch.py retrain` calls the same function)."""
    from pipeline.config import load_config
    from pipeline.retrain.cycle import retrain

    return retrain(load_config(config, overrides))


def _launch_retrain(config: str, *overrides: str, fault: str = "", wait: bool = True):
    """`launch.py retrain` in a process of its own (its own Ray), optionally with a fault injected."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"KTO_RETRAIN_FAULT": fault} if fault else {})}
    process = subprocess.Popen([sys.executable, "launch.py", "retrain", "--config", config,
                                *[f"--set={o}" for o in overrides]], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    if wait:
        output, _ = process.communicate(timeout=600)
        return process.returncode, output
    return process


def _ledger(tmp_path) -> tuple[list[dict], dict]:
    """The cycles (JSON columns parsed) and the consumed files: {file: cycle id}."""
    db = sqlite3.connect(str(tmp_path / "registry" / "ledger.sqlite"))
    db.row_factory = sqlite3.Row
    cycles = [{**dict(row), **{k: json.loads(row[k]) for k in ("partitions", "changed", "quarantined", "waiting")}}
              for row in db.execute("SELECT * FROM cycles ORDER BY id")]
    consumed = {row["file"]: row["cycle_id"] for row in db.execute("SELECT * FROM consumed_files")}
    db.close()
    return cycles, consumed


def _cycles_so_far(tmp_path) -> list[dict]:
    """For polling a running cycle: its ledger file appears before its first transaction creates the tables,
    so a missing file or table means no cycle yet, not an error."""
    if not (tmp_path / "registry" / "ledger.sqlite").exists():
        return []
    try:
        return _ledger(tmp_path)[0]
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return []
        raise


def _files(row: dict) -> list[str]:
    return sorted(f["name"] for p in row["partitions"] for f in p["files"])


# --- the partition lifecycle, without Ray ---------------------------------------------------------------------------


def _survey(root, ledger: Ledger = None, settle_s: float = 600, **more):
    consumed, quarantine = (ledger.consumed(), ledger.quarantine()) if ledger else ({}, {})
    return survey(str(root), consumed, quarantine, settle_s, **more)


def test_a_partition_is_eligible_once_sealed_by_its_marker_or_by_settling(tmp_path):
    root = tmp_path / "feedback"
    marked = root / "date=2026-12-01"
    write_feedback(str(marked / "part-0.parquet"), rows=3)
    assert _survey(root).waiting[0]["partition"] == "date=2026-12-01"  # just written, no marker: waits
    assert "no _SUCCESS marker" in _survey(root).waiting[0]["reason"]
    _seal(marked)
    write_feedback(str(root / "date=2026-12-02" / "part-0.parquet"), rows=4)
    assert [f.name for f, _ in _survey(root).new] == ["date=2026-12-01/part-0.parquet"]
    # A file newer than the marker waits (the writer has not declared it done) ...
    write_feedback(str(marked / "part-1.parquet"), rows=5)
    _age(marked / "part-0.parquet", 20)
    _age(marked / "_SUCCESS", 10)
    found = _survey(root)
    assert [f.name for f, _ in found.new] == ["date=2026-12-01/part-0.parquet"]
    assert "marker is older than some files" in found.waiting[0]["reason"]
    # ... until a fresh marker, or until nothing in the partition has changed for settle_s.
    assert [f.name for f, _ in _survey(root, settle_s=0).new] == [
        "date=2026-12-01/part-0.parquet", "date=2026-12-01/part-1.parquet", "date=2026-12-02/part-0.parquet"]
    _seal(marked)
    assert [f.name for f, _ in _survey(root).new] == ["date=2026-12-01/part-0.parquet", "date=2026-12-01/part-1.parquet"]
    # A writer still busy in _temporary/ keeps its partition unsettled, and its files are never read.
    quiet = root / "date=2026-12-03"
    write_feedback(str(quiet / "part-0.parquet"), rows=2)
    write_feedback(str(quiet / "_temporary" / "0" / "part-1.parquet"), rows=2)
    _age(quiet / "part-0.parquet", HOUR)
    _age(quiet, HOUR)
    found = _survey(root)
    assert {w["partition"] for w in found.waiting} == {"date=2026-12-02", "date=2026-12-03"}
    for path in (quiet / "_temporary" / "0" / "part-1.parquet", quiet / "_temporary" / "0", quiet / "_temporary"):
        _age(path, HOUR)
    found = _survey(root)
    assert [(f.name, rows) for f, rows in found.new] == [
        ("date=2026-12-01/part-0.parquet", 3), ("date=2026-12-01/part-1.parquet", 5), ("date=2026-12-03/part-0.parquet", 2)]
    # A file directly under the root is its own partition, sealed by settling.
    write_feedback(str(root / "loose.parquet"), rows=1)
    assert "loose.parquet" in {w["partition"] for w in _survey(root).waiting}
    _age(root / "loose.parquet", HOUR)
    assert ("loose.parquet", 1) in [(f.name, rows) for f, rows in _survey(root).new]


def test_a_cycle_is_recorded_before_it_reads_any_feedback_and_history_lists_what_it_found(tmp_path):
    """Ledger-only cycles (no training, no Ray): a missing feedback root, then a skip that quarantines."""
    from pipeline.config import load_config
    from pipeline.retrain.cycle import retrain

    settings = {"retrain.feedback_root": str(tmp_path / "feedback"), "retrain.registry_dir": str(tmp_path / "registry"),
                "retrain.min_new_rows": 1000, "eval.path": str(tmp_path / "held_out.parquet"),
                "model.name_or_path": str(tmp_path / "model")}
    overrides = tuple(f"{key}={value}" for key, value in settings.items())
    config = load_config(None, overrides)
    with pytest.raises(FileNotFoundError, match="retrain.feedback_root"):
        retrain(config)
    _partition(tmp_path, "2026-12-01", seed=1)
    (tmp_path / "feedback" / "broken.json").write_text('[{"prompt": "p", "completion": "c"')
    _age(tmp_path / "feedback" / "broken.json", HOUR)
    skipped = retrain(config)
    assert skipped["status"] == "skipped" and _files(skipped) == ["date=2026-12-01/part-0.parquet"]
    assert [q["name"] for q in skipped["quarantined"]] == ["broken.json"]
    table = launch_here("history", *[f"--set={o}" for o in overrides])
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[1].split()[4] == "failed" and "FileNotFoundError: retrain.feedback_root" in lines[1]
    assert lines[2].split()[4] == "skipped"
    assert lines[3].strip() == "files (eligible, not consumed): date=2026-12-01/part-0.parquet"
    assert lines[4].strip() == ("quarantined broken.json: its JSON array ends inside element 0: the file is "
                                "truncated or not valid JSON")
    full = json.loads(launch_here("history", "--json", *[f"--set={o}" for o in overrides]).stdout)
    assert full[1]["partitions"][0]["files"][0]["rows"] == 16 and full[1]["quarantined"][0]["fingerprint"]


def _promote(ledger: Ledger, found) -> int:
    cycle = ledger.begin("start", "reference")
    assert ledger.finish(cycle, "promoted", model_path="m", consume=[f.describe(rows=r) for f, r in found.new])
    return cycle


def test_consumption_is_per_file_so_late_files_are_new_and_rewritten_files_are_reported(tmp_path):
    root = tmp_path / "feedback"
    day = root / "date=2026-12-02"
    write_feedback(str(day / "part-0.parquet"), rows=6, seed=1)
    _seal(day)
    ledger = Ledger(str(tmp_path / "ledger.sqlite"), str(root))
    first = _promote(ledger, _survey(root, ledger))
    assert ledger.consumed()["date=2026-12-02/part-0.parquet"]["rows"] == 6
    late = write_feedback(str(day / "part-1.parquet"), rows=4, seed=2)  # the day's files keep arriving
    _seal(day)
    found = _survey(root, ledger)
    assert [(f.name, rows) for f, rows in found.new] == [("date=2026-12-02/part-1.parquet", 4)]
    assert not found.changed and [f.name for f in found.unchanged] == ["date=2026-12-02/part-0.parquet"]
    second = _promote(ledger, found)
    assert {name: row["cycle_id"] for name, row in ledger.consumed().items()} == {
        "date=2026-12-02/part-0.parquet": first, "date=2026-12-02/part-1.parquet": second}
    assert not _survey(root, ledger).new  # each file once
    os.utime(late, (time.time() - 60, time.time() - 60))  # touched, same bytes: still consumed, not changed
    assert not _survey(root, ledger).changed
    write_feedback(late, rows=4, seed=3)  # rewritten in place: reported, never trained again
    found = _survey(root, ledger)
    assert not found.new and [(c["name"], c["consumed_by_cycle"]) for c in found.changed] == [
        ("date=2026-12-02/part-1.parquet", second)]
    with pytest.raises(sqlite3.IntegrityError):  # and the ledger itself refuses a file consumed twice
        _promote(ledger, _survey(root, None, settle_s=0))


def _bad_files(root) -> dict[str, str]:
    """One of each kind of file that cannot be read, beside a good one: name -> a word of its reason."""
    good = write_feedback(str(root / "date=2026-12-01" / "part-0.parquet"), rows=5)
    row = b'{"prompt": "p", "completion": "c", "label": true}\n'
    (root / "half.json").write_bytes(b'[{"prompt": "p", "completion": "c", "label": tr')
    (root / "truncated.jsonl.gz").write_bytes(gzip.compress(row * 200)[:60])
    (root / "latin1.jsonl").write_bytes(row + '{"prompt": "caf\xe9", "completion": "c", "label": true}\n'.encode("latin-1"))
    (root / "deep.jsonl").write_bytes(b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b', "label": true}\n')
    (root / "deep.json").write_bytes(b'[{"prompt": ' + b"[" * 40 + b"]" * 40 + b', "completion": "c", "label": 1}]')
    with open(good, "rb") as f:
        (root / "no_footer.parquet").write_bytes(f.read()[:-20])
    (root / "columns.jsonl").write_bytes(b'{"question": "q", "answer": "a"}\n')
    (root / "empty.jsonl").write_bytes(b"\n")
    os.mkfifo(root / "pipe.jsonl")
    outside = root.parent / "elsewhere"
    write_feedback(str(outside / "part-0.parquet"), rows=3)
    os.symlink(outside, root / "date=2026-11-30")
    os.symlink(outside / "part-0.parquet", root / "linked.parquet")
    os.symlink("..", root / "date=2026-12-01" / "up")  # a loop: never followed
    _age_tree(root)
    return {"half.json": "not valid JSON", "truncated.jsonl.gz": "EOFError", "latin1.jsonl": "row 2 is not UTF-8",
            "deep.jsonl": f"deeper than {MAX_DEPTH}", "deep.json": f"deeper than {MAX_DEPTH}",
            "no_footer.parquet": "ArrowInvalid", "columns.jsonl": "match no feedback format", "empty.jsonl": "no rows",
            "pipe.jsonl": "not a regular file", "date=2026-11-30": "outside the feedback root",
            "linked.parquet": "outside the feedback root", "date=2026-12-01/up": "inside the feedback root"}


def test_unreadable_files_and_symlinks_are_quarantined_with_a_reason_and_retried_once_fixed(tmp_path):
    root = tmp_path / "feedback"
    expected = _bad_files(root)
    ledger = Ledger(str(tmp_path / "ledger.sqlite"), str(root))
    found = _survey(root, ledger)  # no crash, whatever the files hold
    assert [(f.name, rows) for f, rows in found.new] == [("date=2026-12-01/part-0.parquet", 5)]
    reasons = {q["name"]: q["reason"] for q in found.quarantined}
    assert set(reasons) == set(expected)
    for name, word in expected.items():
        assert word in reasons[name], (name, reasons[name])
    cycle = ledger.begin("start", "reference")
    ledger.record_inputs(cycle, [], 0, [], found.quarantined, [])
    again = _survey(root, ledger)  # quarantined stays quarantined: not read again, not listed again
    assert not again.quarantined and sorted(again.still_quarantined) == sorted(expected)
    (root / "half.json").write_bytes(b'[{"prompt": "p", "completion": "c", "label": true}]')  # the upload finished
    _age(root / "half.json", HOUR)
    os.unlink(root / "linked.parquet")
    write_feedback(str(root / "linked.parquet"), rows=2)  # the link replaced by the file itself
    _age(root / "linked.parquet", HOUR)
    fixed = _survey(root, ledger)
    assert sorted((f.name, rows) for f, rows in fixed.new) == [("date=2026-12-01/part-0.parquet", 5),
                                                               ("linked.parquet", 2)]
    assert not fixed.quarantined and "half.json" not in fixed.still_quarantined
    assert "holds json/unpaired feedback" in {w["partition"]: w["reason"] for w in fixed.waiting}["half.json"]


def test_the_pre_read_streams_json_so_a_gzip_bomb_line_is_counted_unread(tmp_path):
    """A cycle reads JSON before it trains as the data stage does, a row at a time: a 128 MB line
    inside a gzip file of a few hundred KB is one row (the data stage quarantines it, row_too_long),
    read no further than the row limit, and a .json array is read element by element."""
    root = tmp_path / "feedback"
    root.mkdir()
    row = json.dumps({"prompt": "what is the sky?", "completion": "blue.", "label": True}).encode() + b"\n"
    with gzip.open(root / "bomb.jsonl.gz", "wb", compresslevel=9) as f:
        f.write(row + b'{"prompt": "')
        for _ in range(128):
            f.write(b"a" * (1 << 20))
        f.write(b'", "completion": "x", "label": true}\n' + row)
    (root / "rows.json").write_text(json.dumps([{"prompt": f"question {i}?", "completion": "an answer.",
                                                 "label": i % 2 == 0} for i in range(5000)]))
    _age_tree(root)
    tracemalloc.start()
    try:
        found = _survey(root)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sorted((f.name, rows) for f, rows in found.new) == [("bomb.jsonl.gz", 3), ("rows.json", 5000)]
    assert not found.quarantined
    assert peak < 3 * ROW_LIMIT < 128 << 20, peak  # the row limit's read, not the line (read whole: 128 MB+)


def test_a_cycle_reads_one_kind_and_format_of_file_and_the_others_wait(tmp_path):
    """The data stage reads one kind (Parquet or JSON) and one format a run: the kind with the most
    new rows trains, the others wait for a later cycle instead of failing every cycle."""
    root = tmp_path / "feedback"
    write_feedback(str(root / "date=2026-12-01" / "part-0.parquet"), rows=5)
    (root / "date=2026-12-01" / "part-1.jsonl").write_bytes(b'{"prompt": "p", "completion": "c", "label": true}\n' * 9)
    pq.write_table(pa.table({"prompt": ["p"], "chosen": ["good"], "rejected": ["bad"]}), str(root / "paired.parquet"))
    found = _survey(root, settle_s=0)
    assert [(f.name, f.kind, rows) for f, rows in found.new] == [("date=2026-12-01/part-1.jsonl", "json/unpaired", 9)]
    waiting = {w["partition"]: w["reason"] for w in found.waiting}
    assert set(waiting) == {"date=2026-12-01/part-0.parquet", "paired.parquet"}
    assert "holds parquet/paired feedback; this cycle trains the json/unpaired files" in waiting["paired.parquet"]


def test_the_gate_compares_with_the_promoted_model_bounds_the_drift_and_refuses_nan():
    before = {"accuracy": 0.75}
    passed = gate(before, {"accuracy": 0.70, "kl": 0.0, "kl_unclamped": -2.0}, False, 0.05, 3.0)
    assert passed["passed"] and passed["baseline_accuracy"] == 0.75 and passed["kl_drift"] == 2.0
    worse = gate(before, {"accuracy": 0.69, "kl": 0.0, "kl_unclamped": 0.5}, False, 0.05, 3.0)
    assert not worse["passed"] and "accuracy 0.6900 < 0.7500" in worse["reason"]
    drifted = gate(before, {"accuracy": 0.9, "kl": 0.0, "kl_unclamped": -3.5}, False, 0.05, 3.0)
    assert not drifted["passed"] and "3.5 nats > retrain.gate_max_kl = 3" in drifted["reason"]
    # The promoted model as its own reference (first cycle; reference: start): chance is the baseline.
    assert gate({"accuracy": 0.0}, {"accuracy": 0.5, "kl_unclamped": 0.1}, True, 0.0, 3.0)["passed"]
    assert not gate({"accuracy": 0.0}, {"accuracy": 0.4, "kl_unclamped": 0.1}, True, 0.0, 3.0)["passed"]
    # NaN compares False with everything, so unchecked it would pass both bounds; inf drift likewise is refused.
    for after, word in (({"accuracy": 0.9, "kl_unclamped": float("nan")}, "KL drift is nan"),
                        ({"accuracy": float("nan"), "kl_unclamped": 0.1}, "held-out accuracy is nan"),
                        ({"accuracy": 0.9, "kl_unclamped": float("-inf")}, "KL drift is inf")):
        verdict = gate(before, after, False, 1.0, 1e9)
        assert not verdict["passed"] and word in verdict["reason"] and "not a finite number" in verdict["reason"]
    assert not gate({"accuracy": float("nan")}, {"accuracy": 0.9, "kl_unclamped": 0.1}, False, 1.0, 3.0)["passed"]
    assert "held-out accuracy is None" in gate(before, {"accuracy": None, "kl_unclamped": 0.1}, False, 1.0, 3.0)["reason"]


def test_a_finished_cycle_is_never_rewritten(tmp_path):
    ledger = Ledger(str(tmp_path / "ledger.sqlite"), str(tmp_path))
    file = {"name": "a.parquet", "partition": "a.parquet", "fingerprint": "f", "signature": "s", "rows": 3}
    promoted = ledger.begin("start", "reference")
    assert ledger.finish(promoted, "promoted", model_path="model", consume=[file])
    # What a SIGTERM or an error after the commit used to do: record the promoted cycle as failed.
    assert not ledger.finish(promoted, "failed", reason="Interrupted: stopped by SIGTERM")
    assert ledger.fail_unfinished("died") == []
    row = ledger.cycles()[0]
    assert (row["status"], row["model_path"], row["reason"]) == ("promoted", "model", None)
    assert ledger.promoted_model() == "model" and set(ledger.consumed()) == {"a.parquet"}
    # A cycle that another one recorded as failed (it took over the lock) cannot consume anything.
    late = ledger.begin("start", "reference")
    ledger.fail_unfinished("died")
    other = {**file, "name": "b.parquet"}
    with pytest.raises(RuntimeError, match="no longer running"):
        ledger.finish(late, "promoted", model_path="late", consume=[other])
    assert ledger.cycles()[1]["status"] == "failed" and set(ledger.consumed()) == {"a.parquet"}
    assert ledger.promoted_model() == "model"


def _v1_ledger(path: str, root) -> None:
    """A ledger as version 1 left it (WAL mode), with date=2026-11-20 consumed by cycle 1."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    for statement in V1:
        db.execute(statement)
    db.execute("INSERT INTO cycles (started_at, status, host, pid, start_model, reference_model, partitions, "
               "new_rows) VALUES (0, 'promoted', 'h', 1, 's', 'r', '[]', 8)")
    db.execute("INSERT INTO consumed VALUES ('date=2026-11-20', 'old', 'sig', 8, 1)")
    db.execute("PRAGMA user_version = 1")
    db.close()


MIGRATE = """
import os, sys, time
sys.path.insert(0, {root!r})
from pipeline.retrain.ledger import Ledger
open(os.path.join({ready!r}, str(os.getpid())), "w").close()
while not os.path.exists({go!r}):
    time.sleep(0.005)
Ledger({ledger!r}, {feedback!r}).close()
"""


def test_processes_opening_an_old_ledger_at_once_migrate_it_once(tmp_path):
    feedback = tmp_path / "feedback"
    write_feedback(str(feedback / "date=2026-11-20" / "part-0.parquet"), rows=5)
    write_feedback(str(feedback / "date=2026-11-20" / "part-1.parquet"), rows=3)
    write_feedback(str(feedback / "date=2026-11-21" / "part-0.parquet"), rows=4)
    ledger_path, go = str(tmp_path / "ledger.sqlite"), str(tmp_path / "go")
    _v1_ledger(ledger_path, feedback)
    ready = tmp_path / "ready"
    ready.mkdir()
    script = MIGRATE.format(root=ROOT, go=go, ready=str(ready), ledger=ledger_path, feedback=str(feedback))
    openers = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True) for _ in range(6)]
    while len(os.listdir(ready)) < len(openers):  # every process imported, waiting for the start
        assert all(opener.poll() is None for opener in openers)
        time.sleep(0.01)
    open(go, "w").close()
    for opener in openers:
        assert opener.wait(timeout=120) == 0, opener.stderr.read()[-2000:]
    Ledger(ledger_path, str(feedback)).close()  # (an open that no other process shares leaves WAL)
    db = sqlite3.connect(ledger_path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # no WAL on a shared volume
    migrations = db.execute("SELECT version, note FROM migrations").fetchall()
    assert len(migrations) == 1 and migrations[0][0] == 2
    assert json.loads(migrations[0][1]) == {"consumed_partitions": 1, "changed_since_consumed": ["date=2026-11-20"]}
    assert dict(db.execute("SELECT file, rows FROM consumed_files")) == {
        "date=2026-11-20/part-0.parquet": 5, "date=2026-11-20/part-1.parquet": 3}
    db.close()
    ledger = Ledger(ledger_path, str(feedback))
    assert [f.name for f, _ in _survey(feedback, ledger, settle_s=0).new] == ["date=2026-11-21/part-0.parquet"]


# --- one registry's life, with a fault injected at each phase of a cycle -------------------------------------------


def _quarantined_and_waiting_feedback(tmp_path) -> None:
    """Beside the good partition: a corrupt one (a Parquet file cut short), a symlink to a folder outside
    the root, and a partition whose writer is not done (no marker, just written)."""
    feedback = tmp_path / "feedback"
    corrupt = _partition(tmp_path, "2026-11-19", seed=6, rows=12)
    with open(corrupt, "rb") as f:
        data = f.read()
    with open(corrupt, "wb") as f:  # an upload cut short: no footer
        f.write(data[:-100])
    write_feedback(str(tmp_path / "elsewhere" / "part-0.parquet"), rows=16, seed=5)
    os.symlink(tmp_path / "elsewhere", feedback / "date=2026-11-18")
    _partition(tmp_path, "2026-11-22", seed=4, sealed=False)


def _kill_during_training(config: str, tmp_path, cycle_id: int) -> str:
    """Start a long cycle, SIGKILL it once its training has logged a step; the refusal of a
    second cycle while it runs is returned (its stderr)."""
    cycle = _launch_retrain(config, "training.max_steps=500", wait=False)
    metrics = tmp_path / "registry" / "cycles" / f"cycle-{cycle_id:06d}" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        assert cycle.poll() is None and time.time() < deadline, cycle.stdout.read()[-3000:]
        time.sleep(0.2)
    refused = launch_here("retrain", "--config", config)  # while it runs
    assert refused.returncode == 75 and f"pid {cycle.pid}" in refused.stderr
    assert cycle.poll() is None
    cycle.kill()  # no clean-up runs: the lock stays, the row stays 'running'
    cycle.wait()
    return refused.stderr


@pytest.mark.slow
def test_a_registry_loses_no_feedback_whichever_phase_a_cycle_is_killed_in(registry, ray_local, monkeypatch):
    """One registry's life. Cycles killed before training, during training, between the ledger
    commit and the pointer switch, and during pruning; a SIGTERM after a commit; late files in a
    consumed partition; a corrupt partition and a symlink beside good ones; a partition still
    being written. After each, the next cycle repairs what it can from the ledger, and at the end
    every file is in exactly one promoted cycle, or still eligible, or quarantined with a reason."""
    config, tmp_path = registry
    current = tmp_path / "registry" / "current"
    _partition(tmp_path, "2026-11-20", seed=1)
    _quarantined_and_waiting_feedback(tmp_path)

    # 1. Killed before training: the row, what it found and the quarantine are recorded first.
    code, output = _launch_retrain(config, fault="before_training")
    assert code == -signal.SIGKILL, output[-3000:]
    (killed,), consumed = _ledger(tmp_path)
    assert killed["status"] == "running" and not consumed and _files(killed) == ["date=2026-11-20/part-0.parquet"]
    reasons = {q["name"]: q["reason"] for q in killed["quarantined"]}
    assert "ArrowInvalid" in reasons["date=2026-11-19/part-0.parquet"]
    assert "outside the feedback root" in reasons["date=2026-11-18"]
    assert [w["partition"] for w in killed["waiting"]] == ["date=2026-11-22"]

    # 2. Killed during training (after a logged step), a second cycle refused while it ran.
    _kill_during_training(config, tmp_path, cycle_id=2)
    cycles, consumed = _ledger(tmp_path)
    assert [c["status"] for c in cycles] == ["failed", "running"] and not consumed
    assert not cycles[1]["quarantined"]  # quarantined once, not again each cycle

    # 3. Killed between the commit and the pointer switch: promoted in the ledger, `current` not yet there.
    code, output = _launch_retrain(config, fault="after_commit")
    assert code == -signal.SIGKILL, output[-3000:]
    cycles, consumed = _ledger(tmp_path)
    first = cycles[2]
    assert [c["status"] for c in cycles] == ["failed", "failed", "promoted"] and "died" in cycles[1]["reason"]
    assert consumed == {"date=2026-11-20/part-0.parquet": 3} and not os.path.lexists(current)
    # The feedback that the cycle killed during training had staged (hard links) went at this cycle's start.
    assert os.listdir(tmp_path / "registry" / "cycles" / "cycle-000002" / "feedback") == []

    # 4. Late files in the consumed partition (the writer seals it again) and a new partition; the cycle
    # repairs `current` first, is rejected by the gate, and a SIGTERM after its commit changes nothing.
    _partition(tmp_path, "2026-11-20", seed=2, part=1)
    _partition(tmp_path, "2026-11-21", seed=3)
    monkeypatch.setenv("KTO_RETRAIN_FAULT", "after_commit:TERM")
    rejected = _retrain(config, "retrain.gate_max_kl=1e-9")  # two steps at lr 1e-3 move it further than that
    monkeypatch.delenv("KTO_RETRAIN_FAULT")
    assert rejected["status"] == "rejected" and "retrain.gate_max_kl" in rejected["reason"]
    assert _files(rejected) == ["date=2026-11-20/part-1.parquet", "date=2026-11-21/part-0.parquet"]
    assert rejected["start_model"] == first["model_path"] == os.path.realpath(current)  # repaired, kept
    assert os.path.isdir(rejected["model_path"]) and _ledger(tmp_path)[1] == consumed  # nothing consumed
    drift = json.loads((tmp_path / "registry" / "cycles" / "cycle-000004" / "summary.json").read_text())
    assert "is not the policy" in drift["reference"]["step0_drift"]["skipped"]  # started from the promoted model

    # 5. The same files again, with older feedback replayed; killed after pruning its first model folder.
    code, output = _launch_retrain(config, "retrain.replay_fraction=0.5", "retrain.keep_models=1",
                                   fault="during_pruning")
    assert code == -signal.SIGKILL, output[-3000:]
    cycles, consumed = _ledger(tmp_path)
    second = cycles[4]
    assert second["status"] == "promoted" and second["new_rows"] == 32 and second["replay_rows"] == 16
    assert os.path.realpath(current) == second["model_path"]  # switched before pruning
    assert not os.path.isdir(first["model_path"]) and os.path.isdir(rejected["model_path"])  # pruning cut short
    staged = os.path.join(os.path.dirname(second["model_path"]), "feedback")
    assert os.listdir(staged) == ["replay"]  # the staged feedback went after training; the replay sample stays
    replay = pq.read_table(os.path.join(staged, "replay", "part-0.parquet"))
    older = pq.read_table(str(tmp_path / "feedback" / "date=2026-11-20" / "part-0.parquet"))
    assert replay.num_rows == 16 and set(replay.column("extra").to_pylist()) <= set(older.column("extra").to_pylist())

    # 6. The corrupt file fixed, the first file rewritten in place, the last partition sealed: a ledger-only cycle
    # (too few rows to train) finishes the pruning and lists what is eligible now.
    _partition(tmp_path, "2026-11-19", seed=6, rows=12)  # the upload done again
    write_feedback(str(tmp_path / "feedback" / "date=2026-11-20" / "part-0.parquet"), rows=16, seed=7)
    _seal(tmp_path / "feedback" / "date=2026-11-22")
    skipped = _retrain(config, "retrain.min_new_rows=1000", "retrain.keep_models=1")
    assert skipped["status"] == "skipped" and "retrain.min_new_rows" in skipped["reason"]
    assert _files(skipped) == ["date=2026-11-19/part-0.parquet", "date=2026-11-22/part-0.parquet"]
    assert [(c["name"], c["consumed_by_cycle"]) for c in skipped["changed"]] == [("date=2026-11-20/part-0.parquet", 3)]
    assert not skipped["quarantined"] and not skipped["waiting"]

    # Every file: in exactly one promoted cycle (the primary key of consumed_files), or eligible now.
    cycles, consumed = _ledger(tmp_path)
    assert [c["status"] for c in cycles] == ["failed", "failed", "promoted", "rejected", "promoted", "skipped"]
    assert consumed == {"date=2026-11-20/part-0.parquet": 3, "date=2026-11-20/part-1.parquet": 5,
                        "date=2026-11-21/part-0.parquet": 5}
    promoted_files = [name for c in cycles if c["status"] == "promoted" for name in _files(c)]
    assert sorted(promoted_files) == sorted(consumed)  # each once
    on_disk = sorted(os.path.relpath(os.path.join(folder, name), tmp_path / "feedback")
                     for folder, _, names in os.walk(tmp_path / "feedback") for name in names if name != "_SUCCESS")
    assert on_disk == sorted([*consumed, *_files(skipped)])  # (date=2026-11-18 is a quarantined symlink)
    # `current` is the ledger's promoted model; pruning finished: only it is kept (keep_models 1).
    assert os.path.realpath(current) == second["model_path"]
    assert [c["id"] for c in cycles if c["model_path"] and os.path.isdir(c["model_path"])] == [5]
    # The reference cache keeps what the promoted cycles and the shared eval set used; the entries made from the
    # staged feedback of cycle 2 (killed) and cycle 4 (rejected) went after later decisions.
    from pipeline.cache_admin import list_entries

    cycle_data = sorted(os.path.relpath(use["data_path"], tmp_path / "registry" / "cycles")
                        for entry in list_entries(str(tmp_path / "cache")) for use in entry.uses
                        if use["data_path"] != str(tmp_path / "held_out.parquet"))
    assert cycle_data == ["cycle-000003/feedback", "cycle-000005/feedback"]
    assert not [p for p in os.listdir(tmp_path / "registry") if ".tmp-" in p]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(current)).num_parameters() > 0

    table = launch_here("history", "--config", config)
    assert table.returncode == 0, table.stderr[-3000:]
    lines = table.stdout.strip().splitlines()
    rows = [line for line in lines[1:] if not line.startswith(" " * 7)]
    assert lines[0].split()[:3] == ["cycle", "started", "new"]
    assert [line.split()[4] for line in rows] == ["failed", "failed", "promoted", "rejected", "promoted", "skipped"]
    text = table.stdout
    assert "files (consumed): date=2026-11-20/part-0.parquet" in text
    assert "files (consumed): date=2026-11-20/part-1.parquet, date=2026-11-21/part-0.parquet" in text
    assert "quarantined date=2026-11-19/part-0.parquet: ArrowInvalid" in text and "changed since cycle 3" in text
    full = json.loads(launch_here("history", "--config", config, "--json").stdout)
    assert [f["name"] for p in full[4]["partitions"] for f in p["files"]] == _files(second)
    assert {f["fingerprint"] for p in full[4]["partitions"] for f in p["files"]} and full[4]["replay_rows"] == 16


@pytest.mark.slow
def test_schedule_runs_cycles_at_cron_times_and_stops_on_sigterm(registry):
    config, tmp_path = registry  # no partitions: each cycle records a skip, quickly
    scheduler = subprocess.Popen([sys.executable, "launch.py", "schedule", "--config", config,
                                  "--cron", "* * * * * */2"],  # every 2 seconds (a sixth field: seconds)
                                 cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while len([c for c in _cycles_so_far(tmp_path) if c["status"] != "running"]) < 2:
        assert scheduler.poll() is None and time.time() < deadline, scheduler.stdout.read()[-3000:]
        time.sleep(0.2)
    scheduler.send_signal(signal.SIGTERM)
    output, _ = scheduler.communicate(timeout=60)
    assert scheduler.returncode == 0, output[-3000:]
    assert "next retrain cycle at" in output and "scheduler stopped" in output
    cycles, consumed = _ledger(tmp_path)
    assert len(cycles) >= 2 and {c["status"] for c in cycles} <= {"skipped", "failed"} and not consumed
    assert cycles[0]["status"] == "skipped" and cycles[1]["status"] == "skipped"
    assert not (tmp_path / "registry" / "retrain.lock").exists()
