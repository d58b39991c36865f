"""The step file (pipeline/data/step_file.py): a worker that streams its steps gets exactly the rows
the whole-table reader gives it (the schedule, the scored table, its rank's slots), from any step
it resumes at; and its memory does not grow with the rows of the data set."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cache import check_table
from pipeline.data.step_file import RankSteps, Schedule, prefetched, take_rows, write_step_file
from pipeline.train.step import MicroBatch


def scored_table(n: int, seed: int = 0) -> pa.Table:
    """A scored file's columns, as the reference stage writes them, with random lengths and ids."""
    rng = np.random.default_rng(seed)

    def ids(low: int, high: int) -> pa.ListArray:
        offsets = np.concatenate([[0], np.cumsum(rng.integers(low, high, n))]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(0, 50000, offsets[-1], np.int32)))

    return pa.table({"row_index": pa.array(np.arange(n), pa.int64()), "prompt_ids": ids(4, 40),
                     "completion_ids": ids(2, 30), "label": pa.array(rng.random(n) < 0.4),
                     "source_file": pa.array([f"part-{i % 3}.parquet" for i in range(n)]),
                     "source_row": pa.array(np.arange(n), pa.int64()), "kl_completion_ids": ids(2, 30),
                     "ref_logp": pa.array(-rng.random(n).astype(np.float32) * 40),
                     "ref_kl_logp": pa.array(-rng.random(n).astype(np.float32) * 40)})


