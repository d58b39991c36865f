"""The reference stage: score every row and its KL pair once, with one actor pool for all the
examples a run needs (the training examples and the held-out ones), so the reference model or
vLLM engine loads once per run. Examples stream from Parquet into Parquet caches keyed by a
fingerprint of everything that changes the numbers (pipeline/cache.py).
"""

import glob
import os
from dataclasses import replace
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from actors.reference import ReferenceScorer, ScoringOptions
from pipeline.cache import staging_name, sync_folder_of, sync_tree
from pipeline.cluster import use_ray_data_settings
from pipeline.console import bar

# What the actors are sent of each example, and get back with the scores; the rest stays on disk.
SCORED_INPUTS = ["row_index", "prompt_ids", "completion_ids", "kl_completion_ids"]
SCORES = pa.schema([("ref_logp", pa.float32()), ("ref_kl_logp", pa.float32())])


class ScoringJob(NamedTuple):
    """A folder of examples and the cache file that its scored copy goes to."""
    examples_dir: str
    target: str


def score_examples(jobs: list[ScoringJob], max_model_len: int, *, backend: str, reference_path: str,
                   pad_token_id: int, num_replicas: int, num_cpus_per_replica: float,
                   num_gpus_per_replica: float, options: ScoringOptions) -> None:
    """Streams the jobs' examples, one job after the other, through one pool of reference actors;
    each target gets its examples with `ref_logp` and `ref_kl_logp` added. The actor pool (and
    the GPUs it holds) is released when scoring ends.

    Each target is written to a staging file named by host and pid, synced, then renamed: a crash
    mid-write never leaves a cache entry that looks complete, and a failed write removes its staging file.
    """
    use_ray_data_settings()
    # One read of the folders in order (a union would interleave their blocks).
    scored = ray.data.read_parquet([job.examples_dir for job in jobs], columns=SCORED_INPUTS).map_batches(
        ReferenceScorer,
        fn_constructor_kwargs=dict(backend=backend, model_path=reference_path, pad_token_id=pad_token_id,
                                   options=replace(options, max_model_len=max_model_len + 1)),
        batch_format="pyarrow",
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=num_replicas),
        num_cpus=num_cpus_per_replica,
        num_gpus=num_gpus_per_replica,
    )
    files = [sorted(glob.glob(os.path.join(job.examples_dir, "*.parquet"))) for job in jobs]
    for job, job_files in zip(jobs, files):
        if not job_files:
            raise RuntimeError(f"{job.examples_dir} holds no examples to score")
    totals = [sum(pq.ParquetFile(f).metadata.num_rows for f in job_files) for job_files in files]
    stagings = [staging_name(job.target) for job in jobs]  # beside the targets, in the data stage's private folders
    examples = [_Rows(job_files) for job_files in files]
    writers = []
    progress = bar(f"reference ({backend})", total=sum(totals))
    try:
        for staging, job_files in zip(stagings, files):
            writers.append(pq.ParquetWriter(staging, pa.unify_schemas([pq.read_schema(job_files[0]), SCORES])))
        for job, scores in _in_order(scored.iter_batches(batch_size=None, batch_format="pyarrow"), totals):
            progress.update(scores.num_rows)
            rows = examples[job].take(scores.num_rows)
            # The scores are a function of these columns: equal here, they are this job's rows' scores.
            if not rows.select(SCORED_INPUTS).equals(scores.select(SCORED_INPUTS)):
                raise RuntimeError(f"the scores of {jobs[job].examples_dir} came back for other rows near row "
                                   f"{rows.column('row_index')[0]}; the cache was not written")
            for name in SCORES.names:
                rows = rows.append_column(name, scores.column(name))
            writers[job].write_table(rows)
        for writer, staging in zip(writers, stagings):
            writer.close()
            sync_tree(staging)
        for job, staging in zip(jobs, stagings):
            os.replace(staging, job.target)
            sync_folder_of(job.target)
    finally:
        progress.close()
        for writer in writers:
            writer.close()
        for staging in stagings:  # a failed or interrupted write leaves nothing behind
            if os.path.exists(staging):
                os.remove(staging)


def _in_order(batches, totals: list[int]) -> Iterator[tuple[int, pa.Table]]:
    """(job, scored rows): the stream cut at the jobs' boundaries (a batch may span two jobs), checked
    to arrive in order and whole: each job's row indexes run 0, 1, ..., its total - 1."""
    job, expected = 0, 0
    for batch in batches:
        offset = 0
        while offset < batch.num_rows:
            while job < len(totals) and expected == totals[job]:
                job, expected = job + 1, 0
            if job == len(totals):
                raise RuntimeError("reference scoring returned more rows than it was sent; the cache was not written")
            piece = batch.slice(offset, min(batch.num_rows - offset, totals[job] - expected))
            if not np.array_equal(piece.column("row_index").to_numpy(), np.arange(expected, expected + piece.num_rows)):
                raise RuntimeError(f"reference scoring returned rows out of order near row {expected}; "
                                   "the cache was not written")
            yield job, piece
            offset += piece.num_rows
            expected += piece.num_rows
    if sum(totals[:job]) + expected != sum(totals):
        raise RuntimeError("reference scoring lost rows; the cache was not written")


class _Rows:
    """The rows of Parquet files in order, handed out n at a time (a batch of the files at a time in memory)."""

    def __init__(self, files: list[str]):
        self.batches = (batch for f in files for batch in pq.ParquetFile(f).iter_batches())
        self.head = pa.table({})

    def take(self, n: int) -> pa.Table:
        parts = []
        while n:
            if not self.head.num_rows:
                batch = next(self.batches, None)
                if batch is None:
                    raise RuntimeError("the examples changed while they were scored; the cache was not written")
                self.head = pa.Table.from_batches([batch])
            part = self.head.slice(0, n)
            parts.append(part)
            self.head, n = self.head.slice(part.num_rows), n - part.num_rows
        return pa.concat_tables(parts)
