"""The driver of `launch.py train`: Ray start-up, the data and reference stages, the Ray
Train run, held-out checks, and the files of the run directory. One function a stage."""

import dataclasses
import glob
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import yaml

from actors.reference import ScoringOptions
from pipeline.config import Config, ConfigError
from pipeline.checks import check_counts, examine, weight_advice
from pipeline.data import DataError
from pipeline.pairing import build_schedule
from pipeline.progress import StepProgress
from pipeline.drift import DriftError, sample_rows, step0_drift
from pipeline.models import load_causal_lm, load_tokenizer, load_trained, resolve_model_path
from pipeline.reporting import TRACKERS, missing_reporters, read_metrics
from pipeline.scoring import fingerprint, score_examples

log = logging.getLogger("kto")


def runtime_env(config: Config) -> dict:
    """Environment of every Ray process of the run: offline, DeepSpeed told it runs on CPUs where
    it does (else it probes for an accelerator and warns), and the driver's MLFLOW_* / WANDB_*
    variables for the reporters that output.report_to lists (rank 0 may run on another node)."""
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
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
            ray.init(address=s.address, runtime_env=runtime_env(config))
        else:
            # Ray Data needs CPUs of its own beside the training workers, or it waits forever.
            r = config.reference
            busiest = max(s.num_workers * cpus_per_worker, r.num_replicas * r.num_cpus_per_replica)
            num_cpus = s.embedded_num_cpus or int(math.ceil(busiest)) + 2
            # "local": a new instance even where `ray start` left a cluster address in /tmp/ray
            ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env(config))
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


@dataclass
class Prepared:
    """What the data and reference stages leave for training: Parquet files and their counts."""
    model_path: str
    reference_path: str
    tokenizer: object
    scored_path: str
    counts: dict
    eval_scored_path: Optional[str] = None
    eval_counts: Optional[dict] = None


def prepare(config: Config, source: str, data_path: str, model_path: str, reference_path: str,
            pad_token_id: int) -> tuple[str, dict, str]:
    """The data stage for one source (train or eval), then the reference stage on its examples:
    (scored Parquet file, counts, the data stage's cache folder). The rejected rows are copied to
    <run>/rejected/<source>-part-N.parquet."""
    folder, counts = examine(config, data_path, model_path)
    for part in sorted(glob.glob(os.path.join(counts["rejected_dir"], "*.parquet"))):
        os.makedirs(os.path.join(config.run_dir, "rejected"), exist_ok=True)
        shutil.copyfile(part, os.path.join(config.run_dir, "rejected", f"{source}-{os.path.basename(part)}"))
    check_counts(config, counts, data_path)
    scored_path, cache_hit = score(config, os.path.join(folder, "examples"), counts["longest_sequence"],
                                   reference_path, pad_token_id)
    return scored_path, {**counts, "fingerprint": os.path.basename(folder), "reference_cache_hit": cache_hit}, folder


def score(config: Config, examples_dir: str, longest_sequence: int, reference_path: str,
          pad_token_id: int) -> tuple[str, bool]:
    """The reference stage, cached beside the examples: (scored Parquet file, whether it was cached)."""
    r = config.reference
    scored_path = f"{examples_dir}-scored-" + fingerprint(
        [], [reference_path], {"backend": r.backend, "dtype": r.dtype}) + ".parquet"
    cache_hit = os.path.exists(scored_path)
    if not cache_hit:
        options = ScoringOptions(dtype=r.dtype, max_tokens_per_batch=r.max_tokens_per_batch,
                                 trust_remote_code=config.model.trust_remote_code,
                                 tensor_parallel_size=r.tensor_parallel_size,
                                 gpu_memory_utilization=r.gpu_memory_utilization,
                                 cache_root=os.path.join(r.cache_dir, "vllm"))
        score_examples(examples_dir, scored_path, longest_sequence, backend=r.backend,
                       reference_path=reference_path, pad_token_id=pad_token_id, num_replicas=r.num_replicas,
                       num_cpus_per_replica=r.num_cpus_per_replica, num_gpus_per_replica=r.num_gpus_per_replica,
                       options=options)
    return scored_path, cache_hit


