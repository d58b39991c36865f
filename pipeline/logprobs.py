"""Summed completion log-probs from token ids: the one computation that the reference
actor (hf backend) and the trainer share, so that policy == reference gives r == 0.

Sequences are right-padded; only completion tokens count (prompt tokens are masked);
log-softmax runs in float32 on the completion positions alone (bf16 log-softmax is
visibly wrong, and the prompt positions need no full-vocabulary float32 copy).
"""

from typing import Sequence

import torch


def collate(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, and `completion_mask` (1 on completion tokens)."""
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(lengths, default=0)
    input_ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    completion_mask = torch.zeros((len(lengths), width), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        n_prompt, n_total = len(prompt), len(prompt) + len(completion)
        input_ids[row, :n_prompt] = torch.as_tensor(prompt, dtype=torch.long)
        input_ids[row, n_prompt:n_total] = torch.as_tensor(completion, dtype=torch.long)
        attention_mask[row, :n_total] = 1
        completion_mask[row, n_prompt:n_total] = True
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "completion_mask": completion_mask.to(device),
    }


# Architectures whose causal-LM head is exactly `lm_head(last hidden state)` (no logit scaling or
# soft-capping), so it can run on the completion positions alone.
PLAIN_HEAD_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3"}


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over completion tokens of log p(token | everything before it), float32, shape [n].

    Where the architecture allows, the output head runs on completion positions only: on
    feedback data most positions are prompt or padding, and the head (vocabulary x hidden) is a
    large share of a small model's FLOPs and of its activation memory.
    """
    # Position t predicts the token at t + 1.
    scored = batch["completion_mask"][:, 1:]
    rows, positions = scored.nonzero(as_tuple=True)
    targets = batch["input_ids"][:, 1:][rows, positions]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if getattr(model.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES:
        hidden = model.get_decoder()(**inputs).last_hidden_state
        token_logits = model.get_output_embeddings()(hidden[:, :-1][rows, positions]).float()
    else:
        token_logits = model(**inputs).logits[:, :-1][rows, positions].float()
    token_logps = torch.log_softmax(token_logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(batch["input_ids"].shape[0], dtype=torch.float32, device=token_logps.device)
    return sums.index_add(0, rows, token_logps)


def length_grouped_batches(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Index groups of similar length (longest first), each under a padded-token budget.

    Sorting by length keeps padding small; real feedback lengths vary widely.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for index in order:
        if groups and len(groups[-1]) < max_rows and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= max_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


@torch.inference_mode()
def score_sequences(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]],
                    completion_ids: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu",
                    max_tokens: int = 4096, max_rows: int = 64) -> torch.Tensor:
    """`sequence_logps` of many rows without gradients, in length-grouped batches, in row order (CPU)."""
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    out = torch.empty(len(lengths), dtype=torch.float32)
    for group in length_grouped_batches(lengths, max_tokens, max_rows):
        batch = collate([prompt_ids[i] for i in group], [completion_ids[i] for i in group], pad_token_id, device)
        out[group] = sequence_logps(model, batch).cpu()
    return out
