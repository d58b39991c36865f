"""The KTO training step on one GPU, without Ray, side by side with TRL's KTOTrainer step on the
same rows: bf16 autocast over float32 master weights on both sides (TRL's `bf16=True`), models
random-initialised from a config (SmolLM2-135M's, Qwen2.5-0.5B's and Qwen2.5-1.5B's shapes).

    python benchmarks/gpu_step.py --tokenizer DIR --data PARQUET [--models 0.5b,1.5b] [--steps 10]
                                  [--batch-size 64] [--max-length 1024] [--profile]

`DIR` holds a tokenizer and, for `smollm2`, the model's config.json (no weights needed).
Each contender runs in its own process (clean peak-memory counters): ours (`train_step` with
precomputed reference log-probs: packed forwards, the chunked head, gradient checkpointing as a GPU
run has it), `ours-padded` (the same with padded forwards), `ours-no-ckpt` (packed, no gradient
checkpointing), `ours-zero3` (DeepSpeed ZeRO-3), TRL default (reference model in memory), TRL with
`precompute_ref_log_probs=True` (TRL with its GPU defaults: gradient checkpointing on). Tokens/s:
prompt + completion tokens of the rows trained on, padding excluded, over the summed step times after
one warm-up step. MFU: (6 x parameters x trained tokens + 2 x parameters x KL-forward tokens) / time
over the bf16 matrix-multiply rate measured here, first (the same useful work for every contender:
TRL default's reference forwards and everyone's recomputation are not counted). `--profile`: ours'
two steps under torch.profiler, the operators that take the most GPU time.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test of this script only


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


# Qwen2.5-0.5B's and Qwen2.5-1.5B's published shapes (their config.json), random weights.
QWEN25 = {"0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
          "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12)}


def model_config(name: str, folder: str):
    from transformers import AutoConfig, Qwen2Config

    if name == "smollm2":
        return AutoConfig.from_pretrained(folder)
    return Qwen2Config(vocab_size=151936, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, **QWEN25[name])


def random_weights(a) -> str:
    """A folder with the model's config and seeded random weights: both sides load it the same way."""
    from transformers import AutoModelForCausalLM
    import torch

    folder = tempfile.mkdtemp()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(model_config(a.model, a.tokenizer)).save_pretrained(folder)
    return folder


def rows(tokenizer, data: str, count: int, max_length: int) -> tuple[list, list, list]:
    import pyarrow.parquet as pq

    table = pq.read_table(data, columns=["prompt", "completion", "label"])
    prompts, completions, labels = [], [], []
    for p, c, label in zip(*(table.column(n).to_pylist() for n in ("prompt", "completion", "label"))):
        p_ids = tokenizer(p)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(p_ids) + len(c_ids) <= max_length:
            prompts.append(p_ids)
            completions.append(c_ids)
            labels.append(label)
        if len(prompts) == count:
            break
    return prompts, completions, labels


def zero3_engine(model, optimizer, scheduler, batch_size: int):
    """`scaling.strategy: deepspeed` as the trainer builds it (ZeRO-3, bf16), in a one-process group."""
    import torch.distributed as dist

    from pipeline.train.engines import DeepSpeedEngine, deepspeed_config

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("nccl" if device() == "cuda" else "gloo")
    return DeepSpeedEngine(model, optimizer, scheduler, deepspeed_config(
        3, False, False, bf16=device() == "cuda", max_grad_norm=1.0, per_device_train_batch_size=batch_size))


