"""The reference stage with both backends (Ray Data's actor pool; vLLM's CPU build), and the step-0
drift check that the trainers run before their first update (its stop: test_end_to_end)."""

import glob
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import tiny_config, write_feedback
from pipeline.run import train

pytestmark = pytest.mark.slow

# Measured on the tiny model (float32): vLLM's CPU build and the transformers forward agree to
# about 3e-5 nats a sequence; on SmolLM2-135M, 2e-4 (sequences of 45-180 tokens).
AGREEMENT_NATS = 1e-3


def test_vllm_and_hf_references_agree_and_train_alike(tmp_path, tiny_model, ray_local):
    data = write_feedback(str(tmp_path / "data" / "feedback.parquet"), rows=16)
    losses, scores = {}, {}
    for backend in ("hf", "vllm"):
        config = tiny_config(tmp_path, tiny_model, data, **{"reference.backend": backend,
                                                            "output.run_name": backend})
        summary = train(config)
        drift = summary["reference"]["step0_drift"]
        assert summary["reference"]["backend"] == backend
        # measured by the trainer on its own forwards: 16 rows, each completion and KL completion; the hf
        # reference is the trainer's own function in float32 (other batches, other padding: ~1e-6 apart)
        assert drift["sequences"] == 32
        assert drift["max_abs_per_sequence"] <= (1e-4 if backend == "hf" else AGREEMENT_NATS), drift
        with open(os.path.join(config.run_dir, "metrics.jsonl")) as f:
            losses[backend] = [json.loads(line)["loss"] for line in f]
        # The run's scored rows: the reference stage's cache file for this backend.
        folder = os.path.join(config.reference.cache_dir, summary["data"]["fingerprint"])
        (path,) = set(glob.glob(os.path.join(folder, "examples-scored-*.parquet"))) - set(scores)
        scored = pq.read_table(path)
        assert scored.column("row_index").to_pylist() == list(range(16))
        scores[path] = np.concatenate([scored.column("ref_logp").to_numpy(), scored.column("ref_kl_logp").to_numpy()])
    hf, vllm = scores.values()
    assert np.all(hf < 0)
    np.testing.assert_allclose(vllm, hf, rtol=0, atol=AGREEMENT_NATS)
    assert len(losses["vllm"]) == 3
    np.testing.assert_allclose(losses["vllm"], losses["hf"], rtol=1e-4)
    # The replicas and the trainers hand their resources back when the run ends.
    total = ray_local.cluster_resources()["CPU"]
    deadline = time.time() + 60
    while ray_local.available_resources().get("CPU", 0) < total and time.time() < deadline:
        time.sleep(1)
    assert ray_local.available_resources().get("CPU", 0) == total

