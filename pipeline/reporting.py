"""Where rank 0 records each step's metrics as the run goes: `metrics.jsonl` (one JSON line a step)
and TensorBoard event files under the same names (`output.report_to`).

On resume the record restarts from the checkpoint's copy of the metrics, so each step appears once:
metrics.jsonl is rewritten, and TensorBoard is told to purge events from the first step run again.
"""

import json
import numbers
import os

REPORTERS = ("tensorboard",)


class MetricsLog:
    def __init__(self, run_dir: str, history: list[str], start_step: int, report_to: list[str]):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        with open(self.path, "w") as f:
            f.writelines(history)
        self.tensorboard = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter  # here: only runs that report to it need it

            self.tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1)

    def write(self, line: str, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(line)
        if self.tensorboard:
            for name, value in metrics.items():
                if name != "step" and isinstance(value, numbers.Number):
                    self.tensorboard.add_scalar(name, value, metrics["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
