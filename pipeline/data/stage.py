"""The data stage: read feedback with Ray Data (Parquet, JSON lines, JSON; listed and checked in
inputs.py), turn each row into
KTO examples, tokenize them once, quarantine bad rows with a reason, pair each kept row with a
KL partner, and write the result as Parquet. It streams: memory stays bounded at any input size.

Parsing and tokenization (tokenize.py) run as Ray Data tasks of a few thousand rows, on every CPU Ray has.
The driver then consumes the stream in read order (provenance, de-duplication and KL pairing
need the global order), writing as it goes and keeping only counters and two KL blocks.
"""

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline.cluster import use_ray_data_settings
from pipeline.console import bar
from pipeline.data.formats import PAIRED_FORMATS, DataError
from pipeline.data.inputs import check_inputs, list_input_files, read_dataset
from pipeline.data.json_lines import original_columns
from pipeline.data.pairing import KLPairer
from pipeline.data.tokenize import ADDED_COLUMNS, tokenize_batch

LENGTH_BINS = 1 << 16  # token-length histograms are exact below this and clipped above
ROWS_PER_PART = 1 << 16  # rows of a part file of the data stage (PartWriter)


@dataclass(frozen=True)
class DataSettings:
    """Everything that changes the examples, and so keys their cache."""
    tokenizer_path: str
    max_length: int
    max_prompt_length: int
    kl_block_size: int
    format: str = "auto"
    label_map: dict = field(default_factory=dict)
    prompt_delimiter: str = "\n\nAssistant:"
    deduplicate: bool = False
    trust_remote_code: bool = False
    held_out_fraction: float = 0.0  # share of the prompts whose rows go to held_out/ (eval), not examples/
    allow_control_tokens: bool = False  # keep rows whose text holds a control token's literal string
    max_text_chars: int = 1_000_000  # a longer text field is quarantined (text_too_long) before tokenization


class PartWriter:
    """Parquet part files in one folder, written as rows stream by; a new part whenever the
    schema changes (JSON blocks can infer different types for the same column) and every
    ROWS_PER_PART rows: Ray Data reads a file in one task, so the reference stage streams a
    folder of parts part by part, where one file of a million rows would be read whole into
    one worker and the object store."""

    def __init__(self, folder: str):
        self.folder, self.writer, self.parts, self.rows = folder, None, 0, 0

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        if self.writer is not None and (self.rows >= ROWS_PER_PART or not self.writer.schema.equals(table.schema)):
            self.close()
        if self.writer is None:
            os.makedirs(self.folder, exist_ok=True)
            self.writer = pq.ParquetWriter(os.path.join(self.folder, f"part-{self.parts:05d}.parquet"), table.schema)
            self.parts += 1
        self.writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer, self.rows = None, 0


