"""The data stage: read Parquet feedback with Ray Data, quarantine bad rows, tokenize once,
pair each row with a KL partner, and fix which rows make up each global step.

Tokenization and validation run in parallel inside Ray Data. Pairing and the step
schedule need the global row order, so they run on the driver over the token-id
columns alone (about 4 bytes a token), in the order the files were read.
"""

import glob
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

REQUIRED_COLUMNS = {"prompt": pa.string(), "completion": pa.string(), "label": pa.bool_()}
TOKEN_COLUMNS = ("prompt_ids", "completion_ids")


class DataError(ValueError):
    """Input that cannot be trained on as a whole; the message names the file and column."""


def list_parquet_files(path: str) -> list[str]:
    """The Parquet files under `path` (a file or a folder, hive partitions allowed), sorted."""
    if not os.path.exists(path):
        raise DataError(f"data path {path!r} does not exist; set data.path to a Parquet file or folder")
    if os.path.isfile(path):
        return [os.path.abspath(path)]
    files = sorted(glob.glob(os.path.join(os.path.abspath(path), "**", "*.parquet"), recursive=True))
    if not files:
        raise DataError(f"data path {path!r} holds no *.parquet file")
    return files


def check_schema(files: list[str]) -> None:
    """Stop at start-up when a file lacks a required column or holds it with the wrong type."""
    for file in files:
        try:
            schema = pq.read_schema(file)
        except Exception as error:  # pyarrow says why; we say which file
            raise DataError(f"{file}: not a readable Parquet file ({error})") from None
        for name, expected in REQUIRED_COLUMNS.items():
            if name not in schema.names:
                raise DataError(f"{file}: required column {name!r} is missing (columns: {schema.names}); "
                                f"expected {name} of type {expected}")
            actual = schema.field(name).type
            if not (actual == expected or (expected == pa.string() and actual == pa.large_string())):
                raise DataError(f"{file}: column {name!r} has type {actual}, expected {expected}")


class Tokenize:
    """Ray Data callable: validates rows and turns text into the token ids every later stage uses.

    Prompt: tokenizer's special tokens (BOS where it has one), truncated from the left to
    max_prompt_length. Completion: EOS appended (as TRL does), then truncated from the right
    to what max_length leaves. Bad rows are kept with a `reason` and no tokens, to be quarantined.
    """

    def __init__(self, tokenizer_path: str, max_length: int, max_prompt_length: int, trust_remote_code: bool):
        from pipeline.models import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch.column("prompt").to_pylist()
        completions = batch.column("completion").to_pylist()
        labels = batch.column("label").to_pylist()
        reasons = [_row_problem(p, c, lab) for p, c, lab in zip(prompts, completions, labels)]
        ok = [i for i, reason in enumerate(reasons) if not reason]
        prompt_ids: list = [[] for _ in reasons]
        completion_ids: list = [[] for _ in reasons]
        if ok:
            tok = self.tokenizer
            encoded_prompts = tok([prompts[i] for i in ok], add_special_tokens=True)["input_ids"]
            encoded_completions = tok([completions[i] for i in ok], add_special_tokens=False)["input_ids"]
            for i, p_ids, c_ids in zip(ok, encoded_prompts, encoded_completions):
                p_ids = p_ids[-self.max_prompt_length:]
                c_ids = (c_ids + [tok.eos_token_id])[: self.max_length - len(p_ids)]
                prompt_ids[i], completion_ids[i] = p_ids, c_ids
        ids_type = pa.list_(pa.int32())
        batch = batch.append_column("prompt_ids", pa.array(prompt_ids, ids_type))
        batch = batch.append_column("completion_ids", pa.array(completion_ids, ids_type))
        return batch.append_column("reason", pa.array(reasons, pa.string()))


def _row_problem(prompt, completion, label) -> str:
    if prompt is None or not prompt.strip():
        return "empty_prompt"
    if completion is None or not completion.strip():
        return "empty_completion"
    if label is None:
        return "null_label"
    return ""


@dataclass
class Feedback:
    kept: pa.Table  # tokenized rows, in read order, with provenance
    rejected: pa.Table  # original rows with `reason`, `source_file`, `source_row`
    files: list[str]


