"""The Ray Train worker, in the order it works: load (or resume) the model and engine, check the
reference at step 0, evaluate the initial policy, run the scheduled steps (step.py), evaluate the
final policy, and checkpoint (checkpoint.py); rank 0 records the metrics (trackers.py).

The data position is the step number: every step's rows come from the saved schedule, so a
restarted worker group continues with exactly the rows of the first step it had not finished.
"""

import contextlib
import json
import logging
import os
import socket
import time
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.config import Config
from pipeline.fit import WorkerPlan, write_stop
from pipeline.models import disable_dropout, load_causal_lm, load_tokenizer
from pipeline.train import checkpoint, drift
from pipeline.train.checkpoint import TrainerState
from pipeline.train.engines import all_gather_objects, build_engine, deepspeed_settings, skip_deepspeed_shm_build
from pipeline.train.held_out import HeldOut
from pipeline.train.step import SCORED_COLUMNS, MicroBatch, NonFiniteStep, StepSettings, train_step
from pipeline.train.trackers import MetricsLog, peak_rss_mib


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's worker function."""
    import ray.train  # here, not at the top: the step and its tests run where Ray is absent

    config, plan = Config.from_dict(loop_config["config"]), WorkerPlan(**loop_config["plan"])
    _quiet_reports(plan.ray_log_level)
    t = config.training
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(t.seed)
    device = _device(config.scaling.use_gpu, context.get_local_rank())
    _record_worker(config.run_dir, rank)

    # checked by the driver before training (stages._score -> cache.check_table), in a 0700 folder
    scored = pq.read_table(plan.scored_path, columns=list(SCORED_COLUMNS))
    plan_of_steps = rank_micro_batches(pq.read_table(plan.schedule_path), rank, t.per_device_train_batch_size,
                                       t.gradient_accumulation_steps)
    total_steps = len(plan_of_steps)
    settings = StepSettings.from_config(config.kto, t, plan.desirable_weight, plan.pad_token_id)
    held_out = HeldOut(plan.eval_scored_path, config.eval, rank, pairs=config.kto.loss_type == "kto_pairwise") if (
        plan.eval_scored_path) else None
    generates = held_out is not None and bool(held_out.prompts)
    tokenizer = load_tokenizer(plan.model_path, config.model.trust_remote_code) if rank == 0 or generates else None

    saved = ray.train.get_checkpoint()
    with saved.as_directory() if saved else contextlib.nullcontext() as folder:
        state, history = checkpoint.restore(folder) if folder else (TrainerState(strategy=config.scaling.strategy), [])
        engine = _engine(config, plan, folder, total_steps, device)
    if state.step == 0:  # a fresh start: check the reference, then evaluate the policy before any update
        state.step0_drift = drift.check(engine, config, plan.model_path, plan.reference_path, plan.scored_path, rank,
                                        plan.pad_token_id)
        if "error" in state.step0_drift:  # no update: the driver stops the run with its message
            checkpoint.save_state_only(state, rank)
            return
        if held_out:
            state.eval_before = held_out.check(engine, settings, tokenizer)
    state.world_size = context.get_world_size()
    log = MetricsLog(config, history, state.step, total_steps, state.tracking_ids) if rank == 0 else None
    if rank == 0 and state.step:
        print(f"resuming from the checkpoint of step {state.step} of {total_steps}", flush=True)

    saved_step = state.step  # the latest checkpoint's: the one a stopped run keeps
    for step in range(state.step, total_steps):
        micro_batches = [MicroBatch.from_table(scored, rows) for rows in plan_of_steps[step] if rows]
        started = time.perf_counter()
        try:
            metrics = {"step": step + 1, **train_step(engine, micro_batches, settings)}
        except NonFiniteStep as error:  # every rank alike: no update was applied, no checkpoint is written
            if rank == 0:
                write_stop(config, non_finite_message(error, step + 1, plan.scored_path, saved_step))
            if log:
                log.close()
            return
        metrics["step_time_s"] = round(time.perf_counter() - started, 3)
        metrics["peak_rss_mib"] = peak_rss_mib()
        state.step = done = step + 1
        last = done == total_steps
        if held_out and (last or (config.eval.eval_steps and done % config.eval.eval_steps == 0)):
            metrics.update(held_out.metrics(engine, settings))
            if last:
                state.eval_after = held_out.check(engine, settings, tokenizer, eval_metrics=metrics)
        history.append(json.dumps(metrics) + "\n")
        if log:
            log.write(history[-1], metrics)
            state.tracking_ids = log.tracking_ids
        if last or (t.save_steps and done % t.save_steps == 0):
            checkpoint.save(engine, state, history, metrics, rank, tokenizer,
                            merge_adapters=last and bool(config.lora.r) and config.lora.save_merged)
            saved_step = done
    if log:
        log.close()


