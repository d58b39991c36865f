"""Padding-free forwards: a forward's rows laid end to end as one sequence, each row attending only
to itself, with positions restarting at every row.

Real feedback lengths vary widely; padded to the longest row, a forward spends a quarter to a half
of its layer FLOPs and activation memory on padding (benchmarks/NOTES.md). Packed, it spends none.

The model runs the `kto_packed` attention (registered with transformers' AttentionInterface and
set by pipeline.models.load_causal_lm for the architectures in PACKABLE_MODEL_TYPES): a forward
that carries `cu_seq_lens_q` (the row boundaries, the name transformers' flash attention reads)
gets attention per row: torch's flash-attention varlen kernel on GPUs (`varlen_attn`), causal SDPA
row by row on CPUs. Any other forward (a padded batch, generation) is plain SDPA, as before.
transformers' own packed path (position ids alone, no mask) would build a [tokens, tokens] mask
and attend across every row pair: more work than padding on a CPU, gigabytes on a GPU.
"""

import functools
import inspect
from typing import Sequence

import torch

PACKED_ATTENTION = "kto_packed"
# Architectures whose attention passes the forward's keyword arguments through to the attention
# function and whose output head is exactly `lm_head(last hidden state)`.
PACKABLE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3"}


@functools.cache
def register() -> str:
    """Registers `kto_packed` (attention and mask functions) with transformers, once a process."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def mask(*, attention_mask=None, q_length: int, kv_length: int, **kwargs):
        # No padding and no cache (a packed forward, or one unpadded sequence): no mask, the attention
        # below applies causality (and a sliding window) itself, never a [tokens, tokens] tensor.
        # Anything else (padding, decoding from a cache) gets SDPA's mask as transformers builds it.
        if attention_mask is None and q_length == kv_length:
            return None
        return sdpa_mask(attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, mask)
    return PACKED_ATTENTION


def packs(model: torch.nn.Module, device: torch.device | str) -> bool:
    """Whether forwards of `model` on `device` should be packed: the model runs `kto_packed`, and
    the device has a per-row attention that pays (CPU, or a GPU with torch's varlen kernel; without
    it a GPU would launch one attention a row and layer, and padded batches are faster)."""
    if getattr(model.config, "_attn_implementation", None) != PACKED_ATTENTION:
        return False
    return torch.device(device).type == "cpu" or _varlen() is not None


@functools.cache
def _varlen():
    """torch's flash-attention varlen kernel, where this torch has it in the form used here."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if "window_size" in inspect.signature(varlen_attn).parameters else None


def pack(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
         device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One [1, tokens] sequence of every row's prompt + completion, with `position_ids`, the row
    boundaries `cu_seq_lens_q` and `max_length_q`, and the scored positions (see logprobs.batch_of)."""
    ids, positions, bounds = [], [], [0]
    token_index, targets, token_rows = [], [], []
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        sequence = list(prompt) + list(completion)
        start = bounds[-1]
        ids += sequence
        positions += range(len(sequence))
        bounds.append(start + len(sequence))
        # position j - 1 of the row predicts its completion token j (a row's first token has no predictor)
        first = max(len(prompt), 1)
        token_index += range(start + first - 1, start + len(sequence) - 1)
        targets += sequence[first:]
        token_rows += [row] * (len(sequence) - first)
    as_long = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return {
        "input_ids": as_long([ids]), "position_ids": as_long([positions]),
        "cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32, device=device),
        "max_length_q": max((b - a for a, b in zip(bounds, bounds[1:])), default=0),
        "token_index": as_long(token_index), "targets": as_long(targets), "token_rows": as_long(token_rows),
        "num_rows": len(bounds) - 1, "num_tokens": len(ids),
    }


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, scaling=None, dropout: float = 0.0, sliding_window=None, **kwargs):
    """transformers' attention-function interface: query [batch, heads, tokens, dim], key and value
    [batch, kv heads, tokens, dim]; returns ([batch, tokens, heads, dim], None)."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None and (attention_mask is not None or query.shape[2] != key.shape[2]):
        # a padded batch, or decoding from a cache: SDPA with its mask, as transformers runs it
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, **kwargs)
    dropout = dropout if module.training else 0.0
    gqa = query.shape[1] != key.shape[1]
    if bounds is not None and query.is_cuda and _varlen() is not None:
        assert not dropout, "attention dropout is zeroed in training (pipeline.models.disable_dropout)"
        window = (sliding_window - 1 if sliding_window else -1, 0)
        out = _varlen()(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), bounds, bounds,
                        kwargs["max_length_q"], kwargs["max_length_q"], scale=scaling, window_size=window,
                        enable_gqa=gqa)
        return out.unsqueeze(0), None
    rows = bounds.tolist() if bounds is not None else [0, query.shape[2]]
    pieces = []
    for start, end in zip(rows, rows[1:]):
        q, k, v = (t[:, :, start:end] for t in (query, key, value))
        length = end - start
        if sliding_window and length > sliding_window:  # causal within the window (transformers' rule)
            i = torch.arange(length, device=q.device)
            band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < sliding_window)
            pieces.append(torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=band, dropout_p=dropout, scale=scaling, enable_gqa=gqa))
        else:
            pieces.append(torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=length > 1, dropout_p=dropout, scale=scaling, enable_gqa=gqa))
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None
