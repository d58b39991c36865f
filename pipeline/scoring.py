"""The reference stage: score every row and its KL pair once, on an actor pool, streaming the
examples from Parquet into a Parquet cache keyed by a fingerprint of everything that changes
the numbers (pipeline/cache.py).
"""

import os
from dataclasses import replace

import numpy as np
import pyarrow.dataset
import pyarrow.parquet as pq
import ray

from actors.reference import ReferenceScorer, ScoringOptions
from pipeline.cache import staging_name, sync_folder_of, sync_tree
from pipeline.cluster import use_ray_data_settings
from pipeline.console import bar


def score_examples(examples_dir: str, target: str, max_model_len: int, *, backend: str, reference_path: str,
                   pad_token_id: int, num_replicas: int, num_cpus_per_replica: float,
                   num_gpus_per_replica: float, options: ScoringOptions) -> None:
    """Streams the examples through the reference actors into `target`, adding `ref_logp` and
    `ref_kl_logp`. The actor pool (and the GPUs it holds) is released when scoring ends.

    Written to a staging file named by host and pid, synced, then renamed: a crash mid-write never
    leaves a cache entry that looks complete, and a failed write removes its staging file.
    """
    use_ray_data_settings()
    scored = ray.data.read_parquet(examples_dir).map_batches(
        ReferenceScorer,
        fn_constructor_kwargs=dict(backend=backend, model_path=reference_path, pad_token_id=pad_token_id,
                                   options=replace(options, max_model_len=max_model_len + 1)),
        batch_format="pyarrow",
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=num_replicas),
        num_cpus=num_cpus_per_replica,
        num_gpus=num_gpus_per_replica,
    )
    staging = staging_name(target)  # beside the target, in the data stage's private folder
    try:
        _write_in_order(scored, pyarrow.dataset.dataset(examples_dir).count_rows(), staging, backend)
        sync_tree(staging)
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):  # a failed or interrupted write leaves nothing behind
            os.remove(staging)
    sync_folder_of(target)


def _write_in_order(scored: "ray.data.Dataset", total: int, staging: str, backend: str) -> None:
    """The scored batches into `staging`, checked to arrive in row order and all of them."""
    writer, expected = None, 0
    progress = bar(f"reference ({backend})", total=total)
    try:
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            progress.update(batch.num_rows)
            rows = batch.column("row_index").to_numpy()
            if not np.array_equal(rows, np.arange(expected, expected + len(rows))):
                raise RuntimeError(f"reference scoring returned rows out of order near row {expected}; "
                                   "the cache was not written")
            expected += len(rows)
            writer = writer or pq.ParquetWriter(staging, batch.schema)
            writer.write_table(batch)
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    if expected != total:
        raise RuntimeError("reference scoring lost rows; the cache was not written")
