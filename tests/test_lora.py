"""LoRA through PEFT: only the adapters train (the base weights stay), the saved adapter reloads
with PEFT and reproduces the trained model's held-out numbers, and ZeRO-2 with 2 workers trains the
same adapters as ddp with 1."""

import os

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import direct_eval, tiny_config

pytestmark = pytest.mark.slow


def _train(tmp_path, tiny_model, data, **overrides):
    """On the session's reference data (10 rows, 7 held out), whose stages are cached."""
    from pipeline.run import train
    from pipeline.stages import precompute

    train_path, held_out = data
    config = tiny_config(tmp_path, tiny_model, train_path, **{
        "lora.r": 4, "lora.alpha": 8, "lora.target_modules": "[q_proj, v_proj]", "training.learning_rate": 1e-2,
        "eval.path": held_out, "training.max_steps": 3, **overrides})
    summary = train(config)
    return config, summary, pq.read_table(precompute(config).eval_scored_path)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, reference_data, ray_local):
    """ddp, 1 worker, adapters on q_proj and v_proj, the merged model written too."""
    return _train(tmp_path_factory.mktemp("lora"), tiny_model, reference_data, **{"lora.save_merged": True,
                                                                         "output.run_name": "lora"})


def test_adapters_train_base_stays_and_the_adapter_reloads(tiny_model, lora_run):
    from peft import PeftModel

    from pipeline.models import load_causal_lm

    config, summary, scored = lora_run
    run = config.run_dir
    adapter = load_file(os.path.join(run, "model", "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    assert any("lora_B" in name and tensor.abs().max() > 0 for name, tensor in adapter.items())  # B starts at 0

    base = load_file(os.path.join(tiny_model, "model.safetensors"))
    reloaded = PeftModel.from_pretrained(load_causal_lm(tiny_model), os.path.join(run, "model"))
    for name, tensor in reloaded.get_base_model().state_dict().items():
        if "lora_" not in name:  # every base weight as it was
            torch.testing.assert_close(tensor, base[name.replace(".base_layer", "")], rtol=0, atol=0)

    merged = load_file(os.path.join(run, "merged", "model.safetensors"))
    changed = {name for name in base if not torch.equal(merged[name], base[name])}
    assert changed and all(("q_proj" in name or "v_proj" in name) for name in changed)

    # The merged model (written by rank 0 into the last checkpoint) is PEFT's own merge of the adapter.
    folded = reloaded.merge_and_unload()
    for name, tensor in folded.state_dict().items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7)

    # The reloaded adapter gives the numbers the trainers reported for the final weights.
    final = summary["final_metrics"]
    direct = direct_eval(folded, scored, config.kto.beta, tiny_model)
    for key in ("loss", "kl", "rewards/margins", "accuracy"):
        assert final[f"eval/{key}"] == pytest.approx(direct[key], rel=1e-4, abs=1e-5), key


def test_zero2_with_two_workers_trains_the_same_adapters_as_ddp(tmp_path, tiny_model, reference_data, lora_run):
    ddp, _, _ = lora_run
    zero2, _, _ = _train(tmp_path, tiny_model, reference_data, **{
        "output.run_name": "lora-zero2", "scaling.num_workers": 2, "training.per_device_train_batch_size": 2,
        "scaling.strategy": "deepspeed", "deepspeed.zero_stage": 2, "scaling.embedded_num_cpus": 4})
    one = load_file(os.path.join(ddp.run_dir, "model", "adapter_model.safetensors"))
    two = load_file(os.path.join(zero2.run_dir, "model", "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-5, atol=2e-6)
