"""A round's labelled samples become KTO feedback: the labeler's verdicts checked, samples it raised
on quarantined with the error, and the selection rule applied (threshold: every scored sample,
desirable when its score >= threshold; best_worst: a prompt's best sample desirable and its worst
undesirable, the rest unused; a prompt whose samples all score the same gives none).

The feedback file is the unpaired format the data stage reads (a conversation's prompt stays a list
of messages and its completion an assistant turn, so the chat template renders both as they were
sampled), rows interleaved across prompts so that a KL block of consecutive rows mixes prompts.
Runs in a Ray task; the driver gets the counts.
"""

import json
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cache import publish_file
from pipeline.data.formats import DataError

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


class LabelerError(DataError):
    """A labeler returned what is not a label; the message names the labeler and the sample."""


def check_verdicts(table: pa.Table, labeler: str, where: str) -> None:
    fatal = table.column("fatal").to_pylist()
    bad = [i for i, problem in enumerate(fatal) if problem]
    if bad:
        i = bad[0]
        raise LabelerError(
            f"labeler {labeler} {fatal[i]}, for {where} prompt {table.column('prompt_index')[i].as_py()} sample "
            f"{table.column('sample')[i].as_py()} (completion {table.column('completion')[i].as_py()[:80]!r}); "
            f"{len(bad)} of {table.num_rows} samples alike. Return True / False or a finite float")


def select(table: pa.Table, selection: str, threshold: float, round_number: int, feedback_path: str,
           quarantine_path: str, mask_truncated: bool = False) -> dict:
    """Write the round's feedback and quarantined samples; return the counts. With mask_truncated,
    completions cut at max_tokens are quarantined as `truncated`."""
    errors = table.column("error").to_pylist()
    empty = [not c.strip() for c in table.column("completion").to_pylist()]
    truncated = [not finished for finished in table.column("finished").to_pylist()]
    reasons = [f"labeler_raised: {e}" if e else "empty_completion" if blank else "truncated" if cut and mask_truncated
               else "" for e, blank, cut in zip(errors, empty, truncated)]
    quarantined = [i for i, r in enumerate(reasons) if r]
    _write(table.take(pa.array(quarantined, pa.int64())).append_column(
        "reason", pa.array([reasons[i] for i in quarantined], pa.string())), quarantine_path)
    usable = [i for i, r in enumerate(reasons) if not r]
    scores = np.array(table.column("score").to_pylist(), dtype=np.float64)
    labels: dict[int, bool] = {}
    if selection == "threshold":
        labels = {i: bool(scores[i] >= threshold) for i in usable}
    else:
        by_prompt: dict[int, list[int]] = {}
        for i in usable:
            by_prompt.setdefault(table.column("prompt_index")[i].as_py(), []).append(i)
        for members in by_prompt.values():
            ranked = sorted(members, key=lambda i: (scores[i], -i))
            if len(ranked) >= 2 and scores[ranked[-1]] > scores[ranked[0]]:
                labels[ranked[-1]], labels[ranked[0]] = True, False
    rows = _interleaved(table, sorted(labels))
    feedback = _feedback(table.take(pa.array(rows, pa.int64())), [labels[i] for i in rows], round_number)
    _write(feedback, feedback_path)
    scored = scores[usable]
    return {"samples": table.num_rows, "truncated": sum(truncated), "quarantined": len(quarantined),
            "quarantined_by_reason": dict(Counter(r.split(":")[0] for r in reasons if r)),
            "desirable": sum(labels.values()), "undesirable": len(labels) - sum(labels.values()),
            "unused": len(usable) - len(labels), "pass_rate": _share(scored >= threshold),
            "mean_score": float(scored.mean()) if len(scored) else None}


def held_out_result(table: pa.Table, threshold: float) -> dict:
    """The pass rate on held-out prompts: the share of their samples scoring >= threshold (a
    sample the labeler raised on counts as failing), and the mean score."""
    scores = np.array([np.nan if s is None else s for s in table.column("score").to_pylist()], dtype=np.float64)
    scored = scores[~np.isnan(scores)]
    return {"pass_rate": _share(np.nan_to_num(scores, nan=-np.inf) >= threshold),
            "mean_score": float(scored.mean()) if len(scored) else None, "samples": table.num_rows,
            "labeler_raised": int(np.isnan(scores).sum()),
            "mean_completion_tokens": float(pc.mean(table.column("completion_tokens")).as_py() or 0)}


def _share(flags: np.ndarray) -> float | None:
    return float(flags.mean()) if len(flags) else None


def _interleaved(table: pa.Table, rows: list[int]) -> list[int]:
    """Rows ordered by their rank within their prompt, then by prompt: consecutive rows answer
    different prompts."""
    prompt = table.column("prompt_index").to_pylist()
    rank: dict[int, int] = {}
    seen: dict[int, int] = {}
    for i in rows:
        rank[i] = seen.get(prompt[i], 0)
        seen[prompt[i]] = rank[i] + 1
    return sorted(rows, key=lambda i: (rank[i], prompt[i], i))


def _feedback(table: pa.Table, labels: list[bool], round_number: int) -> pa.Table:
    prompts = [json.loads(t) for t in table.column("prompt_json").to_pylist()]
    completions = table.column("completion").to_pylist()
    conversational = bool(prompts) and isinstance(prompts[0], list)
    if conversational:
        prompt_column = pa.array(prompts, MESSAGES)
        completion_column = pa.array([[{"role": "assistant", "content": c}] for c in completions], MESSAGES)
    else:
        prompt_column, completion_column = pa.array(prompts, pa.string()), pa.array(completions, pa.string())
    return pa.table({"prompt": prompt_column, "completion": completion_column, "label": pa.array(labels, pa.bool_()),
                     "round": pa.array([round_number] * table.num_rows, pa.int32()),
                     "prompt_index": table.column("prompt_index"), "sample": table.column("sample"),
                     "score": table.column("score")})


def _write(table: pa.Table, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    publish_file(path, lambda file: pq.write_table(table, file))
