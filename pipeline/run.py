"""The driver of `launch.py train`: Ray start-up, the data and reference stages, the Ray
Train run, held-out checks, and the files of the run directory. One function a stage."""

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml

from actors.reference import ScoringOptions
from pipeline.config import Config, ConfigError
from pipeline.data import add_kl_pairs, build_schedule, label_counts, read_and_tokenize
from pipeline.drift import DriftError, sample_rows, step0_drift
from pipeline.models import load_causal_lm, load_tokenizer, resolve_model_path
from pipeline.scoring import cache_path, fingerprint, score_with_cache

log = logging.getLogger("kto")
RUNTIME_ENV = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}


def start_ray(config: Config) -> None:
    """Embedded Ray by default, or connect to `scaling.address`; refuse plans that would deadlock."""
    s = config.scaling
    cpus_per_worker = float(s.resources_per_worker.get("CPU", 1))
    if not ray.is_initialized():
        if s.address:
            ray.init(address=s.address, runtime_env=RUNTIME_ENV)
        else:
            # Ray Data needs CPUs of its own beside the training workers, or it waits forever.
            r = config.reference
            busiest = max(s.num_workers * cpus_per_worker, r.num_replicas * r.num_cpus_per_replica)
            num_cpus = s.embedded_num_cpus or int(math.ceil(busiest)) + 2
            ray.init(num_cpus=num_cpus, runtime_env=RUNTIME_ENV)
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
    """What the data and reference stages leave for training."""
    model_path: str
    reference_path: str
    tokenizer: object
    scored: pa.Table
    scored_path: str
    counts: dict
    eval_scored: Optional[pa.Table] = None
    eval_counts: Optional[dict] = None


def prepare(config: Config, source: str, data_path: str, model_path: str, reference_path: str,
            pad_token_id: int) -> tuple[pa.Table, dict]:
    """Read, tokenize, pair and score one data source (`source`: train or eval): the scored rows
    and their counts; rejected rows go to <run>/rejected/<source>.parquet with their reasons."""
    k, r = config.kto, config.reference
    feedback = read_and_tokenize(data_path, model_path, k.max_length, k.max_prompt_length,
                                 config.model.trust_remote_code)
    paired, pairing = add_kl_pairs(feedback.kept, config.data.kl_block_size, k.max_length)
    settings = {"max_length": k.max_length, "max_prompt_length": k.max_prompt_length,
                "kl_block_size": config.data.kl_block_size, "backend": r.backend, "dtype": r.dtype}
    key = fingerprint(feedback.files, model_path, reference_path, settings)
    options = ScoringOptions(dtype=r.dtype, max_tokens_per_batch=r.max_tokens_per_batch,
                             trust_remote_code=config.model.trust_remote_code,
                             tensor_parallel_size=r.tensor_parallel_size,
                             gpu_memory_utilization=r.gpu_memory_utilization,
                             cache_root=os.path.join(r.cache_dir, "vllm"))
    scored, cache_hit = score_with_cache(
        paired, r.cache_dir, key, backend=r.backend, reference_path=reference_path, pad_token_id=pad_token_id,
        num_replicas=r.num_replicas, num_cpus_per_replica=r.num_cpus_per_replica,
        num_gpus_per_replica=r.num_gpus_per_replica, options=options)
    if feedback.rejected.num_rows:
        os.makedirs(os.path.join(config.run_dir, "rejected"), exist_ok=True)
        pq.write_table(feedback.rejected, os.path.join(config.run_dir, "rejected", f"{source}.parquet"))
    reasons = feedback.rejected.column("reason").to_pylist()
    counts = {"read": feedback.kept.num_rows + feedback.rejected.num_rows, "kept": feedback.kept.num_rows,
              "rejected": feedback.rejected.num_rows,
              "rejected_by_reason": {reason: reasons.count(reason) for reason in sorted(set(reasons))},
              "fingerprint": key, "reference_cache_hit": cache_hit, **pairing}
    return scored, counts


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
    scored, counts = prepare(config, "train", config.data.path, model_path, reference_path, tokenizer.pad_token_id)
    scored_path = cache_path(config.reference.cache_dir, counts["fingerprint"])
    prepared = Prepared(model_path, reference_path, tokenizer, scored, scored_path, counts)
    if config.eval.path:
        prepared.eval_scored, prepared.eval_counts = prepare(config, "eval", config.eval.path, model_path,
                                                             reference_path, tokenizer.pad_token_id)
    return prepared


