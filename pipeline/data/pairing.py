"""KL pairs and the step schedule: the data-time decisions that make z0 honest and training
independent of the worker count.

KL pairs are formed over the kept rows in read order, in blocks of m rows (data.kl_block_size).
Each block is rotated once: row i takes the completion of row i + s (wrapping), with s the
smallest shift under which no row meets its own prompt. Side-by-side preference pairs (chosen,
rejected, chosen, ...) get s = 2, so chosen answers pair with chosen and rejected with rejected:
every completion serves exactly once, and z0 sees desirable and undesirable answers in the
proportion the data has them (the paper's mismatched pairs, unbiased). Only where no rotation
works (one prompt holds more than half a block) does a row fall back to the next row with
another prompt, and where the whole block shares one prompt, to the next row: those rows are
counted (`kl_same_prompt_rows`). A short last block is folded into the previous one, so no block
has fewer than 2 rows and no row meets its own completion. `KLPairer` does this on a stream,
holding at most two blocks and one batch.
"""

from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.formats import DataError


def block_partners(prompt_keys: np.ndarray) -> np.ndarray:
    """partner[b, i]: the position within block b whose completion row i of block b takes.

    The block's smallest clean rotation (a permutation); in a block without one, per row the next
    position whose prompt differs, or, if the whole block shares one prompt, the next position.
    """
    blocks, m = prompt_keys.shape
    positions = np.arange(m)
    partners = np.full((blocks, m), -1)
    for shift in range(1, m):
        clean = (partners[:, 0] < 0) & (np.roll(prompt_keys, -shift, axis=1) != prompt_keys).all(axis=1)
        partners[clean] = (positions + shift) % m
    for shift in range(1, m):  # the blocks left: row by row
        unset = (partners < 0) & (np.roll(prompt_keys, -shift, axis=1) != prompt_keys)
        partners[unset] = np.broadcast_to((positions + shift) % m, (blocks, m))[unset]
    same_prompt = partners < 0
    partners[same_prompt] = np.broadcast_to((positions + 1) % m, (blocks, m))[same_prompt]
    return partners


def block_starts(num_rows: int, block_size: int) -> list[int]:
    starts = list(range(0, num_rows, block_size))
    if len(starts) > 1 and num_rows - starts[-1] < block_size:
        starts.pop()  # fold the short last block into the previous one
    return starts


def kl_partners(num_rows: int, block_size: int, prompt_keys: Optional[np.ndarray] = None) -> np.ndarray:
    """partner[i]: the row whose completion is row i's KL completion (the whole set at once)."""
    if block_size < 2:
        raise ValueError(f"KL pairing block must be >= 2, got {block_size}")
    if num_rows < 2:
        raise DataError(f"{num_rows} usable row(s): KL pairing needs at least 2")
    keys = np.arange(num_rows) if prompt_keys is None else np.asarray(prompt_keys)
    starts = block_starts(num_rows, block_size)
    partners = np.empty(num_rows, dtype=np.int64)
    for start, end in zip(starts, starts[1:] + [num_rows]):
        partners[start:end] = start + block_partners(keys[None, start:end])[0]
    return partners


