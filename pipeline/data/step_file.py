"""The step file: the scored rows a run trains on, laid out in the order it trains on them, so that
a worker reads only the rows of its coming steps and its memory does not grow with the data.

    <scored>-steps-<key>.parquet, beside the scored file in the reference cache (a run with the same
    schedule settings on the same scores reuses it)
    columns  step, slot, then the scored columns a step reads, row_index last (a failed step names
             its rows by it: pipeline/train/worker.py)
    order    (step, slot): the schedule of pipeline/data/pairing.build_schedule, a row once for each
             time it is scheduled (each epoch)
    groups   one row group for every `steps_per_group` steps (about GROUP_ROWS rows), in step order;
             the footer's metadata says how many steps a group holds and how many steps there are

Written by one Ray task (not the driver) in two passes that hold a bounded slice of the data:
the scored file is read in batches in row order and each scheduled row is appended to the bucket
of its step range (Arrow IPC files in a private staging folder); then each bucket, sorted by
(step, slot), is appended to the step file. Only the schedule's three integer columns (24 bytes a
scheduled row) are whole in memory. Written under a staging name, synced, then renamed: a reader
finds the whole file or none.
"""

import json
import math
import os
import queue
import shutil
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cache import fingerprint, private_folder, publish_file, staging_name
from pipeline.data.pairing import build_schedule

TRAINED_COLUMNS = ("prompt_ids", "completion_ids", "label", "kl_completion_ids", "ref_logp", "ref_kl_logp")
GROUP_ROWS = 4096  # rows of a row group, about: a worker holds one group (and the prefetched steps)
BUCKET_ROWS = 1 << 16  # rows a bucket holds, about: the writer's second pass holds one bucket
MAX_BUCKETS = 256  # open IPC writers in the first pass (beyond 16M scheduled rows, buckets grow instead)
READ_ROWS = 1 << 14  # rows of a batch of the first pass
METADATA_KEY = b"kto.steps"


@dataclass(frozen=True)
class Schedule:
    """The settings a schedule depends on (and the step file's key)."""
    num_rows: int
    global_batch_size: int
    num_train_epochs: float
    max_steps: int
    seed: int
    shuffle: bool
    pairs: bool

    def table(self) -> pa.Table:
        return build_schedule(self.num_rows, self.global_batch_size, self.num_train_epochs, self.max_steps,
                              self.seed, shuffle=self.shuffle, pairs=self.pairs)


def step_file_path(scored_path: str, schedule: Schedule) -> str:
    key = fingerprint([], [], {"scored": os.path.basename(scored_path), **schedule.__dict__})
    return f"{scored_path.removesuffix('.parquet')}-steps-{key}.parquet"


