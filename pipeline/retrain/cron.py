"""`launch.py schedule --cron EXPR`: run `launch.py retrain` at each cron time, one cycle at a
time, until SIGTERM or SIGINT.

Each cycle is a child process, so a cycle's Ray instance, memory and any crash stay its own; the
registry's lock still refuses a cycle that some other scheduler started. Fire times missed while
a cycle ran are skipped, not caught up (like a Kubernetes CronJob with concurrencyPolicy: Forbid):
the next cycle sees all the feedback that arrived meanwhile anyway.
"""

import logging
import signal
import subprocess
import sys
import threading
from datetime import datetime

from croniter import croniter

from pipeline.config import ConfigError

log = logging.getLogger("kto")


def run_schedule(cron: str, retrain_command: list[str]) -> int:
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
        child = subprocess.Popen(retrain_command)
        while child.poll() is None:
            if stop.wait(0.5):
                log.info("stopping: SIGTERM to the running cycle (pid %d); it records itself as failed", child.pid)
                child.send_signal(signal.SIGTERM)
                child.wait()
        log.info("cycle %d exited with %d", cycles, child.returncode)
    log.info("scheduler stopped after %d cycles", cycles)
    return 0


def retrain_command(launch_py: str, config: str, overrides: list[str]) -> list[str]:
    return [sys.executable, launch_py, "retrain", "--config", config, *[f"--set={o}" for o in overrides]]
