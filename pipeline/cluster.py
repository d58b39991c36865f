"""Ray for a run: the embedded local Ray by default, or the cluster at `scaling.address`, with the
environment every Ray process of the run gets, and the resource checks that turn a plan that
would wait forever into an error at start-up."""

import logging
import math
import os
from urllib.parse import urlsplit

import ray
import ray.data

from pipeline.config import Config, ConfigError
from pipeline.console import QUIET_VARIABLES, ray_log_level


# The MLflow and W&B variables that travel to every Ray process of a run (rank 0, which reports, may
# run on another node): where metrics go and how they are grouped, never who sends them. Ray shows a
# runtime environment on its dashboard and in its logs, so credentials (*_PASSWORD, *_TOKEN,
# *_API_KEY, *_USERNAME, credential and identity-token files) never travel in it; each node has its
# own (README: "Credentials on a cluster"). Left out as well: switches that turn TLS verification off
# (MLFLOW_TRACKING_INSECURE_TLS, WANDB_INSECURE_DISABLE_SSL), which a node should set for itself if
# it must, paths to certificates that exist on the driver's machine, and run ids and names, which
# the trainers set themselves (trackers.py).
TRACKER_VARIABLES = {
    "mlflow": ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_ALLOW_FILE_STORE",
               "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"),
    "wandb": ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_RUN_GROUP", "WANDB_TAGS",
              "WANDB_NOTES", "WANDB_JOB_TYPE", "WANDB_SILENT"),
}


def runtime_env(config: Config) -> dict:
    """Environment of every Ray process of the run: offline, DeepSpeed told it runs on CPUs where
    it does (else it probes for an accelerator and warns), and the driver's TRACKER_VARIABLES of
    the reporters that output.report_to lists."""
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in QUIET_VARIABLES:  # set on the driver unless --verbose (console.quiet_ray)
        if name in os.environ:
            env[name] = os.environ[name]
    if not config.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    env.update(tracker_variables(config.output.report_to))
    return {"env_vars": env}


def tracker_variables(report_to: list[str]) -> dict[str, str]:
    """The driver's TRACKER_VARIABLES for the listed trackers, less any URL that carries a user or
    password (https://user:password@host, postgresql://user:password@db/mlflow): that one is a
    secret too, said so on the console, and left for the nodes' own environment to set."""
    names = [name for tracker in report_to for name in TRACKER_VARIABLES.get(tracker, ())]
    forwarded = {}
    for name in names:
        value = os.environ.get(name)
        if value is not None and "@" in urlsplit(value).netloc:
            logging.getLogger(__name__).warning(
                "%s holds a user or password (user:password@host): it is not sent to the Ray runtime environment, "
                "which the Ray dashboard shows; set it in each node's environment, or keep the URL plain and "
                "give the credentials to the nodes (README: Credentials on a cluster)", name)
        elif value is not None:
            forwarded[name] = value
    return forwarded


def start_ray(config: Config) -> None:
    """Embedded Ray by default, or connect to `scaling.address`; refuse plans that would deadlock."""
    s = config.scaling
    cpus_per_worker = float(s.resources_per_worker.get("CPU", 1))
    if not ray.is_initialized():
        if s.address:
            ray.init(address=s.address, runtime_env=runtime_env(config), logging_level=ray_log_level())
        else:
            # Ray Data needs CPUs of its own beside the training workers, or it waits forever.
            r = config.reference
            busiest = max(s.num_workers * cpus_per_worker, r.num_replicas * r.num_cpus_per_replica)
            num_cpus = s.embedded_num_cpus or int(math.ceil(busiest)) + 2
            # "local": a new instance even where `ray start` left a cluster address in /tmp/ray
            ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env(config), logging_level=ray_log_level())
    available = ray.cluster_resources()
    wanted_cpus = s.num_workers * cpus_per_worker + 1
    if available.get("CPU", 0) < wanted_cpus:
        raise ConfigError(
            f"Ray has {available.get('CPU', 0):g} CPUs but this run needs {wanted_cpus:g} "
            f"({s.num_workers} workers x {cpus_per_worker:g} CPU + 1 for the data stage); lower "
            "scaling.num_workers or raise scaling.embedded_num_cpus, or the run would hang waiting for CPUs")
    r = config.reference
    if r.num_replicas * r.num_cpus_per_replica > available.get("CPU", 0) or (
            r.num_replicas * r.num_gpus_per_replica > available.get("GPU", 0)):
        raise ConfigError(
            f"reference.num_replicas = {r.num_replicas} replicas of {r.num_cpus_per_replica:g} CPU and "
            f"{r.num_gpus_per_replica:g} GPU do not fit in Ray's {available.get('CPU', 0):g} CPUs and "
            f"{available.get('GPU', 0):g} GPUs; lower reference.num_replicas or the per-replica resources")
    if s.use_gpu and available.get("GPU", 0) < s.num_workers * s.resources_per_worker.get("GPU", 1):
        raise ConfigError(f"scaling.use_gpu with {s.num_workers} workers, but Ray has "
                          f"{available.get('GPU', 0):g} GPUs")


def use_ray_data_settings() -> None:
    """The Ray Data settings of this project's two pipelines (feedback -> examples, examples ->
    reference scores): blocks come out in read order (provenance, KL pairing and the scored
    row check depend on it), and Parquet is read with Ray Data's first Parquet reader. Ray 2.60's
    default (DataSource V2) starts 32 FooterReader actors for every read_parquet, whatever its
    size: measured on 2 CPU cores, reading a 10-row file took 9.5 s with it and 0.2 s without."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.use_datasource_v2 = False
