"""`launch.py plan` (pipeline/plan.py): parameter counts, model states, activations and logits of a
Llama-shaped config.json (no weights) against hand arithmetic, the smallest fix of a config that does not fit,
and the error for a model that is not there."""

import json

import pytest
import torch

from pipeline.config import load_config
from pipeline.model_shape import activation_bytes_per_token, lora_params, model_shape
from pipeline.plan import CPU_RUNTIME_RESERVE, GIB, describe, estimate, forward_tokens, plan

V, H, FF, L, HEADS, KV_HEADS = 1000, 64, 160, 3, 2, 1  # head_dim 32: k and v project to 32
KV = H // HEADS * KV_HEADS
LAYER = H * H + 2 * H * KV + H * H + 3 * H * FF + 2 * H  # q, k, v, o, gate/up/down, two RMSNorms
P = V * H + L * LAYER + H + V * H  # embeddings, layers, final norm, untied head


# The same with a 400k vocabulary: 51.5M parameters, where ZeRO's savings outweigh its engine's fixed cost
V_WIDE = 400_000
P_WIDE = P + 2 * (V_WIDE - V) * H


def llama_config(folder, vocab: int) -> str:
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": H,
        "intermediate_size": FF, "num_hidden_layers": L, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "max_position_embeddings": 512, "tie_word_embeddings": False}))
    return str(folder)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return llama_config(tmp_path_factory.mktemp("llama-config"), V)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> str:
    return llama_config(tmp_path_factory.mktemp("wide-llama-config"), V_WIDE)


def config_of(model: str, *overrides: str):
    return load_config(None, (f"model.name_or_path={model}", *overrides))


def test_parameters_and_largest_layer_by_hand(llama):
    shape = model_shape(llama, "unused")
    assert shape.params == P == 257_472
    assert shape.largest_layer == V * H  # the embedding (and the head): the most parameters one module holds
    assert (shape.vocab, shape.hidden, shape.layers) == (V, H, L)
    assert shape.kv_bytes_per_token == 2 * L * KV  # keys and values, per byte of the cache's dtype
    # LoRA r=8 on every Linear but the head; on q_proj and v_proj only
    assert lora_params(shape, 8, "all-linear") == L * 8 * ((H + H) + 2 * (H + KV) + (H + H) + 2 * (H + FF) + (FF + H))
    assert lora_params(shape, 8, ["q_proj", "v_proj"]) == L * 8 * ((H + H) + (H + KV))


def test_model_states_by_hand(llama):
    gpu = ("scaling.use_gpu=true", "scaling.num_workers=4", "scaling.resources_per_worker={CPU: 1, GPU: 1}")
    ddp = estimate(config_of(llama, *gpu), 80)["trainer"]["bytes"]
    assert (ddp["weights"], ddp["gradients"], ddp["optimizer_states"]) == (4 * P, 4 * P, 8 * P)  # 16P: float32 AdamW
    zero3 = estimate(config_of(llama, *gpu, "scaling.strategy=deepspeed", "deepspeed.zero_stage=3"), 80)["trainer"]
    assert zero3["dtype"] == "bfloat16"  # deepspeed on GPUs: bf16 unless training.bf16 says otherwise
    b = zero3["bytes"]
    # bf16 weights 2P/N plus the gathered largest layer (DeepSpeed counts 4 bytes a parameter), float32
    # gradients 4P/N, master weights and moments 12P/N: 18P/N in all, as DeepSpeed's estimator
    assert b["weights"] == 2 * P // 4 + 4 * V * H
    assert b["gradients"] == 4 * P // 4
    assert b["optimizer_states"] == 12 * P // 4
    assert b["gradient_bucket"] == 2 * int(5e8)  # DeepSpeed's default reduce bucket, bf16, whole on a GPU
    zero2 = estimate(config_of(llama, *gpu, "scaling.strategy=deepspeed", "deepspeed.zero_stage=2"), 80)["trainer"]
    assert zero2["bytes"]["weights"] == 2 * P  # 16-bit weights everywhere; gradients and states partitioned
    assert zero2["bytes"]["gradients"] + zero2["bytes"]["optimizer_states"] == 18 * P // 4
    offload = estimate(config_of(llama, *gpu, "scaling.strategy=deepspeed", "deepspeed.zero_stage=3",
                                 "deepspeed.offload_optimizer=true", "deepspeed.offload_param=true"), 80)["trainer"]
    assert offload["bytes"]["weights"] == 4 * V * H and offload["bytes"]["optimizer_states"] == 0
    # DeepSpeed's host estimate for both offloaded, ZeRO-Init: 18 bytes a parameter x its 1.5 buffer factor
    assert offload["offloaded_bytes_per_node"] == int(P * 18 * 1.5)


