"""Held-out checks on one process: implied-reward accuracy and a generation property share.

Implied reward r = log pi(y|x) - log pi_ref(y|x), with z0 estimated from the held-out KL
pairs as in training. A desirable row counts as right when r - z0 > 0, an undesirable one
when r - z0 < 0 (so with policy == reference, every row sits at 0 and none is right).
"""

import re

import pyarrow as pa
import torch

from pipeline.logprobs import score_sequences


def implied_reward_metrics(model, scored: pa.Table, beta: float, pad_token_id: int) -> dict:
    prompts = scored.column("prompt_ids").to_pylist()
    logps = score_sequences(model, prompts, scored.column("completion_ids").to_pylist(), pad_token_id)
    kl_logps = score_sequences(model, prompts, scored.column("kl_completion_ids").to_pylist(), pad_token_id)
    labels = torch.tensor(scored.column("label").to_pylist(), dtype=torch.bool)
    rewards = logps - torch.tensor(scored.column("ref_logp").to_numpy())
    kl_unclamped = (kl_logps - torch.tensor(scored.column("ref_kl_logp").to_numpy())).double().mean()
    z0 = kl_unclamped.clamp(min=0).float()
    right = torch.where(labels, rewards - z0 > 0, rewards - z0 < 0)
    chosen, rejected = beta * rewards[labels], beta * rewards[~labels]
    metrics = {"accuracy": right.float().mean().item(), "kl": z0.item(), "kl_unclamped": kl_unclamped.item()}
    if len(chosen) and len(rejected):
        metrics["rewards/margins"] = (chosen.mean() - rejected.mean()).item()
    return metrics


@torch.inference_mode()
def property_share(model, tokenizer, prompt_ids: list, pattern: str, max_new_tokens: int) -> tuple[float, list]:
    """Share of greedy generations (one prompt at a time, no padding) matching `pattern`."""
    regex = re.compile(pattern)
    texts = []
    for ids in prompt_ids:
        output = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(output[0, len(ids):], skip_special_tokens=True))
    return sum(bool(regex.search(t)) for t in texts) / max(len(texts), 1), texts
