"""The data stage on every input shape it accepts: real files written here (and the shared demo
files where present), read by Ray Data, tokenized by Ray tasks, paired on the stream."""

import glob
import gzip
import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SHARED_DATA
from pipeline.data.stage import DataSettings, process_feedback

QUESTIONS = ["what color is the sky?", "why is the river big?", "how are you?", "what is a cat?", "is a dog good?"]


def run_stage(tmp_path, data: str, tokenizer: str, name: str = "out", **settings) -> tuple[dict, pa.Table, pa.Table]:
    """The report, the kept examples and the rejected rows of one run of the data stage."""
    defaults = dict(tokenizer_path=tokenizer, max_length=64, max_prompt_length=32, kl_block_size=4)
    out = str(tmp_path / name)
    report = process_feedback(data, DataSettings(**{**defaults, **settings}), out)
    assert report["read"] == report["kept"] + report["held_out"] + report["rejected"]
    kept = pq.read_table(os.path.join(out, "examples")) if report["kept"] >= 2 else None
    parts = sorted(glob.glob(os.path.join(out, "rejected", "*.parquet")))
    rejected = pa.concat_tables([pq.read_table(p) for p in parts], promote_options="permissive") if parts else None
    assert (rejected.num_rows if rejected else 0) == report["rejected"]
    return report, kept, rejected


def write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def test_unpaired_json_lines_with_labels_mapped_by_the_config(tmp_path, tiny_model, ray_local):
    rows = [{"prompt": q, "completion": "sure thing, the answer.", "label": "thumbs_up" if i % 2 else "thumbs_down"}
            for i, q in enumerate(QUESTIONS)] + [{"prompt": "why?", "completion": "no.", "label": "meh"}]
    data = write_jsonl(tmp_path / "feedback.jsonl", rows)
    report, kept, rejected = run_stage(tmp_path, data, tiny_model,
                                       label_map={"thumbs_up": True, "thumbs_down": False})
    assert report["format"] == "unpaired" and (report["read"], report["kept"]) == (6, 5)
    assert kept.column("label").to_pylist() == [False, True, False, True, False]
    assert rejected.column("reason").to_pylist() == ["unknown_label"]
    assert rejected.column("label").to_pylist() == ["meh"] and rejected.column("source_row").to_pylist() == [5]


