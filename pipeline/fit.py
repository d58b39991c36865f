"""The Ray Train run of `launch.py train`: where its checkpoints live, whether it resumes, the
TorchTrainer over the workers (pipeline/train/worker.py), and what the driver takes from its last
checkpoint. Also the deletion of a finished run's checkpoints (retraining cycles)."""

import contextlib
import dataclasses
import getpass
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import pyarrow.fs as pafs
import yaml

from pipeline.config import Config, ConfigError
from pipeline.console import StepProgress, ray_log_level
from pipeline.train import checkpoint
from pipeline.train.checkpoint import TrainerState

log = logging.getLogger("kto")


# The file, in the run's checkpoint folder (checkpoint_storage), by which the workers stop a run
# that must not go on: the driver reads it once Ray Train returns and stops with its message (exit 3).
# Raising instead would make Ray Train restart the workers scaling.max_failures times (forever
# with -1), each restart failing at the same step: the failure is in the data, not the machine.
STOP_FILE = "stopped.json"


class TrainingStopped(RuntimeError):
    """The workers stopped the run on purpose before applying an update (a NaN or infinite loss or
    gradient, pipeline/train/step.py); the last good checkpoint is kept. A restart would fail at the
    same step, so it is not retried: launch.py exits 3 with the message."""


def write_stop(config: Config, message: str) -> None:
    """Rank 0 leaves the run's reason to stop where the driver looks for it."""
    filesystem, folder, _ = checkpoint_storage(config)
    filesystem.create_dir(folder, recursive=True)
    with filesystem.open_output_stream(f"{folder}/{STOP_FILE}") as out:
        out.write(json.dumps({"error": message}).encode())
    print(f"error: {message}", flush=True)


def take_stop(config: Config) -> Optional[str]:
    """The workers' reason to stop the run, if they left one; removed once read."""
    filesystem, folder, _ = checkpoint_storage(config)
    path = f"{folder}/{STOP_FILE}"
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(path) as source:
        message = json.loads(source.read())["error"]
    filesystem.delete_file(path)
    return message


class DriftError(RuntimeError):
    """The cached reference log-probs are too far from the trainer's own at step 0 (the workers'
    check, pipeline/train/drift.py, stops before any update and says by how much)."""


@dataclass
class WorkerPlan:
    """What the driver's stages decided for the workers, beside the run's Config."""
    model_path: str  # the policy's initial weights (a local folder)
    reference_path: str
    scored_path: str  # the scored training rows (Parquet)
    eval_scored_path: Optional[str]  # the scored held-out rows, if any
    steps_path: str  # the scheduled rows in training order (pipeline/data/step_file.py)
    pad_token_id: int
    desirable_weight: float  # kto.desirable_weight, `auto` resolved from the label counts
    ray_log_level: int = logging.INFO  # Ray Train's console lines (console.ray_log_level: WARNING unless --verbose)

    def loop_config(self, config: Config) -> dict:
        """Ray Train's train_loop_config: plain values, rebuilt into typed objects on each worker."""
        return {"config": config.to_dict(), "plan": dataclasses.asdict(self)}


def train_loop(loop_config: dict) -> None:
    """Ray Train's worker function, pipeline/train/worker.py. Imported here, in the worker: the
    driver (and Ray Train's controller) never import torch, transformers or DeepSpeed for it."""
    from pipeline.train.worker import train_loop_per_worker

    train_loop_per_worker(loop_config)


