"""The retraining lock and the scheduler's stop, with real processes: racing takeovers, killed and
stopped (SIGSTOP) owners, empty and garbage lock files, a removed lease, a broken guard, and a cycle
that ignores SIGTERM. No Ray: the fast tier."""

import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline.retrain.cron import wait_for_cycle
from pipeline.retrain.lock import LockHeld, LockLost, RetrainLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDER = """
import sys
from pipeline.retrain.lock import LockLost, RetrainLock
try:
    with RetrainLock(sys.argv[1], float(sys.argv[2])) as lock:
        print("held", flush=True)
        sys.stdin.readline()
except LockLost as error:
    print("LockLost:", error, flush=True)
"""


def start_holder(path: str, stale_after_s: float) -> subprocess.Popen:
    """A real process that takes the lock, says so, and holds it until a line arrives on its stdin."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, path, str(stale_after_s)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline() == "held\n"
    return holder


def backdate(path: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.fixture
def killed_owners_lease(tmp_path) -> bytes:
    """The bytes of a lease whose owner, a real process on this machine, was SIGKILLed."""
    path = str(tmp_path / "killed" / "retrain.lock")
    holder = start_holder(path, 600)
    holder.kill()
    holder.wait()
    with open(path, "rb") as f:
        return f.read()


def test_a_live_owner_is_refused_by_name_and_a_killed_one_is_taken_over_at_once(tmp_path):
    path = str(tmp_path / "retrain.lock")
    holder = start_holder(path, 600)
    with pytest.raises(LockHeld, match=rf"pid {holder.pid} on {socket.gethostname()}, .* heartbeat 0 s ago .*"
                                       r"retrain.lock_stale_after_s = 600 s"):
        RetrainLock(path, stale_after_s=600).__enter__()
    holder.kill()
    holder.wait()
    with RetrainLock(path, stale_after_s=600) as lock:
        assert lock.recovered["pid"] == holder.pid and lock.recovered["why"] == "its process had died"
        assert lock.recovered["host"] == socket.gethostname() and lock.recovered["heartbeat_age_s"] < 600
        assert json.load(open(path))["pid"] == os.getpid()
    assert not os.path.exists(path)  # released on exit


def test_an_owner_on_another_host_is_judged_by_its_heartbeat_and_an_old_format_lease_is_understood(tmp_path):
    path = str(tmp_path / "retrain.lock")
    with open(path, "w") as f:  # a pid on another host is never looked up here
        json.dump({"token": "t", "host": "elsewhere", "machine": "elsewhere", "pid": 1, "since": time.time()}, f)
    with pytest.raises(LockHeld, match="pid 1 on elsewhere, .* heartbeat 0 s ago"):
        RetrainLock(path, stale_after_s=600).__enter__()
    backdate(path, 1200)  # its heartbeat stopped 20 minutes ago
    with RetrainLock(path, stale_after_s=600) as lock:
        assert lock.recovered["host"] == "elsewhere" and lock.recovered["why"] == "no heartbeat for 1200 s"

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(path, "w") as f:  # as the lock before this module wrote it: host, pid, since
        json.dump({"host": socket.gethostname(), "pid": int(finished.stdout), "since": time.time()}, f)
    with RetrainLock(path, stale_after_s=600) as lock:
        assert lock.recovered["pid"] == int(finished.stdout) and lock.recovered["why"] == "its process had died"


def test_empty_and_garbage_lock_files_are_judged_by_age(tmp_path):
    path = str(tmp_path / "retrain.lock")
    for content, what in [(b"", "is empty"), (b"\x00\xff{not json", "holds no owner record")]:
        with open(path, "wb") as f:
            f.write(content)
        with pytest.raises(LockHeld, match=f"the lock file {path} {what}.* last written 0 s ago.* delete it"):
            RetrainLock(path, stale_after_s=600).__enter__()
        backdate(path, 601)
        with RetrainLock(path, stale_after_s=600) as lock:
            assert what in lock.recovered["why"] and lock.recovered["pid"] is None
            assert lock.recovered["heartbeat_age_s"] >= 600
        assert not os.path.exists(path)


def _racer(path: str, stale_after_s: float, repetitions: int, barrier, results) -> None:
    for repetition in range(repetitions):
        barrier.wait()  # the parent has planted a stale lease
        try:
            lock, outcome = RetrainLock(path, stale_after_s).__enter__(), "won"
        except Exception as error:  # LockHeld expected; anything else is a failure the parent reports
            lock, outcome = None, f"{type(error).__name__}: {error}"
        barrier.wait()  # every racer has tried while the winner still holds the lock
        if lock is not None:
            with open(path) as f:
                outcome += " holding" if json.load(f)["token"] == lock.token else " NOT holding"
            lock.__exit__(None, None, None)
        results.put((repetition, os.getpid(), outcome))
        barrier.wait()  # released


def test_racing_takeovers_of_a_stale_lock_have_exactly_one_winner_every_time(tmp_path, killed_owners_lease):
    """8 processes race for one stale lease, 100 times, four kinds of stale: an owner on this machine
    that was killed, a silent owner on another host, an empty and a garbage lock file, both old."""
    path, racers, repetitions = str(tmp_path / "retrain.lock"), 8, 100
    silent = json.dumps({"token": "t", "host": "elsewhere", "machine": "elsewhere", "pid": 1, "since": 0}).encode()
    stale_leases = [(killed_owners_lease, 0), (silent, 1200), (b"", 1200), (b"\x00garbage", 1200)]
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(racers + 1, timeout=30), context.Queue()
    processes = [context.Process(target=_racer, args=(path, 600, repetitions, barrier, results))
                 for _ in range(racers)]
    for process in processes:
        process.start()
    for repetition in range(repetitions):
        content, age = stale_leases[repetition % len(stale_leases)]
        with open(path, "wb") as f:
            f.write(content)
        backdate(path, age)
        for _ in range(3):
            barrier.wait()
        outcomes = {pid: outcome for _, pid, outcome in (results.get(timeout=30) for _ in range(racers))}
        winners = [pid for pid, outcome in outcomes.items() if outcome.startswith("won")]
        assert len(winners) == 1, (repetition, outcomes)
        assert outcomes[winners[0]] == "won holding", (repetition, outcomes)
        refusal = f"LockHeld: another retrain cycle is running: pid {winners[0]} on {socket.gethostname()}"
        assert all(o.startswith(refusal) for pid, o in outcomes.items() if pid != winners[0]), (repetition, outcomes)
        assert not os.path.exists(path)  # the winner's release removed its own lease
    for process in processes:
        process.join(10)
        assert process.exitcode == 0


def test_a_stopped_owner_is_taken_over_and_its_release_leaves_the_new_owners_lock(tmp_path):
    """SIGSTOP an owner past the stale age (a hang), take its lock, resume it: it learns that it lost
    the lock (LockLost, naming the new owner) and never deletes the new owner's lease."""
    path = str(tmp_path / "retrain.lock")
    holder = start_holder(path, 1.0)
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        time.sleep(1.3)
        with RetrainLock(path, stale_after_s=1.0) as lock:
            assert lock.recovered["pid"] == holder.pid and lock.recovered["why"].startswith("no heartbeat for")
            os.kill(holder.pid, signal.SIGCONT)
            said, _ = holder.communicate("go\n", timeout=20)
            assert said.startswith(f"LockLost: the retrain lock {path} was lost: ")
            assert f"holds another owner: pid {os.getpid()} on {socket.gethostname()}" in said
            assert json.load(open(path))["token"] == lock.token  # still ours
            assert lock.lost is None
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
            holder.wait()
    assert not os.path.exists(path)


