"""The online prompt set, read once into the run directory: each prompt is text or a conversation
(a list of {role, content} messages ending with the user's turn, rendered with the chat template),
split into training and held-out prompts by a hash of the prompt (the same split on every run;
held-out prompts are never trained on and measure the pass rate). Rows that cannot be a prompt are
quarantined with a reason, never dropped: rows read = kept + held out + rejected.

Runs as a Ray task (the driver holds no data set). Each round then reads its window of a seeded
order of the training prompts (round_rows).
"""

import json
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache import publish_file
from pipeline.data.formats import DataError
from pipeline.data.inputs import list_input_files
from pipeline.data.json_lines import row_limit, rows_of
from pipeline.data.stage import is_held_out
from pipeline.data.tokenize import _hash64

SCHEMA = pa.schema([("prompt_json", pa.string()), ("source", pa.string()), ("row", pa.int64())])
REJECTED_SCHEMA = pa.schema([("prompt_json", pa.string()), ("source", pa.string()), ("row", pa.int64()),
                             ("reason", pa.string())])


def prepare_prompts(path: str, out_dir: str, held_out_fraction: float, max_text_chars: int) -> dict:
    """Write out_dir/train.parquet, held_out.parquet and rejected.parquet; return the counts.
    Done once a run: a resumed run reads the files it wrote (each published whole, counts.json last)."""
    done = os.path.join(out_dir, "counts.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    files, kind = list_input_files(path)
    rows = {"train": [], "held_out": [], "rejected": []}
    kinds = set()
    for file in files:
        for index, (prompt, reason) in enumerate(_read(file, kind, max_text_chars)):
            text = json.dumps(prompt, ensure_ascii=False, default=str)
            if reason:
                rows["rejected"].append((text, file, index, reason))
            else:
                kinds.add(type(prompt).__name__)
                side = "held_out" if is_held_out(pa.array([_hash64(text)], pa.int64()), held_out_fraction)[0].as_py() \
                    else "train"
                rows[side].append((text, file, index))
    if len(kinds) > 1:
        raise DataError(f"online.prompts {path!r} mixes text prompts and conversations (lists of messages); "
                        "keep one kind in a prompt set (the sampled feedback is written in one format)")
    if not rows["train"]:
        raise DataError(f"online.prompts {path!r}: no usable training prompt ({len(rows['held_out'])} held out, "
                        f"{len(rows['rejected'])} rejected; reasons in {out_dir}/rejected.parquet)")
    os.makedirs(out_dir, exist_ok=True)
    for name, values in rows.items():
        schema = REJECTED_SCHEMA if name == "rejected" else SCHEMA
        table = pa.table([pa.array([v[i] for v in values], field.type) for i, field in enumerate(schema)],
                         schema=schema)
        publish_file(os.path.join(out_dir, f"{name}.parquet"), lambda file: pq.write_table(table, file))
    counts = {"read": sum(len(v) for v in rows.values()), **{name: len(v) for name, v in rows.items()},
              "conversational": kinds == {"list"},
              "rejected_by_reason": dict(Counter(reason for *_, reason in rows["rejected"]))}
    publish_file(done, lambda file: file.write(json.dumps(counts, indent=2).encode()))
    return counts


def _read(file: str, kind: str, max_text_chars: int):
    """(prompt, reason) for each row of a file; reason is '' for a usable prompt."""
    if kind == "parquet":
        if "prompt" not in pq.ParquetFile(file).schema_arrow.names:
            raise DataError(f"{file}: no `prompt` column; an online prompt set needs one (text, or a list of "
                            "{role, content} messages)")
        for prompt in pq.read_table(file, columns=["prompt"]).column("prompt").to_pylist():
            yield prompt, _reason(prompt, max_text_chars)
        return
    for text in rows_of(file, row_limit(max_text_chars)):
        try:
            row = json.loads(text) if text is not None else None
        except ValueError:
            yield "", "unreadable_json"
            continue
        if not isinstance(row, dict) or "prompt" not in row:
            yield "", "missing_prompt" if text is not None else "text_too_long"
            continue
        yield row["prompt"], _reason(row["prompt"], max_text_chars)


def _reason(prompt, max_text_chars: int) -> str:
    if isinstance(prompt, str):
        return "" if prompt.strip() and len(prompt) <= max_text_chars else (
            "empty_prompt" if not prompt.strip() else "text_too_long")
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return "malformed_messages" if prompt is not None else "empty_prompt"
    if prompt[-1]["role"] != "user":
        return "last_turn_not_user"
    if sum(len(m["content"]) for m in prompt) > max_text_chars:
        return "text_too_long"
    return "" if any(m["content"].strip() for m in prompt) else "empty_prompt"


def round_rows(num_prompts: int, round_number: int, per_round: int, seed: int) -> list[int]:
    """Round r's training prompts: positions [(r-1) n, r n) of the prompts in seeded random orders,
    one new order each pass over the set; the same rows on every run (a resumed round samples the
    same prompts)."""
    start = (round_number - 1) * per_round
    rows: list[int] = []
    while len(rows) < per_round:
        epoch, offset = divmod(start + len(rows), num_prompts)
        order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
        rows.extend(order[offset:offset + per_round - len(rows)].tolist())
    return rows
