"""Bad input that must not take a process down or slip through: symlinks out of and around the
data root, JSON too big to hold, texts over data.max_text_chars, label types that change between
blocks, and a file with no rows. Real files, real gzip, real symlinks; Ray only where the fact
is Ray Data's (the last two tests)."""

import gzip
import json
import os
import tracemalloc

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import launch_here
from pipeline.data.formats import DataError
from pipeline.data.json_lines import CHUNK_ROWS, original_columns, read_chunks, row_limit, rows_of
from pipeline.data.inputs import list_input_files
from pipeline.data.stage import DataSettings
from pipeline.data.tokenize import tokenize_batch
from test_formats import run_stage, write_jsonl


def _settings(tokenizer: str, **more) -> DataSettings:
    return DataSettings(**{"tokenizer_path": tokenizer, "max_length": 64, "max_prompt_length": 32,
                           "kl_block_size": 4, **more})


def _parquet(path, rows: int = 2) -> str:
    pq.write_table(pa.table({"prompt": ["a?"] * rows, "completion": ["b."] * rows, "label": [True] * rows}), str(path))
    return str(path)


def test_listing_never_follows_directory_symlinks_and_refuses_files_linked_from_outside(tmp_path):
    root = tmp_path / "data"
    (root / "date=1" / "d").mkdir(parents=True)
    inside = _parquet(root / "date=1" / "part.parquet")
    os.symlink("..", root / "date=1" / "d" / "up")  # one loop: listed the file 41 times
    os.symlink("../..", root / "date=1" / "d" / "top")  # a second loop: grew without bound
    os.symlink(inside, root / "date=1" / "same.parquet")  # a file link that stays inside the root is read
    files, kind = list_input_files(str(root))
    assert (files, kind) == ([inside, str(root / "date=1" / "same.parquet")], "parquet")

    outside = _parquet(tmp_path / "elsewhere.parquet")
    os.symlink(outside, root / "date=1" / "stolen.parquet")
    with pytest.raises(DataError) as error:
        list_input_files(str(root))
    assert str(root / "date=1" / "stolen.parquet") in str(error.value) and outside in str(error.value)
    assert "outside the data path" in str(error.value)


def test_json_lines_stream_in_bounded_chunks_and_a_gzip_bomb_line_is_skipped_unread(tmp_path):
    """A 64 MB line inside a 64 KB gzip file, between good rows, and 20k ordinary rows: the reader's
    peak memory stays a small fraction of what the file inflates to, every chunk holds at most
    CHUNK_ROWS rows, and the huge line is one row marked too long (None), in its place."""
    path = tmp_path / "bomb.jsonl.gz"
    row = json.dumps({"prompt": "what is the sky?", "completion": "blue.", "label": True}).encode() + b"\n"
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(row)
        f.write(b'{"prompt": "')
        for _ in range(64):
            f.write(b"a" * (1 << 20))
        f.write(b'", "completion": "x", "label": true}\n')
        for _ in range(20_000):
            f.write(row)
    assert os.path.getsize(path) < 1 << 20
    limit = row_limit(1000)  # 1 MB: the 64 MB line is over it
    tracemalloc.start()
    try:
        chunks = list(read_chunks(pa.table({"path": [str(path)]}), limit))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # the file inflates to 70 MB (measured: 3.2 MB)
    texts = [text for chunk in chunks for text in chunk.column("kto_json").to_pylist()]
    assert len(texts) == 20_002 and texts[1] is None and texts[0] == texts[2] == row
    assert max(chunk.num_rows for chunk in chunks) == CHUNK_ROWS


def test_a_json_array_streams_element_by_element_and_a_broken_one_names_the_file(tmp_path):
    rows = [{"prompt": f"question {i}?", "completion": "an answer.", "label": i % 2 == 0} for i in range(5000)]
    whole = tmp_path / "rows.json"
    whole.write_text(json.dumps(rows, indent=1))
    assert [json.loads(text) for text in rows_of(str(whole), row_limit(1000))] == rows
    with gzip.open(tmp_path / "rows.json.gz", "wt", encoding="utf-8-sig") as f:  # with a byte-order mark
        f.write(json.dumps(rows[:3]))
    assert [json.loads(text) for text in rows_of(str(tmp_path / "rows.json.gz"), row_limit(1000))] == rows[:3]

    truncated = tmp_path / "half-uploaded.json"
    truncated.write_text(whole.read_text()[:-300])
    with pytest.raises(DataError) as error:
        list(rows_of(str(truncated), row_limit(1000)))
    assert str(truncated) in str(error.value) and "truncated" in str(error.value)

    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps([rows[0], {"prompt": "a" * (3 << 20), "completion": "b", "label": True}]))
    with pytest.raises(DataError) as error:
        list(rows_of(str(huge), row_limit(1000)))
    assert str(huge) in str(error.value) and "element 1" in str(error.value) and "JSON lines" in str(error.value)