def run_ours(a, contender: str) -> dict:
    """Ours: bf16 autocast over float32 weights (strategy ddp), or DeepSpeed ZeRO-3's bf16 weights
    with float32 master copies in the optimizer (strategy deepspeed)."""
    import contextlib

    import torch
    from transformers import AutoTokenizer

    from pipeline.logprobs import batch_of, score_sequences
    from pipeline.models import disable_dropout, load_causal_lm
    from pipeline.train.engines import PlainEngine, make_optimizer
    from pipeline.train.step import MicroBatch, StepSettings, train_step

    zero3 = contender == "ours-zero3"
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    model = load_causal_lm(random_weights(a)).to(device())  # as the trainer loads (both sides: the same weights)
    if contender == "ours-padded":
        model.set_attn_implementation("sdpa")
    disable_dropout(model)
    params = sum(p.numel() for p in model.parameters())  # (ZeRO-3 leaves a shard placeholder in each)
    n = a.batch_size * (a.steps + 1)
    prompts, completions, labels = rows(tokenizer, a.data, n, a.max_length)
    kl = completions[1:] + completions[:1]
    with torch.autocast(device(), dtype=torch.bfloat16):
        ref = score_sequences(model.eval(), prompts, completions, tokenizer.pad_token_id, device())
        ref_kl = score_sequences(model, prompts, kl, tokenizer.pad_token_id, device())
    model.train()
    if contender != "ours-no-ckpt":  # training.gradient_checkpointing: null turns it on for GPU workers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer, scheduler = make_optimizer(model, 1e-6, 0.0, "linear", 0.0, a.steps + 1, fused=not zero3)
    if zero3:
        engine = zero3_engine(model, optimizer, scheduler, a.batch_size)
        model = engine.module
    else:
        engine = PlainEngine(model, optimizer, scheduler, max_grad_norm=1.0)
    autocast = contextlib.nullcontext if zero3 else lambda: torch.autocast(device(), dtype=torch.bfloat16)
    settings = StepSettings(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto",
                            pad_token_id=tokenizer.pad_token_id,
                            max_tokens_per_forward=a.max_tokens_per_forward)
    times, tokens, kl_tokens = [], 0, 0

    def step_batch(step: int) -> MicroBatch:
        s = slice(step * a.batch_size, (step + 1) * a.batch_size)
        return MicroBatch(prompts[s], completions[s], kl[s], torch.tensor(labels[s]), ref[s], ref_kl[s])

    for step in range(a.steps + 1):
        batch = step_batch(step)
        synchronize()
        started = time.perf_counter()
        with autocast():
            metrics = train_step(engine, [batch], settings)
        synchronize()
        if step:  # the first step warms up kernels and allocator
            times.append(time.perf_counter() - started)
            tokens += metrics["num_tokens"]
            kl_tokens += sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.kl_completion_ids))
    if a.profile and device() == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, autocast():
            for step in (1, 2):
                train_step(engine, [step_batch(step)], settings)
            synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20), file=sys.stderr)
    # The model's no-grad forward alone on the last batch, to tell GPU time from the step's other work.
    forward = batch_of(model, batch.prompt_ids, batch.completion_ids, tokenizer.pad_token_id, device())
    inputs = {k: forward[k] for k in ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "max_length_q")
              if k in forward}
    with torch.no_grad(), autocast():
        model(**inputs, use_cache=False)
        synchronize()
        started = time.perf_counter()
        for _ in range(5):
            model(**inputs, use_cache=False)
        synchronize()
    forward_s = (time.perf_counter() - started) / 5
    return {"tokens": tokens, "kl_tokens": kl_tokens, "seconds": sum(times), "params": params,
            "peak_gib": peak_gib(), "forward_tokens_per_s": forward["num_tokens"] / forward_s}


def run_trl(a, precompute: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(random_weights(a))  # TRL builds its reference from this folder
    n = a.batch_size * (a.steps + 1)
    prompts, completions, labels = rows(tokenizer, a.data, n, a.max_length)
    dataset = Dataset.from_dict({"prompt": [tokenizer.decode(p) for p in prompts],
                                 "completion": [tokenizer.decode(c[:-1]) for c in completions], "label": labels})
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            times.append(time.perf_counter() - self.began)

    with tempfile.TemporaryDirectory() as out:
        args = KTOConfig(output_dir=out, per_device_train_batch_size=a.batch_size, max_length=a.max_length,
                         learning_rate=1e-6, beta=0.1, max_steps=a.steps + 1, lr_scheduler_type="linear",
                         logging_steps=1, save_strategy="no", report_to=[], seed=0, bf16=True,
                         precompute_ref_log_probs=precompute, dataloader_num_workers=0, disable_tqdm=True,
                         train_sampling_strategy="sequential", use_cpu=device() == "cpu")
        trainer = KTOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[StepTimer()])
        trainer.train()
    lengths = [len(p) + len(c) for p, c in zip(trainer.train_dataset["prompt_ids"], trainer.train_dataset["completion_ids"])]
    tokens = sum(lengths[a.batch_size:a.batch_size * (a.steps + 1)])
    # (TRL's KL completions are the same completions with other prompts of the batch: about as many tokens)
    return {"tokens": tokens, "kl_tokens": tokens, "seconds": sum(times[1:]),
            "params": sum(p.numel() for p in model.parameters()), "peak_gib": peak_gib()}