def precompute(config: Config) -> Prepared:
    """The data and reference stages for the training data (and the eval data, if any): after
    this the cache holds everything training needs, so a cluster can score once, train many times."""
    os.makedirs(config.run_dir, exist_ok=True)
    model_path = resolve_model_path(config.model.name_or_path, config.model.cache_dir)
    reference_path = resolve_model_path(config.reference.model or config.model.name_or_path, config.model.cache_dir)
    tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
    if config.data.generate_demo:
        from pipeline.demo_data import ensure_demo_data

        ensure_demo_data(config.data.path, config.eval.path, tokenizer)
    start_ray(config)
    scored_path, counts, folder = prepare(config, "train", config.data.path, model_path, reference_path,
                                          tokenizer.pad_token_id)
    prepared = Prepared(model_path, reference_path, tokenizer, scored_path, counts)
    if config.eval.path:
        prepared.eval_scored_path, prepared.eval_counts, _ = prepare(config, "eval", config.eval.path, model_path,
                                                                     reference_path, tokenizer.pad_token_id)
    elif config.eval.split_fraction:
        held_out = counts["held_out_counts"]
        prepared.eval_scored_path, cache_hit = score(config, os.path.join(folder, "held_out"),
                                                     held_out["longest_sequence"], reference_path,
                                                     tokenizer.pad_token_id)
        prepared.eval_counts = {**held_out, "split_fraction": config.eval.split_fraction,
                                "reference_cache_hit": cache_hit}
    return prepared


def validate_data(config: Config, data_path: str) -> dict:
    """`launch.py validate`: the data stage's checks and counts, without scoring or training;
    `trainable` is false (and `problem` says why) when train would stop on this data."""
    model_path = resolve_model_path(config.model.name_or_path, config.model.cache_dir)
    start_ray(config)
    _, counts = examine(config, data_path, model_path)
    k = config.kto
    report = {**counts, "weights": weight_advice(k.desirable_weight, k.undesirable_weight,
                                                 counts["desirable"], counts["undesirable"])}
    try:
        check_counts(config, counts, data_path)
        return {**report, "trainable": True}
    except DataError as problem:
        return {**report, "trainable": False, "problem": str(problem)}


def check_drift(config: Config, prepared: Prepared) -> dict:
    """Step-0 drift of the cached reference values against the trainer's own computation."""
    r = config.reference
    if r.drift_check_rows == 0:
        return {"skipped": "reference.drift_check_rows is 0"}
    if prepared.reference_path != prepared.model_path:
        return {"skipped": f"reference.model ({r.model}) is not the policy: r != 0 at step 0 is expected"}
    if r.backend == "hf" and r.dtype == "float32" and (r.num_gpus_per_replica > 0) == config.scaling.use_gpu:
        # The reference was scored by the trainer's own function, dtype and kind of device: r = 0
        # at step 0 by construction, and the check would cost a forward of its rows on the driver.
        return {"skipped": "hf reference in float32 on the trainers' kind of device: the trainer's own computation"}
    sample = sample_rows(prepared.scored_path, r.drift_check_rows, config.training.seed)
    arguments = (prepared.model_path, sample, prepared.tokenizer.pad_token_id, config.model.trust_remote_code)
    if config.scaling.use_gpu:  # on a GPU, as the trainers compute; the driver may have none
        drift = ray.get(ray.remote(step0_drift).options(num_cpus=1, num_gpus=1).remote(*arguments))
    else:
        drift = step0_drift(*arguments)
    log.info("step-0 drift of the %s reference (%s) against the trainer: %s", r.backend, r.dtype, drift)
    if drift["max_abs_per_sequence"] > r.drift_max_abs:
        raise DriftError(
            f"at step 0 the reference log-probs ({r.backend}, {r.dtype}) differ from the trainer's float32 ones by "
            f"up to {drift['max_abs_per_sequence']:.4g} nats a sequence ({drift['max_abs_per_token']:.3g} a token) "
            f"on {drift['sequences']} sequences, above reference.drift_max_abs = {r.drift_max_abs:g}: that bias "
            "enters every reward and z0. Score the reference in float32 (--set reference.dtype=float32) or with "
            "--set reference.backend=hf; raise reference.drift_max_abs only if you accept the bias.")
    return drift


def resolve_desirable_weight(config: Config, n_desirable: int, n_undesirable: int) -> float:
    """The desirable weight to train with: `auto` resolved from the label counts; a warning
    when the weights leave the paper's range."""
    k = config.kto
    advice = weight_advice(k.desirable_weight, k.undesirable_weight, n_desirable, n_undesirable)
    if not advice["in_range"]:
        log.warning(advice["advice"])
    if k.desirable_weight == "auto":
        return advice["auto_desirable_weight"] or 1.0
    return k.desirable_weight


