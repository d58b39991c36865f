"""Shared test fixtures: a real local Ray, and a tiny random-init Llama with a tokenizer
trained here by the `tokenizers` library. Nothing is downloaded."""

import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
WORDS = ("the a cat dog sky is blue green red yes no good bad answer question what why how please thanks "
         "sure thing well ok hello capital city river mountain sound color opposite big small").split()


def make_tokenizer(folder: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(400)]
    if os.path.isdir(SHARED_DATA):  # real text makes the real-data test tokenize realistically
        table = pq.read_table(os.path.join(SHARED_DATA, "hh-rlhf-harmless-base-test.kto.parquet"),
                              columns=["prompt", "completion"]).slice(0, 400)
        corpus += table.column("prompt").to_pylist() + table.column("completion").to_pylist()
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    from tokenizers import decoders

    tokenizer.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                      eos_token="<eos>")
    wrapped.save_pretrained(folder)
    return wrapped


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A folder with a 2-layer Llama (hidden 64, 2 heads: head_dim 32, as vLLM's CPU attention needs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    tokenizer = make_tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def write_feedback(path: str, rows: int, seed: int = 0, desirable_share: float = 0.4) -> str:
    rng = random.Random(seed)
    table = pa.table({
        "prompt": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "?" for _ in range(rows)],
        "completion": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10))) + "." for _ in range(rows)],
        "label": [rng.random() < desirable_share for _ in range(rows)],
        "extra": list(range(rows)),
    })
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=4, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def tiny_config(tmp_path, model: str, data: str, **overrides):
    """A Config for the tiny model with everything under tmp_path; overrides are section.key: value."""
    from pipeline.config import load_config

    settings = {"model.name_or_path": model, "data.path": data, "data.generate_demo": False,
                "data.kl_block_size": 4, "eval.path": None, "kto.max_length": 64, "kto.max_prompt_length": 32,
                "training.learning_rate": 1e-4, "training.warmup_ratio": 0.0, "training.max_steps": 3,
                "training.per_device_train_batch_size": 4, "scaling.num_workers": 1,
                "output.output_dir": str(tmp_path / "runs"), "reference.cache_dir": str(tmp_path / "cache"),
                "model.cache_dir": str(tmp_path / "models"), **overrides}
    return load_config(None, tuple(f"{k}={'null' if v is None else v}" for k, v in settings.items()))
