"""`launch.py plan`: will a config fit its GPUs? Bytes per GPU (or per CPU worker) from the model's
config.json alone, before anything is launched; and when it does not fit, the smallest change that does.

Where the numbers come from:
- Parameter counts and activations: pipeline/model_shape.py (the model on the meta device).
- Model states under DeepSpeed in bfloat16: DeepSpeed's estimators, called with these counts
  (stage_1_and_2.estimate_zero2_model_states_mem_needs for stages 1 and 2, which it counts alike;
  stage3.estimate_zero3_model_states_mem_needs), their totals split into weights / gradients /
  optimizer states by the multipliers their source comments give (2 = 16-bit weights; 18 = 2 + 4
  gradients, 4 float32 master weights, 8 AdamW moments). They assume 16-bit weights: float32 runs (ddp, and
  DeepSpeed on CPUs) use the same accounting with 4-byte weights and one float32 gradient copy.
  DeepSpeed's host-memory number (its `cpu_mem`, per node, with its 1.5 buffer factor) is taken as is for
  offloaded states.
- DeepSpeed's gradient bucket: `reduce_bucket_size` (5e8 elements, its default; this project sets none),
  allocated whole on a GPU (stage 1 in float32 when bf16 accumulates in float32; two with stage 3's overlap).
- Logits: pipeline/logprobs.py runs the head on completion positions only (plain-head architectures), in
  chunks of HEAD_CHUNK_ELEMENTS logits that the backward recomputes, and takes a float32 log-softmax: a
  chunk's head output, its float32 copy and log-softmax, and in the backward its gradient in and out
  (12 bytes a logit in float32, 14 in bf16); other architectures hold every position's logits whole.
- Calibrated on CPUs against measured peaks (benchmarks/plan_calibration.py; benchmarks/NOTES.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from pipeline.model_shape import Shape, activation_bytes_per_token, lora_params, model_shape

GIB = 2**30
DS_REDUCE_BUCKET = int(5e8)  # DeepSpeed's default reduce_bucket_size (elements)
GPU_RUNTIME_RESERVE = GIB  # CUDA context, cuBLAS workspace, NCCL buffers: a rule of thumb, not measured here
# What a CPU training process holds beyond the tensors counted here while it steps, measured on the tiny
# model, whose model-sized parts are ~60 MiB (benchmarks/plan_calibration.py): the step's runtime, and
# with DeepSpeed its engine (~46 MiB more, whatever the model's size); checked on SmolLM2-135M.
CPU_RUNTIME_RESERVE = {"ddp": 23 * 2**20, "deepspeed": 69 * 2**20}


def forward_tokens(config) -> tuple[int, int, int]:
    """(rows, padded tokens, completion positions) of a trainer's largest forward, every row at
    kto.max_length with a one-token prompt: the bound pipeline/train/step.py's grouping allows. A budget
    (training.max_tokens_per_forward) groups all of a step's rows on a rank; 0: one micro-batch a forward."""
    t, length = config.training, config.kto.max_length
    rows = t.per_device_train_batch_size
    if t.max_tokens_per_forward > 0:
        rows = min(rows * t.gradient_accumulation_steps, max(1, t.max_tokens_per_forward // length))
    return rows, rows * length, rows * (length - 1)


def logits_bytes(shape: Shape, tokens: int, positions: int, dtype_bytes: int, backward: bool) -> int:
    """The head's output on the scored positions, its float32 copy and log-softmax (and in a backward the
    log-softmax's gradient in and out): one chunk of them at a time where the head runs on the scored
    positions alone; architectures whose head runs on every position hold all of them, and every logit first."""
    from pipeline.logprobs import HEAD_CHUNK_ELEMENTS  # (torch: imported by those that plan, not by the driver)

    per_logit = (12 if dtype_bytes == 4 else 14) if backward else (8 if dtype_bytes == 4 else 10)
    if shape.plain_head:
        return min(positions, max(1, HEAD_CHUNK_ELEMENTS // shape.vocab)) * shape.vocab * per_logit
    return positions * shape.vocab * per_logit + tokens * shape.vocab * dtype_bytes


def zero_states(stage: int, params: int, largest: int, workers: int, per_node: int, offload_optimizer: bool,
                offload_param: bool, weight_bytes: int) -> tuple[dict, int]:
    """({weights, gradients, optimizer_states} bytes per device, offloaded bytes per node) under ZeRO.

    16-bit weights: the per-device total is DeepSpeed's estimator's, split as its comments count (weights 2P,
    or 2P/N + the gathered layer at stage 3; gradients 16-bit and float32, 6P/N, or float32 only at stage 3,
    4P/N; the rest, 12P/N, optimizer states: float32 master weights and AdamW's moments); offloaded states
    go to the host, by its per-node number. Float32 weights: the same accounting with 4-byte weights and one
    float32 gradient (4P/N)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    # (the estimators count nodes x GPUs a node of workers: a last, partly filled node counts as a fraction)
    per_node = min(workers, per_node)
    nodes, w = workers / per_node, weight_bytes
    offloaded = offload_optimizer or offload_param
    if stage < 3:
        host, device = estimate_zero2_model_states_mem_needs(params, per_node, nodes, cpu_offload=offload_optimizer)
        weights, layer = 2 * params, 0
    else:
        host, device, layer = estimate_zero3_model_states_mem_needs(params, largest, per_node, nodes,
                                                                    offload_optimizer, offload_param)
        weights = layer + (0 if offload_param else 2 * params // workers)
    gradients = 0 if offload_optimizer else (6 if stage < 3 else 4) * params // workers
    states = {"weights": weights, "gradients": gradients, "optimizer_states": device - weights - gradients}
    if w != 2:  # float32 weights: 4 bytes where the estimators count 2, one gradient copy of 4 bytes
        states["weights"] = (w * params if stage < 3 else 0 if offload_param else w * params // workers) + layer
        states["gradients"] = 0 if offload_optimizer else 4 * params // workers
    if stage == 1 and not offload_optimizer:
        # measured (benchmarks/plan_calibration.py): ZeRO-1 keeps each parameter's whole float32 gradient (its
        # accumulator; this project's grad_accum_dtype is float32) besides the partition, 4P more than ZeRO-2
        states["gradients"] += 4 * params
    return states, host if offloaded else 0


def trainer_bytes(config, shape: Shape, per_node: int) -> dict:
    """Bytes of one training worker's device (a GPU, or its CPU process), by part, at its two peaks: the
    start of a backward (activations and logits held) and the optimizer step (gradients complete)."""
    bf16, workers, lora = config.trainer_bf16, config.scaling.num_workers, config.lora
    w = 2 if bf16 else 4
    trainable = lora_params(shape, lora.r, lora.target_modules) if lora.r else shape.params
    on_gpu = config.scaling.use_gpu
    if config.scaling.strategy == "ddp":  # PlainEngine: float32, everything on every worker
        states = {"weights": 4 * (shape.params + (trainable if lora.r else 0)), "gradients": 4 * trainable,
                  "optimizer_states": 8 * trainable}
        offloaded, persistent_grads = 0, 0
        bucket = 2 * min(32 * 2**20, 4 * trainable) if workers > 1 else 0  # engines.all_reduce_gradients
    else:
        ds = config.deepspeed
        states, offloaded = zero_states(ds.zero_stage, trainable, shape.largest_layer, workers, per_node,
                                        ds.offload_optimizer, ds.offload_param, w)
        if lora.r:  # the frozen base stays a plain module in the trainer's dtype; ZeRO holds the adapters
            states["weights"] += w * shape.params
        # what a backward holds besides activations: the gradient partition; at stage 3 also the reduce bucket,
        # filled during the backward (measured: benchmarks/plan_calibration.py)
        persistent_grads = states["gradients"]
        grad_bytes = 4 if bf16 and ds.zero_stage == 1 else w  # stage 1 + bf16 stages the float32 accumulator
        bucket = grad_bytes * (DS_REDUCE_BUCKET if on_gpu else min(DS_REDUCE_BUCKET, trainable))
        persistent_grads += bucket if ds.zero_stage == 3 else 0
    rows, tokens, positions = forward_tokens(config)
    # the lean MLP and norms step aside for ZeRO-3's partitioned weights and for LoRA's wrapped projections
    lean = lora.r == 0 and not (config.scaling.strategy == "deepspeed" and config.deepspeed.zero_stage == 3)
    per_layer, outside = activation_bytes_per_token(shape, "bfloat16" if bf16 else "float32",
                                                    config.model.trust_remote_code, lean)
    if config.trainer_gradient_checkpointing:  # each layer's input kept; one layer recomputed in the backward
        activations, working = tokens * (shape.layers * shape.hidden * w + outside), 2 * per_layer * tokens
    else:
        activations, working = tokens * (shape.layers * per_layer + outside), per_layer * tokens
    logits = logits_bytes(shape, tokens, positions, w, backward=True)
    # ddp: torch's fused AdamW (no temporaries); under DeepSpeed torch's AdamW, foreach on GPUs (one
    # temporary copy of what it updates), one tensor at a time on CPUs
    optimized = 0 if offloaded or config.scaling.strategy == "ddp" else trainable // workers
    optimizer_temp = 4 * (optimized if on_gpu else min(optimized, shape.largest_layer))
    parts = {**states, "activations": activations, "logits": logits, "layer_backward": working,
             "gradient_bucket": bucket, "optimizer_step_temporary": optimizer_temp,
             "runtime_reserve": GPU_RUNTIME_RESERVE if on_gpu else CPU_RUNTIME_RESERVE[config.scaling.strategy]}
    backward = (states["weights"] + states["optimizer_states"] + persistent_grads + activations
                + max(logits, working))
    step = states["weights"] + states["optimizer_states"] + states["gradients"] + bucket + optimizer_temp
    return {"device": "GPU" if on_gpu else "CPU", "dtype": "bfloat16" if bf16 else "float32",
            "trainable_params": trainable, "rows_per_forward": rows, "tokens_per_forward": tokens,
            "logit_positions": positions, "bytes": parts, "offloaded_bytes_per_node": offloaded,
            "backward_peak": backward + parts["runtime_reserve"], "step_peak": step + parts["runtime_reserve"],
            "peak": max(backward, step) + parts["runtime_reserve"]}


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
VLLM_CPU_KV_CACHE = 4 * GIB  # vLLM's CPU backend: VLLM_CPU_KVCACHE_SPACE's default


def reference_bytes(config, shape: Shape, gpu_bytes: int) -> dict:
    """One reference replica: hf, its weights and one no-grad forward of reference.max_tokens_per_batch
    tokens; vllm, its weights over tensor_parallel_size GPUs and the KV cache that fills
    gpu_memory_utilization of each (the tokens it holds: a sequence of kto.max_length must fit)."""
    r, length = config.reference, config.kto.max_length
    b = DTYPE_BYTES[r.dtype]
    weights = b * shape.params
    on_gpu = r.num_gpus_per_replica > 0
    if r.backend == "hf":
        tokens = max(r.max_tokens_per_batch, length)
        per_layer, _ = activation_bytes_per_token(shape, r.dtype, config.model.trust_remote_code, lean=False)
        temporary = per_layer * tokens + logits_bytes(shape, tokens, tokens, b, backward=False)
        peak = weights + temporary + (GPU_RUNTIME_RESERVE if on_gpu else 0)
        return {"backend": "hf", "device": "GPU" if on_gpu else "CPU", "dtype": r.dtype, "weights": weights,
                "forward_temporary": temporary, "peak": peak, "fits": not on_gpu or peak <= gpu_bytes}
    gpus = r.tensor_parallel_size if on_gpu else 1
    kv_per_token = shape.kv_bytes_per_token * b // gpus
    share = weights // gpus
    if on_gpu:
        kv_cache = int(r.gpu_memory_utilization * gpu_bytes) - share - GPU_RUNTIME_RESERVE
        peak = int(r.gpu_memory_utilization * gpu_bytes)
    else:
        kv_cache, peak = VLLM_CPU_KV_CACHE, share + VLLM_CPU_KV_CACHE
    kv_tokens = max(kv_cache, 0) // kv_per_token
    return {"backend": "vllm", "device": "GPU" if on_gpu else "CPU", "dtype": r.dtype, "gpus": gpus,
            "weights": share, "kv_cache": max(kv_cache, 0), "kv_cache_tokens": kv_tokens, "peak": peak,
            "fits": kv_tokens >= length}


def host_bytes(config, shape: Shape, trainer: dict, reference: dict, per_node: int) -> dict:
    """Host RAM of the busiest node, in the larger of the two phases (the reference replicas exit before
    the trainers start). GPU workers load the model in float32 on the host first (load_causal_lm); under
    ZeRO-3 each loads its partition only (HfDeepSpeedConfig: zero.Init)."""
    s = config.scaling
    workers = min(s.num_workers, per_node) if s.use_gpu else s.num_workers  # CPU: the embedded Ray's one node
    if s.use_gpu:
        zero3 = s.strategy == "deepspeed" and config.deepspeed.zero_stage == 3
        load = 4 * (shape.params // s.num_workers + shape.largest_layer) if zero3 else 4 * shape.params
        training = workers * load + trainer["offloaded_bytes_per_node"]
    else:
        training = workers * trainer["peak"] + trainer["offloaded_bytes_per_node"]
    r = config.reference
    nodes = max(1, math.ceil(s.num_workers / per_node)) if s.use_gpu else 1
    replicas = math.ceil(r.num_replicas / nodes)
    if reference["device"] == "CPU":
        scoring = replicas * reference["peak"]
    else:  # hf loads its weights on the host first; vLLM streams them
        scoring = replicas * reference["weights"] if r.backend == "hf" else 0
    return {"workers_per_node": workers, "training": training, "reference": scoring, "peak": max(training, scoring)}


def estimate(config, gpu_memory_gib: float, gpus_per_node: int = 8, shapes: Optional[dict] = None) -> dict:
    """The bytes of one config, without fixes: trainer, reference replica, host; and whether they fit."""
    m = config.model
    shapes = shapes if shapes is not None else {}
    if "policy" not in shapes:
        shapes["policy"] = model_shape(m.name_or_path, m.cache_dir, m.trust_remote_code)
    if "reference" not in shapes:
        shapes["reference"] = (model_shape(config.reference.model, m.cache_dir, m.trust_remote_code)
                               if config.reference.model else shapes["policy"])
    gpu_bytes = int(gpu_memory_gib * GIB)
    per_node = gpus_per_node if config.scaling.use_gpu else config.scaling.num_workers
    trainer = trainer_bytes(config, shapes["policy"], per_node)
    reference = reference_bytes(config, shapes["reference"], gpu_bytes)
    host = host_bytes(config, shapes["policy"], trainer, reference, per_node)
    # CPU runs: the trainers' memory is the host's, and --gpu-memory-gib is read as the node's RAM
    trainer["fits"] = trainer["peak"] <= gpu_bytes if config.scaling.use_gpu else host["training"] <= gpu_bytes
    if reference["device"] == "CPU":
        reference["fits"] = reference["fits"] and host["reference"] <= gpu_bytes
    return {"trainer": trainer, "reference": reference, "host": host}


def _with(config, key: str, value):
    section, name = key.split(".")
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{name: value})})


def trainer_changes(config) -> list[list[tuple[str, object]]]:
    """Single changes that lower a trainer's memory, cheapest first: a smaller forward budget (only
    padding and speed change), gradient checkpointing (~16-30% slower steps), the next ZeRO stages, offload,
    then more workers (more GPUs)."""
    ds, length = config.deepspeed, config.kto.max_length
    changes: list[list[tuple[str, object]]] = []
    tokens = forward_tokens(config)[1]
    while tokens // 2 >= length:
        tokens //= 2
        changes.append([("training.max_tokens_per_forward", tokens // length * length)])
    if not config.trainer_gradient_checkpointing:
        changes.append([("training.gradient_checkpointing", True)])
    deepspeed = config.scaling.strategy == "deepspeed"
    for stage in range(ds.zero_stage + 1 if deepspeed else 1, 4):
        changes.append(([] if deepspeed else [("scaling.strategy", "deepspeed")]) + [("deepspeed.zero_stage", stage)])
    on_zero3 = [] if deepspeed and ds.zero_stage == 3 else [("scaling.strategy", "deepspeed"),
                                                             ("deepspeed.zero_stage", 3)]
    if not ds.offload_optimizer:
        changes.append(on_zero3 + [("deepspeed.offload_optimizer", True)])
    changes.append(on_zero3 + [("deepspeed.offload_optimizer", True), ("deepspeed.offload_param", True)])
    workers = config.scaling.num_workers
    while workers < 4096:
        workers *= 2
        changes.append([("scaling.num_workers", workers)])
    return changes


def reference_changes(config) -> list[list[tuple[str, object]]]:
    r = config.reference
    changes = [[("reference.dtype", "bfloat16")]] if r.dtype == "float32" else []
    if r.backend == "vllm" and r.num_gpus_per_replica:
        tp = r.tensor_parallel_size
        while tp < 64:
            tp *= 2
            changes.append([("reference.tensor_parallel_size", tp), ("reference.num_gpus_per_replica", tp)])
    elif r.backend == "hf":
        budget = r.max_tokens_per_batch
        while budget // 2 >= config.kto.max_length:
            budget //= 2
            changes.append([("reference.max_tokens_per_batch", budget)])
    return changes


def _first_fit(config, changes, part: str, gpu_memory_gib: float, gpus_per_node: int, shapes: dict):
    from pipeline.config import ConfigError, validate

    for change in changes:
        changed = config
        for key, value in change:
            changed = _with(changed, key, value)
        try:
            validate(changed)  # (LoRA refuses ZeRO-3, offload_param needs stage 3, ...)
        except ConfigError:
            continue
        result = estimate(changed, gpu_memory_gib, gpus_per_node, shapes)
        if result[part]["fits"]:
            return {"set": [f"{key}={value if not isinstance(value, bool) else str(value).lower()}"
                            for key, value in change], "peak": result[part]["peak"]}
    return None


def plan(config, gpu_memory_gib: float, gpus_per_node: int = 8) -> dict:
    """The memory plan of a run (see the module docstring), with the smallest change that makes each part
    fit where it does not: the first of trainer_changes / reference_changes, cheapest first, whose
    re-run estimate fits."""
    shapes: dict = {}
    report = estimate(config, gpu_memory_gib, gpus_per_node, shapes)
    s = shapes["policy"]
    report["model"] = {"name_or_path": config.model.name_or_path, "config": s.source, "model_type": s.model_type,
                       "params": s.params, "largest_layer_params": s.largest_layer, "layers": s.layers,
                       "hidden_size": s.hidden, "vocab_size": s.vocab}
    report["run"] = {"strategy": config.scaling.strategy, "zero_stage": config.deepspeed.zero_stage,
                     "offload_optimizer": config.deepspeed.offload_optimizer,
                     "offload_param": config.deepspeed.offload_param, "workers": config.scaling.num_workers,
                     "use_gpu": config.scaling.use_gpu, "lora_r": config.lora.r,
                     "gradient_checkpointing": config.trainer_gradient_checkpointing,
                     "max_length": config.kto.max_length,
                     "per_device_batch": config.training.per_device_train_batch_size,
                     "max_tokens_per_forward": config.training.max_tokens_per_forward}
    report["gpu_memory_bytes"] = int(gpu_memory_gib * GIB)
    report["gpus_per_node"] = gpus_per_node
    for part, changes in (("trainer", trainer_changes), ("reference", reference_changes)):
        report[part]["fix"] = None if report[part]["fits"] else _first_fit(
            config, changes(config), part, gpu_memory_gib, gpus_per_node, shapes)
    report["fits"] = report["trainer"]["fits"] and report["reference"]["fits"]
    return report


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def describe(report: dict) -> str:
    """`launch.py plan`'s text: per part and in total, whether it fits, and the fix."""
    m, run, t, r, h = report["model"], report["run"], report["trainer"], report["reference"], report["host"]
    budget = report["gpu_memory_bytes"]
    strategy = run["strategy"] if run["strategy"] == "ddp" else (
        f"deepspeed ZeRO-{run['zero_stage']}" + (" offload_optimizer" if run["offload_optimizer"] else "")
        + (" offload_param" if run["offload_param"] else ""))
    lines = [f"model: {m['model_type']}, {m['params'] / 1e9:.3g}B parameters (largest layer "
             f"{m['largest_layer_params'] / 1e6:.3g}M), from {m['config']}",
             f"trainer: {strategy}, {run['workers']} workers on {t['device']}s, {t['dtype']}"
             + (f", LoRA r={run['lora_r']} ({t['trainable_params'] / 1e6:.3g}M trainable)" if run["lora_r"] else "")
             + (", gradient checkpointing" if run["gradient_checkpointing"] else "")
             + f"; largest forward {t['rows_per_forward']} rows x {run['max_length']} = {t['tokens_per_forward']} "
               f"tokens"]
    lines += [f"  {name.replace('_', ' '):<26}{_gib(value):>12}" for name, value in t["bytes"].items() if value]
    memory = f"{_gib(budget)} a GPU" if t["device"] == "GPU" else f"{_gib(budget)} of RAM a node"
    lines.append(f"  {'peak a worker':<26}{_gib(t['peak']):>12}   (backward {_gib(t['backward_peak'])}, optimizer "
                 f"step {_gib(t['step_peak'])}) -> " + ("fits" if t["fits"] else "does NOT fit") + f" in {memory}")
    if t["offloaded_bytes_per_node"]:
        lines.append(f"  offloaded to host memory: {_gib(t['offloaded_bytes_per_node'])} a node (DeepSpeed's estimate)")
    if r["backend"] == "hf":
        lines.append(f"reference (hf, {r['dtype']}, on {r['device']}): weights {_gib(r['weights'])} + forward "
                     f"{_gib(r['forward_temporary'])} = {_gib(r['peak'])} a replica")
    else:
        devices = f"{r['gpus']} {r['device']}" + ("s" if r["gpus"] > 1 else "")
        lines.append(f"reference (vllm, {r['dtype']}, {devices} a replica): weights {_gib(r['weights'])}"
                     f" a {r['device']}, KV cache {_gib(r['kv_cache'])} = {r['kv_cache_tokens']:,} tokens")
    lines[-1] += " -> " + ("fits" if r["fits"] else "does NOT fit")
    lines.append(f"host RAM a node ({h['workers_per_node']} workers): {_gib(h['peak'])} (training "
                 f"{_gib(h['training'])}, reference {_gib(h['reference'])})")
    for part in ("trainer", "reference"):
        fix = report[part]["fix"]
        if not report[part]["fits"]:
            lines.append(f"{part} fix: " + (" ".join(f"--set {s}" for s in fix["set"]) + f" (peak {_gib(fix['peak'])})"
                                            if fix else "none of the single changes fits: see the parts above"))
    lines.append("fits: yes" if report["fits"] else "fits: no")
    return "\n".join(lines)
