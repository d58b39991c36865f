"""Bad input, one case per kind: whole-input errors stop at start-up naming the file and the
column; row errors go to the quarantine with a reason, and rows read = kept + rejected."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.stage import DataSettings, process_feedback
from pipeline.data.formats import DataError
from test_formats import run_stage, write_jsonl


def _write(table: pa.Table):
    def write(folder) -> str:
        pq.write_table(table, str(folder / "feedback.parquet"))
        return str(folder / "feedback.parquet")
    return write


def _garbage(folder) -> str:
    (folder / "feedback.parquet").write_bytes(b"not parquet at all")
    return str(folder / "feedback.parquet")


def _mixed(folder) -> str:
    _write(pa.table({"prompt": ["a?"], "completion": ["b."], "label": [True]}))(folder)
    write_jsonl(folder / "more.jsonl", [{"prompt": "a?", "completion": "b.", "label": True}])
    return str(folder)


WHOLE_INPUT_ERRORS = [  # (case, writer, settings, words the message must hold)
    ("no such path", lambda folder: str(folder / "nowhere"), {}, ["nowhere", "does not exist"]),
    ("empty folder", lambda folder: str(folder), {}, ["holds no"]),
    ("unreadable parquet", _garbage, {}, ["feedback.parquet", "not a readable Parquet file"]),
    ("required column missing", _write(pa.table({"prompt": ["a?"], "completion": ["b."]})), {"format": "unpaired"},
     ["feedback.parquet", "['label']", "missing"]),
    ("no format matches", _write(pa.table({"question": ["a?"], "answer": ["b."]})), {},
     ["feedback.parquet", "match no feedback format", "data.format"]),
    ("label of a type that cannot hold a label", _write(pa.table({"prompt": ["a?"], "completion": ["b."],
                                                                  "label": [0.5]})), {},
     ["feedback.parquet", "'label'", "double", "0/1"]),
    ("string labels with no label_map", _write(pa.table({"prompt": ["a?"], "completion": ["b."], "label": ["up"]})),
     {}, ["feedback.parquet", "data.label_map"]),
    ("prompt of a type that cannot hold text", _write(pa.table({"prompt": [1], "completion": ["b."], "label": [True]})),
     {}, ["feedback.parquet", "'prompt'", "int64"]),
    ("parquet and json in one folder", _mixed, {}, ["mixes Parquet and JSON"]),
]


@pytest.mark.parametrize("case, writer, settings, words", WHOLE_INPUT_ERRORS, ids=[c[0] for c in WHOLE_INPUT_ERRORS])
def test_whole_input_errors_stop_at_start_up(tmp_path, tiny_model, case, writer, settings, words):
    data_folder = tmp_path / "data"
    data_folder.mkdir()
    data = writer(data_folder)
    defaults = dict(tokenizer_path=tiny_model, max_length=64, max_prompt_length=32, kl_block_size=4)
    with pytest.raises(DataError) as error:
        process_feedback(data, DataSettings(**{**defaults, **settings}), str(tmp_path / "out"))
    for word in words:
        assert word in str(error.value), (case, str(error.value))
    assert not (tmp_path / "out").exists()  # nothing half-written


GOOD = [("what is the sky?", "blue."), ("what is a cat?", "an animal."), ("is a dog good?", "yes.")]
LONG_PROMPT = " ".join(["the big red mountain"] * 60) + "?"  # > 128 tokens
# Unpaired rows, text as raw bytes so that one can fail to decode; (prompt, completion, label, expected reason).
UNPAIRED_ROWS = [(p.encode(), c.encode(), 1, "") for p, c in GOOD] + [
    (None, b"an answer.", 1, "empty_prompt"),
    (b"a question?", b"   ", 0, "empty_completion"),
    (b"\xff\xfe broken?", b"an answer.", 0, "undecodable_text"),
    (b"a question?", b"an answer.", 7, "unknown_label"),
    (b"a question?", b"an answer.", None, "null_label"),
    (LONG_PROMPT.encode(), b"an answer.", 1, "no_room_for_completion"),
    (GOOD[0][0].encode(), GOOD[0][1].encode(), 1, "duplicate"),
]
MESSAGE_ROWS = [
    ([{"role": "user", "content": p}, {"role": "assistant", "content": c}], True, "") for p, c in GOOD] + [
    ([{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi?"}], True,
     "last_message_not_assistant"),
    ([{"role": "tool", "content": "42"}, {"role": "assistant", "content": "it is 42."}], False, "chat_template_error"),
    ([{"role": "user", "content": "a question?"}, {"role": "assistant", "content": " "}], False, "empty_completion"),
    ([], True, "empty_prompt"),
]
PAIR_ROWS = [  # implicit prompts: hh-rlhf style transcripts
    ("\n\nHuman: what is the sky?\n\nAssistant: blue.", "\n\nHuman: what is the sky?\n\nAssistant: green.", ""),
    ("\n\nHuman: a cat?\n\nAssistant: an animal.", "\n\nHuman: a cat?\n\nAssistant: a river.", ""),
    ("Human: no delimiter here. yes", "Human: no delimiter here. no", "no_shared_prompt"),
]


def _unpaired(folder) -> tuple[str, list[str]]:
    table = pa.table({"prompt": pa.array([r[0] for r in UNPAIRED_ROWS], pa.binary()),
                      "completion": pa.array([r[1] for r in UNPAIRED_ROWS], pa.binary()),
                      "label": pa.array([r[2] for r in UNPAIRED_ROWS], pa.int64())})
    pq.write_table(table, str(folder / "rows.parquet"))
    return str(folder / "rows.parquet"), [r[3] for r in UNPAIRED_ROWS]


def _messages(folder) -> tuple[str, list[str]]:
    (folder / "rows.json").write_text(json.dumps([{"messages": m, "label": label} for m, label, _ in MESSAGE_ROWS]))
    return str(folder / "rows.json"), [r[2] for r in MESSAGE_ROWS]


def _pairs(folder) -> tuple[str, list[str]]:
    path = write_jsonl(folder / "rows.jsonl", [{"chosen": c, "rejected": r} for c, r, _ in PAIR_ROWS])
    return path, [reason for *_, reason in PAIR_ROWS for _side in (0, 1)]


@pytest.mark.parametrize("writer", [_unpaired, _messages, _pairs], ids=["unpaired", "messages", "implicit_pairs"])
def test_row_errors_are_quarantined_with_their_reason(tmp_path, tiny_model, ray_local, writer):
    data, expected = writer(tmp_path)
    report, kept, rejected = run_stage(tmp_path, data, tiny_model, deduplicate=True, max_length=128,
                                       max_prompt_length=128)
    expected_rejected = {i: reason for i, reason in enumerate(expected) if reason}
    assert report["read"] == len(expected) and report["kept"] == len(expected) - len(expected_rejected)
    assert report["rejected_by_reason"] == {r: list(expected_rejected.values()).count(r)
                                            for r in set(expected_rejected.values())}
    # Each quarantined row keeps its original columns, its file and its row in that file.
    paired = writer is _pairs
    got = {(row["source_row"] * 2 + (row["pair_side"] == "rejected") if paired else row["source_row"]): row["reason"]
           for row in rejected.to_pylist()}
    assert got == expected_rejected
    assert set(rejected.column("source_file").to_pylist()) == {os.path.abspath(data)}
    if writer is _unpaired:
        assert rejected.filter(pa.compute.equal(rejected.column("reason"), "unknown_label")).column(
            "label").to_pylist() == [7]
