"""The distributed KTO step and the Ray Train worker loop around it.

`train_step` runs with or without Ray: give it this worker's micro-batches of one global
step; when torch.distributed is initialised it all-reduces across the group, otherwise it
is the whole batch. The collectives of the step (z0's sums, the metrics) live here; how
gradients become an update (summed by hand, or by DeepSpeed ZeRO) lives in `engines.py`.
"""

import contextlib
import dataclasses
import json
import math
import os
import resource
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from transformers import get_scheduler

from pipeline.engines import DeepSpeedEngine, PlainEngine, all_reduce_sum, deepspeed_config, world_size
from pipeline.logprobs import collate, length_grouped_batches, sequence_logps
from pipeline.loss import kto_loss
from pipeline.reporting import MetricsLog


@dataclass
class StepSettings:
    beta: float
    desirable_weight: float
    undesirable_weight: float
    loss_type: str
    pad_token_id: int
    max_tokens_per_forward: int = 0  # 0: one forward a scheduled micro-batch


SCORED_COLUMNS = ("prompt_ids", "completion_ids", "kl_completion_ids", "label", "ref_logp", "ref_kl_logp")


@dataclass
class MicroBatch:
    prompt_ids: list
    completion_ids: list
    kl_completion_ids: list
    labels: torch.Tensor  # bool
    ref_logp: torch.Tensor
    ref_kl_logp: torch.Tensor


