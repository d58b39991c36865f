"""Progress on the driver's terminal, one bar a stage: rows read, rows scored (with rows/s), training
steps (with loss and ETA). Silent when stderr is not a terminal (log files, CI, Ray jobs), where the
stages' own log lines say what happened."""

import json
import logging
import os
import sys
import threading

from tqdm import tqdm


def bar(description: str, total: int | None = None, unit: str = "rows") -> tqdm:
    return tqdm(total=total, desc=description, unit=unit, unit_scale=True, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


# Variables that quiet_ray sets on the driver and the run's runtime environment hands to every Ray process.
QUIET_VARIABLES = ("HF_HUB_DISABLE_PROGRESS_BARS",)
_quiet = False


def quiet_ray() -> None:
    """Keep Ray Data's per-operator progress, Ray's INFO lines and every process's model-loading
    bars out of the user's way (--verbose shows them)."""
    global _quiet
    import ray.data

    _quiet = True
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' "Loading weights" bars, on every worker
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # Notices that read like faults: "Token authentication is enabled for this Ray cluster" and
    # "Progress bars disabled" (as asked, just above).
    for name in ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress"):
        logging.getLogger(name).setLevel(logging.ERROR)


def ray_log_level() -> int:
    """The level of Ray's own console lines: the driver's `ray` logger (ray.init) and Ray Train's
    controller and workers (RunConfig's logging_config). Quiet: warnings and errors only. The
    workers' own output and errors still reach the console."""
    return logging.WARNING if _quiet else logging.INFO


class StepProgress:
    """Follows rank 0's metrics.jsonl while Ray Train runs (where the driver sees the run directory:
    one machine, or a shared filesystem), as a bar of steps with the latest loss and the ETA."""

    def __init__(self, run_dir: str, total_steps: int):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.bar = bar("training", total=total_steps, unit="steps")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self):
        if not self.bar.disable:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        self.bar.close()

    def _follow(self) -> None:
        while not self.stop.wait(1.0):
            try:
                with open(self.path) as f:
                    lines = [json.loads(line) for line in f if line.strip()]
            except (OSError, ValueError):  # not there yet, or a line being written
                continue
            if lines:
                self.bar.n = lines[-1]["step"]
                self.bar.set_postfix(loss=f"{lines[-1]['loss']:.4f}", kl=f"{lines[-1]['kl']:.3g}", refresh=True)
