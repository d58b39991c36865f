"""The reference cache as its owner manages it (`launch.py cache list | prune`): its entries, their
sizes, who used them and when, and their removal.

An entry is one fingerprint (pipeline/cache.py) under reference.cache_dir:

    <fingerprint>/              the data stage's folder (report.json marks it complete), with the
                                scored files and step files that runs wrote into it
    <fingerprint>-*             anything a run writes beside it, under the fingerprint's name
    <fingerprint>.uses.json     its usage record: the last USES_KEPT runs that used it (JSON, written
                                by stages.precompute through record_use)

Names holding cache.STAGING (`.tmp-<host>-<pid>`) are writes in progress, or what a killed writer
left: never an entry, never removed while their writer may be alive (a live pid on this host, or
any pid on another host, which this host cannot check). `prune` removes the leftovers of dead
writers on this host.

When an entry counts as in use (kept by `prune` unless --force): a run that used it is alive on
this host (its driver's pid), or its last use is under RECENT_S old. The second covers a run on
another host, and a run between its data stage's rename and its use record. A staging file inside
an entry keeps it even with --force: removing the folder under a live writer would fail its run.

Removal is crash-safe: the entry's paths are first renamed, the folder first, into one folder named
`<fingerprint>.pruning.tmp-<host>-<pid>` (synced), and only then deleted. The data stage reuses a
folder only where `<fingerprint>/report.json` is, so a prune killed at any point leaves whole files
under their names or nothing: never a half-deleted folder that passes for a complete one.
"""

import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Optional

from pipeline.cache import STAGING, private_folder, publish_file, staging_name, sync_folder_of
from pipeline.config import ConfigError

log = logging.getLogger("kto")
RECENT_S = 600  # an entry used this recently may be in use by a run this host cannot see
USES_KEPT = 20  # runs kept in an entry's usage record
USES = ".uses.json"
PRUNING = ".pruning"
FINGERPRINT = re.compile(r"[0-9a-f]{20}")  # pipeline.cache.fingerprint: 20 hex digits
WRITER = re.compile(re.escape(STAGING) + r"(.+)-(\d+)")  # staging_name's host and pid
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass
class Entry:
    fingerprint: str
    paths: list[str]  # its folder and the files beside it (and its usage record)
    size: int  # bytes of its files (apparent sizes, as `du -b --apparent-size` adds them, without folders)
    uses: Optional[list[dict]]  # newest first; None when the record is unreadable
    last_use: float  # the newest use's time; without a use record, the newest mtime of its files
    staging: list[str]  # staging files inside the entry: a writer at work, or one killed

    def describe(self) -> dict:
        return {"fingerprint": self.fingerprint, "size_bytes": self.size, "last_use": _when(self.last_use),
                "last_use_unix": self.last_use, "runs": [use["run_dir"] for use in self.uses or []],
                "uses": self.uses, "paths": self.paths, "staging": self.staging}


# ---- usage records ------------------------------------------------------------------------------

def record_use(folder: str, run_dir: str, data_path: str) -> None:
    """Record that the run in `run_dir` uses the entry whose data stage folder is `folder` (its
    data read from `data_path`): the newest USES_KEPT runs are kept, one record a run. Written
    under a staging name, synced, then renamed. Two runs recording at the same instant may keep
    only one of their records (the last rename wins): both runs started then, within seconds."""
    cache_dir, fingerprint = os.path.split(os.path.abspath(folder))
    path = os.path.join(cache_dir, fingerprint + USES)
    run_dir = os.path.abspath(run_dir)
    use = {"time": time.time(), "run_dir": run_dir, "data_path": os.path.abspath(data_path),
           "host": socket.gethostname(), "pid": os.getpid()}
    older = [u for u in read_uses(path) or [] if u["run_dir"] != run_dir]
    record = {"fingerprint": fingerprint, "uses": [use, *older][:USES_KEPT]}
    publish_file(path, lambda file: file.write(json.dumps(record, indent=1).encode()))


def read_uses(path: str) -> Optional[list[dict]]:
    """An entry's uses, newest first: [] without a record, None (and a warning) for a record that is
    not what record_use writes. JSON only: nothing read here is unpickled or executed."""
    if not os.path.exists(path):
        return []
    fields = {"time": (int, float), "run_dir": str, "data_path": str, "host": str, "pid": int}
    try:
        with open(path) as f:
            uses = json.load(f)["uses"]
        if not (isinstance(uses, list) and all(isinstance(u, dict) and all(
                isinstance(u.get(name), kind) for name, kind in fields.items()) for u in uses)):
            raise ValueError(f"each use must be an object with {', '.join(fields)}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("usage record %s is unreadable (%s): its entry's last use is taken from its files' times, and "
                    "the next run that uses it writes the record afresh", path, error)
        return None
    return sorted(uses, key=lambda u: -u["time"])


