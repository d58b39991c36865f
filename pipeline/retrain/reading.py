"""Reading a feedback file in full before a cycle trains on it: its rows counted, every one of
them decoded, so that a file the data stage could not read is quarantined with a reason instead of
failing the cycle (and every later one)."""

from __future__ import annotations

import gzip
import json
import os
import zlib
from typing import TYPE_CHECKING, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.formats import DataError, check_types, detect_format
from pipeline.data.json_lines import json_texts, row_limit

if TYPE_CHECKING:
    from pipeline.retrain.partitions import FeedbackFile

MAX_DEPTH = 32  # JSON nesting a feedback row can need is 4 (row, messages, message, text); pyarrow crashes past ~10^4
ROW_LIMIT = row_limit(1_000_000)  # bytes of one row's JSON parsed here (data.max_text_chars' default)


class Unreadable(Exception):
    """A feedback file that cannot be read; the message is the ledger's quarantine reason."""


def read_rows(file: FeedbackFile, data_format: str = "auto", label_map: Optional[dict] = None) -> int:
    """The file's input rows, after reading every one of them; Unreadable(reason) when that fails.

    Parquet: every page decoded, its columns checked against the feedback formats. JSON lines:
    every line UTF-8 and a JSON object. JSON: one object or a list of objects. Nesting deeper
    than MAX_DEPTH is refused before any pyarrow reader sees it (pyarrow's JSON parser recurses
    and crashes its process on deep enough input)."""
    try:
        if file.path.endswith(".parquet"):
            rows, fmt = _parquet_rows(file, data_format, label_map or {})
        else:
            rows, fmt = _json_rows(file, data_format)
        file.kind = f"{'parquet' if file.path.endswith('.parquet') else 'json'}/{fmt}"
        return rows
    except Unreadable:
        raise
    except DataError as error:  # a message of ours, for this file: said as it is
        raise Unreadable(_clip(str(error).removeprefix(f"{file.name}: "))) from None
    except (OSError, EOFError, zlib.error, pa.ArrowException) as error:  # gzip.BadGzipFile is an OSError
        raise Unreadable(_clip(f"{type(error).__name__}: {error}")) from None


def _parquet_rows(file: FeedbackFile, data_format: str, label_map: dict) -> tuple[int, str]:
    with open_inside(file.path) as f:
        parquet = pq.ParquetFile(f)
        fmt = detect_format(parquet.schema_arrow.names, data_format, file.name)
        check_types(parquet.schema_arrow, fmt, label_map, file.name)
        return _some(sum(batch.num_rows for batch in parquet.iter_batches(batch_size=65536))), fmt


def _json_rows(file: FeedbackFile, data_format: str) -> tuple[int, str]:
    """Rows as the data stage reads them (json_lines.json_texts: a top-level array's elements, else
    the non-blank lines), a row at a time: a 10 GB file or a gzip bomb never sits in memory whole."""
    columns: set = set()
    rows = 0
    with open_inside(file.path) as raw:
        stream = gzip.GzipFile(fileobj=raw) if file.path.endswith(".gz") else raw
        for rows, text in enumerate(json_texts(stream, file.name, ROW_LIMIT), 1):
            if text is not None:  # (a row over the limit is counted: the data stage quarantines it, row_too_long)
                columns |= _json_object(text, f"row {rows}").keys()
    return _some(rows), detect_format(sorted(columns), data_format, file.name)


def _some(rows: int) -> int:
    if not rows:
        raise Unreadable("holds no rows (an upload that has not begun?)")
    return rows


def _json_object(line: bytes, where: str) -> dict:
    value = _json_value(line, where)
    if not isinstance(value, dict):
        raise Unreadable(f"{where} is a JSON {type(value).__name__}, not an object with the row's fields")
    return value


def _json_value(data: bytes, where: str):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Unreadable(f"{where} is not UTF-8 (byte {data[error.start]:#04x} at offset {error.start}); "
                         "write JSON as UTF-8") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise Unreadable(f"{where}: JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as error:
        raise Unreadable(_clip(f"{where} is not valid JSON ({error}): a partial upload?")) from None
    if _depth(value) > MAX_DEPTH:
        raise Unreadable(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
    return value


def _depth(value) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def open_inside(path: str):
    """Open for reading without following a final symlink, and only if the path resolves inside
    the root it was listed under (a folder swapped for a symlink after listing is refused)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        raise Unreadable(f"cannot open: {error.strerror}") from None
    if os.path.realpath(path) != os.path.normpath(path):
        os.close(fd)
        raise Unreadable(f"{path} resolves to {os.path.realpath(path)}: a folder on its path became a symlink")
    return os.fdopen(fd, "rb")


def _clip(text: str) -> str:
    return text if len(text) <= 300 else text[:297] + "..."
