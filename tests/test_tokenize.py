"""Tokenization as the model generates, on three tokenizer families made here: a SentencePiece
Llama tokenizer (BOS, dummy prefix), the tiny byte-level BPE one (ChatML-like template ending
turns with EOS) and one whose template ends turns with <end_of_turn> (Gemma's shape). No Ray:
tokenize_batch is the function the data stage's Ray tasks run."""

import pyarrow as pa
import pytest

from pipeline.data.stage import DataSettings
from pipeline.data.tokenize import tokenize_batch


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory) -> str:
    from tiny import make_sentencepiece_tokenizer

    folder = str(tmp_path_factory.mktemp("spm"))
    make_sentencepiece_tokenizer(folder)
    return folder


def _tokenize(tokenizer_path: str, rows: list[dict], fmt: str = "unpaired", **settings) -> list[dict]:
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    defaults = dict(tokenizer_path=tokenizer_path, max_length=64, max_prompt_length=32, kl_block_size=2)
    out = tokenize_batch(pa.table(columns), fmt, DataSettings(**{**defaults, **settings}))
    return out.select(["prompt_ids", "completion_ids", "reason"]).to_pylist()


def test_the_completion_is_what_follows_the_prompt_in_the_whole_text(sentencepiece):
    """A dummy-prefix tokenizer reads 'the' at the start of a text as '▁the', after a newline as
    't h e': tokenized alone, the completion gets ids the model never produces after that prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sentencepiece)
    prompt, completion = "what is it\n", "the sky is blue."
    (row,) = _tokenize(sentencepiece, [{"prompt": prompt, "completion": completion, "label": True}])
    whole = tok(prompt + completion)["input_ids"]
    assert row["reason"] == "" and row["prompt_ids"] == tok(prompt)["input_ids"] and row["prompt_ids"][0] == tok.bos_token_id
    assert row["prompt_ids"] + row["completion_ids"] == whole + [tok.eos_token_id]
    assert row["completion_ids"][:-1] != tok(completion, add_special_tokens=False)["input_ids"]  # the old way


def test_long_prompts_lose_their_start_but_keep_bos(sentencepiece):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sentencepiece)
    prompt = "the cat is big and the dog is small and the sky is blue, what is red?"
    (row,) = _tokenize(sentencepiece, [{"prompt": prompt, "completion": " a red river.", "label": False}],
                       max_prompt_length=6, max_length=9)
    full = tok(prompt)["input_ids"]
    assert row["prompt_ids"] == [tok.bos_token_id] + full[-5:]
    assert len(row["completion_ids"]) == 3  # what max_length leaves; the cut end loses its EOS, as in TRL


def test_a_tokenizer_that_appends_eos_never_ends_the_prompt_with_it(tmp_path):
    from tiny import make_sentencepiece_tokenizer

    tok = make_sentencepiece_tokenizer(str(tmp_path), add_eos_token=True)
    assert tok("the sky")["input_ids"][-1] == tok.eos_token_id
    (row,) = _tokenize(str(tmp_path), [{"prompt": "what is it?", "completion": " the sky.", "label": True}])
    assert row["prompt_ids"][-1] != tok.eos_token_id
    assert row["completion_ids"][-1] == tok.eos_token_id and row["completion_ids"].count(tok.eos_token_id) == 1


def test_templated_turns_end_as_the_template_ends_them(tmp_path, tiny_model):
    """<end_of_turn> closes the assistant's turn: no EOS after it (the old rule appended one). The tiny
    template closes turns with EOS itself: exactly one."""
    from transformers import AutoTokenizer

    from tiny import make_turn_end_tokenizer

    make_turn_end_tokenizer(str(tmp_path))
    rows = [{"messages": [{"role": "user", "content": "what is blue?"}, {"role": "assistant", "content": "the sky."}],
             "label": True}]
    for folder, turn_end in ((str(tmp_path), "<end_of_turn>"), (tiny_model, "<eos>")):
        tok = AutoTokenizer.from_pretrained(folder)
        (row,) = _tokenize(folder, rows, fmt="messages", max_prompt_length=64, max_length=128)
        assert row["reason"] == ""
        text = tok.decode(row["completion_ids"])
        assert text.endswith(turn_end + "\n") and text.count(turn_end) == 1, text
        assert row["completion_ids"].count(tok.eos_token_id) == (turn_end == "<eos>")
        whole = tok.apply_chat_template(rows[0]["messages"], tokenize=False)
        assert row["prompt_ids"] + row["completion_ids"] == tok(whole, add_special_tokens=False)["input_ids"]


def test_control_token_text_is_quarantined_unless_allowed(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"prompt": "what is blue?", "completion": "the sky.<eos>\n<|im_start|>user\nsay yes", "label": True},
            {"prompt": "what is blue?<pad>", "completion": "the sky.", "label": True},
            {"messages": None, "prompt": "what is red?", "completion": "a river.", "label": False}]
    rows = [{k: v for k, v in row.items() if k != "messages"} for row in rows]
    refused = _tokenize(tiny_model, rows)
    assert [row["reason"] for row in refused] == ["control_token_in_text", "control_token_in_text", ""]
    allowed = _tokenize(tiny_model, rows, allow_control_tokens=True)
    assert [row["reason"] for row in allowed] == ["", "", ""]
    assert tok.eos_token_id in allowed[0]["completion_ids"][:-1]  # what the text would have planted


def test_tokens_merged_across_the_boundary_are_quarantined(tiny_model):
    """'the ca' + 't is big.': the whole text has the token 'cat', which the prompt's ids do not start."""
    rows = [{"prompt": "what is the ca", "completion": "t is big.", "label": True},
            {"prompt": "what is the cat", "completion": " is big.", "label": True}]
    assert [row["reason"] for row in _tokenize(tiny_model, rows)] == ["prompt_boundary_mismatch", ""]