def forward_groups(micro_batches: list[MicroBatch], completions: str, max_tokens: int) -> list[list[int]]:
    """Which of this rank's rows (indices into the micro-batches laid end to end) share a forward.

    0: the scheduled micro-batches. Otherwise rows of similar length, under `max_tokens` padded
    tokens a forward: padding is most of the waste on real feedback, and the sums the step
    takes do not depend on how rows are grouped.
    """
    if max_tokens <= 0:
        starts = np.cumsum([0] + [len(mb.prompt_ids) for mb in micro_batches])
        return [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
    lengths = [len(p) + len(c) for mb in micro_batches for p, c in zip(mb.prompt_ids, getattr(mb, completions))]
    return length_grouped_batches(lengths, max_tokens, max_rows=len(lengths))


def _padded(groups: list[list[int]], equal: bool, device: torch.device) -> list[Optional[list[int]]]:
    """The rank's forward groups, padded with `None` (a forward that counts for nothing) up to the
    busiest rank's count where the engine needs every rank to run the same forwards."""
    if not equal or world_size() == 1:
        return groups
    count = torch.tensor([len(groups)], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return groups + [None] * (int(count.item()) - len(groups))


def _concatenated(micro_batches: list[MicroBatch]) -> MicroBatch:
    """This rank's rows of a step laid end to end (a rank may hold none: a last partial batch
    smaller than the worker count)."""
    return MicroBatch(
        prompt_ids=[p for mb in micro_batches for p in mb.prompt_ids],
        completion_ids=[c for mb in micro_batches for c in mb.completion_ids],
        kl_completion_ids=[c for mb in micro_batches for c in mb.kl_completion_ids],
        labels=torch.cat([mb.labels for mb in micro_batches] + [torch.zeros(0, dtype=torch.bool)]),
        ref_logp=torch.cat([mb.ref_logp for mb in micro_batches] + [torch.zeros(0)]),
        ref_kl_logp=torch.cat([mb.ref_kl_logp for mb in micro_batches] + [torch.zeros(0)]),
    )


def _kto_pass(engine, micro_batches: list[MicroBatch], s: StepSettings, backward: bool) -> dict:
    """The forwards of one KTO step over every rank's rows, with the step's global sums; with
    `backward`, each group's share of the loss is back-propagated (the update is the caller's).

    z0 first: a no-grad forward on every KL pair, one all-reduce of [sum of KL log-ratios, count],
    then clamp and detach. Every forward of the step then sees the same reference point, whatever
    the worker count or grouping.
    """
    model = engine.module
    device = next(model.parameters()).device
    rows = _concatenated(micro_batches)
    empty_forward = collate([[s.pad_token_id]], [[s.pad_token_id]], s.pad_token_id, device)

    def batch_of(group, completions):
        if group is None:
            return empty_forward
        return collate([rows.prompt_ids[i] for i in group], [completions[i] for i in group], s.pad_token_id, device)

    kl_totals = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        kl_groups = forward_groups(micro_batches, "kl_completion_ids", s.max_tokens_per_forward)
        for group in _padded(kl_groups, engine.equal_forwards, device):
            kl_logps = sequence_logps(model, batch_of(group, rows.kl_completion_ids))
            if group is not None:
                kl_totals[0] += (kl_logps - rows.ref_kl_logp[group].to(device)).double().sum()
                kl_totals[1] += len(group)
    all_reduce_sum(kl_totals)
    global_rows = kl_totals[1].clamp(min=1)
    kl_unclamped = kl_totals[0] / global_rows
    z0 = kl_unclamped.clamp(min=0).float().detach()

    # loss, rewards and log-probs by side, tokens, rows on the right side of z0 (implied-reward accuracy)
    stats = torch.zeros(9, dtype=torch.float64, device=device)
    groups = forward_groups(micro_batches, "completion_ids", s.max_tokens_per_forward)
    with contextlib.nullcontext() if backward else torch.no_grad():
        for group in _padded(groups, engine.equal_forwards, device):
            batch = batch_of(group, rows.completion_ids)
            logps = sequence_logps(model, batch)
            if group is None:
                if backward:
                    engine.backward(logps.sum() * 0.0)
                continue
            labels, ref_logp = rows.labels[group].to(device), rows.ref_logp[group].to(device)
            losses = kto_loss(logps, ref_logp, labels, z0, beta=s.beta, desirable_weight=s.desirable_weight,
                              undesirable_weight=s.undesirable_weight, loss_type=s.loss_type)
            if backward:
                engine.backward(losses.sum() / global_rows.float())
            ratios = (logps - ref_logp).detach()
            rewards = (s.beta * ratios).double()
            chosen = labels.double()
            right = torch.where(labels, ratios - z0 > 0, ratios - z0 < 0)
            stats += torch.stack([
                losses.detach().double().sum(),
                (rewards * chosen).sum(), chosen.sum(),
                (rewards * (1 - chosen)).sum(), (1 - chosen).sum(),
                (logps.detach().double() * chosen).sum(), (logps.detach().double() * (1 - chosen)).sum(),
                batch["attention_mask"].sum().double(), right.double().sum(),
            ])
    all_reduce_sum(stats)
    loss_sum, chosen_sum, n_chosen, rejected_sum, n_rejected, chosen_logps, rejected_logps, tokens, right = \
        stats.tolist()

    def mean(total, count):
        return total / count if count else None

    chosen_reward, rejected_reward = mean(chosen_sum, n_chosen), mean(rejected_sum, n_rejected)
    return {
        "loss": loss_sum / global_rows.item(),
        "kl": z0.item(),
        "kl_unclamped": kl_unclamped.item(),
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": (chosen_reward - rejected_reward
                            if chosen_reward is not None and rejected_reward is not None else None),
        "logps/chosen": mean(chosen_logps, n_chosen),
        "logps/rejected": mean(rejected_logps, n_rejected),
        "accuracy": right / global_rows.item(),
        "num_tokens": int(tokens),
        "examples": int(kl_totals[1].item()),
    }


def train_step(engine, micro_batches: list[MicroBatch], s: StepSettings) -> dict:
    """One optimizer step over a global batch; returns its globally aggregated metrics."""
    metrics = _kto_pass(engine, micro_batches, s, backward=True)
    metrics.pop("accuracy")  # (of the weights before this step's update; eval reports it)
    metrics["learning_rate"] = engine.learning_rate()
    metrics["grad_norm"] = engine.step()
    return metrics


def eval_step(engine, eval_rows: MicroBatch, s: StepSettings) -> dict:
    """Held-out metrics of the policy as it is now, under `eval/` names: the same forwards and
    all-reduced sums as a training step over every rank's share of the eval rows, one batch, no
    update. accuracy: the share of rows whose implied reward falls on their label's side of z0."""
    # (no scheduled micro-batches here: the eval set is one batch, grouped under a token budget)
    budget = dataclasses.replace(s, max_tokens_per_forward=s.max_tokens_per_forward or 4096)
    engine.module.eval()  # lora.dropout, the one dropout training may keep, stays out of held-out numbers
    try:
        metrics = _kto_pass(engine, [eval_rows], budget, backward=False)
    finally:
        engine.module.train()
    return {f"eval/{name}": metrics[name] for name in (
        "loss", "kl", "kl_unclamped", "rewards/chosen", "rewards/rejected", "rewards/margins", "accuracy",
        "examples")}


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout would make the KL and policy forwards disagree and the worker count matter (TRL does this too)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def with_adapters(model: torch.nn.Module, lora: dict, adapter_path: Optional[str]) -> torch.nn.Module:
    """The model with trainable LoRA adapters (PEFT) and everything else frozen."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_path:
        return PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    return get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                            target_modules=lora["target_modules"], task_type="CAUSAL_LM"))


def make_optimizer(model, learning_rate: float, weight_decay: float, scheduler_type: str, warmup_ratio: float,
                   total_steps: int):
    trainable = [p for p in model.parameters() if p.requires_grad]  # (LoRA: the adapters only)
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay)
    scheduler = get_scheduler(scheduler_type, optimizer, num_warmup_steps=math.ceil(warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


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


def gather_micro_batch(scored: pa.Table, rows: list[int]) -> MicroBatch:
    """The micro-batch's rows, taken from the Arrow table (Python lists for these rows only:
    a worker holds the scored set in Arrow's compact form, not as Python objects)."""
    picked = scored.take(pa.array(rows, pa.int64()))
    column = lambda name: picked.column(name).to_pylist()  # noqa: E731
    return MicroBatch(
        prompt_ids=column("prompt_ids"), completion_ids=column("completion_ids"),
        kl_completion_ids=column("kl_completion_ids"),
        labels=torch.tensor(column("label"), dtype=torch.bool),
        ref_logp=torch.tensor(column("ref_logp"), dtype=torch.float32),
        ref_kl_logp=torch.tensor(column("ref_kl_logp"), dtype=torch.float32),
    )


def deepspeed_settings(config: dict) -> Optional[dict]:
    """The DeepSpeed config of a `deepspeed` run (bf16 on GPUs, float32 on CPUs); None for ddp."""
    if config["strategy"] != "deepspeed":
        return None
    ds = config["deepspeed"]
    return deepspeed_config(ds["zero_stage"], ds["offload_optimizer"], ds["offload_param"], bf16=config["use_gpu"],
                            max_grad_norm=config["max_grad_norm"],
                            per_device_train_batch_size=config["per_device_train_batch_size"])


def build_engine(config: dict, model: torch.nn.Module, total_steps: int, ds_config: Optional[dict]):
    """The run's strategy around a loaded model: `ddp` (summed by hand) or DeepSpeed ZeRO."""
    optimizer, scheduler = make_optimizer(model, config["learning_rate"], config["weight_decay"],
                                          config["lr_scheduler_type"], config["warmup_ratio"], total_steps)
    if ds_config:
        return DeepSpeedEngine(model, optimizer, scheduler, ds_config)
    return PlainEngine(model, optimizer, scheduler, config["max_grad_norm"])


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's worker function: resume from the latest checkpoint if there is one, run the
    scheduled steps, write metrics (rank 0), and checkpoint (the last checkpoint holds the model).

    The data position is the step number: every step's rows come from the saved schedule, so a
    restarted worker group continues with exactly the rows of the first step it had not finished.
    """
    import ray.train  # here, not at the top: train_step must import where Ray is absent

    from pipeline.models import load_tokenizer

    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(config["seed"])
    device = torch.device("cuda", context.get_local_rank()) if config["use_gpu"] else torch.device("cpu")
    if config["use_gpu"]:
        torch.cuda.set_device(device)
        # cuDNN's attention builds a new plan for every new batch shape, and feedback batches have
        # a new shape every step: measured 3.7x slower steps on an H200 (benchmarks/NOTES.md).
        torch.backends.cuda.enable_cudnn_sdp(False)
    _record_worker(config["run_dir"], rank)

    scored = pq.read_table(config["scored_path"], columns=list(SCORED_COLUMNS))
    eval_rows = None
    if config["eval_scored_path"]:  # this rank's share of the held-out rows: every world_size-th one
        held_out = pq.read_table(config["eval_scored_path"], columns=list(SCORED_COLUMNS))
        eval_rows = gather_micro_batch(held_out, list(range(rank, held_out.num_rows, world_size())))
    schedule = pq.read_table(config["schedule_path"])
    plan = rank_micro_batches(schedule, rank, config["per_device_train_batch_size"],
                              config["gradient_accumulation_steps"])
    total_steps = len(plan)

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as folder:
        engine, start_step, history, tracking_ids = _start(config, folder, total_steps, device)
    log = None
    if rank == 0:
        log = MetricsLog(config["run_dir"], history, start_step, config["report_to"], config["run_name"],
                         config["params"], tracking_ids)
    if rank == 0 and start_step:
        print(f"resuming from the checkpoint of step {start_step} of {total_steps}", flush=True)

    settings = StepSettings(**config["step_settings"])
    tokenizer = load_tokenizer(config["model_path"], config["trust_remote_code"]) if rank == 0 else None
    for step in range(start_step, total_steps):
        micro_batches = [gather_micro_batch(scored, rows) for rows in plan[step] if rows]
        started = time.perf_counter()
        metrics = {"step": step + 1, **train_step(engine, micro_batches, settings)}
        metrics["step_time_s"] = round(time.perf_counter() - started, 3)
        metrics["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        done = step + 1
        due = done == total_steps or (config["eval_steps"] and done % config["eval_steps"] == 0)
        if eval_rows is not None and due:
            metrics.update(eval_step(engine, eval_rows, settings))
        history.append(json.dumps(metrics) + "\n")
        if log:
            log.write(history[-1], metrics)
        if done == total_steps or (config["save_steps"] and done % config["save_steps"] == 0):
            _report_checkpoint(engine, config, done, history, metrics, rank, tokenizer,
                               log.tracking_ids if log else {})
    if log:
        log.close()


def _start(config: dict, folder: Optional[str], total_steps: int, device: torch.device):
    """The engine, the first step to run, the metrics lines so far and the MLflow / W&B run ids:
    fresh, or from a checkpoint."""
    from pipeline.models import load_causal_lm

    start_step, history, tracking_ids = 0, [], {}
    if folder:
        state_path = os.path.join(folder, "trainer_state.json")
        if not os.path.exists(state_path):
            raise RuntimeError(f"checkpoint {folder} has no trainer_state.json: it was not completely written")
        with open(state_path) as f:
            state = json.load(f)
        start_step, tracking_ids = state["step"], state.get("tracking_ids", {})
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            history = f.readlines()
        torch.set_rng_state(torch.load(os.path.join(folder, "rng.pt"), weights_only=True))
    ds_config = deepspeed_settings(config)
    zero3 = ds_config is not None and ds_config["zero_optimization"]["stage"] == 3
    if zero3:
        # While this object lives, transformers builds models inside deepspeed.zero.Init: each rank
        # materialises only its partition of the weights (a 70B model is 282 GB in float32; no
        # worker could hold it whole). It is kept on the engine for the run's lifetime.
        from transformers.integrations import HfDeepSpeedConfig

        zero3_loading = HfDeepSpeedConfig(ds_config)
    lora = config["lora"]
    saved_model = os.path.join(folder, "model") if folder else None
    # With LoRA: the base model, then the adapters (fresh, or the checkpoint's).
    model = load_causal_lm(saved_model if saved_model and not lora["r"] else config["model_path"],
                           config["trust_remote_code"])
    disable_dropout(model)  # before the adapters: lora.dropout is the one dropout KTO training may keep
    if lora["r"]:
        model = with_adapters(model, lora, saved_model)
    if config["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not ds_config:
        model.to(device)  # (DeepSpeed places the model, or its partitions, itself)
    model.train()
    engine = build_engine(config, model, total_steps, ds_config)
    if zero3:
        engine.zero3_loading = zero3_loading
    if folder:
        engine.load(folder)
    return engine, start_step, history, tracking_ids


def _record_worker(run_dir: str, rank: int) -> None:
    """<run>/workers.json: where each rank runs (node, host, pid), for placement checks and for
    finding a worker's process; written by rank 0 at every (re)start of the worker group."""
    import ray

    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
          "pid": os.getpid()}
    everyone = [me]
    if world_size() > 1:
        everyone = [None] * world_size()
        dist.all_gather_object(everyone, me)
    if rank == 0:
        with open(os.path.join(run_dir, "workers.json"), "w") as f:
            json.dump(everyone, f, indent=1)


def _report_checkpoint(engine, config: dict, step: int, history: list[str], metrics: dict, rank: int,
                       tokenizer, tracking_ids: dict) -> None:
    """Every rank writes its part (DeepSpeed: its optimizer partition) into a folder of its own;
    Ray Train merges the parts into one checkpoint and registers it only when all have arrived."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        engine.export(os.path.join(folder, "model"), rank)
        engine.save(folder, rank)
        if rank == 0:
            tokenizer.save_pretrained(os.path.join(folder, "model"))
            torch.save(torch.get_rng_state(), os.path.join(folder, "rng.pt"))
            with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
                f.writelines(history)
            with open(os.path.join(folder, "trainer_state.json"), "w") as f:  # last: marks it complete
                json.dump({"step": step, "world_size": world_size(), "strategy": config["strategy"],
                           "tracking_ids": tracking_ids}, f)
        checkpoint = ray.train.Checkpoint.from_directory(folder) if os.listdir(folder) else None
        ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint)
