"""The distributed KTO step: one optimizer step (`train_step`) or the held-out metrics
(`eval_step`) over a global batch whose rows are split among the workers.

torch and torch.distributed only (no Ray): give `train_step` this worker's micro-batches of one
global step; when torch.distributed is initialised it all-reduces across the group, otherwise it
is the whole batch. The collectives of a step (z0's sums, the metrics) live here; how gradients
become an update (summed by hand, or by DeepSpeed ZeRO) lives in engines.py.
"""

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from pipeline.logprobs import batch_of, length_grouped_batches, sequence_logps
from pipeline.packing import packs
from pipeline.train.engines import all_gather_objects, all_reduce_max, all_reduce_sum, world_size
from pipeline.train.loss import kto_loss

# The columns of the scored data set that a step reads.
SCORED_COLUMNS = ("prompt_ids", "completion_ids", "kl_completion_ids", "label", "ref_logp", "ref_kl_logp")


@dataclass
class StepSettings:
    beta: float
    desirable_weight: float
    undesirable_weight: float
    loss_type: str
    pad_token_id: int
    max_tokens_per_forward: int = 0  # 0: one forward a scheduled micro-batch

    @classmethod
    def from_config(cls, kto, training, desirable_weight: float, pad_token_id: int) -> "StepSettings":
        """From the run's `kto` and `training` sections; the desirable weight as resolved from the
        label counts (`auto`) and the tokenizer's pad token come from the driver's stages."""
        return cls(beta=kto.beta, desirable_weight=desirable_weight, undesirable_weight=kto.undesirable_weight,
                   loss_type=kto.loss_type, pad_token_id=pad_token_id,
                   max_tokens_per_forward=training.max_tokens_per_forward)


@dataclass
class MicroBatch:
    prompt_ids: list
    completion_ids: list
    kl_completion_ids: list
    labels: torch.Tensor  # bool
    ref_logp: torch.Tensor
    ref_kl_logp: torch.Tensor
    rows: Optional[list] = None  # the rows' indices in the scored table: what a failed step names

    @classmethod
    def from_table(cls, scored, rows: list[int]) -> "MicroBatch":
        """These rows of a scored Arrow table (Python lists for these rows only: a worker holds the
        scored set in Arrow's compact form, not as Python objects)."""
        return cls._of(scored.take(pa.array(list(rows), pa.int64())), list(rows))

    @classmethod
    def from_step_rows(cls, table) -> "MicroBatch":
        """A micro-batch's rows as the step file holds them (pipeline/data/step_file.py), named by
        their row_index in the scored table."""
        return cls._of(table, table.column("row_index").to_pylist())

    @classmethod
    def _of(cls, picked, rows: list[int]) -> "MicroBatch":
        column = lambda name: picked.column(name).to_pylist()  # noqa: E731
        return cls(prompt_ids=column("prompt_ids"), completion_ids=column("completion_ids"),
                   kl_completion_ids=column("kl_completion_ids"),
                   labels=torch.tensor(column("label"), dtype=torch.bool),
                   ref_logp=torch.tensor(column("ref_logp"), dtype=torch.float32),
                   ref_kl_logp=torch.tensor(column("ref_kl_logp"), dtype=torch.float32), rows=rows)


class NonFiniteStep(RuntimeError):
    """A step's loss or gradient is NaN or infinite: raised before the optimizer applies it, on
    every rank alike (the verdict is all-reduced), so the weights stay those of the last good step.
    `rows`: the scored-table rows at fault (non-finite inputs or log-probs; else the rows whose
    loss is not finite; else every row of the step), across all ranks."""

    def __init__(self, what: str, rows: list[int], loss: float, grad_norm: Optional[float] = None):
        self.what, self.rows, self.loss, self.grad_norm = what, rows, loss, grad_norm
        super().__init__(f"non-finite {what} (loss {loss}, gradient norm {grad_norm}) from rows {rows[:20]}")