def test_activations_match_a_real_forward(tiny_model):
    """The meta-device measurement against the tensors a real CPU forward keeps for its backward."""
    from pipeline.models import load_causal_lm

    shape = model_shape(tiny_model, "unused")
    per_layer, outside = activation_bytes_per_token(shape, "float32")
    model = load_causal_lm(tiny_model).train()
    weights = {p.data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(3, model.config.vocab_size, (4, 256))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert shape.layers * per_layer + outside == pytest.approx(sum(kept.values()) / ids.numel(), rel=0.05)


def test_tokens_and_logits_by_hand(llama, wide_llama):
    c = config_of(llama, "training.per_device_train_batch_size=8", "training.gradient_accumulation_steps=2",
                  "kto.max_length=256", "kto.max_prompt_length=128", "training.max_tokens_per_forward=1024")
    assert forward_tokens(c) == (4, 1024, 4 * 255)  # 1024 // 256 rows a forward, one prompt token each
    assert forward_tokens(config_of(llama, "training.max_tokens_per_forward=0", "kto.max_length=256",
                                    "kto.max_prompt_length=128")) == (8, 8 * 256, 8 * 255)  # one micro-batch
    trainer = estimate(c, 80)["trainer"]
    assert trainer["bytes"]["logits"] == 4 * 255 * V * 12  # float32: log-softmax saved + its gradient in and out
    # A large vocabulary: the head runs in chunks of 2^26 logits (167 positions of 400,000), one alive at a time.
    wide = estimate(config_of(wide_llama, "kto.max_length=256", "kto.max_prompt_length=128"), 80)["trainer"]
    assert wide["bytes"]["logits"] == (2**26 // V_WIDE) * V_WIDE * 12  # (whole: 8 rows x 255 positions)


def test_a_config_that_does_not_fit_gets_the_first_change_that_does(wide_llama):
    c = config_of(wide_llama, "scaling.num_workers=4", "kto.max_length=2", "kto.max_prompt_length=1",
                  "training.per_device_train_batch_size=1", "training.gradient_checkpointing=true")
    zero2 = estimate(config_of(wide_llama, "scaling.num_workers=4", "kto.max_length=2", "kto.max_prompt_length=1",
                               "training.per_device_train_batch_size=1", "training.gradient_checkpointing=true",
                               "scaling.strategy=deepspeed", "deepspeed.zero_stage=2"), 80)["host"]["training"]
    ddp = estimate(c, 80)["host"]["training"]
    # float32 on CPUs, 4 workers on one node: ddp holds 16P a worker (test_model_states_by_hand; its fused
    # AdamW needs no temporaries), ZeRO-2 partitions the gradients and AdamW's states, ZeRO-1 keeps whole
    # float32 gradients besides its partition (measured: 4P more than ZeRO-2); DeepSpeed's engine costs a
    # fixed 46 MiB more a worker
    assert ddp > 4 * 16 * P_WIDE + 4 * CPU_RUNTIME_RESERVE["ddp"] and zero2 + 4 * 4 * P_WIDE > ddp > zero2
    memory = (zero2 + ddp) / 2 / GIB  # room for ZeRO-2, not for ddp or ZeRO-1
    report = plan(c, memory)
    assert not report["fits"] and not report["trainer"]["fits"]
    assert report["trainer"]["fix"]["set"] == ["scaling.strategy=deepspeed", "deepspeed.zero_stage=2"]
    assert report["trainer"]["fix"]["peak"] <= memory * GIB
    text = describe(report)
    assert "does NOT fit" in text and "--set scaling.strategy=deepspeed --set deepspeed.zero_stage=2" in text
    assert plan(c, 2 * ddp / GIB)["trainer"]["fits"]


def test_a_model_that_is_not_there(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="model.name_or_path.*no-such-model"):
        plan(config_of(missing), 80)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        plan(config_of(str(empty)), 80)