def truncate_lists(lists: pa.Array, limits: np.ndarray) -> pa.Array:
    """Each list cut (from the right) to its own limit, without leaving Arrow."""
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(lists)
    keep_lengths = np.minimum(lengths, limits)
    starts = np.cumsum(lengths) - lengths
    position = np.arange(len(values)) - np.repeat(starts, lengths)
    values = values.filter(pa.array(position < np.repeat(keep_lengths, lengths)))
    offsets = np.concatenate([[0], np.cumsum(keep_lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


class KLPairer:
    """Adds `row_index` and `kl_completion_ids` to kept rows arriving in read order.

    A block is only released once at least one full block follows it, so the short last
    block can still be folded into it when the stream ends.
    """

    def __init__(self, block_size: int, max_length: int, emit: Callable[[pa.Table], None]):
        if block_size < 2:
            raise ValueError(f"KL pairing block must be >= 2, got {block_size}")
        self.block_size, self.max_length, self.emit = block_size, max_length, emit
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.next_row_index = 0
        self.folded_rows = 0
        self.same_prompt_rows = 0  # rows whose KL completion answers their own prompt (see the module)
        self.undesirable_kl_completions = 0

    def add(self, rows: pa.Table) -> None:
        if rows.num_rows:
            self.pending.append(rows)
            self.pending_rows += rows.num_rows
        releasable = (self.pending_rows - self.block_size) // self.block_size
        if releasable > 0:
            table = pa.concat_tables(self.pending)
            cut = releasable * self.block_size
            self._release(table.slice(0, cut), releasable, self.block_size)
            self.pending, self.pending_rows = [table.slice(cut)], table.num_rows - cut

    def finish(self) -> None:
        total = self.next_row_index + self.pending_rows
        if total < 2:
            raise DataError(f"{total} usable row(s) after validation: KL pairing needs at least 2")
        if self.pending_rows:
            if total > self.block_size:
                self.folded_rows = self.pending_rows - self.block_size
            self._release(pa.concat_tables(self.pending), 1, self.pending_rows)
        self.pending, self.pending_rows = [], 0

    def _release(self, table: pa.Table, blocks: int, rows_per_block: int) -> None:
        keys = table.column("prompt_hash").to_numpy().reshape(blocks, rows_per_block)
        partners = (block_partners(keys) + np.arange(blocks)[:, None] * rows_per_block).ravel()
        self.same_prompt_rows += int(np.sum(keys.ravel()[partners] == keys.ravel()))
        labels = table.column("label").to_numpy(zero_copy_only=False)
        self.undesirable_kl_completions += int(np.sum(~labels[partners]))
        prompt_lengths = pc.list_value_length(table.column("prompt_ids")).to_numpy(zero_copy_only=False)
        partner_completions = table.column("completion_ids").combine_chunks().take(pa.array(partners))
        kl = truncate_lists(partner_completions, self.max_length - prompt_lengths)
        row_index = np.arange(self.next_row_index, self.next_row_index + table.num_rows)
        self.next_row_index += table.num_rows
        table = table.drop_columns(["prompt_hash"]).append_column("kl_completion_ids", kl)
        self.emit(table.add_column(0, "row_index", pa.array(row_index, pa.int64())))


def build_schedule(num_rows: int, global_batch_size: int, num_train_epochs: float, max_steps: int,
                   seed: int, shuffle: bool = True, pairs: bool = False) -> pa.Table:
    """(step, slot, row_index): which row fills each place of each global batch.

    Fixed before training and independent of the worker count: a worker takes the slots of
    its rank, so N workers see exactly the rows one worker would, and a resumed run picks
    up at the same row. Each epoch is a fresh seeded permutation (or the read order, without
    `shuffle`); a last partial batch stays. With `pairs` (kto_pairwise), rows 2k and 2k+1 are
    one preference pair: pairs are permuted, and a pair fills two neighbouring slots (2j, 2j+1)
    of one step (an even per-device batch keeps it on one worker, in one micro-batch).
    """
    if pairs:
        halves = build_schedule(num_rows // 2, global_batch_size // 2, num_train_epochs, max_steps, seed, shuffle)
        pair = halves.column("row_index").to_numpy()
        return pa.table({"step": np.repeat(halves.column("step").to_numpy(), 2),
                         "slot": np.stack([2 * halves.column("slot").to_numpy(),
                                           2 * halves.column("slot").to_numpy() + 1], axis=1).ravel(),
                         "row_index": np.stack([2 * pair, 2 * pair + 1], axis=1).ravel()})
    steps_per_epoch = -(-num_rows // global_batch_size)
    total_steps = max_steps if max_steps > 0 else max(1, int(round(num_train_epochs * steps_per_epoch)))
    steps, slots, rows = [], [], []
    step, epoch = 0, 0
    while step < total_steps:
        order = np.random.default_rng([seed, epoch]).permutation(num_rows) if shuffle else np.arange(num_rows)
        for start in range(0, num_rows, global_batch_size):
            if step == total_steps:
                break
            chunk = order[start:start + global_batch_size]
            steps.append(np.full(len(chunk), step))
            slots.append(np.arange(len(chunk)))
            rows.append(chunk)
            step += 1
        epoch += 1
    return pa.table({"step": np.concatenate(steps), "slot": np.concatenate(slots), "row_index": np.concatenate(rows)})
