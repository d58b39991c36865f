"""The step-0 drift of a bfloat16 trainer against a float32 reference (issue 15's numerics), on
the device it runs on: what the workers' drift check (pipeline/train/drift.py) measures when a
DeepSpeed bf16 run (weights in bfloat16) trains against references scored in float32 by the hf
reference actor, beside the same trainer against a bfloat16 reference and a float32 trainer
against the float32 reference.

    python benchmarks/gpu_drift.py --model-config DIR --examples PARQUET [--rows 64] [--device cuda]

DIR holds a model's config.json (the model is random-initialised from it, seeded: no weights
travel); PARQUET holds the data stage's examples (prompt_ids, completion_ids, kl_completion_ids).
The reference side is the hf actor's computation (pipeline.logprobs.score_sequences, its token
budget); the trainer side is drift.measure on the trainer's own forward (logps_without_grad).
Prints one JSON object.
"""

import argparse
import copy
import json
import os
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", required=True)
    parser.add_argument("--examples", required=True)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.logprobs import score_sequences
    from pipeline.train.drift import measure

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.model_config)
    config.attention_dropout = 0.0
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()
    columns = ["prompt_ids", "completion_ids", "kl_completion_ids"]
    rows = pq.read_table(args.examples, columns=columns).slice(0, args.rows)
    prompts = rows.column("prompt_ids").to_pylist()
    completions = rows.column("completion_ids").to_pylist()
    kl_completions = rows.column("kl_completion_ids").to_pylist()
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    bf16 = copy.deepcopy(model).to(torch.bfloat16)

    def reference(scorer) -> pa.Table:
        """The rows with the hf reference actor's scores of `scorer` (its dtype, this device)."""
        scores = score_sequences(scorer, prompts * 2, completions + kl_completions, pad, device).numpy()
        return rows.append_column("ref_logp", pa.array(scores[:len(prompts)])).append_column(
            "ref_kl_logp", pa.array(scores[len(prompts):]))

    started = time.time()
    f32_reference, bf16_reference = reference(model), reference(bf16)
    cases = {"bf16 trainer vs float32 reference": (bf16, f32_reference),
             "bf16 trainer vs bf16 reference": (bf16, bf16_reference),
             "float32 trainer vs float32 reference": (model, f32_reference)}
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "model": f"{config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
                       "random init (seed 0)", "rows": rows.num_rows,
              "tokens_per_completion_mean": round(sum(map(len, completions)) / len(completions), 1)}
    for name, (trainer, scored) in cases.items():
        engine = SimpleNamespace(module=trainer, equal_forwards=False)
        result[name] = {k: (round(v, 7) if isinstance(v, float) else v)
                        for k, v in measure(engine, scored, 0, pad, 4096).items()}
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
