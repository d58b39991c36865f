"""Tokenization, once, in Ray Data tasks: each input row becomes its KTO examples with token ids,
or a quarantine reason. The driver's streamed stage (stage.py) consumes what this returns."""

import functools
import hashlib
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.formats import FORMAT_COLUMNS, DataError, render, to_examples
from pipeline.data.json_lines import parse_rows

# What tokenize_batch adds to the input columns.
ADDED_COLUMNS = ("kto_side", "kto_label", "prompt_ids", "completion_ids", "prompt_tokens", "completion_tokens",
                 "prompt_hash", "row_hash", "reason")


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str, trust_remote_code: bool):
    from pipeline.models import load_tokenizer

    return load_tokenizer(path, trust_remote_code)  # once per Ray worker process, reused across tasks


def control_tokens(tokenizer) -> tuple[str, ...]:
    """The literal strings the tokenizer turns into its special tokens (BOS, EOS, pad, a chat
    template's turn markers such as <|im_start|> or <|eot_id|>)."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    return tuple(sorted({t for t in [*tokenizer.all_special_tokens, *added] if t}))


def appends_eos(tokenizer) -> bool:
    """Whether the tokenizer's own special tokens end every text with EOS (some Llama configs):
    a prompt must never end with it."""
    eos = tokenizer.eos_token_id
    with_special, without = (tokenizer("a", add_special_tokens=flag)["input_ids"] for flag in (True, False))
    return eos is not None and with_special[-1:] == [eos] != without[-1:]


@functools.lru_cache(maxsize=2)
def _tokenizer_facts(path: str, trust_remote_code: bool) -> tuple[tuple[str, ...], bool]:
    tok = _tokenizer(path, trust_remote_code)
    return control_tokens(tok), appends_eos(tok)


def cut_prompt(ids: list[int], bos: Optional[int], max_prompt_length: int) -> list[int]:
    """A prompt cut from the left to max_prompt_length tokens, keeping its BOS (the end of a prompt is
    what the completion answers); the online sampler cuts the prompts it samples from alike."""
    if len(ids) <= max_prompt_length:
        return ids
    head = 1 if bos is not None and ids[:1] == [bos] else 0
    return ids[:head] + ids[len(ids) - max_prompt_length + head:]


def _hash64(*parts: str) -> int:
    digest = hashlib.blake2b("\x1f".join(parts).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[Optional[list[int]]]:
    try:
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"] if texts else []
    except Exception:  # find the rows at fault; the rest keep their tokens
        out = []
        for text in texts:
            try:
                out.append(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
            except Exception:
                out.append(None)
        return out


def _input_rows(batch: pa.Table, fmt: str) -> tuple[pa.Table, dict[str, list], list[str]]:
    """(the rows' original columns with `path`, the format's columns as Python values, a reason
    per row that cannot be read). JSON arrives as raw text (json_lines.py) and is parsed here, a
    row at a time: each value keeps its own type, so mixed label types are per-row verdicts. Its
    original columns stay that text (one schema for every block, however the rows' types vary):
    the driver types the quarantined rows' columns when it writes them."""
    if "kto_json" in batch.column_names:
        rows, reasons = parse_rows(batch.column("kto_json").to_pylist())
        return batch, {c: [row.get(c) if row else None for row in rows] for c in FORMAT_COLUMNS[fmt]}, reasons
    missing = [c for c in FORMAT_COLUMNS[fmt] if c not in batch.column_names]
    if missing:
        source = batch.column("path")[0].as_py() if "path" in batch.column_names else "an input file"
        raise DataError(f"{source}: required column(s) {missing} missing; every file needs {FORMAT_COLUMNS[fmt]}")
    return batch, {c: batch.column(c).to_pylist() for c in FORMAT_COLUMNS[fmt]}, [""] * batch.num_rows


def tokenize_batch(batch: pa.Table, fmt: str, settings) -> pa.Table:
    """Ray Data task: each input row becomes its examples, with the original columns repeated
    (`settings`: the stage's DataSettings).

    As the model generates (and as TRL tokenizes): the prompt and the prompt + completion are
    tokenized as whole texts, the completion being what follows the prompt's ids; a row whose
    joint ids do not start with the prompt's (tokens merged across the boundary) is quarantined
    (`prompt_boundary_mismatch`). Plain text gets the tokenizer's special tokens (BOS where it has
    one) and a final EOS unless it already ends with one (a tokenizer set to end every text with
    EOS does not end the prompt with it); a chat template writes its own tokens and ends the turn
    as it does (Gemma's <end_of_turn>, Llama-3's <|eot_id|>): nothing is added. The prompt is cut
    from the left to max_prompt_length keeping its BOS, the completion from the right to what
    max_length leaves. Bad examples keep a `reason`, and no tokens; a text over
    settings.max_text_chars is refused (`text_too_long`) before it is rendered or tokenized.
    """
    tok = _tokenizer(settings.tokenizer_path, settings.trust_remote_code)
    batch, columns, row_reasons = _input_rows(batch, fmt)
    examples = to_examples(columns, fmt, settings.label_map, settings.prompt_delimiter, settings.max_text_chars)
    controls, tokenizer_appends_eos = _tokenizer_facts(settings.tokenizer_path, settings.trust_remote_code)
    refused = () if settings.allow_control_tokens else controls
    n = len(examples)
    reasons = [row_reasons[example.row] or example.reason for example in examples]
    texts: list = [None] * n
    for j, example in enumerate(examples):
        if not reasons[j]:
            texts[j] = render(example.prompt, example.completion, tok, refused, settings.max_text_chars)
            reasons[j] = texts[j].reason or example.label_reason
    prompt_ids, completion_ids = [None] * n, [None] * n
    prompt_tokens, completion_tokens = [0] * n, [0] * n
    prompt_hash, row_hash = [0] * n, [0] * n
    eos, bos = tok.eos_token_id, tok.bos_token_id
    for templated in (False, True):
        rows = [j for j in range(n) if not reasons[j] and texts[j].templated == templated]
        prompts = _encode(tok, [texts[j].prompt for j in rows], add_special_tokens=not templated)
        joints = _encode(tok, [texts[j].prompt + texts[j].completion for j in rows], add_special_tokens=not templated)
        for j, p_ids, joint in zip(rows, prompts, joints):
            if p_ids is None or joint is None:
                reasons[j] = "tokenize_failed"
                continue
            if not templated and tokenizer_appends_eos:
                p_ids, joint = p_ids[:-1], joint[:-1]  # the prompt's EOS would sit mid-sequence; one is added below
            if joint[:len(p_ids)] != p_ids:
                reasons[j] = "prompt_boundary_mismatch"
                continue
            c_ids = joint[len(p_ids):]
            if not templated and c_ids[-1:] != [eos]:
                c_ids = c_ids + [eos]
            kept = cut_prompt(p_ids, bos, settings.max_prompt_length)
            room = settings.max_length - len(kept)
            if room < 1 or not c_ids:
                reasons[j] = "no_room_for_completion"
                continue
            prompt_tokens[j], completion_tokens[j] = len(p_ids), len(c_ids)
            prompt_ids[j], completion_ids[j] = kept, c_ids[:room]
            prompt_hash[j] = _hash64(texts[j].prompt)
            row_hash[j] = _hash64(texts[j].prompt, texts[j].completion, str(examples[j].label))
    ids = pa.list_(pa.int32())
    out = batch.take(pa.array([example.row for example in examples], pa.int64()))
    # Only quarantined rows need their original values downstream; the kept rows' are dropped
    # here, halving what travels to the driver (unless the driver may still find duplicates).
    is_bad = pa.array([bool(reason) for reason in reasons])
    for index, name in enumerate(out.column_names):
        if name != "path" and not settings.deduplicate:
            column = out.column(name)
            out = out.set_column(index, name, pc.if_else(is_bad, column, pa.nulls(n, column.type)))
    added = {"kto_side": pa.array([e.side for e in examples], pa.int8()),
             "kto_label": pa.array([e.label if not r else None for e, r in zip(examples, reasons)], pa.bool_()),
             "prompt_ids": pa.array(prompt_ids, ids), "completion_ids": pa.array(completion_ids, ids),
             "prompt_tokens": pa.array(prompt_tokens, pa.int32()),
             "completion_tokens": pa.array(completion_tokens, pa.int32()),
             "prompt_hash": pa.array(prompt_hash, pa.int64()), "row_hash": pa.array(row_hash, pa.int64()),
             "reason": pa.array(reasons, pa.string())}
    for name in ADDED_COLUMNS:
        out = out.append_column(name, added[name])
    return out
