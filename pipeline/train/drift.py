"""The step-0 drift check, on the workers: does the reference engine agree with the trainer?

When the policy starts from the reference weights, the implied reward r = log pi - log pi_ref
is 0 for every row at step 0, exactly, if both sides compute the same numbers. A reference
scored by another engine (vLLM) or in another dtype than the trainers' (a bfloat16 trainer
against a float32 reference, or the reverse) gives r != 0 instead, a bias that enters every loss
term and z0. The check runs for every backend and dtype: it costs one forward of its sample. Before the first update the workers compute the policy's own
log-probs (their engine, dtype and device: what the step will compute) on a seeded sample of
the scored rows, split among them, and compare them with the cached reference values.
"""

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.data.step_file import take_rows
from pipeline.logprobs import length_grouped_batches
from pipeline.train.engines import all_reduce_max, all_reduce_sum, world_size
from pipeline.train.step import logps_without_grad


def skip_reason(config, model_path: str, reference_path: str) -> Optional[str]:
    """Why the check cannot find anything on this run (None: run it)."""
    r = config.reference
    if r.drift_check_rows == 0:
        return "reference.drift_check_rows is 0"
    if reference_path != model_path:
        return f"reference.model ({r.model}) is not the policy: r != 0 at step 0 is expected"
    return None


def sample_rows(scored_path: str, rows: int, seed: int) -> pa.Table:
    """A seeded sample of the scored file, read without loading the rest of it."""
    count = pq.ParquetFile(scored_path).metadata.num_rows
    # (choice without replacement: memory of the sample's size, not the file's)
    return take_rows(scored_path, np.sort(np.random.default_rng(seed).choice(count, min(rows, count), replace=False)))


def measure(engine, sample: pa.Table, rank: int, pad_token_id: int, max_tokens: int) -> dict:
    """Absolute differences, per sequence and per token, between the policy's summed log-probs and
    the cached reference values over the sample's completions and KL completions; this rank
    scores every world_size-th row, the totals are all-reduced (every rank calls it)."""
    mine = sample.take(pa.array(range(rank, sample.num_rows, world_size()), pa.int64()))
    prompts = mine.column("prompt_ids").to_pylist() * 2
    completions = mine.column("completion_ids").to_pylist() + mine.column("kl_completion_ids").to_pylist()
    cached = torch.tensor(np.concatenate([mine.column("ref_logp").to_numpy(), mine.column("ref_kl_logp").to_numpy()]),
                          dtype=torch.float64)
    scored = torch.isfinite(cached)  # (without z0, KL completions are not scored: NaN)
    prompts, completions = [p for p, keep in zip(prompts, scored) if keep], [c for c, k in zip(completions, scored) if k]
    cached = cached[scored]
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    groups = length_grouped_batches(lengths, max_tokens, max_rows=64)
    engine.module.eval()
    try:
        ours = logps_without_grad(engine, prompts, completions, groups, pad_token_id).double().cpu()
    finally:
        engine.module.train()
    per_sequence = (ours - cached).abs()
    per_token = per_sequence / torch.tensor([max(len(c), 1) for c in completions], dtype=torch.float64)
    device = next(engine.module.parameters()).device  # NCCL, on GPUs, reduces device tensors only
    sums = all_reduce_sum(torch.tensor([per_sequence.sum(), per_token.sum(), len(completions)], dtype=torch.float64,
                                       device=device)).cpu()
    maxima = all_reduce_max(torch.tensor([per_sequence.max() if len(completions) else 0.0,
                                          per_token.max() if len(completions) else 0.0], dtype=torch.float64,
                                         device=device)).cpu()
    sequences = int(sums[2].item())
    return {"rows": sample.num_rows, "sequences": sequences,
            "mean_abs_per_sequence": sums[0].item() / max(sequences, 1), "max_abs_per_sequence": maxima[0].item(),
            "mean_abs_per_token": sums[1].item() / max(sequences, 1), "max_abs_per_token": maxima[1].item()}


def check(engine, config, model_path: str, reference_path: str, scored_path: str, rank: int,
          pad_token_id: int) -> dict:
    """The drift check of a fresh run (every rank calls it): its measurements, or why it was
    skipped; `error` holds the message when the drift is above reference.drift_max_abs."""
    reason = skip_reason(config, model_path, reference_path)
    if reason:
        return {"skipped": reason}
    r = config.reference
    sample = sample_rows(scored_path, r.drift_check_rows, config.training.seed)
    drift = measure(engine, sample, rank, pad_token_id, config.training.max_tokens_per_forward or 4096)
    if drift["max_abs_per_sequence"] > r.drift_max_abs:
        drift["error"] = (
            f"at step 0 the reference log-probs ({r.backend}, {r.dtype}) differ from the trainer's own by up to "
            f"{drift['max_abs_per_sequence']:.4g} nats a sequence ({drift['max_abs_per_token']:.3g} a token) on "
            f"{drift['sequences']} sequences, above reference.drift_max_abs = {r.drift_max_abs:g}: that bias "
            "enters every reward and z0. Score the reference in float32 (--set reference.dtype=float32) or with "
            "--set reference.backend=hf; raise reference.drift_max_abs only if you accept the bias.")
    return drift
