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
import uuid
from typing import Optional

import pyarrow.fs
import torch

from pipeline.config import Config
from pipeline.data.step_file import RankSteps, prefetched, take_rows
from pipeline.fit import WorkerPlan, write_stop
from pipeline.models import disable_dropout, load_causal_lm, load_tokenizer
from pipeline.train import checkpoint, drift
from pipeline.train.checkpoint import TrainerState
from pipeline.train.engines import all_gather_objects, build_engine, deepspeed_settings, skip_deepspeed_shm_build
from pipeline.train.held_out import HeldOut
from pipeline.train.step import MicroBatch, NonFiniteStep, StepSettings, train_step
from pipeline.train.trackers import MetricsLog, peak_rss_mib

PREFETCH_STEPS = 2  # steps read and decoded ahead of the one training


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
    attempt = _record_worker(config.run_dir, rank)

    # The rows of this rank's coming steps, read a row group at a time (checked by the driver
    # before training, run.py -> cache.check_table, in a 0700 folder)
    steps = RankSteps(plan.steps_path, rank, t.per_device_train_batch_size, t.gradient_accumulation_steps)
    total_steps = steps.total_steps
    settings = StepSettings.from_config(config.kto, t, plan.desirable_weight, plan.pad_token_id)
    held_out = HeldOut(plan.eval_scored_path, config.eval, rank, pairs=config.kto.loss_type == "kto_pairwise") if (
        plan.eval_scored_path) else None
    generates = held_out is not None and bool(held_out.prompts)
    tokenizer = load_tokenizer(plan.model_path, config.model.trust_remote_code) if rank == 0 or generates else None

    storage = context.get_storage()
    local_storage = isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem)
    scratch_dir = config.output.scratch_dir or (None if local_storage else os.path.join(config.run_dir, "scratch"))
    if rank == 0:  # (before any rank saves: the first save follows a step's collectives)
        checkpoint.remove_incomplete(storage)

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
    coming = prefetched(((step, [MicroBatch.from_step_rows(rows) for rows in micro if rows.num_rows])
                         for step, micro in steps.read(state.step)), PREFETCH_STEPS)
    for step, micro_batches in coming:
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
            no_room = checkpoint.save(engine, state, history, metrics, rank, tokenizer, attempt, scratch_dir,
                                      merge_adapters=last and bool(config.lora.r) and config.lora.save_merged)
            if no_room:  # every rank alike; nothing of this checkpoint was written
                if rank == 0:
                    kept = f"the checkpoint of step {saved_step} is kept" if saved_step else "no checkpoint was written"
                    write_stop(config, f"training stopped after step {done}: {no_room} ({kept})")
                break
            saved_step = done
    if log:
        log.close()


def non_finite_message(error: NonFiniteStep, step: int, scored_path: str, last_good_step: int,
                       shown: int = 10) -> str:
    """What the user reads: the step, and the rows at fault by their source file and row."""
    sources = take_rows(scored_path, sorted(error.rows[:shown]), columns=["source_file", "source_row"])
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
    if config.trainer_gradient_checkpointing:
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


def _record_worker(run_dir: str, rank: int) -> str:
    """<run>/workers.json: where each rank runs (node, host, pid), for placement checks and for
    finding a worker's process; written by rank 0 at every (re)start of the worker group. Returns
    this start's id, the same on every rank (rank 0's): it names the checkpoints this start writes."""
    import ray

    everyone = all_gather_objects({"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                                   "hostname": socket.gethostname(), "pid": os.getpid(),
                                   "attempt": uuid.uuid4().hex[:8]})
    if rank == 0:
        with open(os.path.join(run_dir, "workers.json"), "w") as f:
            json.dump(everyone, f, indent=1)
    return everyone[0]["attempt"]
