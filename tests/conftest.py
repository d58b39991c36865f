"""Shared test fixtures: a real local Ray, and a tiny random-init Llama with a tokenizer
trained here by the `tokenizers` library. Nothing is downloaded."""

import os
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPUs, as in CI (no accelerator probing)
RAY_ENV = {name: os.environ[name] for name in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "DS_ACCELERATOR")}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random-init Llama folder; its tokenizer also learns real text where ../shared is present."""
    from pipeline.tiny import make_tiny_model

    text = []
    if os.path.isdir(SHARED_DATA):
        table = pq.read_table(os.path.join(SHARED_DATA, "hh-rlhf-harmless-base-test.kto.parquet"),
                              columns=["prompt", "completion"]).slice(0, 400)
        text = table.column("prompt").to_pylist() + table.column("completion").to_pylist()
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")), text)


def write_feedback(path: str, rows: int, seed: int = 0, desirable_share: float = 0.4) -> str:
    from pipeline.tiny import WORDS

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

    ray.init(address="local", num_cpus=4, runtime_env={"env_vars": RAY_ENV})
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


def train_and_load(tmp_path, model: str, data: str, **overrides) -> tuple[list[dict], dict]:
    """Train in this process (on the session's Ray) and return metrics.jsonl and the model's weights."""
    import json

    from safetensors.torch import load_file

    from pipeline.run import train

    config = tiny_config(tmp_path, model, data, **overrides)
    train(config)
    with open(os.path.join(config.run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return metrics, load_file(os.path.join(config.run_dir, "model", "model.safetensors"))


def launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python launch.py ARGS` from the project root, as a user runs it."""
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT,
                          env={**(env or os.environ), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=900)


def direct_eval(model, scored, beta: float, tokenizer_path: str) -> dict:
    """eval/ metrics of a model on scored held-out rows, computed on one process with the driver's
    held-out code (score_sequences: no grouping, no collectives) and kto_loss (weights 1)."""
    import torch

    from pipeline.evaluate import implied_reward_metrics
    from pipeline.logprobs import score_sequences
    from pipeline.loss import kto_loss
    from pipeline.models import load_tokenizer

    model.eval()
    pad = load_tokenizer(tokenizer_path).pad_token_id
    direct = implied_reward_metrics(model, scored, beta, pad)
    logps = score_sequences(model, scored.column("prompt_ids").to_pylist(),
                            scored.column("completion_ids").to_pylist(), pad)
    losses = kto_loss(logps, torch.tensor(scored.column("ref_logp").to_numpy()),
                      torch.tensor(scored.column("label").to_pylist()), torch.tensor(direct["kl"]), beta=beta,
                      desirable_weight=1.0, undesirable_weight=1.0)
    return {**direct, "loss": losses.mean().item()}
