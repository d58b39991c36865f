"""What a retrain cycle may read under `retrain.feedback_root`, file by file.

A partition is an entry directly under the root: a feedback file, or a folder (a hive partition
such as date=2026-12-02/) with every feedback file below it. Each file goes through:

    waiting      its partition is not sealed yet: not read, not hashed (or: sealed and readable, but
                 of another kind than this cycle's, see Survey.one_kind)
    eligible     sealed, never consumed, and read in full without error: a cycle trains on it
    quarantined  sealed but unreadable (broken JSON, gzip or Parquet, not UTF-8, nested too deep,
                 no feedback columns, no rows), or a symlink, or not a regular file: recorded in the
                 ledger with its reason, never trained on, while the partition's other files are;
                 new bytes (a new content fingerprint) make it eligible again
    consumed     trained on by a promoted cycle (recorded per file in the ledger)
    changed      consumed, and its bytes changed since: reported, never trained on again

Sealed: the partition holds a `_SUCCESS` marker (the Hadoop/Spark convention) at least as new as
the file, or nothing in it (files, hidden and `_temporary` files, folders) has changed for
`retrain.settle_s` seconds. A file that arrives in a consumed folder is new on its own: it waits
until the folder is sealed again (a fresh marker, or quiet), then the next cycle trains on it.
Clocks: a marker and a file are compared by their mtimes, which one file server sets; settling
compares the newest mtime with this host's clock, so clock skew between this host and the server
shifts the wait by the skew (an mtime in the future counts as a change right now). Keep settle_s
well above the pauses of the writers plus any skew.

Symlinks are never followed and never read: a symlinked partition, folder or file is quarantined
(pointing outside the root it would train on data the registry's owner did not put there;
pointing inside, its target is already listed under its own name). Every file read is opened
without following a final symlink, and must resolve inside the root.
"""

import functools
import hashlib
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Optional


from pipeline.data.formats import FEEDBACK_SUFFIXES
from pipeline.retrain.reading import Unreadable, open_inside, read_rows

MARKER = "_SUCCESS"