def whole_table_micro_batches(scored: pa.Table, schedule: pa.Table, rank: int, per_device: int,
                              accumulation: int) -> dict[int, list[MicroBatch]]:
    """The reader workers had before the step file: the schedule and the whole scored table in memory."""
    per_rank = per_device * accumulation
    plan: dict[int, list] = {}
    for step, slot, row in zip(*(schedule.column(name).to_pylist() for name in ("step", "slot", "row_index"))):
        micro = plan.setdefault(step, [[] for _ in range(accumulation)])
        if slot // per_rank == rank:
            micro[(slot % per_rank) // per_device].append(row)
    return {step: [MicroBatch.from_table(scored, rows) for rows in micro if rows] for step, micro in plan.items()}


def same(a: MicroBatch, b: MicroBatch) -> bool:
    return (a.rows == b.rows and a.prompt_ids == b.prompt_ids and a.completion_ids == b.completion_ids
            and a.kl_completion_ids == b.kl_completion_ids and bool((a.labels == b.labels).all())
            and bool((a.ref_logp == b.ref_logp).all()) and bool((a.ref_kl_logp == b.ref_kl_logp).all()))


@pytest.mark.parametrize("schedule, per_device, accumulation, world, group_rows, bucket_rows", [
    # 2.5 shuffled epochs of 203 rows (a last partial batch each epoch), 3 ranks; small groups and
    # buckets, so that a step's rows come from many batches of the first pass and many buckets
    (Schedule(203, 12, 2.5, 0, 7, True, False), 2, 2, 3, 50, 130),
    # kto_pairwise: pairs in neighbouring slots, read order, max_steps past one epoch
    (Schedule(200, 8, 1.0, 30, 3, False, True), 2, 1, 4, 64, 1 << 16),
])
def test_each_rank_streams_exactly_the_rows_of_the_whole_table_reader_from_any_step(
        tmp_path, schedule, per_device, accumulation, world, group_rows, bucket_rows):
    scored = scored_table(schedule.num_rows)
    pq.write_table(scored, tmp_path / "examples-scored-k.parquet", row_group_size=37)
    path, total_steps = write_step_file(str(tmp_path / "examples-scored-k.parquet"), schedule, group_rows, bucket_rows)
    check_table(path, "steps")
    plan = schedule.table()
    assert total_steps == plan.column("step")[-1].as_py() + 1
    assert pq.ParquetFile(path).metadata.num_row_groups > 1
    for rank in range(world):
        expected = whole_table_micro_batches(scored, plan, rank, per_device, accumulation)
        steps = RankSteps(path, rank, per_device, accumulation)
        assert steps.total_steps == total_steps
        for start in (0, 1, total_steps // 2, total_steps - 1):  # a fresh run, and resumed ones
            streamed = [(step, [MicroBatch.from_step_rows(t) for t in micro if t.num_rows])
                        for step, micro in prefetched(steps.read(start), 2)]
            assert [step for step, _ in streamed] == list(range(start, total_steps))
            for step, micro in streamed:
                assert len(micro) == len(expected[step]) and all(map(same, micro, expected[step])), (rank, step)
    # a second write of the same schedule on the same scores is the cached file, untouched
    modified = (tmp_path / path.rsplit("/", 1)[1]).stat().st_mtime_ns
    assert write_step_file(str(tmp_path / "examples-scored-k.parquet"), schedule) == (path, total_steps)
    assert (tmp_path / path.rsplit("/", 1)[1]).stat().st_mtime_ns == modified
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["examples-scored-k.parquet", path.rsplit("/", 1)[1]])


def test_take_rows_reads_the_rows_a_whole_table_take_gives(tmp_path):
    scored = scored_table(500, seed=3)
    pq.write_table(scored, tmp_path / "scored.parquet", row_group_size=64)
    rows = np.sort(np.random.default_rng(1).choice(500, 40, replace=False))
    for columns in (None, ["source_file", "source_row"]):
        expected = scored.take(pa.array(rows)) if columns is None else scored.select(columns).take(pa.array(rows))
        assert take_rows(str(tmp_path / "scored.parquet"), rows, columns).equals(expected)
    assert take_rows(str(tmp_path / "scored.parquet"), [], ["source_row"]).num_rows == 0


def test_an_error_in_the_prefetching_thread_is_raised_at_the_step_it_stopped_at():
    def steps():
        yield 0
        yield 1
        raise OSError("the volume went away")

    seen = []
    with pytest.raises(OSError, match="the volume went away"):
        for step in prefetched(steps(), 4):
            seen.append(step)
    assert seen == [0, 1]


# A worker's reading, in a fresh process: every step of rank 0 of 2, each micro-batch's rows as the
# Python lists a step makes of them; prints the process's peak RSS (MiB, VmHWM: not ru_maxrss, which a
# process started by fork and exec inherits from its parent, this test's).
READER = """
import sys
from pipeline.train.trackers import peak_rss_mib
{reader}
for step, micro in steps:
    for table in micro:
        lists = [table.column(name).to_pylist() for name in ("prompt_ids", "completion_ids", "kl_completion_ids")]
print(peak_rss_mib())
"""
STREAMING = """from pipeline.data.step_file import RankSteps
steps = RankSteps(sys.argv[1], 0, 8, 2).read(0)"""
WHOLE_TABLE = """import pyarrow.parquet as pq
table = pq.read_table(sys.argv[1])
steps = ((0, [table.slice(start, 16)]) for start in range(0, table.num_rows, 32))"""


@pytest.fixture(scope="module")
def step_files(tmp_path_factory) -> dict[int, str]:
    """One epoch of 20k rows and of 200k rows (~5 and ~50 MB of token ids in Arrow), as step files."""
    folder, files = tmp_path_factory.mktemp("rows"), {}
    for rows in (20_000, 200_000):
        pq.write_table(scored_table(rows), folder / f"{rows}-scored-k.parquet")
        files[rows], _ = write_step_file(str(folder / f"{rows}-scored-k.parquet"), Schedule(rows, 32, 1.0, 0, 0, True,
                                                                                          False))
    return files


@pytest.mark.parametrize("reader, grows", [(STREAMING, False), (WHOLE_TABLE, True)], ids=["streaming", "whole table"])
def test_a_workers_memory_does_not_grow_with_the_rows(step_files, reader, grows):
    """The streaming reader's peak is the same for 20k and 200k rows; the whole-table reader's (what
    workers did before) grows by the table, which shows that the measurement can see it."""
    peaks = {}
    for rows, path in step_files.items():
        done = subprocess.run([sys.executable, "-c", READER.format(reader=reader), path], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[rows] = int(done.stdout.strip().splitlines()[-1])
    if grows:
        assert peaks[200_000] > peaks[20_000] + 30, peaks
    else:
        assert peaks[200_000] <= 1.05 * peaks[20_000], peaks
