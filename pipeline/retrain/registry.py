"""The retraining registry on disk: the `current` pointer to the promoted model, the model folders
that pruning keeps, and the staging files a killed cycle can leave.

    <registry_dir>/ledger.sqlite            the ledger (pipeline/retrain/ledger.py)
    <registry_dir>/retrain.lock             held while a cycle runs (pipeline/retrain/lock.py)
    <registry_dir>/current -> cycles/cycle-000003/model
    <registry_dir>/cycles/cycle-000003/     a cycle's run directory (feedback/, model/, summary.json, ...)

The reference cache entries (pipeline/cache_admin.py) made from a discarded cycle's staged feedback
are never read again (that folder is the cycle's own): prune_reference_cache removes them.

Everything here is idempotent and repairable from the ledger: each cycle, holding the lock, first
points `current` at the ledger's promoted model, prunes, and removes staging leftovers, so a cycle
killed between its ledger commit and these steps is finished by the next one.
"""

import glob
import os
import shutil
from typing import Callable

from pipeline.cache import STAGING, staging_name  # current.tmp-<host>-<pid>, cycles/cycle-N/feedback.tmp-<host>-<pid>
from pipeline.cache_admin import blocker, list_entries, remove_entry

DISCARDED = ("rejected", "failed")  # cycles whose candidate is never promoted: no later cycle starts from them


def cycle_dir(registry_dir: str, cycle_id: int) -> str:
    """A cycle's run directory: its staged feedback, model, summary."""
    return os.path.join(registry_dir, "cycles", f"cycle-{cycle_id:06d}")


def point_current(registry_dir: str, model_path: str) -> None:
    """Switch `current` to model_path atomically: a new relative symlink renamed over the old one,
    so a reader sees the old model or the new one, never neither."""
    link = os.path.join(registry_dir, "current")
    target = os.path.relpath(model_path, registry_dir)
    if os.path.islink(link) and os.readlink(link) == target:
        return
    staging = staging_name(link)
    try:
        if os.path.lexists(staging):
            os.unlink(staging)
        os.symlink(target, staging)
        os.replace(staging, link)
    finally:
        if os.path.lexists(staging):
            os.unlink(staging)


def remove_staging_leftovers(registry_dir: str) -> list[str]:
    """Staging files of killed cycles, and the feedback a killed cycle staged for its training.
    Only the lock holder calls this, before staging its own, so none is in use."""
    leftovers = glob.glob(os.path.join(registry_dir, f"current{STAGING}*")) + glob.glob(
        os.path.join(registry_dir, "cycles", "cycle-*", f"feedback{STAGING}*"))
    for path in leftovers:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    for data_dir in glob.glob(os.path.join(registry_dir, "cycles", "cycle-*", "feedback")):
        leftovers += unstage_feedback(data_dir)
    return leftovers


def unstage_feedback(data_dir: str) -> list[str]:
    """A cycle's staged feedback files go once it has trained (a file deleted from the feedback
    root must not live on in a cycle's folder); the replay sample stays, as a record of what was
    replayed."""
    removed = [os.path.join(data_dir, name) for name in os.listdir(data_dir) if name != "replay"]
    for path in removed:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    return removed


def prune(cycles: list[dict], current: str, keep: int, after_each: Callable[[], None] = lambda: None) -> list[str]:
    """Keep the newest `keep` candidate model folders (and always the promoted one); older ones go,
    their ledger rows stay. A folder half deleted by a killed cycle is still a folder, and goes at
    the next call."""
    with_models = [c["model_path"] for c in cycles if c["model_path"] and os.path.isdir(c["model_path"])]
    removed = []
    for path in with_models[:-keep] if keep else []:
        if path != current:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            after_each()
    return removed


def prune_reference_cache(cache_dir: str, registry_dir: str, cycles: list[dict]) -> list[str]:
    """Remove the cache entries (fingerprints) whose every recorded use is a discarded cycle of this
    registry reading data inside its own run directory (its staged feedback, which no other run
    ever reads). An entry another run used, or made from data outside the cycle (a shared eval
    set, reused by the next cycle), stays; so does one without a readable usage record. The
    cycles are finished, so their recorded uses do not hold the entries (cache_admin.blocker with
    force); a live writer's staging file inside one still does."""
    discarded = {os.path.realpath(cycle_dir(registry_dir, c["id"])) for c in cycles if c["status"] in DISCARDED}
    removed = []
    for entry in list_entries(cache_dir):
        uses = entry.uses or []
        if uses and all(os.path.realpath(u["run_dir"]) in discarded and _inside(u["data_path"], u["run_dir"])
                        for u in uses) and not blocker(entry, 0.0, force=True):
            remove_entry(cache_dir, entry)
            removed.append(entry.fingerprint)
    return removed


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder
