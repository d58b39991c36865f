"""The driver's stages before training: the data stage (pipeline/data) and the reference stage
(pipeline/scoring.py) for the training data and the eval data, each cached under
reference.cache_dir. `launch.py precompute` and `validate` stop here; `train` goes on (run.py).
No stage loads a model on the driver: tokenizing, scoring and GGUF conversion run in Ray tasks
and actors; the driver keeps counters and paths."""

import glob
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import ray

from actors.reference import ScoringOptions
from pipeline.cache import check_table, fingerprint
from pipeline.cache_admin import record_use
from pipeline.cluster import start_ray
from pipeline.config import Config
from pipeline.data.checks import check_counts, examine, pairing_advice, weight_advice
from pipeline.data.formats import DataError
from pipeline.models import load_tokenizer, resolve_model_path
from pipeline.scoring import ScoringJob, score_examples

log = logging.getLogger("kto")


@dataclass
class Prepared:
    """What the data and reference stages leave for training: Parquet files and their counts."""
    model_path: str
    reference_path: str
    pad_token_id: int
    scored_path: str
    counts: dict
    eval_scored_path: Optional[str] = None
    eval_counts: Optional[dict] = None


def precompute(config: Config) -> Prepared:
    """The data and reference stages for the training data (and the eval data, if any): after
    this the cache holds everything training needs, so a cluster can score once, train many times."""
    os.makedirs(config.run_dir, exist_ok=True)
    start_ray(config)
    model_path = resolve_model_path(config.model.name_or_path, config.model.cache_dir)
    reference_path = resolve_model_path(config.reference.model or config.model.name_or_path, config.model.cache_dir)
    # The tokenizer loads in a Ray worker (which the data stage's tasks then reuse, transformers
    # imported), not here: the driver holds no model, and no tokenizer either.
    pad = ray.remote(pad_token_id).remote(model_path, config.model.trust_remote_code)
    if config.data.generate_demo:
        from pipeline.data.demo import ensure_demo_data

        ensure_demo_data(config.data.path, config.eval.path)
    folder, counts = _examine(config, "train", config.data.path, model_path)
    examples = {"train": (os.path.join(folder, "examples"), counts)}
    if config.eval.path:
        eval_folder, eval_counts = _examine(config, "eval", config.eval.path, model_path)
        examples["eval"] = (os.path.join(eval_folder, "examples"), eval_counts)
    elif config.eval.split_fraction:
        examples["eval"] = (os.path.join(folder, "held_out"),
                            {**counts["held_out_counts"], "split_fraction": config.eval.split_fraction})
    scored = _score(config, examples, reference_path, pad)
    prepared = Prepared(model_path, reference_path, ray.get(pad), *scored["train"])
    if "eval" in scored:
        prepared.eval_scored_path, prepared.eval_counts = scored["eval"]
    return prepared


def pad_token_id(model_path: str, trust_remote_code: bool) -> int:
    """The id the scorers and trainers pad with (the tokenizer's, or its EOS: padding is masked)."""
    return load_tokenizer(model_path, trust_remote_code).pad_token_id


def validate_data(config: Config, data_path: str) -> dict:
    """`launch.py validate`: the data stage's checks and counts, without scoring or training;
    `trainable` is false (and `problem` says why) when train would stop on this data."""
    start_ray(config)
    model_path = resolve_model_path(config.model.name_or_path, config.model.cache_dir)
    _, counts = examine(config, data_path, model_path)
    k = config.kto
    report = {**counts, "weights": weight_advice(k.desirable_weight, k.undesirable_weight,
                                                 counts["desirable"], counts["undesirable"])}
    report["kl_pairing_advice"] = pairing_advice(counts, data_path)
    if report["kl_pairing_advice"]:
        log.warning(report["kl_pairing_advice"])
    try:
        check_counts(config, counts, data_path)
        return {**report, "trainable": True}
    except DataError as problem:
        return {**report, "trainable": False, "problem": str(problem)}


def resolve_desirable_weight(config: Config, n_desirable: int, n_undesirable: int) -> float:
    """The desirable weight to train with: `auto` resolved from the label counts; a warning
    when the weights leave the paper's range."""
    k = config.kto
    advice = weight_advice(k.desirable_weight, k.undesirable_weight, n_desirable, n_undesirable)
    if not advice["in_range"]:
        log.warning(advice["advice"])
    if k.desirable_weight == "auto":
        return advice["auto_desirable_weight"] or 1.0
    return k.desirable_weight


def _examine(config: Config, source: str, data_path: str, model_path: str) -> tuple[str, dict]:
    """The data stage for one source (train or eval), its checks and advice: (the data stage's
    cache folder, counts), the run's use of that entry recorded. The rejected rows are copied to
    <run>/rejected/<source>-part-N.parquet."""
    folder, counts = examine(config, data_path, model_path)
    record_use(folder, config.run_dir, data_path)  # before scoring: `cache prune` sees a live run (cache_admin.py)
    for part in sorted(glob.glob(os.path.join(counts["rejected_dir"], "*.parquet"))):
        os.makedirs(os.path.join(config.run_dir, "rejected"), exist_ok=True)
        shutil.copyfile(part, os.path.join(config.run_dir, "rejected", f"{source}-{os.path.basename(part)}"))
    held_out = f", {counts['held_out']} held out for eval" if counts.get("held_out") else ""
    log.info("data (%s): %d examples read, %d kept%s, %d rejected%s", source, counts["read"], counts["kept"], held_out,
             counts["rejected"], f" (rows and reasons in {config.run_dir}/rejected)" if counts["rejected"] else "")
    check_counts(config, counts, data_path)
    advice = pairing_advice(counts, data_path)
    if advice:
        log.warning(advice)
    return folder, {**counts, "fingerprint": os.path.basename(folder)}


def _score(config: Config, examples: dict[str, tuple[str, dict]], reference_path: str,
           pad: ray.ObjectRef) -> dict[str, tuple[str, dict]]:
    """The reference stage for each source's examples ({source: (examples folder, counts)}), cached
    beside them; what is not cached yet is scored by one actor pool. Returns {source: (scored
    Parquet file, counts with reference_cache_hit)}. A file's schema is checked before anything
    reads it, a cached one and a fresh one alike; the workers then read it without a check of
    their own (pipeline/train/worker.py): the driver's check comes before training starts, in a
    folder only this user can write (pipeline/cache.py)."""
    r, options = config.reference, ScoringOptions.from_config(config)
    key = fingerprint([], [reference_path], {"backend": r.backend, "dtype": r.dtype, "kl": options.score_kl})
    targets = {source: f"{folder}-scored-{key}.parquet" for source, (folder, _) in examples.items()}
    missing = [source for source, target in targets.items() if not os.path.exists(target)]
    if missing:
        score_examples([ScoringJob(examples[source][0], targets[source]) for source in missing],
                       max(examples[source][1]["longest_sequence"] for source in missing), backend=r.backend,
                       reference_path=reference_path, pad_token_id=ray.get(pad), num_replicas=r.num_replicas,
                       num_cpus_per_replica=r.num_cpus_per_replica, num_gpus_per_replica=r.num_gpus_per_replica,
                       options=options)
    scored = {}
    for source, target in targets.items():
        check_table(target, "scored")
        counts = examples[source][1]
        log.info("reference (%s): %d examples %s", source, counts["kept"], "scored (%s, %s)" % (r.backend, r.dtype)
                 if source in missing else "from the cache")
        scored[source] = (target, {**counts, "reference_cache_hit": source not in missing})
    return scored