def non_finite_message(error: NonFiniteStep, step: int, scored_path: str, last_good_step: int,
                       shown: int = 10) -> str:
    """What the user reads: the step, and the rows at fault by their source file and row."""
    sources = pq.read_table(scored_path, columns=["source_file", "source_row"]).take(error.rows[:shown])
    named = ", ".join(f"{file} row {row}" for file, row in zip(sources.column("source_file").to_pylist(),
                                                               sources.column("source_row").to_pylist()))
    more = f" and {len(error.rows) - shown} more" if len(error.rows) > shown else ""
    kept = (f"the checkpoint of step {last_good_step} is kept" if last_good_step else "no checkpoint was written")
    return (f"training stopped at step {step}: its {error.what} is not finite (loss {error.loss:.6g}"
            + (f", gradient norm {error.grad_norm:.6g}" if error.grad_norm is not None else "")
            + f"), before the update was applied; {kept}. Rows at fault: {named}{more}. A NaN or infinite "
            "reference log-prob (a reference cache written by another engine or dtype) or a policy that overflows "
            "on these rows: check them, clear reference.cache_dir, or lower training.learning_rate")


def _quiet_reports(level: int) -> None:
    """Ray 2.60 logs every report ("Reporting training result ...") through a logger named by its
    file's path, outside `ray.train`, where RunConfig's logging_config does not reach."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(level)


def _device(use_gpu: bool, local_rank: int) -> torch.device:
    if not use_gpu:
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    # cuDNN's attention builds a new plan for every new batch shape, and feedback batches have
    # a new shape every step: measured 3.7x slower steps on an H200 (benchmarks/NOTES.md).
    torch.backends.cuda.enable_cudnn_sdp(False)
    return device


def _engine(config: Config, plan: WorkerPlan, folder: Optional[str], total_steps: int, device: torch.device):
    """The model (fresh, or the checkpoint's), adapters with LoRA, and the engine around them."""
    ds_config = deepspeed_settings(config)
    zero3 = ds_config is not None and ds_config["zero_optimization"]["stage"] == 3
    if ds_config:
        skip_deepspeed_shm_build(config.scaling.use_gpu)
    if zero3:
        # While this object lives, transformers builds models inside deepspeed.zero.Init: each rank
        # materialises only its partition of the weights (a 70B model is 282 GB in float32; no
        # worker could hold it whole). It is kept on the engine for the run's lifetime.
        from transformers.integrations import HfDeepSpeedConfig

        zero3_loading = HfDeepSpeedConfig(ds_config)
    lora = config.lora
    saved_model = checkpoint.model_dir(folder) if folder else None
    # With LoRA: the base model, then the adapters (fresh, or the checkpoint's).
    model = load_causal_lm(saved_model if saved_model and not lora.r else plan.model_path,
                           config.model.trust_remote_code)
    disable_dropout(model)  # before the adapters: lora.dropout is the one dropout KTO training may keep
    if lora.r:
        model = with_adapters(model, lora, saved_model)
    if config.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not ds_config:
        model.to(device)  # (DeepSpeed places the model, or its partitions, itself)
    model.train()
    engine = build_engine(config, model, total_steps, ds_config)
    if zero3:
        engine.zero3_loading = zero3_loading
    if folder:
        checkpoint.load_engine(folder, engine)
    return engine


def with_adapters(model: torch.nn.Module, lora, adapter_path: Optional[str]) -> torch.nn.Module:
    """The model with trainable LoRA adapters (PEFT) and everything else frozen."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_path:
        return PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, task_type="CAUSAL_LM"))


def rank_micro_batches(schedule, rank: int, per_device: int, accumulation: int) -> dict[int, list]:
    """{step: [row indices of micro-batch 0, 1, ...]} for this rank; a rank owns a contiguous
    run of `per_device * accumulation` slots of every global batch."""
    per_rank = per_device * accumulation
    steps = schedule.column("step").to_numpy()
    slots = schedule.column("slot").to_numpy()
    rows = schedule.column("row_index").to_numpy()
    plan: dict[int, list] = {int(step): [[] for _ in range(accumulation)] for step in np.unique(steps)}
    mine = slots // per_rank == rank
    for step, slot, row in zip(steps[mine], slots[mine], rows[mine]):
        plan[int(step)][(slot % per_rank) // per_device].append(int(row))
    return plan


def _record_worker(run_dir: str, rank: int) -> None:
    """<run>/workers.json: where each rank runs (node, host, pid), for placement checks and for
    finding a worker's process; written by rank 0 at every (re)start of the worker group."""
    import ray

    everyone = all_gather_objects({"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                                   "hostname": socket.gethostname(), "pid": os.getpid()})
    if rank == 0:
        with open(os.path.join(run_dir, "workers.json"), "w") as f:
            json.dump(everyone, f, indent=1)