def test_texts_over_max_text_chars_are_quarantined_before_tokenization(tiny_model):
    """Checked on the raw text (prompt, completion, chosen / rejected, each message's content) and,
    for conversations, on the rendered text, which many short turns can push over the cap."""
    cap = 200
    plain = pa.table({"prompt": ["a question?", "q" * (cap + 1), "a question?"],
                      "completion": ["an answer.", "an answer.", "b" * (cap + 1)], "label": [True, False, True],
                      "path": ["f.parquet"] * 3})
    out = tokenize_batch(plain, "unpaired", _settings(tiny_model, max_text_chars=cap))
    assert out.column("reason").to_pylist() == ["", "text_too_long", "text_too_long"]
    assert out.column("prompt_ids")[0].as_py()  # the short row is tokenized as before

    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    messages = pa.table({"messages": [[turn("user", "hi?"), turn("assistant", "hello.")],
                                      [turn("user", "x" * (cap + 1)), turn("assistant", "hello.")],
                                      [turn("user", "y" * 90), turn("assistant", "z" * 90)] * 2],
                         "label": [True, True, False], "path": ["f.parquet"] * 3})
    out = tokenize_batch(messages, "messages", _settings(tiny_model, max_text_chars=cap, max_length=512,
                                                         max_prompt_length=256))
    assert out.column("reason").to_pylist() == ["", "text_too_long", "text_too_long"]

    pairs = pa.table({"chosen": ["Q: x\n\nAssistant: yes", "c" * (cap + 1)],
                      "rejected": ["Q: x\n\nAssistant: no", "Q: y\n\nAssistant: no"], "path": ["f.parquet"] * 2})
    out = tokenize_batch(pairs, "implicit_paired", _settings(tiny_model, max_text_chars=cap))
    assert out.column("reason").to_pylist() == ["", "", "text_too_long", "text_too_long"]


def test_label_types_that_change_between_raw_chunks_are_per_row_verdicts(tmp_path, tiny_model):
    """Each row's label keeps its own JSON type, whatever the rows around it hold, and every
    tokenized block has one schema, so Ray Data can put blocks together."""
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "what is a cat?", "completion": "an animal.", "label": True},
        {"prompt": "what is a dog?", "completion": "an animal.", "label": "thumbs_up"},
        {"prompt": "what is a cow?", "completion": "an animal.", "label": "meh"},
        {"prompt": "what is a hen?", "completion": "a bird.", "label": 1.0},
        {"prompt": "what is a fox?", "completion": "an animal.", "label": 0}])
    with open(path, "a") as f:
        f.write('{"prompt": "what is an owl?", "completion": "a bi\n')  # a half-written last line
    chunks = list(read_chunks(pa.table({"path": [path]}), row_limit(1000)))
    settings = _settings(tiny_model, label_map={"thumbs_up": True})
    outs = [tokenize_batch(chunk.slice(start, 3), "unpaired", settings) for chunk in chunks for start in (0, 3)]
    assert [r for out in outs for r in out.column("reason").to_pylist()] == [
        "", "", "unknown_label", "unknown_label", "", "malformed_json"]
    assert [v for out in outs for v in out.column("kto_label").to_pylist()] == [True, True, None, None, False, None]
    assert outs[0].schema == outs[1].schema
    # The quarantine shows each row as the file held it: a column of mixed types as JSON text, a
    # line that is not JSON as its text.
    every = pa.concat_tables(outs)
    quarantined = original_columns(every.filter(pc.not_equal(every.column("reason"), "")))
    assert quarantined.column("label").to_pylist() == ["meh", "1.0", None]
    assert quarantined.column("raw_json").to_pylist() == [None, None, '{"prompt": "what is an owl?", "completion": "a bi\n']


