"""Shared test fixtures: one real local Ray for the session, a tiny random-init Llama with a
tokenizer trained here by the `tokenizers` library, and the reference runs that several test
files compare against. Nothing is downloaded.

Two tiers: `pytest -m "not slow"` runs what needs no Ray (the loss, the step, config, formats,
pairing, the ledger and the lock) in about a minute; `make test` runs everything.
"""

import contextlib
import io
import json
import logging
import os
import random
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPUs, as in CI (no accelerator probing)
# MLflow and W&B write to local stores only: a file store of this session, W&B's offline run folders.
TRACKING = tempfile.mkdtemp(prefix="kto-tests-tracking-")
os.environ["MLFLOW_TRACKING_URI"] = f"file:{os.path.join(TRACKING, 'mlruns')}"
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
os.environ["WANDB_MODE"] = "offline"
# The session's Ray processes get these (the runs in this process use that Ray, not a runtime env of their own).
RAY_ENV = {name: os.environ[name] for name in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "DS_ACCELERATOR",
                                               "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "WANDB_MODE")}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
# The reference cache of the session's runs: keyed by fingerprints of data, tokenizer, settings and
# reference model, so runs on the same data share their data and reference stages.
SHARED_CACHE = os.path.join(tempfile.mkdtemp(prefix="kto-tests-cache-"), "reference")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(items):
    """Every test that uses the session's Ray is in the slow tier (the others mark themselves).
    Under pytest-xdist (`-n 2 --dist loadgroup`), a file's tests run in one process (its module
    fixtures are built once), and the files that compare with the session's reference runs share one."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        shared = "reference_runs" in getattr(item, "fixturenames", ())
        item.add_marker(pytest.mark.xdist_group("reference_runs" if shared else item.location[0]))


def pytest_collection_finish(session):
    """Grouping that silently stopped would build each module's runs once per process, with no
    error: measured, minutes of a CI run. (pytest 9.2 ignores the group that pytest-xdist 3.8 writes.)"""
    grouped = any("@" in item.nodeid for item in session.items)
    if getattr(session.config.option, "loadgroup", False) and session.items and not grouped:
        raise pytest.UsageError("pytest-xdist's --dist loadgroup is not grouping these tests (see the pytest pin "
                                "in pyproject.toml); run without -n, or with a pytest that xdist supports")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random-init Llama folder; its tokenizer also learns real text where ../shared is present."""
    from tiny import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")), tokenizer_text())


def tokenizer_text() -> list[str]:
    if not os.path.isdir(SHARED_DATA):
        return []
    table = pq.read_table(os.path.join(SHARED_DATA, "hh-rlhf-harmless-base-test.kto.parquet"),
                          columns=["prompt", "completion"]).slice(0, 400)
    return table.column("prompt").to_pylist() + table.column("completion").to_pylist()


def write_feedback(path: str, rows: int, seed: int = 0, desirable_share: float = 0.4) -> str:
    from tiny import WORDS

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

    # No dashboard: no test reads this Ray's (the cluster test starts one of its own), and on 2 cores
    # its start-up and polling take CPU from the runs.
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": RAY_ENV})
    yield ray
    ray.shutdown()


def tiny_config(tmp_path, model: str, data: str, **overrides):
    """A Config for the tiny model with its run directory under tmp_path (and the session's shared
    reference cache); overrides are section.key: value."""
    from pipeline.config import load_config

    settings = {"model.name_or_path": model, "data.path": data, "data.generate_demo": False,
                "data.kl_block_size": 4, "eval.path": None, "kto.max_length": 64, "kto.max_prompt_length": 32,
                "training.learning_rate": 1e-4, "training.warmup_ratio": 0.0, "training.max_steps": 3,
                "training.per_device_train_batch_size": 4, "scaling.num_workers": 1,
                "output.output_dir": str(tmp_path / "runs"), "output.report_to": "[]",
                "reference.cache_dir": SHARED_CACHE, "model.cache_dir": str(tmp_path / "models"), **overrides}
    return load_config(None, tuple(f"{k}={'null' if v is None else v}" for k, v in settings.items()))


def train_and_load(tmp_path, model: str, data: str, **overrides) -> tuple[list[dict], dict, dict]:
    """Train in this process (on the session's Ray): metrics.jsonl, the model's weights, summary.json."""
    from safetensors.torch import load_file

    from pipeline.run import train

    config = tiny_config(tmp_path, model, data, **overrides)
    summary = train(config)
    with open(os.path.join(config.run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return metrics, load_file(os.path.join(config.run_dir, "model", "model.safetensors")), summary


# The reference runs: 10 rows in global batches of 4 for 3 steps (the third step has 2 rows, so
# with 2 workers of 2 rows the second worker's share is empty and it must still join every
# collective), eval/ metrics on 7 held-out rows (the ranks' shares differ in size) every 2 steps,
# and greedy generations of 4 tokens for the 7 held-out prompts before and after training.
REFERENCE_STEPS = 3


@pytest.fixture(scope="session")
def reference_data(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("reference-data")
    return (write_feedback(str(root / "feedback.parquet"), rows=10),
            write_feedback(str(root / "heldout.parquet"), rows=7, seed=5))


def reference_overrides(reference_data, workers: int, **more) -> dict:
    data, held_out = reference_data
    return {"data.path": data, "eval.path": held_out, "eval.eval_steps": 2, "eval.property_regex": "e",
            "eval.max_new_tokens": 4, "scaling.num_workers": workers,
            "training.per_device_train_batch_size": 4 // workers, "training.max_steps": REFERENCE_STEPS,
            "output.run_name": f"workers{workers}", **more}


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory, tiny_model, reference_data, ray_local) -> dict:
    """{workers: (metrics, weights, summary, config)} of the ddp reference runs with 1 and 2 workers."""
    runs = {}
    for workers in (1, 2):
        tmp_path = tmp_path_factory.mktemp(f"reference-{workers}")
        overrides = reference_overrides(reference_data, workers)
        runs[workers] = (*train_and_load(tmp_path, tiny_model, reference_data[0], **overrides),
                         tiny_config(tmp_path, tiny_model, reference_data[0], **overrides))
    return runs


def launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python launch.py ARGS` in the current folder, in a process of its own, as a user runs it
    (with its own embedded Ray)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args],
                          env={**(env or os.environ), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=900)


def launch_here(*args: str) -> subprocess.CompletedProcess:
    """`launch.py ARGS` through its main() in this process (on the session's Ray, without the
    start-up of a new Python and Ray): its exit code, stdout, and stderr with the log lines."""
    import launch as command_line

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    logger = logging.getLogger("kto")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = command_line.main(list(args))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return subprocess.CompletedProcess(args, int(code), out.getvalue(), err.getvalue())


def direct_eval(model, scored, beta: float, tokenizer_path: str) -> dict:
    """eval/ metrics of a model on scored held-out rows, computed here on one process from the
    formulas of ../shared/KTO.md (score_sequences: no grouping, no collectives; weights 1), as an
    independent check of the workers' all-reduced numbers."""
    import torch

    from pipeline.logprobs import score_sequences
    from pipeline.models import load_tokenizer
    from pipeline.train.loss import kto_loss

    model.eval()
    pad = load_tokenizer(tokenizer_path).pad_token_id
    prompts = scored.column("prompt_ids").to_pylist()
    logps = score_sequences(model, prompts, scored.column("completion_ids").to_pylist(), pad)
    kl_logps = score_sequences(model, prompts, scored.column("kl_completion_ids").to_pylist(), pad)
    labels = torch.tensor(scored.column("label").to_pylist(), dtype=torch.bool)
    ref_logps = torch.tensor(scored.column("ref_logp").to_numpy())
    rewards = logps - ref_logps
    kl_unclamped = (kl_logps - torch.tensor(scored.column("ref_kl_logp").to_numpy())).double().mean()
    z0 = kl_unclamped.clamp(min=0).float()
    margin = rewards - z0  # on the label's side: 1, on the other: 0, within 1e-4 nats (float noise): a tie, 0.5
    right = torch.where(margin.abs() < 1e-4, 0.5, torch.where(labels, margin > 0, margin < 0).float())
    losses = kto_loss(logps, ref_logps, labels, z0, beta=beta, desirable_weight=1.0, undesirable_weight=1.0)
    return {"accuracy": right.float().mean().item(), "kl": z0.item(), "kl_unclamped": kl_unclamped.item(),
            "rewards/margins": (beta * rewards[labels].mean() - beta * rewards[~labels].mean()).item(),
            "loss": losses.mean().item()}
