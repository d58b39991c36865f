"""Recurring retraining: real SQLite ledgers, real partitions on disk, the tiny model; `launch.py
retrain` killed in its own process, `schedule` running cycles as child processes, and cycles and
`history` through launch.py in this process."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT, launch_here, write_feedback
from pipeline.retrain.registry import LockHeld, RetrainLock
from pipeline.retrain.cycle import gate


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


def _partition(root, day: str, seed: int, rows: int = 16) -> str:
    return write_feedback(str(root / "feedback" / f"date={day}" / "part-0.parquet"), rows=rows, seed=seed)


def _retrain(config: str, *overrides: str) -> dict:
    """One cycle in this process, on the session's Ray (`launch.py retrain` calls the same function)."""
    from pipeline.config import load_config
    from pipeline.retrain.cycle import retrain

    return retrain(load_config(config, overrides))


def _ledger(tmp_path) -> tuple[list[dict], dict]:
    db = sqlite3.connect(str(tmp_path / "registry" / "ledger.sqlite"))
    db.row_factory = sqlite3.Row
    cycles = [dict(row) for row in db.execute("SELECT * FROM cycles ORDER BY id")]
    consumed = {row["partition"]: row["cycle_id"] for row in db.execute("SELECT * FROM consumed")}
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


@pytest.mark.slow
def test_cycles_train_new_partitions_once_and_survive_a_killed_cycle(registry, ray_local):
    """One registry's life: a cycle killed in the middle (its lock left behind, its row 'running'),
    a cycle refused while it ran, then cycles that recover, promote, reject through the gate, replay
    older feedback, skip, and prune: every partition is trained on by exactly one promoted cycle."""
    config, tmp_path = registry
    current = tmp_path / "registry" / "current"
    _partition(tmp_path, "2026-11-20", seed=1)
    long_cycle = subprocess.Popen(
        [sys.executable, "launch.py", "retrain", "--config", config, "--set=training.max_steps=500"], cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not _cycles_so_far(tmp_path):
        assert long_cycle.poll() is None and time.time() < deadline, long_cycle.stdout.read()[-3000:]
        time.sleep(0.1)
    refused = launch_here("retrain", "--config", config)  # while it runs
    assert refused.returncode == 75 and f"pid {long_cycle.pid}" in refused.stderr
    assert long_cycle.poll() is None
    long_cycle.kill()  # SIGKILL in the middle of the cycle: no clean-up runs, the lock file stays
    long_cycle.wait()
    assert (tmp_path / "registry" / "retrain.lock").exists()
    assert [c["status"] for c in _ledger(tmp_path)[0]] == ["running"]

    first = _retrain(config)  # takes over the dead cycle's lock, records it as failed, trains its partition
    assert first["status"] == "promoted" and [p["name"] for p in first["partitions"]] == ["date=2026-11-20"]
    assert first["new_rows"] == 16 and os.path.realpath(current) == first["model_path"]
    assert not (tmp_path / "registry" / "retrain.lock").exists()
    cycles, consumed = _ledger(tmp_path)
    assert [c["status"] for c in cycles] == ["failed", "promoted"] and "died" in cycles[0]["reason"]
    assert consumed == {"date=2026-11-20": 2}

    _partition(tmp_path, "2026-11-21", seed=2)
    rejected = _retrain(config, "retrain.gate_max_kl=1e-9")  # two steps at lr 1e-3 move it further than that
    assert rejected["status"] == "rejected" and "retrain.gate_max_kl" in rejected["reason"]
    assert os.path.isdir(rejected["model_path"])  # kept for inspection ...
    assert os.path.realpath(current) == first["model_path"]  # ... not promoted
    assert _ledger(tmp_path)[1] == {"date=2026-11-20": 2}  # the watermark did not move
    # The cycle started from the promoted model and scored against the base: no step-0 drift to check.
    drift = json.loads((tmp_path / "registry" / "cycles" / "cycle-000003" / "summary.json").read_text())
    assert "is not the policy" in drift["reference"]["step0_drift"]["skipped"]

    # The rejected cycle's partition again, from the promoted model, with older feedback replayed.
    second = _retrain(config, "retrain.replay_fraction=0.5")
    assert second["status"] == "promoted" and [p["name"] for p in second["partitions"]] == ["date=2026-11-21"]
    assert second["start_model"] == first["model_path"] and os.path.realpath(current) == second["model_path"]
    assert second["new_rows"] == 16 and second["replay_rows"] == 8
    replay = pq.read_table(os.path.join(os.path.dirname(second["model_path"]), "feedback", "replay", "part-0.parquet"))
    older = pq.read_table(str(tmp_path / "feedback" / "date=2026-11-20" / "part-0.parquet"))
    assert replay.num_rows == 8 and set(replay.column("extra").to_pylist()) <= set(older.column("extra").to_pylist())
    assert set(zip(replay.column("prompt").to_pylist(), replay.column("completion").to_pylist())) <= set(
        zip(older.column("prompt").to_pylist(), older.column("completion").to_pylist()))

    _partition(tmp_path, "2026-11-20", seed=7)  # the first partition rewritten in place
    skipped = _retrain(config)
    assert skipped["status"] == "skipped" and skipped["new_rows"] == 0 and "retrain.min_new_rows" in skipped["reason"]
    assert [c["name"] for c in skipped["changed"]] == ["date=2026-11-20"]
    assert skipped["changed"][0]["consumed_by_cycle"] == 2

    cycles, consumed = _ledger(tmp_path)
    assert [c["status"] for c in cycles] == ["failed", "promoted", "rejected", "promoted", "skipped"]
    assert consumed == {"date=2026-11-20": 2, "date=2026-11-21": 4}  # disjoint, once each
    assert len({c["reference_model"] for c in cycles}) == 1  # the base model anchors every cycle
    held_out = json.loads(cycles[1]["metrics"])["after"]  # the workers' held-out check, as the gate read it
    assert 0 <= held_out["accuracy"] <= 1 and held_out["examples"] == 8
    # keep_models 2: the two newest candidates stay, older ones go (their ledger rows stay).
    kept = [c["id"] for c in cycles if c["model_path"] and os.path.isdir(c["model_path"])]
    assert kept == [3, 4] and os.path.realpath(current) == second["model_path"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(current)).num_parameters() > 0

    table = launch_here("history", "--config", config)
    assert table.returncode == 0, table.stderr[-3000:]
    lines = table.stdout.strip().splitlines()
    assert len(lines) == 6 and lines[0].split()[:3] == ["cycle", "started", "new"]
    assert [line.split()[4] for line in lines[1:]] == ["failed", "promoted", "rejected", "promoted", "skipped"]


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


def test_the_gate_compares_with_the_promoted_model_and_bounds_the_drift():
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


def test_the_lock_refuses_a_live_owner_and_takes_over_a_dead_or_silent_one(tmp_path):
    path = str(tmp_path / "retrain.lock")
    with RetrainLock(path, stale_after_s=600):
        with pytest.raises(LockHeld, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            RetrainLock(path, stale_after_s=600).__enter__()
    assert not os.path.exists(path)  # released on exit

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": dead_pid, "since": time.time()}, f)
    with RetrainLock(path, stale_after_s=600) as lock:
        assert lock.recovered["pid"] == dead_pid
        assert json.load(open(path))["pid"] == os.getpid()

    with open(path, "w") as f:  # another host's owner whose heartbeat stopped 20 minutes ago
        json.dump({"host": "elsewhere", "pid": 1, "since": time.time() - 1200}, f)
    os.utime(path, (time.time() - 1200, time.time() - 1200))
    with RetrainLock(path, stale_after_s=600) as lock:
        assert lock.recovered["host"] == "elsewhere"
    with open(path, "w") as f:  # ... and one that beats: held
        json.dump({"host": "elsewhere", "pid": 1, "since": time.time()}, f)
    with pytest.raises(LockHeld):
        RetrainLock(path, stale_after_s=600).__enter__()