def test_the_heartbeat_keeps_a_lock_fresh_and_reports_a_failure_to_refresh(tmp_path, caplog):
    path = str(tmp_path / "retrain.lock")
    with RetrainLock(path, stale_after_s=1.0):
        time.sleep(2.0)  # twice the stale age
        with pytest.raises(LockHeld, match=rf"pid {os.getpid()} .* heartbeat 0 s ago"):
            RetrainLock(path, stale_after_s=1.0).__enter__()

    caplog.set_level(logging.ERROR, logger="kto")
    with pytest.raises(LockLost, match="the lock file was removed"):
        with RetrainLock(path, stale_after_s=1.0) as lock:
            os.unlink(path)  # someone removed the lease
            time.sleep(0.6)
            assert lock.lost == "the lock file was removed"  # learnt from the heartbeat, before the exit
            with pytest.raises(LockLost):
                lock.check()
    assert f"retrain lock {path} lost: the lock file was removed" in caplog.text

    caplog.clear()
    with pytest.raises(LockLost, match=f"could not release it: .*{path}.guard"):
        with RetrainLock(path, stale_after_s=1.0) as lock:
            os.unlink(f"{path}.guard")
            os.mkdir(f"{path}.guard")  # the guard cannot be opened: no refresh can succeed
            time.sleep(1.5)
            assert re.match(r"no heartbeat could be written for \d s \(last error: .*Is a directory", lock.lost)
    assert caplog.text.count(f"could not refresh the retrain lock {path} (IsADirectoryError") >= 2


