"""`launch.py cache list | prune` and the retrain registry's pruning, on real files: entries are
written by hand in the reference cache's layout (a data stage folder with report.json and Parquet
parts, a scored file inside it, a file beside it, a usage record), so every size below is the
count of bytes this test wrote, and every time and run is one this test recorded."""

import json
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, launch_here
from pipeline import cache_admin
from pipeline.cache import staging_name
from pipeline.retrain.ledger import Ledger
from pipeline.retrain.registry import cycle_dir, prune_reference_cache

DAY = 86400
HOST = socket.gethostname()


def _parquet_bytes(rows: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"row_index": list(range(rows)), "label": [i % 2 == 0 for i in range(rows)]}), sink)
    return sink.getvalue().to_pybytes()


def _write(path: str, data: bytes, when: float) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, (when, when))
    return len(data)


def _entry(cache, fingerprint: str, rows: int, when: float, uses=(), beside: bool = False) -> int:
    """A cache entry as runs leave it; returns its bytes. `uses` are (seconds ago, run dir, data path,
    host, pid), written as the usage record."""
    folder = os.path.join(cache, fingerprint)
    size = _write(os.path.join(folder, "report.json"), json.dumps({"kept": rows}).encode(), when)
    size += _write(os.path.join(folder, "examples", "part-00000.parquet"), _parquet_bytes(rows), when)
    size += _write(os.path.join(folder, "examples-scored-0123456789abcdef0123.parquet"), _parquet_bytes(rows), when)
    if beside:
        size += _write(os.path.join(cache, f"{fingerprint}-scored-aaaa-steps-bbbb.parquet"), _parquet_bytes(3), when)
    if uses:
        record = {"fingerprint": fingerprint, "uses": [
            {"time": time.time() - ago, "run_dir": run, "data_path": data, "host": host, "pid": pid}
            for ago, run, data, host, pid in uses]}
        size += _write(os.path.join(cache, fingerprint + ".uses.json"), json.dumps(record).encode(), when)
    return size


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _fp(digit: str) -> str:
    """A fingerprint (20 hex digits) made of one digit."""
    return digit * 20


def _cache_args(cache) -> list[str]:
    return ["--set", f"reference.cache_dir={cache}"]


def test_list_shows_each_entry_s_bytes_last_use_and_runs_newest_first(tmp_path):
    cache = str(tmp_path / "cache")
    old = time.time() - 30 * DAY
    sizes = {
        _fp("a"): _entry(cache, _fp("a"), 50, old, uses=[(3 * DAY, "/runs/a1", "/d/a", "elsewhere", 1)]),
        _fp("b"): _entry(cache, _fp("b"), 7, old, beside=True, uses=[(1 * DAY, "/runs/b2", "/d/b", "elsewhere", 2),
                                                                      (2 * DAY, "/runs/b1", "/d/b", "elsewhere", 3)]),
        _fp("c"): _entry(cache, _fp("c"), 20, old),  # no usage record (written by `validate`): its files' time
    }
    # A live writer's staging file inside b counts in its bytes; a data stage writing a new entry is no entry.
    sizes[_fp("b")] += _write(staging_name(os.path.join(cache, _fp("b"), "held_out-scored-1.parquet")), b"x" * 1000,
                              old)
    _write(os.path.join(staging_name(os.path.join(cache, _fp("d"))), "report.json"), b"{}", old)

    listed = launch_here("cache", "list", "--json", *_cache_args(cache))
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert [e["fingerprint"] for e in entries] == [_fp("b"), _fp("a"), _fp("c")]  # 1 day, 3 days, 30 days ago
    assert {e["fingerprint"]: e["size_bytes"] for e in entries} == sizes
    assert [e["runs"] for e in entries] == [["/runs/b2", "/runs/b1"], ["/runs/a1"], []]
    assert abs(entries[0]["last_use_unix"] - (time.time() - DAY)) < 60 and abs(entries[2]["last_use_unix"] - old) < 1
    assert entries[0]["staging"] == [staging_name(os.path.join(cache, _fp("b"), "held_out-scored-1.parquet"))]

    text = launch_here("cache", "list", *_cache_args(cache)).stdout
    lines = text.splitlines()
    assert lines[0] == f"reference cache {cache}: 3 entries, {cache_admin.human(sum(sizes.values()))}"
    assert [line.split()[0] for line in lines[2:]] == [_fp("b"), _fp("a"), _fp("c")]
    assert "/runs/b2, /runs/b1" in lines[2] and "(1 d ago)" in lines[2] and "(no record)" in lines[4]


