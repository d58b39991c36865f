"""The reference stage: score every row and its KL pair once, on an actor pool, and keep
the result in a Parquet cache keyed by a fingerprint of everything that changes the numbers.
"""

import glob
import hashlib
import json
import os
import tempfile
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from actors.reference import ReferenceScorer, ScoringOptions

CACHE_FORMAT = 2  # bump when the cached columns or their meaning change
SCORED_COLUMNS = ["row_index", "prompt_ids", "completion_ids", "kl_completion_ids"]


def fingerprint(files: list[str], tokenizer_path: str, reference_path: str, settings: dict) -> str:
    """sha256 of the inputs (path, size, mtime), tokenizer and reference files, truncation and pairing."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True).encode())
    for file in files:
        stat = os.stat(file)
        digest.update(f"{os.path.abspath(file)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    for folder in (tokenizer_path, reference_path):
        digest.update(folder.encode())
        for name in sorted(glob.glob(os.path.join(folder, "*.json")) + glob.glob(os.path.join(folder, "*.safetensors"))):
            stat = os.stat(name)
            digest.update(f"{os.path.basename(name)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(os.path.abspath(cache_dir), key, "scored.parquet")


def longest_sequence(table: pa.Table) -> int:
    """Tokens in the longest prompt + completion or prompt + KL completion of the table."""
    prompt = pc.list_value_length(table.column("prompt_ids"))
    completion = pc.max_element_wise(pc.list_value_length(table.column("completion_ids")),
                                     pc.list_value_length(table.column("kl_completion_ids")))
    return int(pc.max(pc.add(prompt, completion)).as_py())


def score_with_cache(table: pa.Table, cache_dir: str, key: str, *, backend: str, reference_path: str,
                     pad_token_id: int, num_replicas: int, num_cpus_per_replica: float,
                     num_gpus_per_replica: float, options: ScoringOptions) -> tuple[pa.Table, bool]:
    """The table with `ref_logp` and `ref_kl_logp`, and whether it came from the cache.

    The actor pool (and the GPUs it holds) is released when scoring ends, before training starts.
    """
    cached = cache_path(cache_dir, key)
    if os.path.exists(cached):
        return pq.read_table(cached), True
    scores = (
        ray.data.from_arrow(table.select(SCORED_COLUMNS))
        .map_batches(
            ReferenceScorer,
            fn_constructor_kwargs=dict(backend=backend, model_path=reference_path, pad_token_id=pad_token_id,
                                       options=replace(options, max_model_len=longest_sequence(table) + 1)),
            batch_format="numpy",
            batch_size=256,
            compute=ray.data.ActorPoolStrategy(size=num_replicas),
            num_cpus=num_cpus_per_replica,
            num_gpus=num_gpus_per_replica,
        )
        .to_arrow_refs()
    )
    scores = pa.concat_tables(ray.get(scores)).sort_by("row_index")
    if not np.array_equal(scores.column("row_index").to_numpy(), table.column("row_index").to_numpy()):
        raise RuntimeError("reference scoring lost or duplicated rows; the cache was not written")
    scored = table.append_column("ref_logp", scores.column("ref_logp")).append_column(
        "ref_kl_logp", scores.column("ref_kl_logp"))
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    # Write then rename: a crash mid-write never leaves a cache entry that looks complete.
    handle, staging = tempfile.mkstemp(dir=os.path.dirname(cached), suffix=".parquet.tmp")
    os.close(handle)
    pq.write_table(scored, staging)
    os.replace(staging, cached)
    return scored, False