def read_and_tokenize(path: str, tokenizer_path: str, max_length: int, max_prompt_length: int,
                      trust_remote_code: bool = False, num_tokenizers: int = 1) -> Feedback:
    files = list_parquet_files(path)
    check_schema(files)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # KL pairing and provenance need the read order
    dataset = ray.data.read_parquet(files, include_paths=True)
    dataset = dataset.map_batches(
        Tokenize,
        fn_constructor_kwargs=dict(tokenizer_path=tokenizer_path, max_length=max_length,
                                   max_prompt_length=max_prompt_length, trust_remote_code=trust_remote_code),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_tokenizers),
        num_cpus=1,
    )
    blocks = [block for block in ray.get(dataset.to_arrow_refs()) if block.num_rows]
    if not blocks:
        raise DataError(f"data path {path!r}: its Parquet files hold no rows")
    table = pa.concat_tables(blocks, promote_options="permissive")
    table = table.rename_columns(["source_file" if n == "path" else n for n in table.column_names])
    table = table.append_column("source_row", pa.array(_row_index_within_file(table), pa.int64()))
    is_bad = pc.not_equal(table.column("reason"), "")
    rejected = table.filter(is_bad).drop_columns(list(TOKEN_COLUMNS))
    kept = table.filter(pc.invert(is_bad)).drop_columns(["reason"])
    return Feedback(kept=kept, rejected=rejected, files=files)


def _row_index_within_file(table: pa.Table) -> np.ndarray:
    counters: dict[str, int] = {}
    index = np.empty(table.num_rows, dtype=np.int64)
    for i, source in enumerate(table.column("source_file").to_pylist()):
        index[i] = counters.get(source, 0)
        counters[source] = index[i] + 1
    return index


def kl_partners(num_rows: int, block_size: int) -> np.ndarray:
    """partner[i]: the row whose completion is row i's KL completion.

    Blocks of `block_size` consecutive rows; row i of a block takes row (i + 1) mod m of the
    same block. A short last block is folded into the previous one (so no block is below
    2 rows and no row ever meets its own completion); with fewer rows than a block, the
    rows form one block.
    """
    if block_size < 2:
        raise ValueError(f"KL pairing block must be >= 2, got {block_size}")
    if num_rows < 2:
        raise DataError(f"{num_rows} usable row(s): KL pairing needs at least 2")
    starts = list(range(0, num_rows, block_size))
    if len(starts) > 1 and num_rows - starts[-1] < block_size:
        starts.pop()  # fold the short last block into the previous one
    partners = np.empty(num_rows, dtype=np.int64)
    for start, end in zip(starts, starts[1:] + [num_rows]):
        block = np.arange(start, end)
        partners[start:end] = np.roll(block, -1)
    return partners


def add_kl_pairs(kept: pa.Table, block_size: int, max_length: int) -> tuple[pa.Table, dict]:
    """Adds `row_index` and `kl_completion_ids`: the partner's completion, cut (from the right)
    to what this row's prompt leaves of max_length, as every completion is."""
    partners = kl_partners(kept.num_rows, block_size)
    completions = kept.column("completion_ids").to_pylist()
    kl_completions = [completions[j][: max_length - len(prompt)]
                      for j, prompt in zip(partners, kept.column("prompt_ids").to_pylist())]
    table = kept.append_column("row_index", pa.array(np.arange(kept.num_rows), pa.int64()))
    table = table.append_column("kl_completion_ids", pa.array(kl_completions, pa.list_(pa.int32())))
    folded = kept.num_rows % block_size if kept.num_rows > block_size else 0
    return table, {"kl_block_size": block_size, "kl_rows_folded_into_last_block": folded}


def build_schedule(num_rows: int, global_batch_size: int, num_train_epochs: float, max_steps: int,
                   seed: int) -> pa.Table:
    """(step, slot, row_index): which row fills each place of each global batch.

    Fixed before training and independent of the worker count: a worker takes the slots of
    its rank, so N workers see exactly the rows one worker would, and a resumed run picks
    up at the same row. Each epoch is a fresh seeded permutation; a last partial batch stays.
    """
    steps_per_epoch = -(-num_rows // global_batch_size)
    total_steps = max_steps if max_steps > 0 else max(1, int(round(num_train_epochs * steps_per_epoch)))
    steps, slots, rows = [], [], []
    step, epoch = 0, 0
    while step < total_steps:
        order = np.random.default_rng([seed, epoch]).permutation(num_rows)
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


def label_counts(table: pa.Table) -> tuple[int, int]:
    desirable = int(pc.sum(table.column("label").cast(pa.int64())).as_py() or 0)
    return desirable, table.num_rows - desirable