class Tally:
    """What the driver keeps of the kept rows: counts and length histograms, no rows."""

    def __init__(self):
        self.kept = self.desirable = self.longest_sequence = 0
        self.truncated = Counter()
        self.lengths = {"prompt": np.zeros(LENGTH_BINS, np.int64), "completion": np.zeros(LENGTH_BINS, np.int64)}
        # Rows not in a whole (chosen, rejected) pair, side by side (kto_pairwise needs none): unpaired
        # formats' rows, and a pair's half whose other half was quarantined.
        self.unpaired_rows = 0
        self.open_half: Optional[str] = None  # the pair_id of a chosen half waiting for its rejected half

    def add(self, kept: pa.Table, settings: DataSettings) -> None:
        self.kept += kept.num_rows
        if "pair_id" not in kept.column_names:
            self.unpaired_rows += kept.num_rows
        else:
            for pair_id, label in zip(kept.column("pair_id").to_pylist(), kept.column("kto_label").to_pylist()):
                if self.open_half is not None and (pair_id != self.open_half or label):
                    self.unpaired_rows += 1  # the waiting half's partner never came
                    self.open_half = None
                if label:
                    self.open_half = pair_id
                elif self.open_half is None:
                    self.unpaired_rows += 1
                else:
                    self.open_half = None
        self.desirable += int(pc.sum(kept.column("kto_label").cast(pa.int64())).as_py() or 0)
        for side, limit in (("prompt", settings.max_prompt_length), ("completion", None)):
            tokens = kept.column(f"{side}_tokens").to_numpy()
            self.lengths[side] += np.bincount(np.minimum(tokens, LENGTH_BINS - 1), minlength=LENGTH_BINS)
            truncated_to = pc.list_value_length(kept.column(f"{side}_ids")).to_numpy()
            self.truncated[side] += int(np.sum(tokens > (truncated_to if limit is None else limit)))

    def pairing_done(self, table: pa.Table) -> None:
        lengths = [pc.list_value_length(table.column(c)).to_numpy() for c in
                   ("prompt_ids", "completion_ids", "kl_completion_ids")]
        self.longest_sequence = max(self.longest_sequence, int(np.max(lengths[0] + np.maximum(*lengths[1:]))))

    def percentiles(self, side: str) -> dict:
        cumulative = np.cumsum(self.lengths[side])
        if not cumulative[-1]:
            return {}
        at = {f"p{q}": int(np.searchsorted(cumulative, q / 100 * cumulative[-1])) for q in (50, 90, 99)}
        return {**at, "max": int(np.flatnonzero(self.lengths[side])[-1])}

    def report(self, pairer: KLPairer) -> dict:
        """The counts of one side of the split (rejected rows are counted by the caller)."""
        return {"kept": self.kept, "desirable": self.desirable, "undesirable": self.kept - self.desirable,
                "tokens_before_truncation": {side: self.percentiles(side) for side in ("prompt", "completion")},
                "truncated": dict(self.truncated), "longest_sequence": self.longest_sequence,
                "kl_block_size": pairer.block_size, "kl_rows_folded_into_last_block": pairer.folded_rows,
                "kl_same_prompt_rows": pairer.same_prompt_rows,
                "unpaired_rows": self.unpaired_rows + (self.open_half is not None),
                "kl_undesirable_completions": pairer.undesirable_kl_completions}


class PairedSink:
    """One side of the split (training examples or held-out rows): its kept rows are KL-paired
    among themselves, so no held-out completion ever serves as a training row's KL completion."""

    def __init__(self, folder: str, settings: DataSettings):
        self.writer, self.tally, self.settings = PartWriter(folder), Tally(), settings
        self.pairer = KLPairer(settings.kl_block_size, settings.max_length, self._write)

    def _write(self, table: pa.Table) -> None:
        self.tally.pairing_done(table)
        self.writer.write(table)

    def add(self, kept: pa.Table, columns: list[str]) -> None:
        self.tally.add(kept, self.settings)
        self.pairer.add(kept.select(columns).rename_columns(
            ["prompt_ids", "completion_ids", "label", "source_file", "source_row", "prompt_hash"] + columns[6:]))

    def finish(self) -> dict:
        if self.tally.kept >= 2:  # fewer: the caller's checks say so with the data path in the message
            self.pairer.finish()
        self.writer.close()
        return self.tally.report(self.pairer)


def is_held_out(prompt_hash: pa.Array, fraction: float) -> pa.Array:
    """Whether a row belongs to the held-out side: decided by its prompt's hash alone, so the split
    is the same on every run and machine, and all answers to one prompt land on the same side
    (the eval set never grades a prompt the policy trained on)."""
    unit = prompt_hash.to_numpy(zero_copy_only=False).view(np.uint64) / float(1 << 64)
    return pa.array(unit < fraction)


def _provenance(batch: pa.Table, fmt: str, rows_seen: Counter) -> pa.Table:
    """source_file, source_row (the row's index within its file, counted in read order) and,
    for pairs, pair_id and pair_side."""
    files = batch.column("path").to_pylist()
    sides = batch.column("kto_side").to_numpy()
    source_rows = np.empty(len(files), np.int64)
    for i, (file, side) in enumerate(zip(files, sides)):
        rows_seen[file] += int(side == 0)  # an input row's examples arrive together, side 0 first
        source_rows[i] = rows_seen[file] - 1
    batch = batch.rename_columns(["source_file" if n == "path" else n for n in batch.column_names])
    batch = batch.append_column("source_row", pa.array(source_rows))
    if fmt in PAIRED_FORMATS:
        batch = batch.append_column("pair_id", pc.binary_join_element_wise(
            batch.column("source_file"), pc.cast(batch.column("source_row"), pa.string()), "#"))
        batch = batch.append_column("pair_side", pc.if_else(pc.equal(batch.column("kto_side"), 0), "chosen", "rejected"))
    return batch


