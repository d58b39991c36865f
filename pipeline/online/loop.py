"""`launch.py online`: KTO from a checker, round after round, as one resumable Ray program.

    prompts (once) -> round 0: the start model's held-out pass rate
    each round r:  sample  the sampler actors (online.num_samplers) draw online.samples_per_prompt
                           completions for the round's prompts from the policy they hold   (sampler.py)
                   label   the labeler scores them on a Ray Data actor pool; select.py turns scores
                           into feedback (quarantining samples the labeler raised on)
                   train   the normal `train` flow on that feedback (data stage, reference scoring,
                           online.steps_per_round KTO steps on the Ray Train workers)   (run.py)
                   sync    the samplers take the new weights; the held-out pass rate is measured
The ledger (ledger.py) records each phase after its outputs are on disk: a killed run resumes at the
round and phase where it stopped and never trains a round twice.

Fault injection (tests only): KTO_ONLINE_FAULT=<round>:<phase> sends this process SIGKILL once the
round's phase (sampled, labelled, trained) has written its outputs and before the ledger records it.
"""

import dataclasses
import json
import logging
import os
import signal
import time

import ray
import yaml

from actors.reference import ScoringOptions
from pipeline.cluster import start_ray
from pipeline.config import Config, EvalConfig
from pipeline.models import resolve_model_path
from pipeline.online.checks import check_labeler, check_resources, check_resumable, task_result
from pipeline.online.labelers import label_samples
from pipeline.online.ledger import FINISHED, RoundLedger
from pipeline.online.prompts import prepare_prompts, round_rows
from pipeline.online.sampler import SamplerPool, Sampling

log = logging.getLogger("kto")
FAULT = "KTO_ONLINE_FAULT"
JUDGE_TEMPLATE_TOKENS = 512  # a judge engine's room for its template beyond a prompt and a completion
ROUND_SEED_STRIDE = 100_003  # round r samples with online.seed + r x this (vLLM seeds prompt i with + i)


