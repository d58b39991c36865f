"""Worker-count invariance through real Ray Train: 1 and 2 workers on the same global
batches give the same z0, loss and weights (float32, rtol 1e-5), and the same held-out (eval/)
metrics, which equal a direct single-process computation on the final weights."""

import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_and_load, write_feedback


def _overrides(data, held_out, workers, per_device, steps) -> dict:
    return {"data.path": data, "eval.path": held_out, "eval.eval_steps": 2, "scaling.num_workers": workers,
            "training.per_device_train_batch_size": per_device, "training.max_steps": steps,
            "output.run_name": f"workers{workers}-steps{steps}"}


def _run(tmp_path, tiny_model, data, held_out, workers, per_device, steps):
    return train_and_load(tmp_path, tiny_model, data, **_overrides(data, held_out, workers, per_device, steps))


def _direct_eval(tmp_path, tiny_model, data, held_out, steps) -> dict:
    import pyarrow.parquet as pq

    from conftest import direct_eval, tiny_config
    from pipeline.models import load_causal_lm
    from pipeline.run import precompute

    config = tiny_config(tmp_path, tiny_model, data, **_overrides(data, held_out, 1, 4, steps))
    scored = pq.read_table(precompute(config).eval_scored_path)  # the cached eval scores
    return direct_eval(load_causal_lm(os.path.join(config.run_dir, "model")), scored, config.kto.beta, tiny_model)


def test_one_and_two_workers_agree(tmp_path, tiny_model, ray_local):
    steps = 3
    # 10 rows in global batches of 4: the third step has 2 rows, so the second worker's
    # share is empty there and it must still join every collective.
    data = write_feedback(str(tmp_path / "data" / "feedback.parquet"), rows=10)
    held_out = write_feedback(str(tmp_path / "data" / "heldout.parquet"), rows=7, seed=5)
    one_metrics, one_weights = _run(tmp_path, tiny_model, data, held_out, workers=1, per_device=4, steps=steps)
    two_metrics, two_weights = _run(tmp_path, tiny_model, data, held_out, workers=2, per_device=2, steps=steps)

    assert [m["step"] for m in one_metrics] == list(range(1, steps + 1))
    assert [m["step"] for m in two_metrics] == list(range(1, steps + 1))
    for one, two in zip(one_metrics, two_metrics):
        assert one["examples"] == two["examples"]
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "grad_norm"):
            if one[key] is None:
                assert two[key] is None
            else:
                assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (one["step"], key)
        # The unclamped estimate is a small difference of sequence log-probs (tens of nats) that
        # were padded differently; float32 holds those to about 1e-5 of their own size.
        scale = max(abs(one["logps/chosen"] or 0), abs(one["logps/rejected"] or 0))
        assert two["kl_unclamped"] == pytest.approx(one["kl_unclamped"], abs=1e-5 * scale), one["step"]
    assert one_metrics[-1]["examples"] == 2
    assert any(abs(m["kl_unclamped"]) > 1e-4 for m in one_metrics)  # z0 really was estimated
    moved = 0
    for name, tensor in one_weights.items():
        torch.testing.assert_close(two_weights[name], tensor, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(tensor, load_file(os.path.join(tiny_model, "model.safetensors"))[name]))
    assert moved > 0  # training changed the weights, so agreement is not trivial

    # Held-out metrics: every eval_steps (2) and at the end, the same with 1 and 2 workers (7 rows:
    # the ranks' shares differ in size), and equal to the direct computation on the final weights.
    evaluated = [m["step"] for m in one_metrics if "eval/loss" in m]
    assert evaluated == [2, 3]
    assert evaluated == [m["step"] for m in two_metrics if "eval/loss" in m]
    direct = _direct_eval(tmp_path, tiny_model, data, held_out, steps)
    for metrics in (one_metrics[-1], two_metrics[-1]):
        assert metrics["eval/examples"] == 7
        for key in ("loss", "kl", "kl_unclamped", "rewards/margins", "accuracy"):
            assert metrics[f"eval/{key}"] == pytest.approx(direct[key], rel=1e-4, abs=1e-5), key