def write_step_file(scored_path: str, schedule: Schedule, group_rows: int = GROUP_ROWS,
                    bucket_rows: int = BUCKET_ROWS) -> tuple[str, int]:
    """(the step file, the number of steps): written unless a whole one is there already."""
    target = step_file_path(scored_path, schedule)
    if os.path.exists(target):
        return target, read_layout(target)["total_steps"]
    plan = schedule.table()
    steps, slots, rows = (plan.column(name).to_numpy() for name in ("step", "slot", "row_index"))
    del plan
    total_steps = int(steps[-1]) + 1
    steps_per_group = max(1, group_rows // schedule.global_batch_size)
    groups_per_bucket = max(1, bucket_rows // (steps_per_group * schedule.global_batch_size),
                            math.ceil(math.ceil(total_steps / steps_per_group) / MAX_BUCKETS))
    steps_per_bucket = steps_per_group * groups_per_bucket
    scratch = private_folder(staging_name(target) + ".buckets")
    try:
        buckets = _fill_buckets(scored_path, steps, slots, rows, steps_per_bucket, scratch)
        del steps, slots, rows
        layout = {"total_steps": total_steps, "steps_per_group": steps_per_group,
                  "global_batch_size": schedule.global_batch_size}
        publish_file(target, lambda file: _write_in_step_order(buckets, layout, file))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target, total_steps


def _fill_buckets(scored_path: str, steps, slots, rows, steps_per_bucket: int, scratch: str) -> list[str]:
    """Pass one: each scheduled row, with its step and slot, into the IPC file of its step range."""
    by_row = np.argsort(rows, kind="stable")
    sorted_rows = rows[by_row]
    writers: dict[int, pa.RecordBatchStreamWriter] = {}
    paths = [os.path.join(scratch, f"bucket-{b:05d}.arrow") for b in range(int(steps[-1]) // steps_per_bucket + 1)]
    first = 0
    try:
        for batch in pq.ParquetFile(scored_path).iter_batches(READ_ROWS, columns=[*TRAINED_COLUMNS, "row_index"]):
            last = first + batch.num_rows
            wanted = by_row[np.searchsorted(sorted_rows, first):np.searchsorted(sorted_rows, last)]
            first = last
            if not len(wanted):
                continue
            taken = pa.Table.from_batches([batch]).select([*TRAINED_COLUMNS, "row_index"])
            taken = taken.take(pa.array(rows[wanted] - (last - batch.num_rows)))
            taken = taken.add_column(0, "slot", pa.array(slots[wanted], pa.int32()))
            taken = taken.add_column(0, "step", pa.array(steps[wanted], pa.int32()))
            bucket_of = steps[wanted] // steps_per_bucket
            order = np.argsort(bucket_of, kind="stable")
            for start, stop in zip(*_runs(bucket_of[order])):
                part = order[start:stop]
                bucket = int(bucket_of[part[0]])
                if bucket not in writers:
                    writers[bucket] = pa.ipc.new_stream(paths[bucket], taken.schema)
                writers[bucket].write_table(taken.take(pa.array(part)))
    finally:
        for writer in writers.values():
            writer.close()
    return [path for path in paths if os.path.exists(path)]


def _write_in_step_order(buckets: list[str], layout: dict, target) -> None:
    """Pass two: each bucket sorted by (step, slot), appended a row group per `steps_per_group` steps."""
    writer = None
    try:
        for path in buckets:
            with pa.memory_map(path) as source:
                table = pa.ipc.open_stream(source).read_all().sort_by([("step", "ascending"), ("slot", "ascending")])
            group = pc.divide(table.column("step"), layout["steps_per_group"]).to_numpy()
            if writer is None:
                schema = table.schema.with_metadata({METADATA_KEY: json.dumps(layout).encode()})
                writer = pq.ParquetWriter(target, schema)
            for start, stop in zip(*_runs(group)):
                writer.write_table(table.slice(start, stop - start))
    finally:
        if writer is not None:
            writer.close()


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) of the runs of equal values of a sorted array."""
    bounds = np.flatnonzero(np.diff(values)) + 1
    return np.concatenate([[0], bounds]), np.concatenate([bounds, [len(values)]])


def read_layout(path: str) -> dict:
    """The footer's layout: total_steps, steps_per_group, global_batch_size."""
    return json.loads(pq.read_schema(path).metadata[METADATA_KEY])


class RankSteps:
    """A worker's view of the step file: for each step from `start`, its micro-batches' rows (one
    Arrow table a micro-batch), one row group read at a time. A rank owns a contiguous run of
    `per_device * accumulation` slots of every global batch, micro-batch m the m-th `per_device`
    of them; the rows come in slot order, as the schedule places them."""

    def __init__(self, path: str, rank: int, per_device: int, accumulation: int):
        self.path, self.rank, self.per_device, self.accumulation = path, rank, per_device, accumulation
        self.layout = read_layout(path)
        self.total_steps = self.layout["total_steps"]

    def read(self, start: int = 0) -> Iterator[tuple[int, list[pa.Table]]]:
        per_rank = self.per_device * self.accumulation
        file = pq.ParquetFile(self.path)
        for group in range(start // self.layout["steps_per_group"], file.metadata.num_row_groups):
            table = file.read_row_group(group)
            slots = table.column("slot").to_numpy()
            table = table.filter(pa.array(slots // per_rank == self.rank))
            micro = (table.column("slot").to_numpy() % per_rank) // self.per_device
            steps = table.column("step").to_numpy()
            first = group * self.layout["steps_per_group"]
            for step in range(max(start, first), min(first + self.layout["steps_per_group"], self.total_steps)):
                mine = steps == step
                yield step, [table.filter(pa.array(mine & (micro == m))) for m in range(self.accumulation)]


def take_rows(path: str, rows, columns: Optional[list[str]] = None) -> pa.Table:
    """These rows of a Parquet file (indices, ascending), reading only the row groups that hold them,
    one at a time: a worker's few sampled or named rows of the scored file cost a row group, not the
    file (pyarrow.dataset's take reads the whole file ahead: measured +166 MiB at 200k rows, +695 MiB
    at 800k, for 64 rows)."""
    file = pq.ParquetFile(path)
    starts = np.cumsum([0] + [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)])
    rows = np.asarray(rows, np.int64)
    groups = np.searchsorted(starts, rows, side="right") - 1
    parts = [file.read_row_group(int(g), columns=columns).take(pa.array(rows[groups == g] - starts[g]))
             for g in np.unique(groups)]
    return pa.concat_tables(parts) if parts else file.schema_arrow.empty_table().select(columns or file.schema_arrow.names)


def prefetched(items: Iterator, depth: int) -> Iterator:
    """`items`, made `depth` ahead by a background thread (reading and decoding the coming steps
    while the current one trains: torch releases the GIL in its kernels). An error in the thread
    is raised here, at the item it stopped at; leaving the loop early stops the thread."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def put(item) -> bool:
        """Hand `item` over unless the consumer has left (then False)."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as error:  # handed to the consumer, raised there
            put(error)

    thread = threading.Thread(target=produce, name="step-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
