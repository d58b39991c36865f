"""The lean SwiGLU and RMSNorm (pipeline/lean_layers.py) compute what transformers computes, with
the same gradients, and keep less for the backward: exactly the tensors they are built not to keep."""

import pytest
import torch

from pipeline import lean_layers
from pipeline.logprobs import pack, sequence_logps
from tests.test_packing import rows, tiny_folder

H, FF, L = 64, 128, 2  # tiny_folder's hidden size, intermediate size and layers


def saved_bytes(model, batch) -> tuple[torch.Tensor, int]:
    """The summed log-probs, and the bytes of the distinct non-parameter storages the backward keeps."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def keep(t):
        pointer = t.untyped_storage().data_ptr()
        if pointer not in parameters:
            storages[pointer] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logps = sequence_logps(model, batch)
    return logps, sum(storages.values())


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_lean_layers_equal_transformers_and_keep_less(tmp_path, architecture):
    from pipeline.models import load_causal_lm

    folder = tiny_folder(tmp_path, architecture)
    lean = load_causal_lm(folder)
    full = load_causal_lm(folder)
    for module in full.modules():  # transformers' own forwards again
        module.__dict__.pop("forward", None)
    assert lean_layers.apply(load_causal_lm(folder)) == L * 3 + 1  # an MLP and two norms a layer, the final norm
    prompts, completions = rows()
    batch = pack(prompts, completions)
    tokens = batch["num_tokens"]

    results = []
    for model in (lean, full):
        logps, kept = saved_bytes(model, batch)
        (logps * torch.linspace(-1, 1, len(prompts))).sum().backward()
        results.append((logps.detach(), kept, {n: p.grad for n, p in model.named_parameters()}))
    (lean_logps, lean_kept, lean_grads), (full_logps, full_kept, full_grads) = results
    torch.testing.assert_close(lean_logps, full_logps, rtol=0, atol=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Not kept: the SiLU of the gate and its product with up (2 x FF a token and layer), and each norm's
    # normalised float32 output (H a token; two a layer and the final one); both keep the reciprocal root.
    assert full_kept - lean_kept == 4 * tokens * (L * (2 * FF + 2 * H) + H)


def test_adapters_and_inference_run_transformers_forward(tmp_path):
    """LoRA wraps the projections: the lean MLP must not bypass them; under no_grad nothing is kept anyway."""
    from peft import LoraConfig, get_peft_model

    from pipeline.models import load_causal_lm

    model = load_causal_lm(tiny_folder(tmp_path, "llama"))
    prompts, completions = rows()
    before = sequence_logps(model, pack(prompts, completions)).detach()
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                                               task_type="CAUSAL_LM"))
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # adapters that change the output
    after = sequence_logps(adapted, pack(prompts, completions))
    assert (after.detach() - before).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(adapted, pack(prompts, completions)), after.detach(), rtol=0,
                                   atol=1e-5)