def forward_groups(micro_batches: list[MicroBatch], completions: str, max_tokens: int,
                   pairs: bool = False, packed: bool = False) -> list[list[int]]:
    """Which of this rank's rows (indices into the micro-batches laid end to end) share a forward.

    0: the scheduled micro-batches. Otherwise rows of similar length, under `max_tokens` tokens
    a forward (padded tokens; with `packed` forwards, the rows' own): padding is most of the
    waste on real feedback, and the sums the step takes do not depend on how rows are grouped.
    With `pairs` (kto_pairwise: rows 2k and 2k+1 are a pair, whose loss needs both) a pair is
    never split, and stays in its order.
    """
    if max_tokens <= 0:
        starts = np.cumsum([0] + [len(mb.prompt_ids) for mb in micro_batches])
        return [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
    lengths = [len(p) + len(c) for mb in micro_batches for p, c in zip(mb.prompt_ids, getattr(mb, completions))]
    if not pairs:
        return length_grouped_batches(lengths, max_tokens, max_rows=len(lengths), packed=packed)
    longer = [max(lengths[i], lengths[i + 1]) for i in range(0, len(lengths), 2)]
    return [[row for k in group for row in (2 * k, 2 * k + 1)]
            for group in length_grouped_batches(longer, max(max_tokens // 2, 1), max_rows=len(longer), packed=packed)]


def _padded(groups: list[list[int]], equal: bool, device: torch.device) -> list[Optional[list[int]]]:
    """The rank's forward groups, padded with `None` (a forward that counts for nothing) up to the
    busiest rank's count where the engine needs every rank to run the same forwards."""
    if not equal or world_size() == 1:
        return groups
    count = all_reduce_max(torch.tensor([len(groups)], device=device))
    return groups + [None] * (int(count.item()) - len(groups))


def _concatenated(micro_batches: list[MicroBatch]) -> MicroBatch:
    """This rank's rows of a step laid end to end (a rank may hold none: a last partial batch
    smaller than the worker count)."""
    return MicroBatch(
        rows=[r for mb in micro_batches for r in (mb.rows or [None] * len(mb.prompt_ids))],
        prompt_ids=[p for mb in micro_batches for p in mb.prompt_ids],
        completion_ids=[c for mb in micro_batches for c in mb.completion_ids],
        kl_completion_ids=[c for mb in micro_batches for c in mb.kl_completion_ids],
        labels=torch.cat([mb.labels for mb in micro_batches] + [torch.zeros(0, dtype=torch.bool)]),
        ref_logp=torch.cat([mb.ref_logp for mb in micro_batches] + [torch.zeros(0)]),
        ref_kl_logp=torch.cat([mb.ref_kl_logp for mb in micro_batches] + [torch.zeros(0)]),
    )


# |implied reward - reference point| below this is float noise, not a verdict: at policy == reference
# every row sits there (~1e-6 nats apart), and strict inequalities would make accuracy a coin flip.
ACCURACY_TIE_NATS = 1e-4


def right_side(ratios: torch.Tensor, labels: torch.Tensor, reference_point) -> torch.Tensor:
    """Per row: 1 if its implied reward log pi/pi_ref lies on its label's side of the reference
    point (above for desirable, below for undesirable), 0 if on the other, 0.5 for a tie."""
    margin = ratios - reference_point
    side = torch.where(labels, margin > 0, margin < 0).double()
    return torch.where(margin.abs() < ACCURACY_TIE_NATS, torch.full_like(side, 0.5), side)


def _device(engine) -> torch.device:
    return next(engine.module.parameters()).device


def _batch(model, rows: list[int], prompt_ids: list, completion_ids: list, pad_token_id: int, device) -> dict:
    if not rows:  # a forward that counts for nothing (ZeRO needs every rank to run as many as the busiest)
        return batch_of(model, [[pad_token_id]], [[pad_token_id]], pad_token_id, device)
    return batch_of(model, [prompt_ids[i] for i in rows], [completion_ids[i] for i in rows], pad_token_id, device)


def logps_without_grad(engine, prompt_ids: list, completion_ids: list, groups: list[list[int]],
                       pad_token_id: int) -> torch.Tensor:
    """Summed completion log-probs of this rank's rows, in row order, float32, no gradient, one
    forward a group. Every rank calls it (an engine that needs equal forwards pads the groups)."""
    device = _device(engine)
    out = torch.zeros(len(prompt_ids), dtype=torch.float32, device=device)
    with torch.no_grad():
        for group in _padded(groups, engine.equal_forwards, device):
            batch = _batch(engine.module, group or [], prompt_ids, completion_ids, pad_token_id, device)
            logps = sequence_logps(engine.module, batch)
            if group:
                out[group] = logps
    return out


def _kto_pass(engine, micro_batches: list[MicroBatch], s: StepSettings, backward: bool) -> dict:
    """The forwards of one KTO step over every rank's rows, with the step's global sums; with
    `backward`, each group's share of the loss is back-propagated (the update is the caller's).

    z0 first: a no-grad forward on every KL pair, one all-reduce of [sum of KL log-ratios, count],
    then clamp and detach. Every forward of the step then sees the same reference point, whatever
    the worker count or grouping.
    """
    model = engine.module
    device = _device(engine)
    rows = _concatenated(micro_batches)
    packed = packs(model, device)
    faulty = ~torch.isfinite(rows.ref_logp)  # rows whose inputs or log-probs are NaN / inf
    loss_not_finite = torch.zeros(len(rows.prompt_ids), dtype=torch.bool)

    if s.loss_type == "apo_zero_unpaired":  # no reference point: no KL forward (as TRL); kl reads 0
        kl_sum = torch.zeros((), dtype=torch.float64, device=device)
    else:
        kl_groups = forward_groups(micro_batches, "kl_completion_ids", s.max_tokens_per_forward, packed=packed)
        kl_logps = logps_without_grad(engine, rows.prompt_ids, rows.kl_completion_ids, kl_groups, s.pad_token_id)
        kl_sum = (kl_logps - rows.ref_kl_logp.to(device)).double().sum()
        faulty |= ~torch.isfinite(kl_logps.cpu() - rows.ref_kl_logp)
    kl_totals = torch.stack([kl_sum, torch.tensor(float(len(rows.prompt_ids)), dtype=torch.float64, device=device)])
    all_reduce_sum(kl_totals)
    global_rows = kl_totals[1].clamp(min=1)
    kl_unclamped = kl_totals[0] / global_rows
    z0 = kl_unclamped.clamp(min=0).float().detach()

    # loss, rewards and log-probs by side, tokens, rows on the right side of z0 (implied-reward accuracy)
    stats = torch.zeros(9, dtype=torch.float64, device=device)
    groups = forward_groups(micro_batches, "completion_ids", s.max_tokens_per_forward,
                            pairs=s.loss_type == "kto_pairwise", packed=packed)
    with contextlib.nullcontext() if backward else torch.no_grad():
        for group in _padded(groups, engine.equal_forwards, device):
            batch = _batch(model, group or [], rows.prompt_ids, rows.completion_ids, s.pad_token_id, device)
            logps = sequence_logps(model, batch)
            if not group:
                if backward:
                    engine.backward(logps.sum() * 0.0)
                continue
            labels, ref_logp = rows.labels[group].to(device), rows.ref_logp[group].to(device)
            losses = kto_loss(logps, ref_logp, labels, z0, beta=s.beta, desirable_weight=s.desirable_weight,
                              undesirable_weight=s.undesirable_weight, loss_type=s.loss_type)
            if backward:
                engine.backward(losses.sum() / global_rows.float())
            faulty[group] |= ~torch.isfinite(logps.detach().cpu())
            loss_not_finite[group] = ~torch.isfinite(losses.detach().cpu())
            ratios = (logps - ref_logp).detach()
            rewards = (s.beta * ratios).double()
            chosen = labels.double()
            # apo_zero_unpaired has no reference point: its rewards are judged against 0
            right = right_side(ratios, labels, 0.0 if s.loss_type == "apo_zero_unpaired" else z0)
            stats += torch.stack([
                losses.detach().double().sum(),
                (rewards * chosen).sum(), chosen.sum(),
                (rewards * (1 - chosen)).sum(), (1 - chosen).sum(),
                (logps.detach().double() * chosen).sum(), (logps.detach().double() * (1 - chosen)).sum(),
                torch.tensor(float(batch["num_tokens"]), dtype=torch.float64, device=device), right.sum(),
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
        "_rows_at_fault": (_named(rows.rows, faulty), _named(rows.rows, loss_not_finite), list(rows.rows)),
    }


def _named(rows: list, mask: torch.Tensor) -> list:
    return [row for row, bad in zip(rows, mask.tolist()) if bad]


def train_step(engine, micro_batches: list[MicroBatch], s: StepSettings) -> dict:
    """One optimizer step over a global batch; returns its globally aggregated metrics. A NaN or
    infinite loss or gradient raises NonFiniteStep before the update: one bad row (a NaN reference
    log-prob) would otherwise turn every weight into NaN, and every later checkpoint with it."""
    metrics = _kto_pass(engine, micro_batches, s, backward=True)
    metrics.pop("accuracy")  # (of the weights before this step's update; eval reports it)
    at_fault = metrics.pop("_rows_at_fault")
    values = {"loss": metrics["loss"], "KL estimate": metrics["kl_unclamped"]}  # (an infinite one clamps to 0)
    not_finite = [name for name, value in values.items() if not math.isfinite(value)]
    if not_finite:
        _stop(at_fault, " and ".join(not_finite), metrics["loss"])

    def refuse_a_non_finite_gradient(grad_norm: float) -> None:  # the engine's norm, the same on every rank
        if not math.isfinite(grad_norm):
            _stop(at_fault, "gradient", metrics["loss"], None if math.isnan(grad_norm) else grad_norm)

    metrics["learning_rate"] = engine.learning_rate()
    metrics["grad_norm"] = engine.step(before_update=refuse_a_non_finite_gradient)
    return metrics


def _stop(at_fault: tuple, what: str, loss: float, grad_norm: Optional[float] = None) -> None:
    """Raise NonFiniteStep naming the rows at fault on every rank (a collective)."""
    everyone = all_gather_objects(at_fault)
    for kind in range(3):  # faulty inputs or log-probs, else non-finite losses, else the whole step
        rows = sorted(row for rank_rows in everyone for row in rank_rows[kind] if row is not None)
        if rows or kind == 2:
            raise NonFiniteStep(what, rows, loss, grad_norm)


EVAL_METRICS = ("loss", "kl", "kl_unclamped", "rewards/chosen", "rewards/rejected", "rewards/margins", "accuracy",
                "examples")


def eval_step(engine, eval_rows: MicroBatch, s: StepSettings) -> dict:
    """Held-out metrics of the policy as it is now, under `eval/` names: the same forwards and
    all-reduced sums as a training step over every rank's share of the eval rows, one batch, no
    update. accuracy: the share of rows whose implied reward falls on their label's side of z0
    (ties half; see right_side)."""
    # (no scheduled micro-batches here: the eval set is one batch, grouped under a token budget)
    budget = dataclasses.replace(s, max_tokens_per_forward=s.max_tokens_per_forward or 4096)
    engine.module.eval()  # lora.dropout, the one dropout training may keep, stays out of held-out numbers
    try:
        metrics = _kto_pass(engine, [eval_rows], budget, backward=False)
    finally:
        engine.module.train()
    return {f"eval/{name}": metrics[name] for name in EVAL_METRICS}