@dataclass
class FeedbackFile:
    name: str  # relative to the feedback root: the file's key in the ledger
    partition: str
    path: str  # absolute, under the real root
    size: int
    mtime_ns: int
    link: Optional[str] = None  # a symlink's target: such an entry is never read
    kind: str = ""  # "parquet/unpaired", "json/paired", ...: set once read (read_rows)

    @property
    def signature(self) -> str:
        """Cheap to read every cycle; the content is hashed again only when this differs."""
        return f"symlink:{self.link}" if self.link is not None else f"{self.size}:{self.mtime_ns}"

    @functools.cached_property
    def fingerprint(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        if self.link is not None:
            digest.update(b"symlink\0" + self.link.encode())
            return digest.hexdigest()
        with open_inside(self.path) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def describe(self, **more) -> dict:
        return {"name": self.name, "partition": self.partition, "fingerprint": self.fingerprint,
                "signature": self.signature, **more}


@dataclass
class Partition:
    name: str
    files: list = field(default_factory=list)  # FeedbackFile, regular files
    links: list = field(default_factory=list)  # FeedbackFile, symlinks and other non-regular entries
    marker_ns: Optional[int] = None  # mtime of its _SUCCESS marker
    last_change_ns: int = 0  # the newest mtime of anything in it

    def sealed_for(self, file: FeedbackFile, now_ns: int, settle_s: float) -> bool:
        if self.marker_ns is not None and file.mtime_ns <= self.marker_ns:
            return True
        return now_ns - self.last_change_ns >= settle_s * 1e9

    def waiting_reason(self, now_ns: int, settle_s: float) -> str:
        marker = "its _SUCCESS marker is older than some files" if self.marker_ns else "no _SUCCESS marker"
        return (f"not sealed: {marker}, and it last changed {(now_ns - self.last_change_ns) / 1e9:.0f} s ago "
                f"(retrain.settle_s = {settle_s:g})")


def list_partitions(root: str) -> list[Partition]:
    """Every partition under the root, its regular feedback files and its symlinks, without following any symlink."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"retrain.feedback_root {root!r} is not a folder; point it at the folder your "
                                "feedback partitions (files, or folders such as date=2026-11-26/) arrive in")
    real_root = os.path.realpath(root)
    partitions = []
    for entry in sorted(os.scandir(real_root), key=lambda e: e.name):
        if entry.name.startswith((".", "_")):  # hidden files, writers' _SUCCESS / _temporary
            continue
        partition = Partition(entry.name)
        if entry.is_dir(follow_symlinks=False):
            _walk(real_root, entry.path, partition)
        elif entry.name.endswith(FEEDBACK_SUFFIXES) or (entry.is_symlink() and entry.is_dir()):
            info = os.lstat(entry.path)
            partition.last_change_ns = info.st_mtime_ns
            _add(real_root, entry.path, partition, info)
        if partition.files or partition.links:
            partition.files.sort(key=lambda f: f.name)
            partitions.append(partition)
    return partitions


def _walk(root: str, folder: str, partition: Partition) -> None:
    """os.walk never descends into a symlinked folder; those are recorded as links here. A folder
    that cannot be listed is recorded too (never a silent drop), and an entry that vanishes while
    listed counts as a change now (a writer is busy)."""
    def unlistable(error: OSError) -> None:
        partition.links.append(FeedbackFile(os.path.relpath(error.filename, root), partition.name, error.filename, 0,
                                            0, f"<a folder that cannot be listed: {error.strerror}>"))

    for here, folders, names in os.walk(folder, onerror=unlistable):
        hidden = here != folder and any(p.startswith((".", "_")) for p in os.path.relpath(here, folder).split(os.sep))
        for name in [*folders, *names]:
            path = os.path.join(here, name)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                partition.last_change_ns = max(partition.last_change_ns, time.time_ns())
                continue
            partition.last_change_ns = max(partition.last_change_ns, info.st_mtime_ns)
            if here == folder and name == MARKER:
                partition.marker_ns = info.st_mtime_ns
            elif hidden or name.startswith((".", "_")) or (name in folders and not stat.S_ISLNK(info.st_mode)):
                continue
            elif name.endswith(FEEDBACK_SUFFIXES) or (stat.S_ISLNK(info.st_mode) and name in folders):
                _add(root, path, partition, info)
    partition.last_change_ns = max(partition.last_change_ns, os.lstat(folder).st_mtime_ns)


def _add(root: str, path: str, partition: Partition, info: os.stat_result) -> None:
    link = os.readlink(path) if stat.S_ISLNK(info.st_mode) else None
    file = FeedbackFile(os.path.relpath(path, root), partition.name, path, info.st_size, info.st_mtime_ns, link)
    if link is None and not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
        file.link = f"<not a regular file: mode {stat.filemode(info.st_mode)}>"
    (partition.files if file.link is None else partition.links).append(file)


@dataclass
class Survey:
    """One cycle's look at the root, against the ledger's consumed and quarantined files."""
    new: list = field(default_factory=list)  # (FeedbackFile, rows): eligible, read in full
    unchanged: list = field(default_factory=list)  # FeedbackFile: consumed, same bytes (replay draws from these)
    quarantined: list = field(default_factory=list)  # dict: quarantined by this look, with the reason
    still_quarantined: list = field(default_factory=list)  # names: quarantined before, bytes unchanged
    changed: list = field(default_factory=list)  # dict: consumed, bytes changed since
    waiting: list = field(default_factory=list)  # dict per partition: not sealed yet

    @property
    def new_rows(self) -> int:
        return sum(rows for _, rows in self.new)

    def one_kind(self) -> None:
        """Keep the new files of one kind and format (a cycle's data stage reads one: Parquet or
        JSON, unpaired or paired, ...), the kind with the most rows; the others wait for the next
        cycle, so that one odd file never fails every night's cycle."""
        rows: dict = {}
        for file, n in self.new:
            rows[file.kind] = rows.get(file.kind, 0) + n
        chosen = max(rows, key=lambda kind: (rows[kind], kind), default=None)
        later = [file for file, _ in self.new if file.kind != chosen]
        self.new = [(file, n) for file, n in self.new if file.kind == chosen]
        self.waiting += [{"partition": file.name, "files": 1, "reason": f"holds {file.kind} feedback; this cycle "
                          f"trains the {chosen} files (one kind and format a cycle), a later cycle these"}
                         for file in later]


def survey(root: str, consumed: dict, quarantine: dict, settle_s: float, data_format: str = "auto",
           label_map: Optional[dict] = None, now: Optional[int] = None) -> Survey:
    """Sort every file under the root into the lifecycle's states. `consumed`: name -> its ledger
    row; `quarantine`: name -> its ledger rows (one per fingerprint it was quarantined with)."""
    now = time.time_ns() if now is None else now
    result = Survey()
    for partition in list_partitions(root):
        for file in partition.links:
            _sort_unreadable(file, link_reason(file, root), consumed, quarantine, result)
        waiting = 0
        for file in partition.files:
            if file.name not in consumed and not partition.sealed_for(file, now, settle_s):
                waiting += 1
                continue
            try:
                _sort_sealed(file, consumed, quarantine, result, data_format, label_map)
            except Unreadable as error:  # not even its bytes could be hashed
                _sort_unreadable(file, str(error), consumed, quarantine, result)
        if waiting:
            result.waiting.append({"partition": partition.name, "files": waiting,
                                   "reason": partition.waiting_reason(now, settle_s)})
    result.one_kind()
    return result


def _sort_sealed(file: FeedbackFile, consumed: dict, quarantine: dict, result: Survey, data_format: str,
                 label_map: Optional[dict]) -> None:
    record = consumed.get(file.name)
    if record:
        if record["signature"] != file.signature and record["fingerprint"] != file.fingerprint:
            result.changed.append({**file.describe(), "consumed_fingerprint": record["fingerprint"],
                                   "consumed_by_cycle": record["cycle_id"]})
        else:
            result.unchanged.append(file)
    elif not _still_quarantined(file, quarantine, result):
        try:
            result.new.append((file, read_rows(file, data_format, label_map)))
        except Unreadable as error:
            _sort_unreadable(file, str(error), consumed, quarantine, result)


def _still_quarantined(file: FeedbackFile, quarantine: dict, result: Survey) -> bool:
    """Quarantined before with these bytes (the same signature, or else the same content hash)."""
    records = quarantine.get(file.name, ())
    if any(r["signature"] == file.signature for r in records) or any(
            r["fingerprint"] == file.fingerprint for r in records):
        result.still_quarantined.append(file.name)
        return True
    return False


def _sort_unreadable(file: FeedbackFile, reason: str, consumed: dict, quarantine: dict, result: Survey) -> None:
    """Quarantine, unless consumed already (nothing is lost then) or quarantined before with these bytes."""
    try:
        file.fingerprint
    except Unreadable:  # its bytes cannot be read at all: the signature stands for them
        file.fingerprint = f"unreadable:{file.signature}"
    if file.name not in consumed and not _still_quarantined(file, quarantine, result):
        result.quarantined.append(file.describe(reason=reason))


def link_reason(file: FeedbackFile, root: str) -> str:
    if file.link.startswith("<"):
        return f"{file.link[1:-1]}; only regular files in readable folders are read"
    target = os.path.realpath(file.path)
    inside = _inside(target, os.path.realpath(root))
    where = ("inside the feedback root: its target is read under its own name" if inside else
             "outside the feedback root: feedback is read only from files under it")
    return f"symlink to {file.link} ({where}); symlinks are never followed: put the file itself there"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