# ---- listing ------------------------------------------------------------------------------------

def list_entries(cache_dir: str) -> list[Entry]:
    """The cache's entries, most recently used first ([] when the folder does not exist)."""
    if not os.path.isdir(cache_dir):
        return []
    paths: dict[str, list[str]] = {}
    for name in sorted(os.listdir(cache_dir)):
        fingerprint = name[:20]
        if STAGING in name or not FINGERPRINT.fullmatch(fingerprint):
            continue
        path = os.path.join(cache_dir, name)
        if (name == fingerprint and os.path.isdir(path)) or name[20:21] == "-" or name == fingerprint + USES:
            paths.setdefault(fingerprint, []).append(path)
    entries = [_entry(cache_dir, fingerprint, found) for fingerprint, found in paths.items()]
    return sorted(entries, key=lambda e: -e.last_use)


def _entry(cache_dir: str, fingerprint: str, paths: list[str]) -> Entry:
    size, newest, staging = 0, 0.0, []
    for path in paths:
        for file in _files(path, staging):
            try:
                info = os.lstat(file)
            except FileNotFoundError:  # a writer's rename, or another prune
                continue
            size, newest = size + info.st_size, max(newest, info.st_mtime)
    uses = read_uses(os.path.join(cache_dir, fingerprint + USES))
    return Entry(fingerprint, paths, size, uses, uses[0]["time"] if uses else newest, staging)