def check_drift(config: Config, prepared: Prepared) -> dict:
    """Step-0 drift of the cached reference values against the trainer's own computation."""
    r = config.reference
    if r.drift_check_rows == 0:
        return {"skipped": "reference.drift_check_rows is 0"}
    if prepared.reference_path != prepared.model_path:
        return {"skipped": f"reference.model ({r.model}) is not the policy: r != 0 at step 0 is expected"}
    sample = sample_rows(prepared.scored, r.drift_check_rows, config.training.seed)
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
    """`auto` sets lambda_D n_D / (lambda_U n_U) = 1; otherwise warn outside [1, 4/3] (KTO paper, Eq. 8)."""
    k = config.kto
    if n_desirable == 0 or n_undesirable == 0:
        log.warning("training data has %d desirable and %d undesirable rows: one side of the KTO loss is empty",
                    n_desirable, n_undesirable)
        return 1.0 if k.desirable_weight == "auto" else k.desirable_weight
    balanced = k.undesirable_weight * n_undesirable / n_desirable
    if k.desirable_weight == "auto":
        return balanced
    ratio = k.desirable_weight * n_desirable / (k.undesirable_weight * n_undesirable)
    if not 1 <= ratio <= 4 / 3:
        log.warning("desirable_weight * n_D / (undesirable_weight * n_U) = %.3f * %d / (%.3f * %d) = %.3f is "
                    "outside [1, 4/3]; kto.desirable_weight=%.3f (or 'auto') would bring it to 1",
                    k.desirable_weight, n_desirable, k.undesirable_weight, n_undesirable, ratio, balanced)
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


def fit(config: Config, prepared: Prepared, desirable_weight: float, schedule_path: str) -> float:
    """The Ray Train run over the scheduled steps; returns its wall time in seconds."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train import train_loop_per_worker

    s, t = config.scaling, config.training
    loop_config = {
        "run_dir": config.run_dir, "model_path": prepared.model_path, "tokenizer_path": prepared.model_path,
        "scored_path": prepared.scored_path, "schedule_path": schedule_path, "seed": t.seed, "use_gpu": s.use_gpu,
        "trust_remote_code": config.model.trust_remote_code,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps, "learning_rate": t.learning_rate,
        "weight_decay": t.weight_decay, "lr_scheduler_type": t.lr_scheduler_type, "warmup_ratio": t.warmup_ratio,
        "save_steps": t.save_steps,
        "step_settings": {"beta": config.kto.beta, "desirable_weight": desirable_weight,
                          "undesirable_weight": config.kto.undesirable_weight, "loss_type": config.kto.loss_type,
                          "max_grad_norm": t.max_grad_norm, "pad_token_id": prepared.tokenizer.pad_token_id},
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=s.resources_per_worker),
        run_config=RunConfig(name="ray_train", storage_path=config.output.storage_path or config.run_dir,
                             failure_config=FailureConfig(max_failures=0)),
    )
    started = time.time()
    trainer.fit()
    return time.time() - started


def train(config: Config) -> dict:
    """The whole flow: data and reference stages, the drift check, held-out checks around the Ray
    Train run, and the run directory's summary."""
    started = time.time()
    run_dir = config.run_dir
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    prepared = precompute(config)
    drift = check_drift(config, prepared)
    model_path, tokenizer, scored = prepared.model_path, prepared.tokenizer, prepared.scored
    n_desirable, n_undesirable = label_counts(scored)
    desirable_weight = resolve_desirable_weight(config, n_desirable, n_undesirable)
    schedule_path = os.path.join(run_dir, "schedule.parquet")
    t = config.training
    schedule = build_schedule(scored.num_rows, config.global_batch_size, t.num_train_epochs, t.max_steps, t.seed)
    pq.write_table(schedule, schedule_path)

    eval_scored, before, after = prepared.eval_scored, None, None
    if eval_scored is not None:
        before = held_out_check(config, load_causal_lm(model_path, config.model.trust_remote_code).eval(),
                                tokenizer, eval_scored)
        log.info("held-out before training: %s", before)

    train_time = fit(config, prepared, desirable_weight, schedule_path)

    if eval_scored is not None:
        after = held_out_check(config, load_causal_lm(os.path.join(run_dir, "model")).eval(), tokenizer, eval_scored)
        log.info("held-out after training: %s", after)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
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
        "train_time_s": round(train_time, 1), "train_tokens_per_s": round(tokens / step_time, 1),
        "wall_time_s": round(time.time() - started, 1),
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
