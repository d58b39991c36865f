"""The retraining registry on disk: the `current` pointer to the promoted model, the model folders
that pruning keeps, and the staging files a killed cycle can leave.

    <registry_dir>/ledger.sqlite            the ledger (pipeline/retrain/ledger.py)
    <registry_dir>/retrain.lock             held while a cycle runs (pipeline/retrain/lock.py)
    <registry_dir>/current -> cycles/cycle-000003/model
    <registry_dir>/cycles/cycle-000003/     a cycle's run directory (feedback/, model/, summary.json, ...)

Everything here is idempotent and repairable from the ledger: each cycle, holding the lock, first
points `current` at the ledger's promoted model, prunes, and removes staging leftovers, so a cycle
killed between its ledger commit and these steps is finished by the next one.
"""

import glob
import os
import shutil
from typing import Callable

from pipeline.cache import STAGING, staging_name  # current.tmp-<host>-<pid>, cycles/cycle-N/feedback.tmp-<host>-<pid>


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
