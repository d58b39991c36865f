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
from pipeline.cluster import start_ray
from pipeline.config import Config
from pipeline.data.checks import check_counts, examine, pairing_advice, weight_advice
from pipeline.data.formats import DataError
from pipeline.models import load_tokenizer, resolve_model_path
from pipeline.scoring import score_examples

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
    scored_path, counts, folder = _prepare(config, "train", config.data.path, model_path, reference_path, pad)
    prepared = Prepared(model_path, reference_path, ray.get(pad), scored_path, counts)
    if config.eval.path:
        prepared.eval_scored_path, prepared.eval_counts, _ = _prepare(config, "eval", config.eval.path, model_path,
                                                                      reference_path, pad)
    elif config.eval.split_fraction:
        held_out = counts["held_out_counts"]
        prepared.eval_scored_path, cache_hit = _score(config, os.path.join(folder, "held_out"),
                                                      held_out["longest_sequence"], reference_path, pad)
        prepared.eval_counts = {**held_out, "split_fraction": config.eval.split_fraction,
                                "reference_cache_hit": cache_hit}
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


def _prepare(config: Config, source: str, data_path: str, model_path: str, reference_path: str,
             pad: ray.ObjectRef) -> tuple[str, dict, str]:
    """The data stage for one source (train or eval), then the reference stage on its examples:
    (scored Parquet file, counts, the data stage's cache folder). The rejected rows are copied to
    <run>/rejected/<source>-part-N.parquet."""
    folder, counts = examine(config, data_path, model_path)
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
    scored_path, cache_hit = _score(config, os.path.join(folder, "examples"), counts["longest_sequence"],
                                    reference_path, pad)
    log.info("reference (%s): %d examples %s", source, counts["kept"],
             "from the cache" if cache_hit else f"scored ({config.reference.backend}, {config.reference.dtype})")
    return scored_path, {**counts, "fingerprint": os.path.basename(folder), "reference_cache_hit": cache_hit}, folder


def _score(config: Config, examples_dir: str, longest_sequence: int, reference_path: str,
           pad: ray.ObjectRef) -> tuple[str, bool]:
    """The reference stage, cached beside the examples: (scored Parquet file, whether it was cached).
    The file's schema is checked before anything reads it, a cached one and a fresh one alike; the
    workers then read it without a check of their own (pipeline/train/worker.py): the driver's check
    comes before training starts, in a folder only this user can write (pipeline/cache.py)."""
    r, options = config.reference, ScoringOptions.from_config(config)
    scored_path = f"{examples_dir}-scored-" + fingerprint(
        [], [reference_path], {"backend": r.backend, "dtype": r.dtype, "kl": options.score_kl}) + ".parquet"
    cache_hit = os.path.exists(scored_path)
    if not cache_hit:
        score_examples(examples_dir, scored_path, longest_sequence, backend=r.backend,
                       reference_path=reference_path, pad_token_id=ray.get(pad), num_replicas=r.num_replicas,
                       num_cpus_per_replica=r.num_cpus_per_replica, num_gpus_per_replica=r.num_gpus_per_replica,
                       options=options)
    check_table(scored_path, "scored")
    return scored_path, cache_hit