def test_prune_keep_last_removes_the_least_recently_used_and_leaves_live_writers_alone(tmp_path):
    cache = str(tmp_path / "cache")
    old = time.time() - 30 * DAY
    for letter, ago in (("a", 1), ("b", 2), ("c", 3), ("e", 4)):
        _entry(cache, _fp(letter), 10, old, uses=[(ago * DAY, f"/runs/{letter}", "/d", "elsewhere", 1)])
    # e (the oldest) is being scored into by a live writer (this process); f's data stage is running;
    # g's data stage was killed (a dead pid on this host): its staging folder is a leftover.
    writing = staging_name(os.path.join(cache, _fp("e"), "held_out-scored-1.parquet"))
    _write(writing, b"partial", old)
    live = os.path.join(staging_name(os.path.join(cache, _fp("f"))), "report.json")
    _write(live, b"{}", old)
    dead = os.path.join(cache, f"{_fp('g')}.tmp-{HOST}-{_dead_pid()}")
    _write(os.path.join(dead, "report.json"), b"{}", old)
    before = sorted(os.listdir(cache))

    dry = launch_here("cache", "prune", "--keep-last", "1", "--dry-run", "--json", *_cache_args(cache))
    assert dry.returncode == 0, dry.stderr
    result = json.loads(dry.stdout)
    assert [e["fingerprint"] for e in result["removed"]] == [_fp("c"), _fp("b")]  # least recently used first
    assert [k["fingerprint"] for k in result["kept_in_use"]] == [_fp("e")] and writing in result["kept_in_use"][0][
        "reason"]
    assert result["leftovers"] == [dead] and sorted(os.listdir(cache)) == before  # a dry run removes nothing

    forced = launch_here("cache", "prune", "--keep-last", "1", "--force", *_cache_args(cache))
    assert forced.returncode == 0, forced.stderr
    assert f"removed {_fp('c')}" in forced.stdout and f"kept {_fp('e')}: {writing} is being written" in forced.stdout
    assert sorted(os.listdir(cache)) == sorted([_fp("a"), _fp("a") + ".uses.json", _fp("e"), _fp("e") + ".uses.json",
                                                os.path.basename(os.path.dirname(live))])
    assert os.path.exists(writing) and os.path.exists(live)


def test_prune_max_size_removes_least_recently_used_until_under_and_keeps_entries_in_use(tmp_path):
    cache = str(tmp_path / "cache")
    old = time.time() - 30 * DAY
    size = {
        "a": _entry(cache, _fp("a"), 40, old, uses=[(1 * DAY, "/runs/a", "/d", "elsewhere", 1)]),
        # b: used days ago by a process of this host that is still alive (this one): a long run
        "b": _entry(cache, _fp("b"), 30, old, uses=[(2 * DAY, "/runs/b", "/d", HOST, os.getpid())]),
        "c": _entry(cache, _fp("c"), 20, old, beside=True, uses=[(3 * DAY, "/runs/c", "/d", "elsewhere", 1)]),
        "d": _entry(cache, _fp("d"), 10, old, uses=[(4 * DAY, "/runs/d", "/d", HOST, _dead_pid())]),
        "e": _entry(cache, _fp("e"), 5, time.time()),  # no record, written a minute ago or less: a run may be starting
    }
    # Under a + b + c + e: d goes (the least recently used of those not in use), and nothing else.
    limit = size["a"] + size["b"] + size["c"] + size["e"]
    first = launch_here("cache", "prune", "--max-size", f"{limit}B", "--json", *_cache_args(cache))
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert [e["fingerprint"] for e in result["removed"]] == [_fp("d")] and not result["kept_in_use"]
    assert result["total_before"] == sum(size.values()) and result["total_after"] == limit
    assert not os.path.exists(os.path.join(cache, _fp("d"))) and not os.path.exists(os.path.join(cache, _fp("d") +
                                                                                                  ".uses.json"))
    # Under b + e: c goes (with the file beside it), b is in use, so a goes too; e is not reached.
    second = json.loads(launch_here("cache", "prune", "--max-size", f"{size['b'] + size['e']}", "--json",
                                    *_cache_args(cache)).stdout)
    assert [e["fingerprint"] for e in second["removed"]] == [_fp("c"), _fp("a")]
    assert [k["fingerprint"] for k in second["kept_in_use"]] == [_fp("b")]
    assert "live process" in second["kept_in_use"][0]["reason"] and second["total_after"] == size["b"] + size["e"]
    assert not [name for name in os.listdir(cache) if name.startswith(_fp("c"))]
    # Under 0 bytes: b is in use, e was written under RECENT_S ago (a run may be starting on it): both stay.
    held = json.loads(launch_here("cache", "prune", "--max-size", "0", "--json", *_cache_args(cache)).stdout)
    assert not held["removed"] and [k["fingerprint"] for k in held["kept_in_use"]] == [_fp("b"), _fp("e")]
    assert "s ago, under 600 s" in held["kept_in_use"][1]["reason"] and held["total_after"] == size["b"] + size["e"]
    # --force removes what is in use; a size in GiB is read as 2^30 bytes.
    third = json.loads(launch_here("cache", "prune", "--max-size", "0GiB", "--force", "--json",
                                   *_cache_args(cache)).stdout)
    assert [e["fingerprint"] for e in third["removed"]] == [_fp("b"), _fp("e")] and os.listdir(cache) == []


