"""JSON feedback read as a stream of bounded chunks of raw rows, so that no process ever holds a
whole file: a 10 GB JSON-lines file, or a gzip file that inflates to one, costs a chunk of memory.

A read task yields tables of (path, kto_json): one row's JSON text a table row, at most
CHUNK_ROWS rows or CHUNK_BYTES bytes a chunk, decompressed as it is read. The text is parsed in the
tokenize tasks (tokenize.py), row by row, so that a row that is not JSON, or whose fields' types
differ from the rows before it (a bool label here, a string label there), becomes a quarantined
row with a reason instead of stopping the read.

JSON lines (`.jsonl`, or a `.json` whose first character is not `[`) stream line by line; a line
over the row limit is skipped unread (kto_json null: the row is quarantined as row_too_long). A
`.json` holding one array is streamed element by element with the standard library's
incremental decoder (no dependency added); an element over the row limit cannot be skipped
without parsing it, so it stops the read with an error that names the file and advises JSON lines.
"""

import gzip
import io
import json
from typing import BinaryIO, Iterator, Optional

import pyarrow as pa

from pipeline.data.formats import DataError

CHUNK_ROWS = 2048  # rows a chunk: the tokenize tasks' unit of work
CHUNK_BYTES = 32 << 20  # a chunk's text stops growing here, whatever its row count
ROW_BYTES_PER_TEXT_CHAR = 16  # a row's JSON may hold several fields, escaped (\uXXXX): its limit in bytes
RAW_SCHEMA = pa.schema([("path", pa.string()), ("kto_json", pa.large_binary())])
_READ_BYTES = 1 << 20


def row_limit(max_text_chars: int) -> int:
    """The most bytes one row's JSON text may take before it is refused unread."""
    return max(ROW_BYTES_PER_TEXT_CHAR * max_text_chars, _READ_BYTES)


def open_binary(path: str) -> BinaryIO:
    """The file's bytes, decompressed on the fly (gzip inflates chunk by chunk, never the whole file)."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb", buffering=_READ_BYTES)


def rows_of(path: str, limit: int) -> Iterator[Optional[bytes]]:
    """Each row's JSON text (None: a line over `limit` bytes, skipped unread)."""
    with open_binary(path) as stream:
        try:
            yield from json_texts(stream, path, limit)
        except (OSError, EOFError) as error:  # a truncated or corrupt gzip stream
            raise DataError(f"{path}: cannot be read to its end ({error}); the file is truncated or corrupt: "
                            "upload it again") from None


def json_texts(stream: BinaryIO, path: str, limit: int) -> Iterator[Optional[bytes]]:
    """Each row's JSON text from an open (decompressing) stream: the elements of a top-level array,
    else the non-blank lines (None: a line over `limit` bytes, skipped unread). Bounded memory."""
    head = stream.peek(64).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]  # (a UTF-8 byte-order mark, whitespace)
    if head == b"[":
        yield from _array_elements(stream, path, limit)
    else:
        yield from _lines(stream, limit)


def _lines(stream: BinaryIO, limit: int) -> Iterator[Optional[bytes]]:
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # the rest of the line, a bounded read at a time
                line = stream.readline(_READ_BYTES)
            yield None
        elif line.strip():  # blank lines are not rows (as in pyarrow's reader)
            yield line


