"""Worker-count invariance through real Ray Train: 1 and 2 workers on the same global batches give
the same z0, loss and weights (float32, rtol 1e-5), and the same held-out (eval/) metrics, which
equal a direct single-process computation on the final weights; the held-out checks before and
after training come from the same evaluator."""

import os

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE_STEPS, direct_eval

pytestmark = pytest.mark.slow


def test_one_and_two_workers_agree(tiny_model, reference_runs):
    one_metrics, one_weights, one_summary, config = reference_runs[1]
    two_metrics, two_weights, two_summary, _ = reference_runs[2]
    steps = REFERENCE_STEPS
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
    from pipeline.models import load_causal_lm
    from pipeline.stages import precompute

    scored = pq.read_table(precompute(config).eval_scored_path)  # the cached eval scores
    direct = direct_eval(load_causal_lm(os.path.join(config.run_dir, "model")), scored, config.kto.beta, tiny_model)
    for metrics in (one_metrics[-1], two_metrics[-1]):
        assert metrics["eval/examples"] == 7
        for key in ("loss", "kl", "kl_unclamped", "rewards/margins", "accuracy"):
            assert metrics[f"eval/{key}"] == pytest.approx(direct[key], rel=1e-4, abs=1e-5), key

    # The held-out checks of summary.json: "after" is the last step's eval/ metrics, "before" the
    # same evaluator on the initial policy, which is the reference: every implied reward is 0 (to
    # float32 noise: the trainer pads differently from the reference actor), so is z0.
    for summary, metrics in ((one_summary, one_metrics), (two_summary, two_metrics)):
        after, before = summary["eval_after"], summary["eval_before"]
        assert {k: v for k, v in after.items() if f"eval/{k}" in metrics[-1]} == {
            k[len("eval/"):]: v for k, v in metrics[-1].items() if k.startswith("eval/")}
        assert before["examples"] == 7 and 0 <= before["kl"] < 1e-5 and abs(before["kl_unclamped"]) < 1e-5
        assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        assert before["loss"] == pytest.approx(0.5, abs=1e-6)  # weights 1: 1 - sigma(0) on every row
    one_before, two_before = one_summary["eval_before"], two_summary["eval_before"]
    assert two_before.pop("sample_generation") == one_before.pop("sample_generation")  # greedy, split over 2 ranks
    assert two_before == pytest.approx(one_before, rel=1e-5, abs=1e-6)



def test_kto_pairwise_with_one_and_two_workers_agrees(tmp_path, tiny_model, ray_local):
    """Whole pairs a step, on one worker or split over two (each rank holding whole pairs, the eval
    set's 3 pairs split 2 + 1): the same loss, z0 and weights."""
    import pyarrow as pa

    from conftest import train_and_load
    from tiny import WORDS

    def paired(path, pairs, seed):
        words = WORDS[seed:] + WORDS[:seed]
        pq.write_table(pa.table({"prompt": [f"{words[i]} {words[i + 1]}?" for i in range(pairs)],
                                 "chosen": [f"{words[i + 2]} {words[i]}." for i in range(pairs)],
                                 "rejected": [f"{words[i + 3]}." for i in range(pairs)]}), str(path))
        return str(path)

    data, held_out = paired(tmp_path / "pairs.parquet", 8, 0), paired(tmp_path / "held.parquet", 3, 9)
    runs = {workers: train_and_load(tmp_path / f"w{workers}", tiny_model, data, **{
        "kto.loss_type": "kto_pairwise", "scaling.num_workers": workers, "training.max_steps": 3,
        "training.per_device_train_batch_size": 4 // workers, "training.learning_rate": 1e-3,
        "eval.path": held_out, "output.run_name": f"pairwise{workers}"}) for workers in (1, 2)}
    (one_metrics, one_weights, one_summary), (two_metrics, two_weights, _) = runs[1], runs[2]
    assert one_summary["data"]["unpaired_rows"] == 0 and [m["examples"] for m in one_metrics] == [4, 4, 4]
    assert "eval/loss" in one_metrics[-1]  # (held-out metrics at the end)
    for one, two in zip(one_metrics, two_metrics):
        for key in ("loss", "kl", "rewards/margins", "grad_norm", "eval/loss", "eval/accuracy", "eval/examples"):
            if key in one:
                assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (one["step"], key)
    for name, tensor in one_weights.items():
        torch.testing.assert_close(two_weights[name], tensor, rtol=1e-5, atol=1e-6)
