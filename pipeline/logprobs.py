"""Summed completion log-probs from token ids: the one computation that the reference
actor (hf backend) and the trainer share, so that policy == reference gives r == 0.

A forward's rows are packed end to end where the model and device allow (pipeline/packing.py),
else right-padded; only completion tokens count (prompt tokens are masked). The output head and
its float32 log-softmax run on the completion positions alone, in chunks (`token_logps`): bf16
log-softmax is visibly wrong, and a [tokens, vocabulary] float32 tensor is the largest one a
step would otherwise keep for its backward (Qwen's 152k vocabulary: 0.6 MB a token).
"""

from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from pipeline.packing import PACKABLE_MODEL_TYPES, pack, packs

# Elements of the float32 logits one chunk of the head holds (256 MiB; its softmax and gradient
# take as much again in the backward, which recomputes the chunk).
HEAD_CHUNK_ELEMENTS = 1 << 26


def collate(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask`, with the scored positions (see `batch_of`)."""
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
    # Position t predicts the token at t + 1.
    token_rows, positions = completion_mask[:, 1:].nonzero(as_tuple=True)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "token_index": (token_rows * width + positions).to(device),
        "targets": input_ids[:, 1:][token_rows, positions].to(device),
        "token_rows": token_rows.to(device),
        "num_rows": len(lengths),
        "num_tokens": sum(lengths),
    }


def batch_of(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
             pad_token_id: int, device: torch.device | str = "cpu") -> dict:
    """The rows as one forward's input: packed where `model` on `device` packs, else padded.

    Either way the batch names its scored positions: `token_index` (the flat index, in the
    forward's [rows x width] positions, of the position that predicts each completion token),
    `targets` (that token) and `token_rows` (its row); `num_tokens` counts real tokens."""
    if packs(model, device):
        return pack(prompt_ids, completion_ids, device)
    return collate(prompt_ids, completion_ids, pad_token_id, device)


def sequence_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Sum over completion tokens of log p(token | everything before it), float32, shape [rows].

    Where the architecture allows, the output head runs on completion positions only: on
    feedback data most positions are prompt or padding, and the head (vocabulary x hidden) is a
    large share of a small model's FLOPs and of its activation memory.
    """
    inputs = {name: batch[name] for name in ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q",
                                             "max_length_q") if name in batch}
    if getattr(model.config, "model_type", None) in PACKABLE_MODEL_TYPES:
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        logps = token_logps(model.get_output_embeddings(), hidden.flatten(0, 1)[batch["token_index"]],
                            batch["targets"], model.config.vocab_size)
    else:
        logits = model(**inputs, use_cache=False).logits.flatten(0, 1)[batch["token_index"]].float()
        logps = torch.log_softmax(logits, dim=-1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(batch["num_rows"], dtype=torch.float32, device=logps.device)
    return sums.index_add(0, batch["token_rows"], logps)


def token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(target) of each position from its last hidden state, float32, in chunks of positions.

    With gradients each chunk is checkpointed: its logits are dropped after the forward and
    recomputed in the backward, so the backward keeps only `hidden` (as Liger's fused linear
    losses do; the KTO loss with its class weights and precomputed reference stays in loss.py).
    """
    rows = max(1, HEAD_CHUNK_ELEMENTS // vocab_size)
    pieces = []
    for start in range(0, hidden.shape[0], rows):
        chunk, chunk_targets = hidden[start:start + rows], targets[start:start + rows]
        if torch.is_grad_enabled() and chunk.requires_grad:
            pieces.append(checkpoint(_chunk_logps, head, chunk, chunk_targets, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, chunk, chunk_targets))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def length_grouped_batches(lengths: Sequence[int], max_tokens: int, max_rows: int,
                           packed: bool = False) -> list[list[int]]:
    """Index groups of similar length (longest first), each under a token budget: padded tokens
    (the longest row times the rows), or with `packed` the rows' own tokens.

    Sorting by length keeps padding small; real feedback lengths vary widely.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def tokens(group: list[int]) -> int:  # (padded: the first row is the longest)
        return sum(lengths[i] for i in group) if packed else lengths[group[0]] * len(group)

    groups: list[list[int]] = []
    for index in order:
        if groups and len(groups[-1]) < max_rows and tokens(groups[-1] + [index]) <= max_tokens:
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
    for group in length_grouped_batches(lengths, max_tokens, max_rows, packed=packs(model, device)):
        batch = batch_of(model, [prompt_ids[i] for i in group], [completion_ids[i] for i in group], pad_token_id,
                         device)
        out[group] = sequence_logps(model, batch).cpu()
    return out