def test_sizes_read_as_decimal_or_binary_units_and_a_bad_one_is_refused_by_name(tmp_path):
    assert cache_admin.parse_size("50GB") == 50 * 10**9 and cache_admin.parse_size("50GiB") == 53_687_091_200
    assert cache_admin.parse_size("1.5 mb") == 1_500_000 and cache_admin.parse_size("512") == 512
    for bad in ("50 gigs", "GB", "-1GB", "50G"):
        refused = launch_here("cache", "prune", f"--max-size={bad}", *_cache_args(tmp_path / "cache"))
        assert refused.returncode == 2 and f"--max-size {bad!r} is not a size" in refused.stderr
    refused = launch_here("cache", "prune", *_cache_args(tmp_path / "cache"))
    assert refused.returncode == 2 and "--keep-last N, --max-size SIZE" in refused.stderr


KILLED_PRUNE = """
import os, shutil, signal, sys
from pipeline import cache_admin
def kill(*args): os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[2] == "before_delete":
    shutil.rmtree = kill  # every rename done, nothing deleted
else:
    rename = os.rename  # the folder renamed, the file beside it not
    os.rename = lambda *a: (rename(*a), setattr(os, "rename", kill))
entry, = cache_admin.list_entries(sys.argv[1])
cache_admin.remove_entry(sys.argv[1], entry)
"""