def matmul_peak() -> float:
    import torch

    size = 8192 if device() == "cuda" else 1024
    x = torch.randn(size, size, device=device(), dtype=torch.bfloat16)
    for _ in range(3):
        x @ x
    synchronize()
    started = time.perf_counter()
    for _ in range(10):
        x @ x
    synchronize()
    return 10 * 2 * size**3 / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--models", default="0.5b,1.5b", help="any of smollm2, 0.5b, 1.5b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-tokens-per-forward", type=int, default=0, help="ours: 0 = the batch in one forward")
    parser.add_argument("--profile", action="store_true", help="ours: where two steps spend GPU time")
    parser.add_argument("--no-cudnn-attention", action="store_true",
                        help="turn off the cuDNN attention backend, which plans anew for every new batch shape")
    parser.add_argument("--contenders", default="ours,ours-padded,trl-default,trl-precompute",
                        help="any of ours (strategy ddp), ours-padded, ours-no-ckpt, ours-zero3 (strategy deepspeed), "
                             "trl-default, trl-precompute")
    parser.add_argument("--one", nargs=2, metavar=("CONTENDER", "MODEL"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.one:
        a.model = a.one[1]
        if a.no_cudnn_attention:  # both sides alike: an environment setting, not a lever of ours
            import torch

            torch.backends.cuda.enable_cudnn_sdp(False)
        if a.one[0].startswith("ours"):
            result = run_ours(a, a.one[0])
        else:
            result = run_trl(a, a.one[0] == "trl-precompute")
        print(json.dumps(result))
        return
    import torch

    peak = matmul_peak()
    name = torch.cuda.get_device_name() if device() == "cuda" else "cpu"
    print(f"{name}: bf16 matmul {peak / 1e12:.0f} TFLOP/s; batch {a.batch_size}, "
          f"max_length {a.max_length}, {a.steps} timed steps")
    print(f"{'model':8} {'contender':15} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9}")
    for name in a.models.split(","):
        results = {}
        for contender in a.contenders.split(","):
            flags = ["--tokenizer", a.tokenizer, "--data", a.data, "--steps", str(a.steps),
                     "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
                     "--max-tokens-per-forward", str(a.max_tokens_per_forward)] + (
                        ["--no-cudnn-attention"] if a.no_cudnn_attention else []) + (["--profile"] if a.profile else [])
            child = subprocess.run([sys.executable, __file__, *flags, "--one", contender, name],
                                   capture_output=True, text=True)
            if child.returncode:
                print(f"{name} {contender} failed: {child.stderr[-2500:]}")
                continue
            if a.profile and contender == "ours":
                print(child.stderr[child.stderr.find("-----"):], flush=True)
            r = results[contender] = json.loads(child.stdout.strip().splitlines()[-1])
            rate = r["tokens"] / r["seconds"]
            mfu = (6 * r["params"] * r["tokens"] + 2 * r["params"] * r["kl_tokens"]) / r["seconds"] / peak
            forward = f"  (forward alone: {r['forward_tokens_per_s']:.0f} tokens/s)" if "forward_tokens_per_s" in r else ""
            print(f"{name:8} {contender:15} {rate:>10.0f} {mfu:>7.1%} {r['peak_gib']:>9.2f}" + forward, flush=True)


if __name__ == "__main__":
    main()
