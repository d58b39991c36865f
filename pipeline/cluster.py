"""Ray for a run: the embedded local Ray by default, or the cluster at `scaling.address`, with the
environment every Ray process of the run gets, and the resource checks that turn a plan that
would wait forever into an error at start-up."""

import math
import os

import ray
import ray.data

from pipeline.config import Config, ConfigError
from pipeline.console import QUIET_VARIABLES, ray_log_level
from pipeline.train.trackers import TRACKERS


def runtime_env(config: Config) -> dict:
    """Environment of every Ray process of the run: offline, DeepSpeed told it runs on CPUs where
    it does (else it probes for an accelerator and warns), and the driver's MLFLOW_* / WANDB_*
    variables for the reporters that output.report_to lists (rank 0 may run on another node)."""
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in QUIET_VARIABLES:  # set on the driver unless --verbose (console.quiet_ray)
        if name in os.environ:
            env[name] = os.environ[name]
    if not config.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    prefixes = tuple(f"{name.upper()}_" for name in config.output.report_to if name in TRACKERS)
    env.update({key: value for key, value in os.environ.items() if prefixes and key.startswith(prefixes)})
    return {"env_vars": env}


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