def checkpoint_storage(config: Config) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, folder of this run's checkpoints, Ray's storage_path): local by default, or
    `output.storage_path` (a path every node reaches, or s3:// / gs://) / run_name."""
    if not config.output.storage_path:
        return pafs.LocalFileSystem(), os.path.join(config.run_dir, "ray_train"), config.run_dir
    storage = config.output.storage_path
    filesystem, root = pafs.FileSystem.from_uri(storage if "://" in storage else os.path.abspath(storage))
    return filesystem, f"{root.rstrip('/')}/{config.output.run_name}", storage


def check_resumable(config: Config) -> bool:
    """True when the run continues from its checkpoints: same run, run name, storage and training
    config. A changed config would silently mix two runs, so it stops with the first difference.
    The storage folder is claimed for this run first (its owner record, below): another run's
    checkpoints are never resumed, delivered or deleted."""
    filesystem, folder, _ = checkpoint_storage(config)
    me = run_identity(config)
    claim_storage(config, filesystem, folder, me)
    entries = filesystem.get_file_info(pafs.FileSelector(folder))
    if not any(e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_") for e in entries):
        return False  # an earlier attempt stopped before its first checkpoint: nothing to continue
    if not config.output.resume:
        log.info("output.resume is false: deleting the checkpoints of the previous run in %s", folder)
        filesystem.delete_dir(folder)
        claim_storage(config, filesystem, folder, me)
        return False
    saved_path = os.path.join(config.run_dir, "config.yaml")
    if os.path.exists(saved_path):
        with open(saved_path) as f:
            saved = yaml.safe_load(f)
        for section, values in config.to_dict().items():
            for key, value in values.items():
                if (section, key) not in RESUMABLE_CHANGES and saved.get(section, {}).get(key) != value:
                    raise ConfigError(
                        f"run '{config.output.run_name}' has checkpoints in {folder} from a run with "
                        f"{section}.{key} = {saved.get(section, {}).get(key)!r}, now {value!r}: resuming would mix two "
                        "runs. Use a new output.run_name, or --set output.resume=false to start this one over.")
    log.info("resuming run '%s' from its latest checkpoint in %s", config.output.run_name, folder)
    return True


def delete_checkpoints(config: Config) -> None:
    """A finished run's Ray Train checkpoints (optimizer states included), once its run directory
    holds the result; refused (ConfigError) when another run owns the folder."""
    filesystem, folder, _ = checkpoint_storage(config)
    if filesystem.get_file_info(folder).type != pafs.FileType.NotFound:
        check_owner(config, filesystem, folder, run_identity(config))
        filesystem.delete_dir(folder)


# What may change between attempts of one run: where the driver connects, how often a run may fail.
RESUMABLE_CHANGES = {("scaling", "address"), ("scaling", "max_failures"), ("output", "resume")}
OWNER, RUN_ID = "OWNER.json", "run_id"


def run_identity(config: Config) -> dict:
    """Who this run is: the id in its run directory (made on its first start), the run directory,
    and a hash of its training config; with the host and user, for the messages."""
    os.makedirs(config.run_dir, exist_ok=True)
    path = os.path.join(config.run_dir, RUN_ID)
    if not os.path.exists(path):
        with open(path, "x") as f:
            f.write(uuid.uuid4().hex)
    with open(path) as f:
        run_id = f.read().strip()
    training = {f"{section}.{key}": value for section, values in config.to_dict().items()
                for key, value in values.items() if (section, key) not in RESUMABLE_CHANGES}
    config_hash = hashlib.sha256(json.dumps(training, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"run_id": run_id, "run_dir": config.run_dir, "config_hash": config_hash,
            "host": socket.gethostname(), "user": _user()}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        return str(os.getuid())


def claim_storage(config: Config, filesystem: pafs.FileSystem, folder: str, me: dict) -> None:
    """Write this run's owner record into its checkpoint folder (pyarrow.fs: local, NFS, s3://, gs://),
    or check the one there (check_owner). Read back after writing: of two runs that claim one folder
    in the same moment, the one whose record was overwritten stops here."""
    if filesystem.get_file_info(f"{folder}/{OWNER}").type == pafs.FileType.NotFound:
        check_owner(config, filesystem, folder, me)  # (ownerless checkpoints of an older version)
        filesystem.create_dir(folder, recursive=True)
        with filesystem.open_output_stream(f"{folder}/{OWNER}") as f:
            f.write(json.dumps(me, indent=2).encode())
    check_owner(config, filesystem, folder, me)


def check_owner(config: Config, filesystem: pafs.FileSystem, folder: str, me: dict) -> None:
    """Refuse (ConfigError, naming both runs) a checkpoint folder whose owner record names another
    run: another run directory (another registry, another user's output_dir) or, in the same
    path, another run id (a run directory made afresh, on this host or another). A folder without a
    record but with checkpoints (an older version's) is this run's only if its run directory has
    run before (its config.yaml)."""
    try:
        with filesystem.open_input_stream(f"{folder}/{OWNER}") as f:
            owner = json.loads(f.read())
    except FileNotFoundError:
        entries = (filesystem.get_file_info(pafs.FileSelector(folder))
                   if filesystem.get_file_info(folder).type == pafs.FileType.Directory else [])
        if any(e.base_name.startswith("checkpoint_") for e in entries) and not os.path.exists(
                os.path.join(config.run_dir, "config.yaml")):
            raise ConfigError(f"{folder} holds checkpoints without an owner record (written by an older version) "
                              f"and this run ({me['run_dir']}, run id {me['run_id']}) never ran there: they may be "
                              "another run's. Use another output.run_name, or delete that folder if it is stale"
                              ) from None
        return
    except ValueError as error:  # (json's)
        raise ConfigError(f"{folder}/{OWNER}, the checkpoint folder's owner record, is not JSON ({error}): "
                          "use another output.run_name, or delete that folder if it is stale") from None
    if not isinstance(owner, dict) or (owner.get("run_id"), owner.get("run_dir")) != (me["run_id"], me["run_dir"]):
        raise ConfigError(
            f"checkpoint folder {folder} belongs to another run: {_describe(owner)}; this run is {_describe(me)}. "
            "Resuming would continue (and deliver) that run's model, and output.resume=false would delete its "
            "checkpoints: use another output.run_name or output.storage_path for this run")


def _describe(run) -> str:
    run = run if isinstance(run, dict) else {}
    return (f"run id {run.get('run_id')} in {run.get('run_dir')} (user {run.get('user')} on {run.get('host')}, "
            f"config hash {run.get('config_hash')})")


# Ray Train's controller on an embedded Ray, whose one machine is never preempted and whose workers
# answer in microseconds: no PreemptionWatcher actor (a process of its own each run, importing Ray
# Train on the CPUs the workers start on), and a health check every 0.5 s instead of 2 s (the controller
# sees the workers start, report checkpoints and finish sooner). A variable the user set stays.
EMBEDDED_RAY_TRAIN = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


@contextlib.contextmanager
def environment(defaults: dict):
    """These environment variables, where the user has not set them, for the `with` block only."""
    added = {name: value for name, value in defaults.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def fit(config: Config, plan: WorkerPlan, total_steps: int) -> tuple[TrainerState, float]:
    """The Ray Train run over the scheduled steps (resumed where checkpoints exist); copies the last
    checkpoint's model (and merged model) and metrics into the run directory. Returns the last
    checkpoint's trainer state (step-0 drift, held-out checks) and the wall time in seconds."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    s, t = config.scaling, config.training
    _, folder, storage_path = checkpoint_storage(config)
    trainer = torch_trainer_class(embedded=not s.address)(
        train_loop,
        train_loop_config=plan.loop_config(config),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=s.resources_per_worker,
                                     placement_strategy=s.placement_strategy),
        run_config=RunConfig(name=os.path.basename(folder), storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.save_total_limit or None),
                             logging_config=LoggingConfig(log_level=logging.getLevelName(ray_log_level()))),
    )
    take_stop(config)  # (a stop left by an earlier attempt is not this one's)
    started = time.time()
    # (Ray Train hands these to its controller when fit() starts it; set for that call only, so that a
    # process which trains, then launches something else, does not pass them on)
    with StepProgress(config.run_dir, total_steps), environment({} if s.address else EMBEDDED_RAY_TRAIN):
        result = trainer.fit()
    elapsed = time.time() - started
    check_owner(config, *checkpoint_storage(config)[:2], run_identity(config))  # still ours: a result to deliver
    stopped = take_stop(config)
    if stopped:
        raise TrainingStopped(stopped)
    state = checkpoint.read_state(result.checkpoint)
    if state.step0_drift and "error" in state.step0_drift:  # the workers stopped before any update
        delete_checkpoints(config)  # nothing was trained: a corrected run starts afresh
        raise DriftError(state.step0_drift["error"])
    checkpoint.copy_results(result.checkpoint, config.run_dir)
    return state, elapsed


def torch_trainer_class(embedded: bool):
    """Ray Train's TorchTrainer without two of its default helpers:
    - the DatasetsCallback, which starts a DatasetManager actor (a Python process of its own) for
      every worker group even when, as here, no Ray Dataset is passed: the workers read their
      scheduled rows from the scored Parquet file themselves;
    - on the embedded Ray, the PlacementGroupCleaner: in Ray 2.60 its stop() joins a monitor
      thread that cannot exit before the join times out, which adds 12 s to the end of every run
      (measured here on every fit; upstream ray-project/ray#62516, #65447). It only matters when a
      controller dies while the cluster lives on, which an embedded Ray, ending with this process,
      does not: on a cluster it stays.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    dropped = (DatasetsCallback, PlacementGroupCleanerCallback) if embedded else (DatasetsCallback,)

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [callback for callback in super()._create_default_callbacks() if not isinstance(callback, dropped)]

    return LeanTorchTrainer