def test_a_heartbeat_stuck_on_the_volume_is_caught_by_check(tmp_path):
    """The lease becomes a FIFO without a writer: the heartbeat's open() blocks, as on a hard-mounted NFS
    server that went away. check() sees the silence without the heartbeat's help."""
    path = str(tmp_path / "retrain.lock")
    with pytest.raises(LockLost):
        with RetrainLock(path, stale_after_s=1.0) as lock:
            os.mkfifo(f"{path}.fifo")
            os.replace(f"{path}.fifo", path)
            time.sleep(1.0)
            with pytest.raises(LockLost, match=r"was lost: no heartbeat for \d s \(the heartbeat is stuck\)"):
                lock.check()
            writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # the stuck open() returns ...
            os.unlink(path)
            os.close(writer)  # ... and reads an empty lease


CYCLE = """
import signal, subprocess, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(grandchild.pid, flush=True)
time.sleep(60)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _ends(pid: int, within_s: float = 5) -> bool:
    deadline = time.monotonic() + within_s
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _running(pid)


@pytest.mark.parametrize("on_sigterm, returncode", [("ignore", -signal.SIGKILL), ("exit", -signal.SIGTERM)])
def test_the_scheduler_kills_a_cycle_that_ignores_sigterm_after_the_grace_period(on_sigterm, returncode):
    cycle = subprocess.Popen([sys.executable, "-c", CYCLE, on_sigterm], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    grandchild = int(cycle.stdout.readline())
    stop = threading.Event()
    stop.set()  # the scheduler got SIGTERM
    started = time.monotonic()
    try:
        assert wait_for_cycle(cycle, stop, grace_s=1.0) == returncode
        took = time.monotonic() - started
        if on_sigterm == "ignore":
            assert 1.0 <= took < 5, took
            assert _ends(grandchild)  # its process group went with it
        else:
            assert took < 1.0, took
    finally:
        cycle.kill()
        if _running(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def test_a_stopped_scheduler_stops_its_cycle_and_kills_the_cycle_that_ignores_sigterm():
    """launch.py schedule's loop in a real process, a cycle each second: SIGTERM to the scheduler reaches
    the cycle, which ignores it, and the scheduler kills it (and its child) after the grace period."""
    program = ("import json, sys; from pipeline.retrain.cron import run_schedule; "
               "sys.exit(run_schedule('* * * * * *', json.loads(sys.argv[1]), grace_s=1.0))")
    scheduler = subprocess.Popen([sys.executable, "-c", program, json.dumps([sys.executable, "-c", CYCLE, "ignore"])],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    grandchild = int(scheduler.stdout.readline())  # a cycle runs
    started = time.monotonic()
    scheduler.send_signal(signal.SIGTERM)
    _, said = scheduler.communicate(timeout=20)
    assert scheduler.returncode == 0 and 1.0 <= time.monotonic() - started < 5
    cycle = int(re.search(r"the cycle \(pid (\d+)\) ignored SIGTERM for 1 s: SIGKILL", said)[1])
    assert _ends(cycle) and _ends(grandchild)
