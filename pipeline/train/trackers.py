"""Where rank 0 records each step's metrics as the run goes: `metrics.jsonl` (one JSON line a step)
and, as `output.report_to` lists them, TensorBoard event files, an MLflow run and a W&B run, all
under the same names.

MLflow and W&B are imported only when listed, and take their destination from their own
environment variables (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME; WANDB_PROJECT, WANDB_MODE,
WANDB_API_KEY, ...), so nothing leaves the machine unless the user configured it to.

On resume the record restarts from the checkpoint's copy of the metrics, so each step appears once:
metrics.jsonl is rewritten, TensorBoard is told to purge events from the first step run again, and
the MLflow and W&B runs named in the checkpoint (`tracking_ids`) are continued, not started anew.
"""

import json
import numbers
import os

REPORTERS = ("tensorboard", "mlflow", "wandb")
TRACKERS = ("mlflow", "wandb")  # reporters that are pyproject extras, configured by their own variables
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}
PROJECT = "ray-kto"  # the MLflow experiment and W&B project when their variables name none


class MetricsLog:
    """Rank 0's record of the run's metrics: every step in metrics.jsonl; every
    `training.logging_steps`-th step, the last, and every step with eval/ metrics in the trackers."""

    def __init__(self, config, history: list[str], start_step: int, total_steps: int, tracking_ids: dict):
        run_dir, report_to, run_name = config.run_dir, config.output.report_to, config.output.run_name
        params = config.to_dict()
        self.every, self.total_steps = config.training.logging_steps, total_steps
        self.path = os.path.join(run_dir, "metrics.jsonl")
        with open(self.path, "w") as f:
            f.writelines(history)
        self.tracking_ids = dict(tracking_ids)
        self.tensorboard = self.mlflow = self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter  # here: only runs that report to it need it

            self.tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1)
        if "mlflow" in report_to:
            import mlflow

            if "MLFLOW_EXPERIMENT_NAME" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ:
                mlflow.set_experiment(PROJECT)
            resumed = "mlflow" in self.tracking_ids
            run = mlflow.start_run(run_id=self.tracking_ids.get("mlflow"), run_name=run_name)
            if not resumed:
                mlflow.log_params({key: str(value) for key, value in _flat(params).items()})
            self.mlflow, self.tracking_ids["mlflow"] = mlflow, run.info.run_id
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, config=params,
                                    dir=run_dir, id=self.tracking_ids.get("wandb"), resume="allow")
            self.tracking_ids["wandb"] = self.wandb.id

    def write(self, line: str, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(line)
        step = metrics["step"]
        if step % self.every and step != self.total_steps and not any(name.startswith("eval/") for name in metrics):
            return
        scalars = {name: value for name, value in metrics.items()
                   if name != "step" and isinstance(value, numbers.Number) and not isinstance(value, bool)}
        if self.tensorboard:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()
        if self.mlflow:
            self.mlflow.log_metrics(scalars, step=step)
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.mlflow:
            self.mlflow.end_run()
        if self.wandb:
            self.wandb.finish()


def _flat(params: dict, prefix: str = "") -> dict:
    """{'kto': {'beta': 0.1}} -> {'kto.beta': 0.1}: MLflow parameters are flat."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def peak_rss_mib() -> int:
    """This process's peak resident memory, MiB: VmHWM where Linux reports it. (getrusage's
    ru_maxrss is no good here: a process started by fork and exec inherits its parent's peak.)"""
    try:
        with open("/proc/self/status") as f:
            return round(int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024)
    except (OSError, StopIteration):
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def missing_reporters(report_to: list[str]) -> list[str]:
    """The pip packages that `report_to` needs and this Python lacks (checked once, on the driver)."""
    import importlib.util

    return [PACKAGES[name] for name in report_to if importlib.util.find_spec(name) is None]


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
