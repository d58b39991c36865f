"""`launch.py train`, top to bottom: the stages before training (stages.py), the step schedule,
the Ray Train run (fit.py), and the run directory's summary. The driver orchestrates: it holds
no model and no data set; its own peak memory is recorded in summary.json."""

import json
import logging
import os
import time

import ray
import yaml

from pipeline.config import Config, ConfigError
from pipeline.console import ray_log_level
from pipeline.cache import check_table
from pipeline.data.step_file import Schedule, write_step_file
from pipeline.fit import WorkerPlan, check_resumable, fit
from pipeline.stages import precompute, resolve_desirable_weight
from pipeline.train.trackers import missing_reporters, peak_rss_mib, read_metrics

log = logging.getLogger("kto")
MIN_Z0_BATCH = 8  # below this many rows a step, z0 (their mean KL log-ratio) is mostly noise


def train(config: Config) -> dict:
    """The whole flow; returns (and writes) the run's summary."""
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
    counts = prepared.counts
    desirable_weight = resolve_desirable_weight(config, counts["desirable"], counts["undesirable"])
    t = config.training
    # The rows of every step in training order, written by a Ray task (this process holds no data
    # set), reused from the cache when the same schedule ran on the same scores before.
    schedule = Schedule(counts["kept"], config.global_batch_size, t.num_train_epochs, t.max_steps, t.seed,
                        shuffle=t.train_sampling_strategy == "random", pairs=config.kto.loss_type == "kto_pairwise")
    steps_path, total_steps = ray.get(ray.remote(write_step_file).remote(prepared.scored_path, schedule))
    check_table(steps_path, "steps")

    plan = WorkerPlan(model_path=prepared.model_path, reference_path=prepared.reference_path,
                      scored_path=prepared.scored_path, eval_scored_path=prepared.eval_scored_path,
                      steps_path=steps_path, pad_token_id=prepared.pad_token_id,
                      desirable_weight=desirable_weight, ray_log_level=ray_log_level())
    log.info("training: %d steps of %d examples on %d workers (%s)", total_steps, config.global_batch_size,
             config.scaling.num_workers, config.scaling.strategy)
    if config.global_batch_size < MIN_Z0_BATCH and config.kto.loss_type != "apo_zero_unpaired":
        log.warning("a global batch of %d rows estimates each step's z0 from %d KL pairs, a noisy reference point "
                    "(KTO.md advises an effective batch of 8 to 128): raise training.per_device_train_batch_size, "
                    "training.gradient_accumulation_steps or scaling.num_workers",
                    config.global_batch_size, config.global_batch_size)
    state, train_time = fit(config, plan, total_steps)

    steps = read_metrics(run_dir)
    # Tokens of the policy's training forwards (prompt + completion, padding excluded) over the
    # time spent in training steps (worker start-up and checkpoints are in train_time_s).
    tokens = sum(step["num_tokens"] for step in steps)
    step_time = sum(step["step_time_s"] for step in steps)
    summary = {
        "final_metrics": steps[-1], "steps": len(steps), "data": counts, "eval_data": prepared.eval_counts,
        "reference": {"backend": config.reference.backend, "dtype": config.reference.dtype,
                      "scored_path": prepared.scored_path, "steps_path": steps_path, "step0_drift": state.step0_drift},
        "label_counts": {"desirable": counts["desirable"], "undesirable": counts["undesirable"]},
        "desirable_weight": desirable_weight, "num_workers": config.scaling.num_workers,
        "global_batch_size": config.global_batch_size, "eval_before": state.eval_before,
        "eval_after": state.eval_after, "resumed": resumed, "strategy": config.scaling.strategy,
        "train_time_s": round(train_time, 1), "train_tokens_per_s": round(tokens / step_time, 1),
        "wall_time_s": round(time.time() - started, 1),
        "driver_peak_rss_mib": peak_rss_mib(),
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