def _mark_duplicates(batch: pa.Table, seen: set) -> pa.Table:
    reasons = batch.column("reason").to_pylist()
    for i, row_hash in enumerate(batch.column("row_hash").to_pylist()):
        if not reasons[i]:
            if row_hash in seen:
                reasons[i] = "duplicate"
            seen.add(row_hash)
    return batch.set_column(batch.column_names.index("reason"), "reason", pa.array(reasons, pa.string()))


def _blocks(dataset: "ray.data.Dataset"):
    """The dataset's blocks in read order. An error a task raised on purpose (a DataError naming
    the file: a truncated JSON array) reaches the user as its own message, not as Ray's traceback."""
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")
    except DataError as error:
        raise DataError(str(getattr(error, "cause", None) or error)) from None


def process_feedback(path: str, settings: DataSettings, out_dir: str) -> dict:
    """Streams `path` through the data stage into out_dir/examples/ (kept, KL-paired rows),
    out_dir/held_out/ (with settings.held_out_fraction: the held-out prompts' rows, paired among
    themselves) and out_dir/rejected/ (original rows with a reason); returns the counts."""
    files, kind = list_input_files(path)
    fmt = check_inputs(files, kind, settings)
    use_ray_data_settings()
    os.makedirs(out_dir, exist_ok=True)  # (report.json goes here, whatever the input held)
    dataset = read_dataset(files, kind, settings).map_batches(tokenize_batch, fn_args=(fmt, settings),
                                                              batch_format="pyarrow", num_cpus=1)
    rejected = PartWriter(os.path.join(out_dir, "rejected"))
    train, held_out = (PairedSink(os.path.join(out_dir, name), settings) for name in ("examples", "held_out"))
    reasons, rows_seen, seen = Counter(), Counter(), set()
    kept_columns = ["prompt_ids", "completion_ids", "kto_label", "source_file", "source_row", "prompt_hash"]
    if fmt in PAIRED_FORMATS:
        kept_columns.append("pair_id")
    progress = bar(f"data: {os.path.basename(path.rstrip('/')) or path}")
    # A block at a time, never concatenated: blocks may type a column differently (JSON).
    for batch in _blocks(dataset):
        progress.update(batch.num_rows)
        batch = _provenance(batch, fmt, rows_seen)
        if settings.deduplicate:
            batch = _mark_duplicates(batch, seen)
        is_bad = pc.not_equal(batch.column("reason"), "")
        bad = batch.filter(is_bad)
        rejected.write(original_columns(bad.drop_columns([c for c in ADDED_COLUMNS if c not in ("reason",)] + (
            ["pair_id"] if fmt in PAIRED_FORMATS else []))))
        reasons.update(bad.column("reason").to_pylist())
        kept = batch.filter(pc.invert(is_bad))
        if settings.held_out_fraction > 0:
            to_held_out = is_held_out(kept.column("prompt_hash"), settings.held_out_fraction)
            held_out.add(kept.filter(to_held_out), kept_columns)
            kept = kept.filter(pc.invert(to_held_out))
        train.add(kept, kept_columns)
    progress.close()
    rejected.close()
    if not rows_seen:
        raise DataError(f"{files[0]} holds no rows" if len(files) == 1 else
                        f"data path {path!r}: its {len(files)} files hold no rows")
    counts = train.finish()
    held_out_counts = held_out.finish()
    n_rejected = sum(reasons.values())
    report = {"format": fmt, "files": len(files), "source_rows": sum(rows_seen.values()),
              "read": counts["kept"] + held_out_counts["kept"] + n_rejected, **counts,
              "held_out": held_out_counts["kept"], "rejected": n_rejected,
              "rejected_by_reason": dict(sorted(reasons.items()))}
    if settings.held_out_fraction > 0:
        report["held_out_counts"] = held_out_counts
    return report
