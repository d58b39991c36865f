"""The reference stage with both backends (Ray Data's actor pool; vLLM's CPU build), and the step-0
drift check that the trainers run before their first update (its stop: test_end_to_end)."""

import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import reference_overrides, tiny_config
from pipeline.run import train

pytestmark = pytest.mark.slow

# Measured on the tiny model (float32): vLLM's CPU build and the transformers forward agree to
# about 3e-5 nats a sequence; on SmolLM2-135M, 2e-4 (sequences of 45-180 tokens).
AGREEMENT_NATS = 1e-3


def test_vllm_and_hf_references_agree_and_train_alike(tmp_path, tiny_model, reference_data, reference_runs,
                                                      ray_local):
    """The session's 1-worker reference run (hf backend) again with the vllm backend: the same rows
    scored alike, the same losses; each run's step-0 drift measured by its trainers."""
    hf_metrics, _, hf_summary, _ = reference_runs[1]
    config = tiny_config(tmp_path, tiny_model, reference_data[0], **reference_overrides(
        reference_data, 1, **{"reference.backend": "vllm", "output.run_name": "vllm"}))
    summary = train(config)
    assert summary["reference"]["backend"] == "vllm" and summary["data"]["fingerprint"] == hf_summary["data"]["fingerprint"]
    # measured by the trainer on its own forwards: 10 rows, each completion and KL completion; the hf
    # reference is the trainer's own function in float32 (other batches, other padding: ~1e-6 apart)
    for run, bound in ((hf_summary, 1e-4), (summary, AGREEMENT_NATS)):
        drift = run["reference"]["step0_drift"]
        assert drift["sequences"] == 20 and drift["max_abs_per_sequence"] <= bound, drift
    # the rows scored again, by vLLM, into a file of their own in the same cache folder
    assert summary["data"]["reference_cache_hit"] is False
    paths = {run["reference"]["backend"]: run["reference"]["scored_path"] for run in (hf_summary, summary)}
    assert paths["hf"] != paths["vllm"] and os.path.dirname(paths["hf"]) == os.path.dirname(paths["vllm"])
    scores = {}
    for backend, path in paths.items():
        scored = pq.read_table(path)
        assert scored.column("row_index").to_pylist() == list(range(10))
        scores[backend] = np.concatenate([scored.column("ref_logp").to_numpy(), scored.column("ref_kl_logp").to_numpy()])
    assert np.all(scores["hf"] < 0)
    np.testing.assert_allclose(scores["vllm"], scores["hf"], rtol=0, atol=AGREEMENT_NATS)
    with open(os.path.join(config.run_dir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 3
    np.testing.assert_allclose(losses, [m["loss"] for m in hf_metrics], rtol=1e-4)
    # The replicas and the trainers hand their resources back when the run ends.
    total = ray_local.cluster_resources()["CPU"]
    deadline = time.time() + 60
    while ray_local.available_resources().get("CPU", 0) < total and time.time() < deadline:
        time.sleep(1)
    assert ray_local.available_resources().get("CPU", 0) == total

