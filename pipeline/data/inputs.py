"""The data stage's inputs: which feedback files a data path holds (never leaving it), their
format checked once at start-up, and their rows read as a stream of small blocks (Parquet by Ray
Data's reader, JSON in bounded chunks), for stage.py to tokenize and write.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pyarrow.parquet as pq
import ray

from pipeline.data.formats import FEEDBACK_SUFFIXES, JSON_SUFFIXES, DataError, check_types, detect_format
from pipeline.data.json_lines import read_chunks, row_limit, sample_schema

if TYPE_CHECKING:
    from pipeline.data.stage import DataSettings

ROWS_PER_TASK = 2048


def list_input_files(path: str) -> tuple[list[str], str]:
    """The feedback files under `path` (a file or a folder, hive partitions allowed), sorted, and
    their kind (parquet or json).

    The listing never follows a directory symlink (a `d/up -> ..` loop would list a file once
    per lap, two loops without end) and never leaves the root: a file that is a symlink is read
    only when its target lies inside the root, else the run stops naming the link and its target
    (silently dropping it would lose rows; reading it would train on files outside data.path)."""
    if not os.path.exists(path):
        raise DataError(f"data path {path!r} does not exist; point data.path at a Parquet or JSON file or folder")
    if os.path.isfile(path):
        files = [os.path.abspath(path)]
    else:
        files = _walk_feedback_files(os.path.abspath(path))
    kinds = {"json" if f.endswith(JSON_SUFFIXES) else "parquet" for f in files}
    if not files:
        raise DataError(f"data path {path!r} holds no *.parquet, *.json or *.jsonl(.gz) file")
    if len(kinds) > 1:
        raise DataError(f"data path {path!r} mixes Parquet and JSON files; keep one kind a folder")
    return files, kinds.pop()


def _walk_feedback_files(root: str) -> list[str]:
    """The feedback files under `root`, sorted; directory symlinks are not entered."""
    real_root = os.path.realpath(root)
    files = []

    def unreadable(error: OSError):
        raise DataError(f"{error.filename}: cannot be listed ({error.strerror}); its files would be left out "
                        "unseen: fix its permissions, or move it out of data.path")

    for folder, subfolders, names in os.walk(root, onerror=unreadable, followlinks=False):
        subfolders.sort()
        for name in names:
            file = os.path.join(folder, name)
            if not name.endswith(FEEDBACK_SUFFIXES) or not os.path.isfile(file):
                continue  # (a broken link, a folder named like a file)
            target = os.path.realpath(file)
            if os.path.commonpath([real_root, target]) != real_root:
                raise DataError(f"{file} is a symlink to {target}, outside the data path {root}: feedback is read "
                                "only from inside data.path. Copy the file in, or point data.path at its folder")
            files.append(file)
    return sorted(files)


def check_inputs(files: list[str], kind: str, settings: DataSettings) -> str:
    """Whole-input checks at start-up: every file readable, its format's columns present with
    types that can hold them. Returns the format."""
    if kind == "json":  # no footer to read: the first rows of the first file stand for all
        try:
            schemas = {files[0]: sample_schema(files[0], row_limit(settings.max_text_chars))}
        except DataError:
            raise
        except Exception as error:
            raise DataError(f"{files[0]}: not readable as JSON or JSON lines ({error})") from None
    else:
        schemas = {}
        for file in files:
            try:
                schemas[file] = pq.read_schema(file)
            except Exception as error:  # pyarrow says why; we say which file
                raise DataError(f"{file}: not a readable Parquet file ({error})") from None
    formats = set()
    for file, schema in schemas.items():
        fmt = detect_format(schema.names, settings.format, file)
        check_types(schema, fmt, settings.label_map, file)
        formats.add(fmt)
    if len(formats) > 1:
        raise DataError(f"the files under the data path hold different formats ({sorted(formats)}); "
                        "keep one format a data path")
    return formats.pop()


def read_dataset(files: list[str], kind: str, settings: DataSettings) -> "ray.data.Dataset":
    """The input rows as a stream of blocks of about ROWS_PER_TASK rows. Parquet through Ray
    Data's reader (a row group at a time); JSON as raw rows in bounded chunks (json_lines.py),
    parsed in the tokenize tasks, so no task ever holds a whole JSON file."""
    if kind == "parquet":
        dataset = ray.data.read_parquet(files, include_paths=True)
    else:
        dataset = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files)).map_batches(
            read_chunks, fn_args=(row_limit(settings.max_text_chars),), batch_size=1, batch_format="pyarrow")
    # Cutting the rows into small blocks (streaming, no shuffle) lets every CPU tokenize, instead of
    # one task a file.
    return dataset.repartition(target_num_rows_per_block=ROWS_PER_TASK)