def test_integer_labels_and_the_streamed_pairing_of_many_blocks(tmp_path, tiny_model, ray_local):
    n = 9000  # several stream batches: KL blocks cross batch boundaries
    table = pa.table({"prompt": [f"question {i}?" for i in range(n)], "completion": [f"answer {i}." for i in range(n)],
                      "label": pa.array([i % 3 == 0 for i in range(n)]).cast(pa.int64())})
    pq.write_table(table, str(tmp_path / "feedback.parquet"), row_group_size=1000)
    report, kept, _ = run_stage(tmp_path, str(tmp_path / "feedback.parquet"), tiny_model, kl_block_size=8)
    assert report["kept"] == n and report["desirable"] == n // 3
    assert kept.column("row_index").to_pylist() == list(range(n))
    assert kept.column("source_row").to_pylist() == list(range(n))  # read order kept end to end
    # Each row's KL completion is the next row's completion within its block of 8.
    completions = kept.column("completion_ids").to_pylist()
    kl = kept.column("kl_completion_ids").to_pylist()
    assert all(kl[i] == completions[i // 8 * 8 + (i + 1) % 8] for i in range(n))


def test_paired_rows_become_two_examples_sharing_a_pair_id(tmp_path, tiny_model, ray_local):
    table = pa.table({"prompt": QUESTIONS, "chosen": [f"good answer {i}." for i in range(5)],
                      "rejected": [f"bad answer {i}." for i in range(5)]})
    pq.write_table(table, str(tmp_path / "pairs.parquet"))
    report, kept, _ = run_stage(tmp_path, str(tmp_path / "pairs.parquet"), tiny_model)
    assert report["format"] == "paired" and report["source_rows"] == 5 and report["kept"] == 10
    assert kept.column("label").to_pylist() == [True, False] * 5
    pair_ids = kept.column("pair_id").to_pylist()
    assert pair_ids[0::2] == pair_ids[1::2] and len(set(pair_ids)) == 5
    # The two halves of a pair sit side by side; neither takes the other's answer as its KL completion.
    prompts, completions = kept.column("prompt_ids").to_pylist(), kept.column("completion_ids").to_pylist()
    for i, kl_completion in enumerate(kept.column("kl_completion_ids").to_pylist()):
        partner = completions.index(kl_completion)
        assert partner != i and prompts[partner] != prompts[i]


def test_a_held_out_fraction_splits_by_prompt_the_same_way_every_time(tmp_path, tiny_model, ray_local):
    n = 300
    table = pa.table({"prompt": [f"question number {i}?" for i in range(n)],
                      "chosen": [f"good answer {i}." for i in range(n)], "rejected": [f"bad answer {i}." for i in range(n)]})
    pq.write_table(table, str(tmp_path / "pairs.parquet"))

    def split(fraction: float) -> tuple[dict, pa.Table, pa.Table]:
        report, kept, _ = run_stage(tmp_path, str(tmp_path / "pairs.parquet"), tiny_model, name=f"split-{fraction}",
                                    held_out_fraction=fraction)
        return report, kept, pq.read_table(str(tmp_path / f"split-{fraction}" / "held_out"))

    report, train, held_out = split(0.2)
    assert report["read"] == 2 * n and report["held_out"] == held_out.num_rows == report["held_out_counts"]["kept"]
    assert report["kept"] == train.num_rows and report["held_out_counts"]["desirable"] == held_out.num_rows // 2
    # Independently: a prompt is held out when the blake2b hash of its text, as a fraction of 2^64, is below 0.2.
    expected = {i for i in range(n) if int.from_bytes(hashlib.blake2b(
        f"question number {i}?".encode(), digest_size=8).digest(), "little") / 2 ** 64 < 0.2}
    held_rows = held_out.column("source_row").to_pylist()
    assert sorted(set(held_rows)) == sorted(expected) and sorted(held_rows) == sorted(2 * list(expected))
    assert not set(held_rows) & set(train.column("source_row").to_pylist())  # both answers of a prompt: one side
    assert 0.12 < len(expected) / n < 0.28
    # Each side pairs within itself: no held-out completion is a training row's KL completion, or back.
    for side in (train, held_out):
        completions = set(map(tuple, side.column("completion_ids").to_pylist()))
        assert all(tuple(kl) in completions for kl in side.column("kl_completion_ids").to_pylist())
        assert side.column("row_index").to_pylist() == list(range(side.num_rows))
    # A larger fraction only moves more prompts out of training: the eval set grows, never reshuffles.
    _, _, larger = split(0.3)
    assert set(held_rows) < set(larger.column("source_row").to_pylist())


def test_conversational_rows_are_rendered_once_with_the_chat_template(tmp_path, tiny_model, ray_local):
    from transformers import AutoTokenizer

    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": "sure thing!"}],
             "label": i % 2 == 0} for i, q in enumerate(QUESTIONS)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    report, kept, _ = run_stage(tmp_path, data, tiny_model, max_length=256, max_prompt_length=128)
    assert report["kept"] == 5
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt_text = tok.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(rows[0]["prompt"] + rows[0]["completion"], tokenize=False)
    assert full_text.startswith(prompt_text) and prompt_text.count("<|im_start|>") == 2
    assert kept.column("prompt_ids")[0].as_py() == tok(prompt_text, add_special_tokens=False)["input_ids"]
    expected = tok(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    assert kept.column("completion_ids")[0].as_py() == expected  # the template's EOS ends it: none appended
    assert expected.count(tok.eos_token_id) == 1


def test_a_json_list_of_messages_rows(tmp_path, tiny_model, ray_local):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "an answer."}],
             "label": i % 2 == 1} for i, q in enumerate(QUESTIONS)]
    rows.append({"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}],
                 "label": True})
    (tmp_path / "messages.json").write_text(json.dumps(rows))
    report, kept, rejected = run_stage(tmp_path, str(tmp_path / "messages.json"), tiny_model)
    assert report["format"] == "messages" and report["kept"] == 5
    assert rejected.column("reason").to_pylist() == ["last_message_not_assistant"]
    assert kept.column("label").to_pylist() == [False, True, False, True, False]


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data (the shared demo files) is absent")
def test_the_shared_llama_factory_kto_demo(tmp_path, tiny_model, ray_local):
    data = os.path.join(SHARED_DATA, "kto-en-demo.messages.json")
    report, kept, _ = run_stage(tmp_path, data, tiny_model, max_length=256, max_prompt_length=128)
    assert report["format"] == "messages" and report["read"] == 300 and report["rejected"] == 0
    assert (report["desirable"], report["undesirable"]) == (150, 150)
    assert report["truncated"]["prompt"] > 0  # long articles: the prompt keeps its end


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data (the shared hh-rlhf files) is absent")
def test_hh_rlhf_transcripts_split_at_the_last_shared_assistant_turn(tmp_path, tiny_model, ray_local):
    """The raw pairs, through implicit_paired, give exactly the rows of the published KTO conversion."""
    raw = os.path.join(SHARED_DATA, "hh-rlhf-harmless-base-test.jsonl.gz")
    report, kept, _ = run_stage(tmp_path, raw, tiny_model, name="raw")
    converted = os.path.join(SHARED_DATA, "hh-rlhf-harmless-base-test.kto.parquet")
    _, reference, _ = run_stage(tmp_path, converted, tiny_model, name="converted")
    with gzip.open(raw, "rt") as f:
        pairs = sum(1 for _ in f)
    assert report["format"] == "implicit_paired" and report["source_rows"] == pairs and report["read"] == 2 * pairs
    assert report["kept"] == reference.num_rows
    # Side-by-side pairs, rotated by 2: chosen answers pair with chosen, rejected with rejected; every
    # block holds several prompts, so no row meets its own prompt and half of z0's completions are
    # undesirable (the old next-other-prompt rule gave 0 of 4624 here).
    assert report["kl_same_prompt_rows"] == 0
    # A pair one of whose answers was quarantined leaves the other half alone (kto_pairwise refuses those)
    assert report["unpaired_rows"] == report["rejected"] > 0, report["rejected_by_reason"]
    assert report["kl_undesirable_completions"] == report["undesirable"]
    assert abs(report["undesirable"] - report["kept"] / 2) <= report["rejected"]
    for column in ("prompt_ids", "completion_ids", "label"):
        assert kept.column(column).equals(reference.column(column)), column


def test_duplicates_are_quarantined_when_asked(tmp_path, tiny_model, ray_local):
    rows = [{"prompt": "why?", "completion": "because.", "label": True}] * 3 + [
        {"prompt": "why?", "completion": "because.", "label": False}, {"prompt": "how?", "completion": "so.", "label": True}]
    data = write_jsonl(tmp_path / "dupes.jsonl", rows)
    report, _, rejected = run_stage(tmp_path, data, tiny_model, deduplicate=True)
    assert report["rejected_by_reason"] == {"duplicate": 2} and report["kept"] == 3
    assert rejected.column("source_row").to_pylist() == [1, 2]
    assert rejected.column("prompt").to_pylist() == ["why?", "why?"]  # the original row, whole
    assert run_stage(tmp_path, data, tiny_model, name="kept-all")[0]["kept"] == 5