def _array_elements(stream: BinaryIO, path: str, limit: int) -> Iterator[bytes]:
    """The elements of a top-level JSON array, each as its own JSON text. The buffer holds what is
    not yet consumed: at most one element and a read ahead."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig")
    decoder = json.JSONDecoder()
    buffer, pos, index, exhausted = "", 0, 0, False

    def more() -> bool:
        nonlocal buffer, pos, exhausted
        if exhausted:
            return False
        try:
            read = text.read(max(_READ_BYTES, len(buffer) - pos))  # doubling: parse attempts stay linear
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 text ({error}); JSON files must be UTF-8") from None
        buffer, pos, exhausted = buffer[pos:] + read, 0, not read
        return bool(read)

    def next_char() -> str:
        nonlocal pos
        while True:
            while pos < len(buffer) and buffer[pos].isspace():
                pos += 1
            if pos < len(buffer) or not more():
                return buffer[pos:pos + 1]

    next_char()
    pos += 1  # the opening "["
    while True:
        char = next_char()
        if char == "]":
            return
        if index:
            if char != ",":
                raise DataError(f"{path}: element {index} of its JSON array is not followed by ',' or ']' "
                                f"(found {char!r}): the file is truncated or not valid JSON")
            pos += 1
            next_char()
        while True:
            try:
                _, end = decoder.raw_decode(buffer, pos)
                if end < len(buffer) or exhausted:
                    break
            except json.JSONDecodeError:
                pass
            except RecursionError:
                raise DataError(f"{path}: element {index} of its JSON array is nested too deeply to read") from None
            if len(buffer) - pos > limit:
                raise DataError(f"{path}: element {index} of its JSON array is not valid JSON or is over {limit} "
                                "bytes (16 x data.max_text_chars); a JSON array cannot skip a row it cannot read: write the "
                                "feedback as JSON lines (.jsonl), where such a row is quarantined as row_too_long")
            if not more():
                raise DataError(f"{path}: its JSON array ends inside element {index}: the file is truncated or not "
                                "valid JSON")
        yield buffer[pos:end].encode("utf-8")
        pos, index = end, index + 1


def read_chunks(files: pa.Table, limit: int) -> Iterator[pa.Table]:
    """Ray Data task: the raw rows of each file in `files` (a `path` column), in bounded chunks."""
    for path in files.column("path").to_pylist():
        texts, size = [], 0
        for row in rows_of(path, limit):
            texts.append(row)
            size += len(row or b"")
            if len(texts) >= CHUNK_ROWS or size >= CHUNK_BYTES:
                yield _chunk(path, texts)
                texts, size = [], 0
        if texts:
            yield _chunk(path, texts)


def _chunk(path: str, texts: list) -> pa.Table:
    return pa.table({"path": pa.array([path] * len(texts), pa.string()),
                     "kto_json": pa.array(texts, pa.large_binary())}, schema=RAW_SCHEMA)


def parse_rows(texts: list) -> tuple[list[Optional[dict]], list[str]]:
    """Each raw row as a dict of its fields, or None with the reason it cannot be one."""
    rows, reasons = [], []
    for text in texts:
        row, reason = None, ""
        if text is None:
            reason = "row_too_long"
        else:
            try:
                row = json.loads(text)
                reason = "" if isinstance(row, dict) else "malformed_json"
            except UnicodeDecodeError:
                reason = "undecodable_text"
            except (ValueError, RecursionError):  # not JSON, truncated, or nested beyond Python's stack
                reason = "malformed_json"
        rows.append(row if not reason else None)
        reasons.append(reason)
    return rows, reasons


def rows_table(rows: list[Optional[dict]], required: tuple[str, ...]) -> pa.Table:
    """The rows' own columns (`required` ones null where no row has them), as typed as their
    values allow: a column whose values mix types within the chunk (true in one row, "yes" in the
    next) holds each value's JSON text, so the quarantine keeps what the file said."""
    names = list(dict.fromkeys([*(name for row in rows if row for name in row), *required]))
    columns = {}
    for name in names:
        values = [row.get(name) if row else None for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            columns[name] = pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values],
                                     pa.string())
    return pa.table(columns)


def original_columns(rejected: pa.Table) -> pa.Table:
    """Quarantined JSON rows with their own columns in place of their raw text; a row that is not
    a JSON object keeps its text (`raw_json`, UTF-8 errors replaced) so that the quarantine shows
    what the file held."""
    if "kto_json" not in rejected.column_names:
        return rejected
    texts = rejected.column("kto_json").to_pylist()
    rows, reasons = parse_rows(texts)
    own = rows_table(rows, ())
    rest = rejected.drop_columns(["kto_json"])
    for name in own.column_names:
        if name not in rest.column_names:
            rest = rest.append_column(name, own.column(name))
    if any(reasons):
        raw = [text.decode("utf-8", "replace") if reason and text is not None else None
               for text, reason in zip(texts, reasons)]
        rest = rest.append_column("raw_json", pa.array(raw, pa.large_string()))
    return rest


def sample_schema(path: str, limit: int, rows: int = 1000) -> pa.Schema:
    """The columns and types of the file's first rows, for the checks at start-up."""
    texts = []
    for text in rows_of(path, limit):
        texts.append(text)
        if len(texts) >= rows:
            break
    parsed, _ = parse_rows(texts)
    return rows_table(parsed, ()).schema
