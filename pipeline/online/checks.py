"""The online run's checks before round 1 (and what a task's error looks like to the user): a resumed
run keeps its settings, the sampler's GPUs leave room for every phase, the labeler loads where the
Ray workers run."""

import importlib
import os

import ray
import yaml

from pipeline.config import Config, ConfigError
from pipeline.data.formats import DataError

# online.* keys a resumed run may change: how many rounds, and how the sampler takes its weights
RESUMABLE_CHANGES = {"rounds", "weight_sync"}


def check_resumable(config: Config) -> None:
    """A run directory with rounds continues them only under the settings they ran with: other prompts,
    seeds, sampling, labeler or model would mix two runs in one ledger."""
    saved_path = os.path.join(config.run_dir, "config.yaml")
    if not (os.path.exists(saved_path) and os.path.exists(os.path.join(config.run_dir, "online.sqlite"))):
        return
    with open(saved_path) as f:
        saved = yaml.safe_load(f)
    now = config.to_dict()
    changed = [f"online.{key}" for key, value in now["online"].items()
               if key not in RESUMABLE_CHANGES and saved.get("online", {}).get(key) != value]
    changed += [f"{section}.{key}" for section, key in (("model", "name_or_path"), ("reference", "model"))
                if saved.get(section, {}).get(key) != now[section][key]]
    if changed:
        raise ConfigError(f"{config.run_dir} holds the rounds of a run with other settings ({', '.join(changed)}; "
                          "only online.rounds and online.weight_sync may change on a resume): use a new "
                          "output.run_name, or restore the settings to continue it")


def check_resources(config: Config) -> None:
    """The sampler keeps its GPUs for the whole run: the trainers, the reference replicas and a model
    labeler's replicas (one phase at a time) need theirs beside it, or a phase would wait forever."""
    r, s = config.reference, config.scaling
    if not r.num_gpus_per_replica:
        return
    trainers = s.num_workers * s.resources_per_worker.get("GPU", 1) if s.use_gpu else 0
    busiest = max(trainers, r.num_replicas * r.num_gpus_per_replica)
    held = config.online.num_samplers * r.num_gpus_per_replica
    available = ray.cluster_resources().get("GPU", 0)
    if available < held + busiest:
        raise ConfigError(
            f"online.num_samplers = {config.online.num_samplers} samplers of reference.num_gpus_per_replica = "
            f"{r.num_gpus_per_replica:g} GPUs hold {held:g} for the whole run and the busiest phase needs {busiest:g} more (trainers {trainers:g}, reference or labeler replicas "
            f"{r.num_replicas * r.num_gpus_per_replica:g}); Ray has {available:g}: lower online.num_samplers, "
            "scaling.num_workers or reference.num_replicas, or add GPUs")


def check_labeler(kind: str, labeler: str) -> None:
    """Ray task, before round 1: the labeler can be imported (a function) or found (a model folder)
    where the Ray workers run."""
    if kind != "function":
        if not os.path.exists(os.path.join(labeler, "config.json")):
            raise ConfigError(f"online.labeler = {labeler!r}: no model folder there (no config.json) on the Ray "
                              f"workers' filesystem; online.labeler_kind {kind} needs a local Hugging Face folder")
        return
    module, _, function = labeler.partition(":")
    try:
        found = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"online.labeler = {labeler!r} cannot be loaded where the Ray workers run "
                          f"({type(error).__name__}: {error}); install its package there or put its folder on "
                          "PYTHONPATH") from None
    if not callable(found):
        raise ConfigError(f"online.labeler = {labeler!r} is not callable; name a function(prompt, completion)")


def task_result(ref):
    """ray.get, with a config or data error raised in the task raised here as itself: its message, not
    the remote traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, (ConfigError, DataError)):
            raise error.cause from None
        raise
