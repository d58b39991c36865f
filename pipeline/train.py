"""The distributed KTO step and the Ray Train worker loop around it.

`train_step` runs with or without Ray: give it this worker's micro-batches of one global
step; when torch.distributed is initialised it all-reduces across the group, otherwise it
is the whole batch. Collectives live here and nowhere else. Gradients are summed with one
explicit all-reduce after accumulation (data parallelism, as DDP does), because the loss
is already normalised by the global row count and because a rank whose share of a step is
empty must still take part without running a forward.
"""

import json
import math
import os
import resource
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from transformers import get_scheduler

from pipeline.logprobs import collate, length_grouped_batches, sequence_logps
from pipeline.loss import kto_loss


@dataclass
class StepSettings:
    beta: float
    desirable_weight: float
    undesirable_weight: float
    loss_type: str
    max_grad_norm: float
    pad_token_id: int
    max_tokens_per_forward: int = 0  # 0: one forward a scheduled micro-batch


@dataclass
class MicroBatch:
    prompt_ids: list
    completion_ids: list
    kl_completion_ids: list
    labels: torch.Tensor  # bool
    ref_logp: torch.Tensor
    ref_kl_logp: torch.Tensor


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _all_reduce_gradients(grads: list[torch.Tensor], bucket_bytes: int = 32 * 2**20) -> None:
    """SUM the gradients across workers in place, a bucket of flattened tensors at a time: few
    collectives, and at most one bucket of extra memory (not a second copy of every gradient)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads + [None]:
        if grad is not None:
            bucket.append(grad)
            size += grad.numel() * grad.element_size()
        if bucket and (grad is None or size >= bucket_bytes):
            flat = _all_reduce_sum(_flatten_dense_tensors(bucket))
            for target, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                target.copy_(reduced)
            bucket, size = [], 0


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


def train_step(model, optimizer, scheduler, micro_batches: list[MicroBatch], s: StepSettings) -> dict:
    """One optimizer step over a global batch; returns its globally aggregated metrics."""
    device = next(model.parameters()).device
    rows = MicroBatch(  # this rank's rows of the step, laid end to end
        prompt_ids=[p for mb in micro_batches for p in mb.prompt_ids],
        completion_ids=[c for mb in micro_batches for c in mb.completion_ids],
        kl_completion_ids=[c for mb in micro_batches for c in mb.kl_completion_ids],
        # (a rank may hold no rows of a step: a last partial batch smaller than the worker count)
        labels=torch.cat([mb.labels for mb in micro_batches] + [torch.zeros(0, dtype=torch.bool)]),
        ref_logp=torch.cat([mb.ref_logp for mb in micro_batches] + [torch.zeros(0)]),
        ref_kl_logp=torch.cat([mb.ref_kl_logp for mb in micro_batches] + [torch.zeros(0)]),
    )
    # z0 first: a no-grad forward on every KL pair of the step, one all-reduce of
    # [sum of KL log-ratios, count], then clamp and detach. Every forward of the step
    # then sees the same reference point, whatever the worker count or grouping.
    kl_totals = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for group in forward_groups(micro_batches, "kl_completion_ids", s.max_tokens_per_forward):
            batch = collate([rows.prompt_ids[i] for i in group], [rows.kl_completion_ids[i] for i in group],
                            s.pad_token_id, device)
            kl_logps = sequence_logps(model, batch)
            kl_totals[0] += (kl_logps - rows.ref_kl_logp[group].to(device)).double().sum()
            kl_totals[1] += len(group)
    _all_reduce_sum(kl_totals)
    global_rows = kl_totals[1].clamp(min=1)
    kl_unclamped = kl_totals[0] / global_rows
    z0 = kl_unclamped.clamp(min=0).float().detach()

    # loss, rewards and log-probs by side, tokens
    stats = torch.zeros(8, dtype=torch.float64, device=device)
    for group in forward_groups(micro_batches, "completion_ids", s.max_tokens_per_forward):
        batch = collate([rows.prompt_ids[i] for i in group], [rows.completion_ids[i] for i in group],
                        s.pad_token_id, device)
        logps = sequence_logps(model, batch)
        labels, ref_logp = rows.labels[group].to(device), rows.ref_logp[group].to(device)
        losses = kto_loss(logps, ref_logp, labels, z0, beta=s.beta, desirable_weight=s.desirable_weight,
                          undesirable_weight=s.undesirable_weight, loss_type=s.loss_type)
        (losses.sum() / global_rows.float()).backward()
        rewards = (s.beta * (logps - ref_logp)).detach().double()
        chosen = labels.double()
        stats += torch.stack([
            losses.detach().double().sum(),
            (rewards * chosen).sum(), chosen.sum(),
            (rewards * (1 - chosen)).sum(), (1 - chosen).sum(),
            (logps.detach().double() * chosen).sum(), (logps.detach().double() * (1 - chosen)).sum(),
            batch["attention_mask"].sum().double(),
        ])
    _all_reduce_sum(stats)

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _all_reduce_gradients([p.grad for p in params])
    max_norm = s.max_grad_norm if s.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    learning_rate = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    loss_sum, chosen_sum, n_chosen, rejected_sum, n_rejected, chosen_logps, rejected_logps, tokens = stats.tolist()

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
        "learning_rate": learning_rate,
        "grad_norm": grad_norm.item(),
        "num_tokens": int(tokens),
        "examples": int(kl_totals[1].item()),
    }


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout would make the KL and policy forwards disagree and the worker count matter (TRL does this too)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def make_optimizer(model, learning_rate: float, weight_decay: float, scheduler_type: str, warmup_ratio: float,
                   total_steps: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
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


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's worker function: resume if a checkpoint exists, run the scheduled steps,
    write metrics (rank 0), checkpoint, and save the final Hugging Face model."""
    import ray.train  # here, not at the top: train_step must import where Ray is absent

    from pipeline.models import load_causal_lm, load_tokenizer

    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(config["seed"])
    device = torch.device("cuda", context.get_local_rank()) if config["use_gpu"] else torch.device("cpu")
    if config["use_gpu"]:
        # cuDNN's attention builds a new plan for every new batch shape, and feedback batches have
        # a new shape every step: measured 3.7x slower steps on an H200 (benchmarks/NOTES.md).
        torch.backends.cuda.enable_cudnn_sdp(False)

    scored = pq.read_table(config["scored_path"], columns=[
        "prompt_ids", "completion_ids", "kl_completion_ids", "label", "ref_logp", "ref_kl_logp"])
    schedule = pq.read_table(config["schedule_path"])
    plan = rank_micro_batches(schedule, rank, config["per_device_train_batch_size"],
                              config["gradient_accumulation_steps"])
    total_steps = len(plan)

    checkpoint = ray.train.get_checkpoint()
    start_step = 0
    model_path = config["model_path"]
    if checkpoint:
        with checkpoint.as_directory() as folder:
            with open(os.path.join(folder, "trainer_state.json")) as f:
                start_step = json.load(f)["step"]
            model = load_causal_lm(folder, config["trust_remote_code"])
            state = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True)
        if rank == 0:
            print(f"resuming from the checkpoint of step {start_step} of {total_steps}", flush=True)
    else:
        model = load_causal_lm(model_path, config["trust_remote_code"])
        state = None
    model.to(device).train()
    disable_dropout(model)
    optimizer, scheduler = make_optimizer(model, config["learning_rate"], config["weight_decay"],
                                          config["lr_scheduler_type"], config["warmup_ratio"], total_steps)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])

    metrics_path = os.path.join(config["run_dir"], "metrics.jsonl")
    if rank == 0:
        _keep_metrics_up_to(metrics_path, start_step)
    settings = StepSettings(**config["step_settings"])
    for step in range(start_step, total_steps):
        micro_batches = [gather_micro_batch(scored, rows) for rows in plan[step] if rows]
        started = time.perf_counter()
        metrics = {"step": step + 1, **train_step(model, optimizer, scheduler, micro_batches, settings)}
        metrics["step_time_s"] = round(time.perf_counter() - started, 3)
        metrics["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        done = step + 1
        if done == total_steps or (config["save_steps"] and done % config["save_steps"] == 0):
            _report_checkpoint(model, optimizer, scheduler, done, metrics, rank)
    if rank == 0:
        model.save_pretrained(os.path.join(config["run_dir"], "model"), safe_serialization=True)
        load_tokenizer(config["tokenizer_path"], config["trust_remote_code"]).save_pretrained(
            os.path.join(config["run_dir"], "model"))


def _keep_metrics_up_to(path: str, step: int) -> None:
    """On resume, drop lines of steps after the checkpoint, so each step appears exactly once."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(lines)


def _report_checkpoint(model, optimizer, scheduler, step: int, metrics: dict, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            model.save_pretrained(folder, safe_serialization=True)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": torch.get_rng_state()}, os.path.join(folder, "optimizer.pt"))
            # Written last: a checkpoint without it is incomplete and never loaded.
            with open(os.path.join(folder, "trainer_state.json"), "w") as f:
                json.dump({"step": step}, f)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint)
