"""The step-0 drift check: does the reference engine agree with the trainer at the start?

When the policy starts from the reference weights, the implied reward r = log pi - log pi_ref
is 0 for every row at step 0, exactly, if both sides compute the same numbers. A reference
scored by another engine (vLLM) or in another dtype (bf16) gives r != 0 instead, a bias that
enters every loss term and z0. This computes the trainer's own log-probs (float32, the same
`sequence_logps` the training step uses) on a sample and compares them with the cached values.
"""

import numpy as np
import pyarrow as pa
import pyarrow.dataset
import torch

from pipeline.logprobs import score_sequences


class DriftError(RuntimeError):
    """The cached reference log-probs are too far from the trainer's own at step 0."""


def sample_rows(scored_path: str, rows: int, seed: int) -> pa.Table:
    """A seeded sample of the scored file, read without loading the rest of it."""
    scored = pyarrow.dataset.dataset(scored_path)
    order = np.random.default_rng(seed).permutation(scored.count_rows())[:rows]
    return scored.take(pa.array(np.sort(order)))


def step0_drift(model_path: str, sample: pa.Table, pad_token_id: int, trust_remote_code: bool = False) -> dict:
    """Absolute differences, per sequence and per token, between the initial policy's summed
    log-probs and the cached reference values, over completions and KL completions."""
    from pipeline.models import load_causal_lm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(model_path, trust_remote_code).to(device).eval()
    prompts = sample.column("prompt_ids").to_pylist() * 2
    completions = sample.column("completion_ids").to_pylist() + sample.column("kl_completion_ids").to_pylist()
    cached = np.concatenate([sample.column("ref_logp").to_numpy(), sample.column("ref_kl_logp").to_numpy()])
    ours = score_sequences(model, prompts, completions, pad_token_id, device).double().numpy()
    per_sequence = np.abs(ours - cached)
    per_token = per_sequence / np.maximum([len(c) for c in completions], 1)
    return {"rows": sample.num_rows, "sequences": len(prompts),
            "mean_abs_per_sequence": float(per_sequence.mean()), "max_abs_per_sequence": float(per_sequence.max()),
            "mean_abs_per_token": float(per_token.mean()), "max_abs_per_token": float(per_token.max())}