@pytest.mark.parametrize("killed", ["before_delete", "between_renames"])
def test_a_killed_prune_leaves_nothing_the_data_stage_takes_for_a_complete_entry(tmp_path, killed):
    cache = str(tmp_path / "cache")
    _entry(cache, _fp("a"), 25, time.time() - DAY, beside=True, uses=[(DAY, "/runs/a", "/d", "elsewhere", 1)])
    beside = os.path.join(cache, f"{_fp('a')}-scored-aaaa-steps-bbbb.parquet")
    child = subprocess.Popen([sys.executable, "-c", KILLED_PRUNE, cache, killed], cwd=ROOT, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert child.wait(timeout=60) == -9, child.stderr.read()
    # The data stage (pipeline/data/checks.py) reuses a folder only where <fingerprint>/report.json is.
    assert not os.path.exists(os.path.join(cache, _fp("a"), "report.json"))
    trash = os.path.join(cache, f"{_fp('a')}.pruning.tmp-{HOST}-{child.pid}")
    assert os.path.exists(os.path.join(trash, _fp("a"), "report.json"))  # moved whole, not half deleted
    if killed == "before_delete":
        assert cache_admin.list_entries(cache) == []
    else:  # the file beside it is still whole under its name (with the usage record): no data stage folder
        assert [e.paths for e in cache_admin.list_entries(cache)] == [[beside, os.path.join(cache, _fp("a") +
                                                                                            ".uses.json")]]
        assert pq.read_table(beside).num_rows == 3
    # The next prune removes what the killed one left (its pid is dead), and keeps the rest.
    result = cache_admin.prune(cache, keep_last=10)
    assert result["leftovers"] == [trash] and not os.path.exists(trash) and not result["removed"]


def test_usage_records_keep_the_last_runs_one_record_a_run(tmp_path):
    cache = tmp_path / "cache"
    folder = str(cache / _fp("a"))
    _entry(str(cache), _fp("a"), 5, time.time())
    for run in range(cache_admin.USES_KEPT + 2):
        cache_admin.record_use(folder, str(tmp_path / f"run-{run}"), str(tmp_path / "data"))
    cache_admin.record_use(folder, str(tmp_path / "run-5"), str(tmp_path / "data"))  # used again: moves to the front
    with open(cache / f"{_fp('a')}.uses.json") as f:
        record = json.load(f)
    runs = [os.path.basename(use["run_dir"]) for use in record["uses"]]
    assert runs == ["run-5"] + [f"run-{n}" for n in range(21, 1, -1) if n != 5][:cache_admin.USES_KEPT - 1]
    assert {(use["host"], use["pid"], use["data_path"]) for use in record["uses"]} == {
        (HOST, os.getpid(), str(tmp_path / "data"))}
    assert sorted(os.listdir(cache)) == [_fp("a"), f"{_fp('a')}.uses.json"]  # no staging file left
    # A record that is not what record_use writes is not trusted, and the next use writes it afresh.
    (cache / f"{_fp('a')}.uses.json").write_text('{"uses": [{"time": "yesterday"}]}')
    assert cache_admin.list_entries(str(cache))[0].uses is None
    cache_admin.record_use(folder, str(tmp_path / "run-x"), str(tmp_path / "data"))
    assert [use["run_dir"] for use in cache_admin.list_entries(str(cache))[0].uses] == [str(tmp_path / "run-x")]


def test_a_registry_prunes_the_entries_only_its_discarded_cycles_made_from_their_own_feedback(tmp_path):
    registry, cache = str(tmp_path / "registry"), str(tmp_path / "cache")
    ledger = Ledger(os.path.join(registry, "ledger.sqlite"), str(tmp_path / "feedback"))
    statuses = {}
    for status in ("promoted", "rejected", "failed", "running"):
        cycle_id = ledger.begin("base", "base")
        if status != "running":
            ledger.finish(cycle_id, status, reason=None if status == "promoted" else "a reason")
        statuses[cycle_id] = status
    assert statuses == {1: "promoted", 2: "rejected", 3: "failed", 4: "running"}

    def used(letter: str, *runs: tuple[str, str]) -> None:
        _entry(cache, _fp(letter), 4, time.time())
        for run_dir, data in runs:
            cache_admin.record_use(os.path.join(cache, _fp(letter)), run_dir, data)

    cycle = {n: cycle_dir(registry, n) for n in statuses}
    feedback = {n: os.path.join(cycle[n], "feedback") for n in statuses}
    eval_set = str(tmp_path / "held_out.parquet")
    used("a", (cycle[1], feedback[1]))  # the promoted cycle's training data
    used("b", (cycle[2], feedback[2]))  # the rejected cycle's: goes
    used("c", (cycle[3], feedback[3]))  # the failed cycle's: goes
    used("d", (cycle[2], eval_set), (cycle[3], eval_set))  # an eval set outside the cycles: the next cycle reads it
    used("e", (cycle[2], feedback[2]), (str(tmp_path / "runs" / "mine"), feedback[2]))  # also used by another run
    used("f", (cycle[4], feedback[4]))  # a cycle still running
    used("7", (cycle_dir(str(tmp_path / "other-registry"), 2), os.path.join(  # another registry's cycle 2
        cycle_dir(str(tmp_path / "other-registry"), 2), "feedback")))
    used("8", (cycle[2], feedback[2]))  # the rejected cycle's, but a live writer is scoring into it
    _write(staging_name(os.path.join(cache, _fp("8"), "held_out-scored-1.parquet")), b"partial", time.time())
    _entry(cache, _fp("9"), 4, time.time())  # no usage record: nothing says who used it

    removed = prune_reference_cache(cache, registry, ledger.cycles())
    assert sorted(removed) == [_fp("b"), _fp("c")]
    assert sorted(e.fingerprint for e in cache_admin.list_entries(cache)) == [_fp(x) for x in "789adef"]
    assert not [name for name in os.listdir(cache) if name.startswith((_fp("b"), _fp("c")))]
    assert prune_reference_cache(cache, registry, ledger.cycles()) == []  # idempotent
    ledger.close()
