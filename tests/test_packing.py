"""Packed forwards and the chunked head are exact: per-row log-probs and gradients equal the padded
forward's and each row scored alone by transformers' own forward, for Llama-, Qwen2- (grouped-query
attention) and Mistral-shaped (sliding window shorter than the rows) tiny models."""

import json
import random

import pytest
import torch

from pipeline import logprobs
from pipeline.logprobs import collate, pack, sequence_logps, token_logps
from pipeline.models import load_causal_lm
from pipeline.packing import PACKED_ATTENTION

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 1}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 1, "sliding_window": 8}),
}


def tiny_folder(tmp_path, architecture: str) -> str:
    import transformers

    config_class, model_class, extra = ARCHITECTURES[architecture]
    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=256)
    config = getattr(transformers, config_class)(**{**shape, **extra})
    torch.manual_seed(0)
    folder = str(tmp_path / architecture)
    getattr(transformers, model_class)(config).save_pretrained(folder)
    return folder


def rows(seed: int = 0, count: int = 6):
    """Rows of 1-19 prompt tokens and 1-19 completion tokens: lengths from 2 to 38, many longer
    than the Mistral model's sliding window of 8."""
    rng = random.Random(seed)
    draw = lambda: [rng.randrange(3, 300) for _ in range(rng.randrange(1, 20))]  # noqa: E731
    return [draw() for _ in range(count)], [draw() for _ in range(count)]


def alone(model, prompt: list, completion: list) -> torch.Tensor:
    """One row by transformers' own forward (its full logits, no mask, no packing), by hand."""
    ids = torch.tensor([prompt + completion])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return logps[torch.arange(len(targets)), targets][len(prompt) - 1:].sum()


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_packed_forward_equals_padded_and_each_row_alone(tmp_path, architecture):
    import transformers

    folder = tiny_folder(tmp_path, architecture)
    model = load_causal_lm(folder)
    assert model.config._attn_implementation == PACKED_ATTENTION
    plain = getattr(transformers, ARCHITECTURES[architecture][1]).from_pretrained(folder, attn_implementation="sdpa")
    prompts, completions = rows()
    expected = torch.stack([alone(plain, p, c) for p, c in zip(prompts, completions)])

    packed = sequence_logps(model, pack(prompts, completions))
    padded = sequence_logps(model, collate(prompts, completions, pad_token_id=0))
    torch.testing.assert_close(packed, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(padded, expected, rtol=0, atol=1e-4)

    gradients = []
    for batch in (pack(prompts, completions), collate(prompts, completions, pad_token_id=0)):
        model.zero_grad()
        (sequence_logps(model, batch) * torch.linspace(-1, 1, len(prompts))).sum().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-4, atol=1e-5)

    # The row boundaries are what keeps rows apart: attending across them changes later rows (all of
    # them but one whose completion lies beyond Mistral's window of the row before).
    across = pack(prompts, completions)
    del across["cu_seq_lens_q"]
    assert ((sequence_logps(model, across)[1:] - expected[1:]).abs() > 1e-3).sum() >= len(prompts) - 2


def test_a_row_whose_completion_starts_the_sequence(tmp_path):
    """An empty prompt: the first token has no predictor and is not scored, packed or padded."""
    model = load_causal_lm(tiny_folder(tmp_path, "llama"))
    prompts, completions = [[], [5, 6]], [[7, 8, 9], [10]]
    packed = sequence_logps(model, pack(prompts, completions))
    torch.testing.assert_close(packed, sequence_logps(model, collate(prompts, completions, pad_token_id=0)),
                               rtol=0, atol=1e-5)
    assert pack(prompts, completions)["targets"].tolist() == [8, 9, 10]


def test_chunked_head_equals_the_whole_head_and_keeps_no_logits(monkeypatch):
    torch.manual_seed(0)
    vocab, hidden_size, positions = 1000, 16, 37
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    hidden = torch.randn(positions, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (positions,))
    weights = torch.linspace(-2, 2, positions)

    whole = torch.log_softmax(head(hidden), dim=-1)[torch.arange(positions), targets]
    (whole * weights).sum().backward()
    expected_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", 5 * vocab)  # 8 chunks, the last one short
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        chunked = token_logps(head, hidden, targets, vocab)
    torch.testing.assert_close(chunked, whole.detach(), rtol=0, atol=1e-5)
    assert not [shape for shape in kept if shape[-1] == vocab and len(shape) > 1]  # only the weight [vocab, hidden]
    (chunked * weights).sum().backward()
    torch.testing.assert_close(hidden.grad, expected_grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, expected_grads[1], rtol=1e-5, atol=1e-6)

    # Without checkpointing, the same chunks keep their logits for the backward: the check above can see them.
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        _ = torch.cat([logprobs._chunk_logps(head, hidden[i:i + 5], targets[i:i + 5]) for i in range(0, positions, 5)])
    assert [shape for shape in kept if shape[-1] == vocab and len(shape) > 1 and shape[0] <= 5]


def test_packed_groups_count_real_tokens():
    lengths = [100, 90, 30, 20, 10]
    assert logprobs.length_grouped_batches(lengths, 200, max_rows=8, packed=True) == [[0, 1], [2, 3, 4]]
    # padded: the longest row times the rows
    assert logprobs.length_grouped_batches(lengths, 200, max_rows=8) == [[0, 1], [2, 3, 4]]
    assert logprobs.length_grouped_batches([100, 60, 40], 200, max_rows=8, packed=True) == [[0, 1, 2]]
    assert logprobs.length_grouped_batches([100, 60, 40], 200, max_rows=8) == [[0, 1], [2]]


def test_saved_model_config_is_untouched(tmp_path):
    model = load_causal_lm(tiny_folder(tmp_path, "qwen2"))
    model.save_pretrained(tmp_path / "saved")
    with open(tmp_path / "saved" / "config.json") as f:
        assert PACKED_ATTENTION not in json.dumps(json.load(f))


@pytest.mark.parametrize("architecture", ["llama", "mistral"])
def test_generation_is_transformers_own(tmp_path, architecture):
    """The packed attention is only for packed forwards: generating from a cache (one row, and a
    left-padded batch) gives exactly the tokens transformers' SDPA gives."""
    import transformers

    folder = tiny_folder(tmp_path, architecture)
    model = load_causal_lm(folder)
    plain = getattr(transformers, ARCHITECTURES[architecture][1]).from_pretrained(folder, attn_implementation="sdpa")
    prompts = torch.tensor([[5, 17, 42, 9, 88, 23, 61, 7, 14, 3]])
    batch = {"input_ids": torch.tensor([[0, 0, 0, 5, 17, 42], [11, 12, 13, 14, 15, 16]]),
             "attention_mask": torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])}
    for inputs in ({"input_ids": prompts}, batch):
        settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        ours, theirs = model.generate(**inputs, **settings), plain.generate(**inputs, **settings)
        assert ours.tolist() == theirs.tolist()