def held_out_check(config: Config, model, tokenizer, scored: pa.Table) -> dict:
    from pipeline.evaluate import implied_reward_metrics, property_share

    result = implied_reward_metrics(model, scored, config.kto.beta, tokenizer.pad_token_id)
    if config.eval.property_regex:
        prompts = list(dict.fromkeys(tuple(p) for p in scored.column("prompt_ids").to_pylist()))
        share, samples = property_share(model, tokenizer, [list(p) for p in prompts[:config.eval.num_generations]],
                                        config.eval.property_regex, config.eval.max_new_tokens)
        result.update(property_share=share, sample_generation=samples[0] if samples else "")
    return result


def checkpoint_storage(config: Config) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, folder of this run's checkpoints, Ray's storage_path): local by default, or
    `output.storage_path` (a path every node reaches, or s3:// / gs://) / run_name."""
    if not config.output.storage_path:
        return pafs.LocalFileSystem(), os.path.join(config.run_dir, "ray_train"), config.run_dir
    storage = config.output.storage_path
    filesystem, root = pafs.FileSystem.from_uri(storage if "://" in storage else os.path.abspath(storage))
    return filesystem, f"{root.rstrip('/')}/{config.output.run_name}", storage


def check_resumable(config: Config) -> bool:
    """True when the run continues from its checkpoints: same run name, storage and training config.
    A changed config would silently mix two runs, so it stops with the first difference."""
    filesystem, folder, _ = checkpoint_storage(config)
    if filesystem.get_file_info(folder).type == pafs.FileType.NotFound:
        return False
    entries = filesystem.get_file_info(pafs.FileSelector(folder))
    if not any(e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_") for e in entries):
        return False  # an earlier attempt stopped before its first checkpoint: nothing to continue
    if not config.output.resume:
        log.info("output.resume is false: deleting the checkpoints of the previous run in %s", folder)
        filesystem.delete_dir(folder)
        return False
    saved_path = os.path.join(config.run_dir, "config.yaml")
    if os.path.exists(saved_path):
        with open(saved_path) as f:
            saved = yaml.safe_load(f)
        # What may change between attempts: where the driver connects, how often a run may fail.
        free = {("scaling", "address"), ("scaling", "max_failures"), ("output", "resume")}
        for section, values in config.to_dict().items():
            for key, value in values.items():
                if (section, key) not in free and saved.get(section, {}).get(key) != value:
                    raise ConfigError(
                        f"run '{config.output.run_name}' has checkpoints in {folder} from a run with "
                        f"{section}.{key} = {saved.get(section, {}).get(key)!r}, now {value!r}: resuming would mix two "
                        "runs. Use a new output.run_name, or --set output.resume=false to start this one over.")
    log.info("resuming run '%s' from its latest checkpoint in %s", config.output.run_name, folder)
    return True


def fit(config: Config, prepared: Prepared, desirable_weight: float, schedule_path: str, total_steps: int) -> float:
    """The Ray Train run over the scheduled steps (resumed where checkpoints exist); copies the last
    checkpoint's model and metrics into the run directory; returns the wall time in seconds."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from pipeline.train import train_loop_per_worker

    s, t = config.scaling, config.training
    loop_config = {
        "run_dir": config.run_dir, "model_path": prepared.model_path,
        "scored_path": prepared.scored_path, "eval_scored_path": prepared.eval_scored_path,
        "eval_steps": config.eval.eval_steps, "report_to": config.output.report_to, "schedule_path": schedule_path,
        "run_name": config.output.run_name, "params": config.to_dict(),
        "seed": t.seed, "use_gpu": s.use_gpu,
        "trust_remote_code": config.model.trust_remote_code, "strategy": s.strategy,
        "deepspeed": dataclasses.asdict(config.deepspeed), "lora": dataclasses.asdict(config.lora),
        "gradient_checkpointing": t.gradient_checkpointing,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps, "learning_rate": t.learning_rate,
        "weight_decay": t.weight_decay, "lr_scheduler_type": t.lr_scheduler_type, "warmup_ratio": t.warmup_ratio,
        "max_grad_norm": t.max_grad_norm, "save_steps": t.save_steps,
        "step_settings": {"beta": config.kto.beta, "desirable_weight": desirable_weight,
                          "undesirable_weight": config.kto.undesirable_weight, "loss_type": config.kto.loss_type,
                          "pad_token_id": prepared.tokenizer.pad_token_id,
                          "max_tokens_per_forward": t.max_tokens_per_forward},
    }
    _, folder, storage_path = checkpoint_storage(config)
    trainer = torch_trainer_class(embedded=not s.address)(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=s.resources_per_worker,
                                     placement_strategy=s.placement_strategy),
        run_config=RunConfig(name=os.path.basename(folder), storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.save_total_limit or None)),
    )
    started = time.time()
    with StepProgress(config.run_dir, total_steps):
        result = trainer.fit()
    elapsed = time.time() - started
    checkpoint = result.checkpoint
    model_dir = os.path.join(config.run_dir, "model")
    shutil.rmtree(model_dir, ignore_errors=True)
    os.makedirs(model_dir)
    pafs.copy_files(f"{checkpoint.path}/model", model_dir, source_filesystem=checkpoint.filesystem,
                    destination_filesystem=pafs.LocalFileSystem())
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/metrics.jsonl") as source, \
            open(os.path.join(config.run_dir, "metrics.jsonl"), "wb") as target:
        target.write(source.read())
    return elapsed


def torch_trainer_class(embedded: bool):
    """Ray Train's TorchTrainer; on the embedded Ray, without its PlacementGroupCleaner. In Ray 2.60
    that helper's stop() joins a monitor thread that cannot exit before the join times out, which
    adds 12 s to the end of every run (measured here on every fit; upstream ray-project/ray#62516,
    #65447). It only matters when a controller dies while the cluster lives on, which an embedded
    Ray, ending with this process, does not: on a cluster it stays."""
    from ray.train.torch import TorchTrainer

    if not embedded:
        return TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class EmbeddedTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [callback for callback in super()._create_default_callbacks()
                    if not isinstance(callback, PlacementGroupCleanerCallback)]

    return EmbeddedTorchTrainer


def train(config: Config) -> dict:
    """The whole flow: data and reference stages, the drift check, held-out checks around the Ray
    Train run, and the run directory's summary."""
    started = time.time()
    run_dir = config.run_dir
    os.makedirs(run_dir, exist_ok=True)
    missing = missing_reporters(config.output.report_to)
    if missing:
        raise ConfigError(f"output.report_to = {config.output.report_to} needs {', '.join(missing)}: "
                          f"pip install {' '.join(missing)}, or leave them out of output.report_to")
    resumed = check_resumable(config)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    prepared = precompute(config)
    drift = check_drift(config, prepared)
    model_path, tokenizer, counts = prepared.model_path, prepared.tokenizer, prepared.counts
    n_desirable, n_undesirable = counts["desirable"], counts["undesirable"]
    desirable_weight = resolve_desirable_weight(config, n_desirable, n_undesirable)
    schedule_path = os.path.join(run_dir, "schedule.parquet")
    t = config.training
    schedule = build_schedule(counts["kept"], config.global_batch_size, t.num_train_epochs, t.max_steps, t.seed,
                              shuffle=t.train_sampling_strategy == "random")
    pq.write_table(schedule, schedule_path)

    eval_scored = pq.read_table(prepared.eval_scored_path) if prepared.eval_scored_path else None  # small
    before = after = None
    if eval_scored is not None:
        before = held_out_check(config, load_causal_lm(model_path, config.model.trust_remote_code).eval(),
                                tokenizer, eval_scored)
        log.info("held-out before training: %s", before)

    train_time = fit(config, prepared, desirable_weight, schedule_path, int(schedule.column("step")[-1].as_py()) + 1)

    save_merged = config.lora.r and config.lora.save_merged
    if eval_scored is not None or save_merged:
        trained = load_trained(os.path.join(run_dir, "model"), model_path, config.model.trust_remote_code)
        if save_merged:  # the base with the adapters folded in: a plain model for serving
            trained.save_pretrained(os.path.join(run_dir, "merged"), safe_serialization=True)
            tokenizer.save_pretrained(os.path.join(run_dir, "merged"))
        if eval_scored is not None:
            after = held_out_check(config, trained.eval(), tokenizer, eval_scored)
            log.info("held-out after training: %s", after)
    steps = read_metrics(run_dir)
    # Tokens of the policy's training forwards (prompt + completion, padding excluded) over the
    # time spent in training steps (worker start-up and checkpoints are in train_time_s).
    tokens = sum(step["num_tokens"] for step in steps)
    step_time = sum(step["step_time_s"] for step in steps)
    summary = {
        "final_metrics": steps[-1], "steps": len(steps), "data": prepared.counts, "eval_data": prepared.eval_counts,
        "reference": {"backend": config.reference.backend, "dtype": config.reference.dtype, "step0_drift": drift},
        "label_counts": {"desirable": n_desirable, "undesirable": n_undesirable},
        "desirable_weight": desirable_weight, "num_workers": config.scaling.num_workers,
        "global_batch_size": config.global_batch_size, "eval_before": before, "eval_after": after,
        "resumed": resumed, "strategy": config.scaling.strategy, "train_time_s": round(train_time, 1),
        "train_tokens_per_s": round(tokens / step_time, 1),
        "wall_time_s": round(time.time() - started, 1),
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