def _files(path: str, staging: list[str]) -> list[str]:
    """The files under `path` (itself, if a file); staging names found on the way go to `staging`,
    and count (a staging folder's files too: they are bytes on disk)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return [path]
    found = []
    for root, folders, names in os.walk(path):
        staging += [os.path.join(root, name) for name in folders + names if STAGING in name]
        found += [os.path.join(root, name) for name in names]
    return found


def table(entries: list[Entry], cache_dir: str) -> str:
    """`cache list` for a person: one line an entry, most recently used first."""
    if not entries:
        return f"reference cache {cache_dir}: no entries"
    now = time.time()
    lines = [f"reference cache {cache_dir}: {len(entries)} entries, {human(sum(e.size for e in entries))}",
             f"{'fingerprint':<20}  {'size':>9}  {'last use':<36}  runs (newest first)"]
    for e in entries:
        runs = ", ".join(e.describe()["runs"]) or ("(usage record unreadable)" if e.uses is None else "(no record)")
        last_use = f"{_when(e.last_use)} ({_ago(now - e.last_use)})"
        lines.append(f"{e.fingerprint:<20}  {human(e.size):>9}  {last_use:<36}  {runs}")
    return "\n".join(lines)


# ---- pruning ------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'50GB' -> 50 * 10**9 bytes, '50GiB' -> 50 * 2**30; a plain number is bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or (unit and unit not in UNITS):
        raise ConfigError(f"--max-size {text!r} is not a size: give a number and a unit, e.g. 50GB (10^9 bytes) or "
                          "50GiB (2^30 bytes); units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
    return int(float(match.group(1)) * UNITS.get(unit, 1))


def prune(cache_dir: str, *, keep_last: Optional[int] = None, max_size: Optional[int] = None, force: bool = False,
          dry_run: bool = False) -> dict:
    """Remove the entries beyond the `keep_last` most recently used, then the least recently used
    ones until the rest total at most `max_size` bytes. Entries in use (module docstring) are kept
    and named with the reason; dead writers' staging leftovers go too. With dry_run nothing is
    removed: the result says what would be."""
    if keep_last is not None and keep_last < 0:
        raise ConfigError(f"--keep-last {keep_last}: give a number of entries, 0 or more")
    if not os.path.isdir(cache_dir):
        return {"cache_dir": cache_dir, "removed": [], "kept_in_use": [], "leftovers": [], "total_before": 0,
                "total_after": 0, "dry_run": dry_run}
    private_folder(cache_dir)  # refused when another user owns it
    entries, now = list_entries(cache_dir), time.time()
    held = {e.fingerprint: reason for e in entries if (reason := blocker(e, now, force))}
    chosen = entries[keep_last:] if keep_last is not None else []  # (those in use are named, not removed)
    total = sum(e.size for e in entries if e not in chosen or e.fingerprint in held)
    for entry in reversed(entries):  # least recently used first
        if max_size is None or total <= max_size:
            break
        if entry not in chosen:
            chosen.append(entry)
            total -= 0 if entry.fingerprint in held else entry.size
    kept = [{"fingerprint": e.fingerprint, "reason": held[e.fingerprint]} for e in chosen if e.fingerprint in held]
    doomed = sorted((e for e in chosen if e.fingerprint not in held), key=lambda e: e.last_use)
    leftovers = dead_leftovers(cache_dir, entries)
    if not dry_run:
        for entry in doomed:
            remove_entry(cache_dir, entry)
        for path in leftovers:
            _delete(path)
    return {"cache_dir": cache_dir, "removed": [e.describe() for e in doomed], "kept_in_use": kept,
            "leftovers": leftovers, "total_before": sum(e.size for e in entries), "total_after": total,
            "dry_run": dry_run}


def blocker(entry: Entry, now: float, force: bool) -> Optional[str]:
    """Why `entry` must stay, or None: a live writer's staging file inside it (whatever `force`
    says), else (without force) a use by a live process of this host or a use under RECENT_S old."""
    for path in entry.staging:
        if writer_alive(path):
            return f"{path} is being written (its writer may be alive)"
    if force:
        return None
    for use in entry.uses or []:
        if use["host"] == socket.gethostname() and _pid_alive(use["pid"]):
            return f"in use by the live process {use['pid']} of the run {use['run_dir']} (--force removes it)"
    if now - entry.last_use < RECENT_S:
        return (f"used {now - entry.last_use:.0f} s ago, under {RECENT_S} s: a run may be starting on it "
                "(--force removes it)")
    return None


def writer_alive(path: str) -> bool:
    """Whether the writer named in a staging name may still be writing: an unknown name or another
    host's writer counts as alive (this host cannot see its processes)."""
    match = WRITER.search(os.path.basename(path))
    if not match or match.group(1) != socket.gethostname():
        return True
    return _pid_alive(int(match.group(2)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def dead_leftovers(cache_dir: str, entries: list[Entry]) -> list[str]:
    """Staging files and folders of dead writers on this host, at the top of the cache (killed data
    stages, usage records, prunes) and inside its entries (killed scorings)."""
    top = [os.path.join(cache_dir, name) for name in sorted(os.listdir(cache_dir)) if STAGING in name]
    inner = [path for e in entries for path in e.staging  # (not the files inside a staging folder)
             if STAGING not in os.path.relpath(os.path.dirname(path), cache_dir)]
    return [path for path in top + inner if not writer_alive(path)]


def remove_entry(cache_dir: str, entry: Entry) -> None:
    """Rename the entry's paths aside (its folder first, so its report.json leaves the name the data
    stage looks for in the same step as everything in it), sync, then delete."""
    trash = staging_name(os.path.join(cache_dir, entry.fingerprint + PRUNING))
    os.makedirs(trash, mode=0o700)
    for path in sorted(entry.paths, key=lambda p: (os.path.basename(p) != entry.fingerprint, p)):
        try:
            os.rename(path, os.path.join(trash, os.path.basename(path)))
        except FileNotFoundError:  # removed meanwhile (another prune)
            continue
    sync_folder_of(trash)
    shutil.rmtree(trash)


def _delete(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def describe_prune(result: dict) -> str:
    """`cache prune` for a person."""
    verb = "would remove" if result["dry_run"] else "removed"
    lines = [f"{verb} {e['fingerprint']}  {human(e['size_bytes'])}  last used {e['last_use']}"
             + (f" by {e['runs'][0]}" if e["runs"] else "") for e in result["removed"]]
    lines += [f"kept {k['fingerprint']}: {k['reason']}" for k in result["kept_in_use"]]
    lines += [f"{verb} {path} (left by a writer that is gone)" for path in result["leftovers"]]
    lines.append(f"reference cache {result['cache_dir']}: {human(result['total_before'])} -> "
                 f"{human(result['total_after'])} ({len(result['removed'])} entries {verb})")
    return "\n".join(lines)


def human(size: int) -> str:
    """Bytes in decimal units, as --max-size reads them (GB = 10^9 bytes)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _when(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _ago(seconds: float) -> str:
    for unit, scale in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.0f} {unit} ago"
    return f"{max(seconds, 0):.0f} s ago"
