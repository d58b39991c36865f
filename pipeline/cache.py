"""The caches under reference.cache_dir, and what may be trusted of them.

Keys: a fingerprint of the inputs and settings that change their contents. The data stage's
folder and the reference scores beside it are reused only while their fingerprint matches. Data
files are keyed by their bytes, so a file rewritten with its mtime restored (rsync -t, cp -p,
an object-store sync) is a new input; models by their files (a hub name by its snapshot folder).

Trust: nothing read from a cache is unpickled. Every cached table's footer is checked against the
exact schema of its kind before use, without reading a row (check_table); cache folders are
private to the user (0700); staging files are named by host and pid and reach their final name
only once their bytes are on disk (fsync, then rename).
"""

import base64
import hashlib
import json
import os
import shutil
import socket
import stat
from typing import BinaryIO, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.formats import DataError

CACHE_FORMAT = 5  # bump when the cached columns or their meaning change (and update CACHED_SCHEMAS)
CHUNK = 1 << 20
# Model files above this size (weights) are keyed by their inode's identity and change time instead
# of their bytes: a write, or an mtime restored by utime, sets ctime, which no user tool can set back.
HASHED_MODEL_FILE_MAX = 64 << 20
EXTENSION_KEY = b"ARROW:extension:name"

_IDS = pa.list_(pa.int32())
_EXAMPLE = [("row_index", pa.int64()), ("prompt_ids", _IDS), ("completion_ids", _IDS), ("label", pa.bool_()),
            ("source_file", pa.string()), ("source_row", pa.int64())]
_PAIR, _KL = [("pair_id", pa.string())], [("kl_completion_ids", _IDS)]
_SCORES = [("ref_logp", pa.float32()), ("ref_kl_logp", pa.float32())]
# Each kind's possible schemas, exactly (names, order, types): unpaired and paired formats.
CACHED_SCHEMAS = {
    "examples": [_EXAMPLE + _KL, _EXAMPLE + _PAIR + _KL],  # examples/ and held_out/ parts
    "scored": [_EXAMPLE + _KL + _SCORES, _EXAMPLE + _PAIR + _KL + _SCORES],
    # a run's scheduled rows in training order (pipeline/data/step_file.py)
    "steps": [[("step", pa.int32()), ("slot", pa.int32()), *_EXAMPLE[1:4], *_KL, *_SCORES, ("row_index", pa.int64())]],
}


class CacheError(DataError):
    """A cached table that this pipeline did not write as it is: refused before a row is read."""


# ---- keys ---------------------------------------------------------------------------------------

def fingerprint(files: list[str], model_folders: list[str], settings: dict) -> str:
    """sha256 of the input files (path and bytes), the models' files (see model_key) and the settings."""
    from pipeline.models import model_files_folder

    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True, default=str).encode())
    for file in files:
        digest.update(f"{os.path.abspath(file)}|{content_hash(file)}\n".encode())
    for model in model_folders:
        digest.update(f"{model}|{model_key(model_files_folder(model))}\n".encode())
    return digest.hexdigest()[:20]


def content_hash(path: str) -> str:
    """sha256 of a file's bytes, read 1 MiB at a time (measured ~0.5-0.9 GB/s here: a 1M-row
    hh-rlhf-like Parquet file of 824 MB in 1-2 s)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_key(folder: str) -> str:
    """What defines a model folder's outputs: every top-level file (config, tokenizer files, chat
    template, weights), by its bytes, or (for large weight files, which would take seconds a GB)
    by device, inode, size, mtime and ctime, which change on any write, including one whose mtime
    was restored (ctime ticks at the kernel's clock granularity, a few ms: a second write within the
    same tick as the one that was keyed would go unseen; a weight file replaced by a copy or a
    download is a new inode)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        info = os.stat(path)  # (hub snapshots: the blob a symlink points to)
        if info.st_size <= HASHED_MODEL_FILE_MAX:
            key = content_hash(path)
        else:
            key = f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}"
        digest.update(f"{name}|{key}\n".encode())
    return digest.hexdigest()


# ---- trust ---------------------------------------------------------------------------------------

