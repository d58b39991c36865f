"""`launch.py schedule --cron EXPR`: run `launch.py retrain` at each cron time, one cycle at a
time, until SIGTERM or SIGINT.

Each cycle is a child process, so a cycle's Ray instance, memory and any crash stay its own; the
registry's lock still refuses a cycle that some other scheduler started. Fire times missed while
a cycle ran are skipped, not caught up (like a Kubernetes CronJob with concurrencyPolicy: Forbid):
the next cycle sees all the feedback that arrived meanwhile anyway.

Stopping the scheduler (SIGTERM, or SIGINT) stops the running cycle: SIGTERM, on which a cycle
records itself as failed and releases the registry's lock; a cycle that ignores it for `grace_s`
(a hang) is killed with its whole process group, so that neither the scheduler nor a pod's
termination waits forever; the next cycle takes over the lock of a dead process at once. Each
cycle runs in a session of its own, so a terminal's Ctrl-C reaches the scheduler only, which stops
the cycle as above.
"""

import logging
import os
import signal
import subprocess
import sys
import threading
from datetime import datetime

from croniter import croniter

from pipeline.config import ConfigError

log = logging.getLogger("kto")

SIGTERM_GRACE_S = 60.0  # a cycle's time, after SIGTERM, to record itself failed and release the lock


def run_schedule(cron: str, retrain_command: list[str], grace_s: float = SIGTERM_GRACE_S) -> int:
    if not croniter.is_valid(cron):
        raise ConfigError(f"--cron {cron!r} is not a cron expression (minute hour day month weekday, "
                         "e.g. '0 3 * * *'; a sixth field counts seconds)")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    cycles = 0
    while not stop.is_set():
        now = datetime.now().astimezone()
        fire = croniter(cron, now).get_next(datetime)
        log.info("next retrain cycle at %s", fire.isoformat(timespec="seconds"))
        if stop.wait((fire - now).total_seconds()):
            break
        cycles += 1
        log.info("cycle %d: %s", cycles, " ".join(retrain_command))
        child = subprocess.Popen(retrain_command, start_new_session=True)
        log.info("cycle %d exited with %d", cycles, wait_for_cycle(child, stop, grace_s))
    log.info("scheduler stopped after %d cycles", cycles)
    return 0


def wait_for_cycle(child: subprocess.Popen, stop: threading.Event, grace_s: float = SIGTERM_GRACE_S) -> int:
    """The cycle's exit status. Once `stop` is set: SIGTERM to the cycle, then, if it has not exited
    after grace_s, SIGKILL to its process group (the child must lead one: start_new_session=True)."""
    while child.poll() is None:
        if stop.wait(0.5):
            log.info("stopping: SIGTERM to the running cycle (pid %d); it records itself as failed", child.pid)
            child.send_signal(signal.SIGTERM)
            try:
                return child.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.error("the cycle (pid %d) ignored SIGTERM for %g s: SIGKILL to it and its processes; the next "
                          "cycle records it as failed and takes over its lock", child.pid, grace_s)
                os.killpg(child.pid, signal.SIGKILL)
                return child.wait()
    return child.returncode


def retrain_command(launch_py: str, config: str, overrides: list[str]) -> list[str]:
    return [sys.executable, launch_py, "retrain", "--config", config, *[f"--set={o}" for o in overrides]]
