"""Real human feedback (Anthropic HH-RLHF harmless-base test split, from ../shared/data)."""

import json
import math
import os

import pytest

from conftest import SHARED_DATA, tiny_config
from pipeline.run import train

pytestmark = pytest.mark.slow

HH_RLHF = os.path.join(SHARED_DATA, "hh-rlhf-harmless-base-test.kto.parquet")


@pytest.mark.skipif(not os.path.exists(HH_RLHF), reason=f"real feedback data not found at {HH_RLHF} "
                    "(it ships in the team's shared/ folder beside the project, not in this repository)")
def test_a_few_steps_on_real_feedback_have_finite_metrics(tmp_path, tiny_model, ray_local):
    config = tiny_config(tmp_path, tiny_model, HH_RLHF, **{
        "kto.max_length": 128, "kto.max_prompt_length": 96, "training.per_device_train_batch_size": 8,
        "scaling.num_workers": 1, "training.max_steps": 3, "data.kl_block_size": 8})
    summary = train(config)
    assert summary["data"]["read"] == 4624 and summary["data"]["kept"] + summary["data"]["rejected"] == 4624
    with open(os.path.join(config.run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert len(metrics) == 3
    for step in metrics:
        for key in ("loss", "kl", "kl_unclamped", "grad_norm", "logps/chosen", "logps/rejected"):
            assert step[key] is not None and math.isfinite(step[key]), key
        assert step["examples"] == 8
