"""The reference stage with both backends, through Ray Data's actor pool, and the step-0 drift check."""

import json
import os
import shutil
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from actors.reference import ScoringOptions
from conftest import tiny_config, write_feedback
from pipeline.data import DataSettings, process_feedback
from pipeline.drift import DriftError
from pipeline.run import train
from pipeline.scoring import score_examples

# Measured on the tiny model (float32): vLLM's CPU build and the transformers forward agree to
# about 3e-5 nats a sequence; on SmolLM2-135M, 2e-4 (sequences of 45-180 tokens).
AGREEMENT_NATS = 1e-3


def test_vllm_and_hf_backends_agree(tmp_path, tiny_model, ray_local):
    data = write_feedback(str(tmp_path / "feedback.parquet"), rows=40)
    settings = DataSettings(tokenizer_path=tiny_model, max_length=64, max_prompt_length=32, kl_block_size=4)
    report = process_feedback(data, settings, str(tmp_path / "examples"))
    scores = {}
    for backend in ("hf", "vllm"):
        target = str(tmp_path / f"scored-{backend}.parquet")
        score_examples(str(tmp_path / "examples" / "examples"), target, report["longest_sequence"], backend=backend,
                       reference_path=tiny_model, pad_token_id=1, num_replicas=1, num_cpus_per_replica=1,
                       num_gpus_per_replica=0, options=ScoringOptions(cache_root=str(tmp_path / "vllm")))
        scored = pq.read_table(target)
        assert scored.column("row_index").to_pylist() == list(range(40))
        scores[backend] = np.concatenate([scored.column("ref_logp").to_numpy(), scored.column("ref_kl_logp").to_numpy()])
    assert np.all(scores["hf"] < 0)
    np.testing.assert_allclose(scores["vllm"], scores["hf"], rtol=0, atol=AGREEMENT_NATS)
    # The replicas hand their resources back when scoring ends, so the trainers can take them.
    total = ray_local.cluster_resources()["CPU"]
    deadline = time.time() + 60
    while ray_local.available_resources().get("CPU", 0) < total and time.time() < deadline:
        time.sleep(1)
    assert ray_local.available_resources().get("CPU", 0) == total


def test_train_with_vllm_reference_matches_hf_and_records_drift(tmp_path, tiny_model, ray_local):
    data = write_feedback(str(tmp_path / "data" / "feedback.parquet"), rows=16)
    losses = {}
    for backend in ("hf", "vllm"):
        config = tiny_config(tmp_path, tiny_model, data, **{"reference.backend": backend,
                                                            "output.run_name": backend})
        summary = train(config)
        drift = summary["reference"]["step0_drift"]
        assert summary["reference"]["backend"] == backend
        if backend == "hf":  # the trainer's own computation: nothing to check
            assert "trainer's own computation" in drift["skipped"]
        else:
            assert drift["sequences"] == 32 and drift["max_abs_per_sequence"] <= AGREEMENT_NATS
        with open(os.path.join(config.run_dir, "metrics.jsonl")) as f:
            losses[backend] = [json.loads(line)["loss"] for line in f]
    assert len(losses["vllm"]) == 3
    np.testing.assert_allclose(losses["vllm"], losses["hf"], rtol=1e-4)


def test_drift_check_stops_a_low_precision_reference(tmp_path, tiny_model, ray_local):
    data = write_feedback(str(tmp_path / "data" / "feedback.parquet"), rows=16)
    config = tiny_config(tmp_path, tiny_model, data, **{"reference.dtype": "bfloat16",
                                                        "reference.drift_max_abs": 0.001})
    with pytest.raises(DriftError, match=r"reference.dtype=float32"):
        train(config)


def test_drift_check_is_skipped_when_the_reference_is_another_model(tmp_path, tiny_model, ray_local):
    other = shutil.copytree(tiny_model, str(tmp_path / "other-reference"))
    data = write_feedback(str(tmp_path / "data" / "feedback.parquet"), rows=16)
    summary = train(tiny_config(tmp_path, tiny_model, data, **{"reference.model": other, "training.max_steps": 1}))
    assert "is not the policy" in summary["reference"]["step0_drift"]["skipped"]
    assert pq.read_table(os.path.join(tmp_path, "runs", "kto", "schedule.parquet")).num_rows > 0