def check_table(path: str, kind: str) -> None:
    """Refuse a cached Parquet file unless its schema is exactly one of `kind`'s (CACHED_SCHEMAS),
    or for kind `rejected` (the input's own columns and a reason) holds no extension type. Only the
    footer is read: the raw footer is searched for an extension type first, so that no registered
    extension class (Ray's pickled objects, tensors) is even instantiated for it."""
    try:
        footer = pq.read_metadata(path).metadata or {}
    except Exception as error:
        raise CacheError(_refusal(path, f"not a readable Parquet file ({error})")) from None
    stored = footer.get(b"ARROW:schema", b"")
    try:
        decoded = base64.b64decode(stored)
    except ValueError:
        decoded = b""
    if EXTENSION_KEY in stored or EXTENSION_KEY in decoded:
        raise CacheError(_refusal(path, "it holds a column of an Arrow extension type (such as Ray's pickled "
                                        "objects, which run code when read)"))
    schema = pq.read_schema(path)
    if kind == "rejected":
        if schema.get_field_index("reason") < 0 or schema.field("reason").type != pa.string():
            raise CacheError(_refusal(path, "a rejected-rows part without a string `reason` column"))
        return
    found = [(field.name, field.type) for field in schema]
    if found not in CACHED_SCHEMAS[kind]:
        expected = " or ".join(str([f"{n}: {t}" for n, t in fields]) for fields in CACHED_SCHEMAS[kind])
        raise CacheError(_refusal(path, f"its columns {[f'{n}: {t}' for n, t in found]} are not the {kind} "
                                        f"schema {expected}"))


def check_folder(folder: str, kind: str) -> None:
    """check_table on every file in a cached folder of Parquet parts (a missing folder holds none)."""
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        check_table(os.path.join(folder, name), kind)


def _refusal(path: str, why: str) -> str:
    return (f"cached table {path} refused: {why}. This pipeline did not write it so; delete "
            f"{os.path.dirname(path)} and run again (and check who can write to reference.cache_dir)")


def private_folder(path: str) -> str:
    """`path` (created if need be) readable and writable by this user only (0700), whatever the
    umask; refused when another user owns it, since that user could plant a cache entry there."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path)
    if info.st_uid != os.getuid():
        raise CacheError(f"cache folder {path} belongs to user id {info.st_uid}, not to you ({os.getuid()}): "
                         "a cache must be private to the user who runs; point the cache_dir setting at a "
                         "folder of your own")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


STAGING = ".tmp-"  # <target>.tmp-<host>-<pid>: what a writer killed before its rename leaves


def staging_name(target: str) -> str:
    """Where `target` is written before its rename: beside it, named by host and pid, so that two
    processes, on one host or on two that share the volume, never write the same staging path."""
    return f"{target}{STAGING}{socket.gethostname()}-{os.getpid()}"


def publish_folder(target: str, write: Callable[[str], None]) -> None:
    """`write(staging)` fills a private staging folder beside `target`, which, synced to disk, then
    replaces `target`: a reader finds the old folder or the whole new one, and a failed write
    leaves no staging folder behind."""
    staging = staging_name(target)
    try:
        write(private_folder(staging))
        sync_tree(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # (gone already once renamed)
    sync_folder_of(target)


def publish_file(target: str, write: Callable[[BinaryIO], None]) -> None:
    """`write(file)` fills a staging file beside `target` (opened for bytes), which, synced to disk,
    then replaces `target`: a reader finds the old file or the whole new one."""
    staging = staging_name(target)
    try:
        with open(staging, "wb") as file:
            write(file)
        sync_tree(staging)
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):  # (gone already once renamed)
            os.remove(staging)
    sync_folder_of(target)


def sync_tree(path: str) -> None:
    """fsync a file, or every file and folder under `path`: its bytes are on disk before a
    rename publishes it (a crash then leaves the old name or the whole new entry)."""
    if os.path.isfile(path):
        _fsync(path, os.O_RDONLY)
        return
    for root, _, names in os.walk(path):
        for name in names:
            _fsync(os.path.join(root, name), os.O_RDONLY)
        _fsync(root, os.O_RDONLY | os.O_DIRECTORY)


def sync_folder_of(path: str) -> None:
    """fsync the folder that holds `path`: a rename into it is on disk."""
    _fsync(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: str, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