def test_json_label_types_changing_across_blocks_quarantine_rows(tmp_path, tiny_model, ray_local):
    """Through Ray Data: 3000 rows of bool labels, then string labels (mapped and not), gzip:
    no traceback, per-row unknown_label, read order and the rows' own values in the quarantine."""
    path = tmp_path / "feedback.jsonl.gz"
    labels = [i % 2 == 0 for i in range(3000)] + ["thumbs_up" if i % 2 else "meh" for i in range(1000)]
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps({"prompt": f"question {i}?", "completion": f"answer {i}.", "label": label}) + "\n"
                     for i, label in enumerate(labels))
    report, kept, rejected = run_stage(tmp_path, str(path), tiny_model, label_map={"thumbs_up": True})
    assert (report["read"], report["kept"], report["rejected_by_reason"]) == (4000, 3500, {"unknown_label": 500})
    assert rejected.column("source_row").to_pylist() == list(range(3000, 4000, 2))
    assert set(rejected.column("label").to_pylist()) == {"meh"}
    assert kept.column("source_row").to_pylist() == sorted(set(range(4000)) - set(range(3000, 4000, 2)))


def test_validate_names_a_parquet_file_that_holds_no_rows(tmp_path, tiny_model, ray_local):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "completion": pa.array([], pa.string()),
                             "label": pa.array([], pa.bool_())}), str(empty))
    result = launch_here("validate", "--data", str(empty), "--set", f"model.name_or_path={tiny_model}",
                         "--set", "data.generate_demo=false", "--set", f"reference.cache_dir={tmp_path / 'cache'}",
                         "--set", f"model.cache_dir={tmp_path / 'models'}")
    assert result.returncode == 2, result.stderr
    assert f"error: {empty} holds no rows" in result.stderr and "Errno" not in result.stderr


def test_a_nan_reference_log_prob_stops_training_at_its_step_and_keeps_the_last_good_checkpoint(
        tmp_path, tiny_model, ray_local):
    """Through launch.py, 2 workers: the scored cache's row 5 (step 2 of sequential batches of 4)
    gets a NaN reference log-prob. train exits 3 naming step 2 and the row's source file and row,
    after no update of step 2 and without a restart of the workers; the checkpoint of step 1 is
    kept, with finite weights."""
    import glob

    from safetensors.torch import load_file

    from conftest import SHARED_CACHE, write_feedback

    data = write_feedback(str(tmp_path / "data" / "feedback.parquet"), rows=12)
    settings = {"model.name_or_path": tiny_model, "data.path": data, "data.generate_demo": "false",
                "data.kl_block_size": 4, "eval.path": "null", "kto.max_length": 64, "kto.max_prompt_length": 32,
                "training.max_steps": 3, "training.per_device_train_batch_size": 2, "scaling.num_workers": 2,
                "training.train_sampling_strategy": "sequential", "training.save_steps": 1,
                "output.output_dir": str(tmp_path / "runs"), "output.run_name": "nan", "output.report_to": "[]",
                "reference.cache_dir": os.path.join(os.path.dirname(SHARED_CACHE), "nan-test"),
                "model.cache_dir": str(tmp_path / "models")}
    args = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    precomputed = launch_here("precompute", *args)
    assert precomputed.returncode == 0, precomputed.stderr
    scored_path = json.loads(precomputed.stdout)["scored"]
    scored = pq.read_table(scored_path)
    ref = scored.column("ref_logp").to_pylist()
    ref[5] = float("nan")
    field = scored.schema.field("ref_logp")
    pq.write_table(scored.set_column(scored.column_names.index("ref_logp"), field, pa.array(ref, field.type)),
                   scored_path)
    source = f"{scored.column('source_file')[5].as_py()} row {scored.column('source_row')[5].as_py()}"
    result = launch_here("train", *args)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "training stopped at step 2" in result.stderr and source in result.stderr, result.stderr[-3000:]
    assert "the checkpoint of step 1 is kept" in result.stderr and "resuming" not in result.stderr
    checkpoints = str(tmp_path / "runs" / "nan" / "ray_train" / "checkpoint_*")
    assert [json.load(open(path))["step"] for path in glob.glob(f"{checkpoints}/trainer_state.json")] == [1]
    weights = load_file(glob.glob(f"{checkpoints}/model/model.safetensors")[0])
    assert all(bool(tensor.isfinite().all()) for tensor in weights.values())