def online(config: Config) -> dict:
    """All rounds (those the ledger has not finished); returns the per-round summary it writes."""
    o, run_dir = config.online, config.run_dir
    os.makedirs(run_dir, exist_ok=True)
    check_resumable(config)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    start_ray(config)
    check_resources(config)
    task_result(ray.remote(check_labeler).options(num_cpus=0).remote(o.labeler_kind, o.labeler))
    base = resolve_model_path(config.model.name_or_path, config.model.cache_dir)
    if o.generate_demo:
        from pipeline.online.demo import ensure_demo_prompts

        ensure_demo_prompts(o.prompts)
    prompts_dir = os.path.join(run_dir, "prompts")
    prompts = task_result(ray.remote(prepare_prompts).options(num_cpus=0).remote(
        o.prompts, prompts_dir, o.held_out_fraction, config.data.max_text_chars))
    log.info("online prompts: %d read, %d for training, %d held out, %d rejected%s", prompts["read"],
             prompts["train"], prompts["held_out"], prompts["rejected"],
             f" (reasons in {prompts_dir}/rejected.parquet)" if prompts["rejected"] else "")
    ledger = RoundLedger(os.path.join(run_dir, "online.sqlite"))
    rounds = Rounds(config, ledger, base, prompts_dir, prompts)
    try:
        if prompts["held_out"]:
            rounds.measure_start()
        for r in range(1, o.rounds + 1):
            rounds.run(r)
        summary = {"rounds": rounds.table(), "prompts": prompts, "run_dir": run_dir}
    finally:
        rounds.stop()
        ledger.close()
    with open(os.path.join(run_dir, "online_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


class Rounds:
    def __init__(self, config: Config, ledger: RoundLedger, base: str, prompts_dir: str, prompts: dict):
        self.config, self.o, self.ledger, self.base = config, config.online, ledger, base
        self.prompts_dir, self.prompts = prompts_dir, prompts
        r = config.reference
        options = dataclasses.replace(ScoringOptions.from_config(config),
                                      max_model_len=config.kto.max_prompt_length + self.o.max_tokens)
        self.options = options
        self.sampler = SamplerPool(self.o.num_samplers, r.num_gpus_per_replica, self.o.backend,
                                   ledger.latest_model() or base, base, options, config.kto.max_prompt_length)

    def stop(self) -> None:
        self.sampler.stop()

    def round_dir(self, r: int) -> str:
        return os.path.join(self.config.run_dir, "rounds", f"round-{r:04d}")

    def measure_start(self) -> None:
        row = self.ledger.begin(0, self.base, self.base)
        if row["status"] in FINISHED:
            return
        self.sampler.sync(self.base, self.o.weight_sync)
        held_out, seconds = self.held_out(0)
        self.ledger.advance(0, "done", held_out=held_out, timings={"held_out_s": seconds}, counts=self.prompts)
        log.info("round 0 (the start model): held-out pass rate %s", _rate(held_out))

    def run(self, r: int) -> None:
        row = self.ledger.get(r)
        if row and row["status"] in FINISHED:
            return
        row = self.ledger.begin(r, self.ledger.latest_model() or self.base,
                                reference_for(r, self.o.sync_reference_every, self.ledger, self.base))
        folder = self.round_dir(r)
        if row["status"] == "started":
            row = self._sample(r, row, folder)
        if row["status"] == "sampled":
            started = time.time()
            counts = self.label(os.path.join(folder, "samples.parquet"), f"round {r}", r)
            _fault(r, "labelled")
            row = self.ledger.advance(r, "labelled", counts=counts, timings={"label_s": round(time.time() - started, 2)})
            log.info("round %d labelled: %d desirable, %d undesirable, %d unused, %d quarantined (pass rate %s)", r,
                     counts["desirable"], counts["undesirable"], counts["unused"], counts["quarantined"],
                     _rate(counts))
        if row["status"] == "labelled":
            row = self._train(r, row, folder)
            if row["status"] == "skipped":
                return
        started = time.time()
        sync_s = self.sampler.sync(row["model_path"], self.o.weight_sync)
        held_out, held_out_s = self.held_out(r) if self.prompts["held_out"] else (None, 0.0)
        row = self.ledger.advance(r, "done", held_out=held_out or {},
                                  timings={"sync_s": sync_s, "held_out_s": held_out_s,
                                           "round_s": round(time.time() - started + sum(
                                               v for k, v in row["timings"].items() if k.endswith("_s")), 1)})
        log.info("round %d done: held-out pass rate %s; seconds %s", r, _rate(held_out or {}), row["timings"])

    def _sample(self, r: int, row: dict, folder: str) -> dict:
        self.sampler.sync(row["policy_model"], self.o.weight_sync)  # a resumed run's samplers
        path = os.path.join(folder, "samples.parquet")
        rows = round_rows(self.prompts["train"], r, self.o.prompts_per_round, self.o.seed)
        stats = self.sampler.sample(os.path.join(self.prompts_dir, "train.parquet"), rows,
                                    Sampling.from_config(self.o, self.o.seed + ROUND_SEED_STRIDE * r), path)
        _fault(r, "sampled")
        log.info("round %d sampled: %d completions of %d prompts, %d tokens, %.1f s", r, stats["samples"], len(rows),
                 stats["tokens"], stats["seconds"])
        return self.ledger.advance(r, "sampled", counts={"prompts": len(rows), "samples": stats["samples"],
                                                          "sampled_tokens": stats["tokens"]},
                                   timings={"sample_s": stats["seconds"]})

    def label(self, samples_path: str, where: str, r: int | None = None) -> dict:
        """Score the samples on the labeler's actor pool; select round r's feedback beside them, or
        (held-out samples: r None) return the pass rate."""
        o = self.o
        return task_result(ray.remote(label_samples).options(num_cpus=0).remote(
            samples_path, o.labeler_kind, o.labeler, o.judge_template, o.backend,
            dataclasses.replace(self.options, max_model_len=self.options.max_model_len + JUDGE_TEMPLATE_TOKENS), where,
            self.config.reference.num_replicas, self.config.reference.num_gpus_per_replica,
            None if r is None else (o.selection, o.threshold, r, o.mask_truncated_completions), o.threshold))

    def _train(self, r: int, row: dict, folder: str) -> dict:
        from pipeline.run import train

        skip, message = one_sided(row["counts"], self.o.require_both_labels)
        if skip:
            log.warning("round %d: %s", r, message)
            return self.ledger.advance(r, "skipped", reason=message)
        if message:
            log.warning("round %d: %s", r, message)
        round_config = self.round_config(r, row, folder)
        summary_path = os.path.join(round_config.run_dir, "summary.json")
        if os.path.exists(summary_path):  # trained before a kill that came ahead of the ledger's record
            with open(summary_path) as f:
                summary = json.load(f)
            log.info("round %d was trained before the run stopped: its summary is in %s", r, summary_path)
        else:
            summary = train(round_config)
        _fault(r, "trained")
        model_path = os.path.join(round_config.run_dir, "merged" if self.config.lora.r else "model")
        final = summary["final_metrics"]
        return self.ledger.advance(
            r, "trained", model_path=model_path,
            metrics={k: final.get(k) for k in ("step", "loss", "kl", "rewards/chosen", "rewards/rejected",
                                               "rewards/margins", "learning_rate")},
            counts={"desirable_weight": summary["desirable_weight"], "trained_rows": summary["data"]["kept"]},
            timings={"data_and_score_s": round(summary["wall_time_s"] - summary["train_time_s"], 1),
                     "train_s": summary["train_time_s"]})

    def round_config(self, r: int, row: dict, folder: str) -> Config:
        """The user's config with what a round decides: its feedback, its start and reference models,
        its step count and its run directory (rounds/round-NNNN/run, resumable from its checkpoints; with
        output.storage_path, checkpoints in <storage_path>/<run_name>/round-NNNN/run)."""
        c = self.config
        return dataclasses.replace(
            c, data=dataclasses.replace(c.data, path=os.path.join(folder, "feedback.parquet"), format="unpaired",
                                        generate_demo=False, label_map={}),
            model=dataclasses.replace(c.model, name_or_path=row["policy_model"]),
            reference=dataclasses.replace(c.reference, model=row["reference_model"]),
            training=dataclasses.replace(c.training, max_steps=self.o.steps_per_round),
            lora=dataclasses.replace(c.lora, save_merged=bool(c.lora.r)),  # the sampler and next round load it
            eval=EvalConfig(),  # the held-out prompts measure the round
            output=dataclasses.replace(c.output, output_dir=folder, run_name="run", resume=True,
                                       storage_path=c.output.storage_path and "/".join(
                                           (c.output.storage_path.rstrip("/"), c.output.run_name, f"round-{r:04d}"))))

    def held_out(self, r: int) -> tuple[dict, float]:
        """The held-out prompts (at most online.held_out_max_prompts, the same ones every round) sampled
        from the policy the sampler holds, always with online.seed: with weights unchanged, the same
        samples every round."""
        started = time.time()
        path = os.path.join(self.round_dir(r), "held_out_samples.parquet")
        count = self.prompts["held_out"]
        rows = sorted(round_rows(count, 1, min(count, self.o.held_out_max_prompts), self.o.seed))
        self.sampler.sample(os.path.join(self.prompts_dir, "held_out.parquet"), rows,
                            Sampling.from_config(self.o, self.o.seed), path)
        return self.label(path, f"round {r} held-out"), round(time.time() - started, 2)

    def table(self) -> list[dict]:
        return [{"round": row["round"], "status": row["status"],
                 "pass_rate": (row["held_out"] or {}).get("pass_rate"),
                 "train_pass_rate": (row["counts"] or {}).get("pass_rate") if row["round"] else None,
                 "desirable": row["counts"].get("desirable"), "undesirable": row["counts"].get("undesirable"),
                 "loss": (row["metrics"] or {}).get("loss"), "kl": (row["metrics"] or {}).get("kl"),
                 "timings": row["timings"], "model_path": row["model_path"], "reason": row["reason"]}
                for row in self.ledger.rounds()]


def reference_for(r: int, every: int, ledger: RoundLedger, base: str) -> str:
    """Round r's reference: the start model, or with online.sync_reference_every = k the policy after
    round k floor((r-1)/k) (after the last trained round before it, where that round was skipped)."""
    anchor = ((r - 1) // every) * every if every else 0
    return (ledger.latest_model(anchor) if anchor else None) or base


def one_sided(counts: dict, require_both: bool) -> tuple[bool, str]:
    """(skip the round?, the warning) for a round's label counts: all one class trains one side of the
    KTO loss, or is skipped with online.require_both_labels; fewer than 2 labelled samples cannot pair."""
    desirable, undesirable = counts["desirable"], counts["undesirable"]
    if desirable and undesirable:
        return False, ""
    facts = (f"{desirable} desirable and {undesirable} undesirable samples ({counts['unused']} unused, "
             f"{counts['quarantined']} quarantined)")
    if desirable + undesirable < 2:
        return True, f"{facts}: skipped, KL pairing needs at least 2 labelled samples"
    if require_both:
        return True, f"{facts}: skipped (online.require_both_labels: true)"
    return False, (f"{facts}: training on one side of the KTO loss (online.require_both_labels: true skips "
                   "such rounds)")


def _rate(result: dict) -> str:
    rate = result.get("pass_rate")
    return "-" if rate is None else f"{rate:.3f}"


def _fault(r: int, phase: str) -> None:
    """The fault-injection hook (see the module docstring)."""
    if os.environ.get(FAULT) == f"{r}:{phase}":
        log.warning("%s=%s: sending SIGKILL to this run", FAULT, os.environ[FAULT])
        os.kill(os.getpid(), signal.SIGKILL)
