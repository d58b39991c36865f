"""`launch.py` end to end on a tiny random-init model: precompute, then `train` in a process of its
own (its embedded Ray, the run directory, the quarantine, the reference cache, the trackers, the
report), re-running the same run name, validate, clear errors; and the driver's memory, which must
not grow with the model."""

import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.data import stage

from conftest import launch, launch_here, tokenizer_text, write_feedback

pytestmark = pytest.mark.slow

METRIC_FIELDS = ("step", "loss", "kl", "kl_unclamped", "rewards/chosen", "rewards/rejected", "rewards/margins",
                 "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "num_tokens", "examples")


def first_json(text: str) -> dict:
    """The JSON object a command printed (Ray may print lines of its own around it)."""
    return json.JSONDecoder().raw_decode(text[text.index("{"):])[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model, ray_local):
    """A config file (hive partitions, one bad row of each kind, an extra column; the eval set split
    off the data; a bfloat16 reference, so the trainers' step-0 drift check runs), `precompute` in
    this process, then `train` as a user runs it: (config path, runs folder, precompute's output,
    the first summary.json, train's finished process). The config's paths are relative, as a user writes them:
    the module runs in the run's folder, and the Ray workers (which run in folders of their own) must
    get them resolved against it."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield _first_run(tmp_path, tiny_model)
    finally:
        os.chdir(previous)


def _first_run(tmp_path, tiny_model):
    data = tmp_path / "feedback"
    write_feedback(str(data / "date=2026-11-20" / "part-0.parquet"), rows=14, seed=1)
    bad = pa.table({"prompt": ["fine prompt?", "", None], "completion": ["", "an answer.", "another."],
                    "label": [True, False, None], "extra": [100, 101, 102]})
    good = pq.read_table(write_feedback(str(data / "date=2026-11-21" / "part-0.parquet"), rows=12, seed=2))
    pq.write_table(pa.concat_tables([good, bad]), str(data / "date=2026-11-21" / "part-0.parquet"))
    config = {
        "data": {"path": "feedback", "kl_block_size": 4, "max_rejected_fraction": 0.2},
        "model": {"name_or_path": tiny_model, "cache_dir": "models"},
        "reference": {"cache_dir": "cache", "dtype": "bfloat16", "drift_max_abs": 100.0},
        "kto": {"max_length": 64, "max_prompt_length": 32, "desirable_weight": "auto"},
        "training": {"learning_rate": 1e-3, "per_device_train_batch_size": 4, "max_steps": 3, "save_steps": 2},
        "scaling": {"num_workers": 2},
        "eval": {"split_fraction": 0.25, "eval_steps": 2, "property_regex": "e", "max_new_tokens": 4},
        "output": {"output_dir": "runs", "run_name": "first",
                   "report_to": ["tensorboard", "mlflow", "wandb"]},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as patch:  # parts of 4 rows: the reference stage reads several files in order
        patch.setattr(stage, "ROWS_PER_PART", 4)
        scored = launch_here("precompute", "--config", str(path))  # data + reference stages only
    assert scored.returncode == 0, scored.stderr[-3000:]
    first = launch("train", "--config", str(path))
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "first" / "summary.json").read_text())
    return str(path), tmp_path / "runs", first_json(scored.stdout), summary, first


def test_train_writes_the_run_directory_and_reuses_the_reference_cache(tiny_run):
    config, runs, precomputed, summary, first = tiny_run
    stdout = first.stdout
    assert os.path.isfile(precomputed["scored"]) and precomputed["data"]["reference_cache_hit"] is False
    parts = os.listdir(os.path.join(os.path.dirname(precomputed["scored"]), "examples"))
    assert len(parts) == -(-precomputed["data"]["kept"] // 4), parts  # (scores checked row by row below)
    run = runs / "first"
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "metrics.jsonl",
                 "summary.json", "config.yaml", "rejected/train-part-00000.parquet"):
        assert (run / name).is_file(), name
    assert f"run directory: {run}" in stdout and "held-out  after training" in stdout
    # The console keeps the stages and the results; Ray's notices and INFO lines stay out (--verbose).
    counts = summary["data"]
    for line in (f"data (train): 29 examples read, {counts['kept']} kept, {counts['held_out']} held out for eval, 3 "
                 "rejected", f"reference (train): {counts['kept']} examples from the cache",  # (precompute's)
                 "training: 3 steps of 8 examples on 2 workers (ddp)"):
        assert line in first.stderr, (line, first.stderr[-3000:])
    for noise in ("Token authentication is enabled", "Started a local Ray instance", "Reporting training result",
                  "Attempting to start training worker group", "Progress bars disabled", "Loading weights"):
        assert noise not in first.stderr + stdout, noise

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(run / "model"))
    assert model.num_parameters() > 0 and AutoTokenizer.from_pretrained(str(run / "model")).eos_token == "<eos>"

    counts = summary["data"]
    assert counts["read"] == 29 and counts["rejected"] == 3
    assert counts["read"] == counts["kept"] + counts["held_out"] + counts["rejected"] and counts["held_out"] >= 2
    assert summary["eval_data"]["kept"] == counts["held_out"]  # the split's held-out rows are the eval set

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert [m["examples"] for m in lines] == [8, 8, min(8, counts["kept"] - 16)]
    for metrics in lines:
        assert set(METRIC_FIELDS) <= set(metrics) and metrics["num_tokens"] > 0
    assert [m["step"] for m in lines if "eval/accuracy" in m] == [2, 3]  # every eval_steps and at the end
    assert all(m["eval/examples"] == counts["held_out"] for m in lines if "eval/examples" in m)
    # The held-out checks before and after training, from the workers: the last step's eval/
    # numbers, and the share of greedy held-out generations that match eval.property_regex.
    after = summary["eval_after"]
    assert {k: v for k, v in after.items() if k not in ("property_share", "sample_generation")} == {
        k[len("eval/"):]: v for k, v in lines[-1].items() if k.startswith("eval/")}
    for check in (summary["eval_before"], after):
        assert 0 <= check["property_share"] <= 1 and isinstance(check["sample_generation"], str)
    # The bfloat16 reference was measured against the trainers' own float32 forwards, 2 workers.
    drift = summary["reference"]["step0_drift"]
    assert drift["rows"] == counts["kept"] and drift["sequences"] == 2 * counts["kept"]
    assert 0 < drift["mean_abs_per_sequence"] <= drift["max_abs_per_sequence"] < 100
    assert counts["rejected_by_reason"] == {"empty_completion": 1, "empty_prompt": 2}
    assert counts["reference_cache_hit"] is True and summary["num_workers"] == 2  # scored by precompute
    assert counts["fingerprint"] == precomputed["data"]["fingerprint"]
    rejected = pq.read_table(str(run / "rejected" / "train-part-00000.parquet"))
    assert sorted(rejected.column("extra").to_pylist()) == [100, 101, 102]
    assert {"reason", "source_file", "source_row"} <= set(rejected.column_names)
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["kto"]["desirable_weight"] == "auto" and resolved["scaling"]["num_workers"] == 2
    assert os.listdir(run / "ray_train")  # Ray Train's checkpoints live under the storage path
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()  # the same names as metrics.jsonl
    assert {"loss", "kl", "kl_unclamped", "rewards/margins", "learning_rate", "grad_norm"} <= set(
        events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([m["loss"] for m in lines])
    _check_mlflow_and_wandb(run, lines)

    report = launch_here("report", str(run))
    assert report.returncode == 0, report.stderr[-3000:]
    _check_report(run, summary)

    other_dtype = launch_here("precompute", "--config", config, "--set", "reference.dtype=float32")
    assert other_dtype.returncode == 0, other_dtype.stderr[-3000:]
    other = first_json(other_dtype.stdout)  # the same examples, scored again in another dtype
    assert other["data"]["fingerprint"] == counts["fingerprint"] and other["scored"] != precomputed["scored"]
    assert other["data"]["reference_cache_hit"] is False
    _check_scores_against_the_reference(other["scored"], other["eval_data"], resolved)

    # The same run name again resumes from its last checkpoint: no step runs twice.
    rerun = launch_here("train", "--config", config)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming run 'first'" in rerun.stderr
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["resumed"] is True
    for name in ("eval_before", "eval_after", "reference"):  # kept in the checkpoint, not computed again
        assert resumed[name] == summary[name], name
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]  # resumed: no step logged twice
    _check_mlflow_and_wandb(run, lines)  # the same MLflow run continued, nothing logged twice
    # ... but not with another training config: that would mix two runs.
    changed = launch_here("train", "--config", config, "--set", "training.learning_rate=0.01")
    assert changed.returncode == 2 and "training.learning_rate = 0.001, now 0.01" in changed.stderr
    assert "output.resume=false" in changed.stderr


def test_the_driver_holds_no_model(tiny_run, tmp_path_factory):
    """The same job with a model 400 times larger (64M parameters, 256 MB in float32, where the
    tiny one has 0.15M): held-out checks and generations run on the workers (the drift check too:
    the tiny run shows it), so the driver's peak memory stays where it was. One float32 copy of the
    larger model on the driver would add 256 MB."""
    from tiny import make_tiny_model

    config, runs, _, tiny_summary, _ = tiny_run
    big = make_tiny_model(str(tmp_path_factory.mktemp("big-llama")), tokenizer_text(), hidden_size=1024,
                          num_hidden_layers=6)
    # One step on one worker and one checkpoint, of LoRA adapters merged on rank 0 (a full model's
    # checkpoint with its optimizer state would be 0.8 GB to write and copy), a float32 reference
    # (bfloat16 forwards are slow on CPUs; the drift check on the workers is the tiny run's), no
    # trackers (the tiny run has them): what the driver would have loaded the model for is still
    # there, the held-out checks before and after training and the merge.
    result = launch("train", "--config", config, "--set", f"model.name_or_path={big}", "--set",
                    "output.run_name=big", "--set", "training.max_steps=1", "--set", "training.save_steps=0",
                    "--set", "reference.dtype=float32", "--set", "output.report_to=[]",
                    "--set", "scaling.num_workers=1", "--set", "lora.r=4", "--set", "lora.save_merged=true")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((runs / "big" / "summary.json").read_text())
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(big).hidden_size == 1024 and summary["steps"] == 1
    assert AutoConfig.from_pretrained(str(runs / "big" / "merged")).hidden_size == 1024
    for check in (summary["eval_before"], summary["eval_after"]):
        assert check["examples"] and check["property_share"] is not None
    small, large = tiny_summary["driver_peak_rss_mib"], summary["driver_peak_rss_mib"]
    assert small > 100 and abs(large - small) < 150, (small, large)


def test_validate_prints_the_facts_and_fails_when_too_much_is_bad(tiny_run):
    config = tiny_run[0]
    result = launch_here("validate", "--config", config, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    facts = first_json(result.stdout)
    assert (facts["read"], facts["kept"] + facts["held_out"], facts["rejected"]) == (29, 26, 3)
    assert facts["trainable"] is True and facts["rejected_by_reason"] == {"empty_completion": 1, "empty_prompt": 2}
    assert facts["desirable"] + facts["undesirable"] == facts["kept"]
    assert facts["tokens_before_truncation"]["prompt"]["p50"] > 0
    n_d, n_u = facts["desirable"], facts["undesirable"]
    assert facts["weights"]["auto_desirable_weight"] == pytest.approx(n_u / n_d) and facts["weights"]["in_range"]

    strict = launch_here("validate", "--config", config, "--json", "--set", "data.max_rejected_fraction=0.05")
    assert strict.returncode == 1 and first_json(strict.stdout)["trainable"] is False
    assert "3 of 29 rows" in strict.stderr and "data.max_rejected_fraction" in strict.stderr
    refused = launch_here("train", "--config", config, "--set", "data.max_rejected_fraction=0.05",
                          "--set", "output.run_name=strict")
    assert refused.returncode == 2 and "3 of 29 rows" in refused.stderr


def test_bad_config_and_missing_data_fail_with_clear_messages(tiny_run, tmp_path):
    config = tiny_run[0]
    result = launch_here("train", "--config", config, "--set", "data.kl_block_size=1")
    assert result.returncode == 2 and "data.kl_block_size = 1" in result.stderr
    result = launch_here("train", "--config", config, "--set", f"data.path={tmp_path}/nowhere",
                         "--set", "output.run_name=nowhere")
    assert result.returncode == 2 and "nowhere" in result.stderr and "does not exist" in result.stderr
    result = launch_here("train", "--config", config, "--set", "kto.bta=0.2")
    assert result.returncode == 2 and "unknown key 'kto.bta'" in result.stderr
    # The bfloat16 reference against the float32 trainers, with a bound below its drift: the workers
    # measure the gap before the first update and the run stops with the message. It is not a worker
    # failure: with restarts unlimited, a check that raised in the workers would be retried forever.
    # (and a global batch of 2 x 2 rows: warned about, as a z0 from 4 KL pairs)
    result = launch_here("train", "--config", config, "--set", "reference.drift_max_abs=0.001", "--set",
                         "output.run_name=drifted", "--set", "scaling.max_failures=-1",
                         "--set", "training.per_device_train_batch_size=2")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "a global batch of 4 rows estimates each step's z0 from 4 KL pairs" in result.stderr
    assert re.search(r"error: at step 0 the reference log-probs \(hf, bfloat16\) differ from the trainer's own by up "
                     r"to .* above reference.drift_max_abs = 0.001.*--set reference.dtype=float32", result.stderr)
    assert not (tiny_run[1] / "drifted" / "metrics.jsonl").exists()  # no step was taken ...
    assert not (tiny_run[1] / "drifted" / "ray_train").exists()  # ... and a corrected run starts afresh


def _check_report(run, summary: dict) -> None:
    """PNGs with something drawn in them, and the summary's numbers in the Markdown."""
    from matplotlib.image import imread

    for name in ("loss.png", "kl.png", "rewards.png", "learning_rate.png"):
        pixels = imread(str(run / "report" / name))
        assert pixels.shape[0] > 100 and pixels[..., :3].std() > 0.05, name  # not a blank canvas
    markdown = (run / "report" / "report.md").read_text()
    final = summary["final_metrics"]
    assert f"| step {final['step']} | {final['loss']:.4g} | {final['kl']:.4g} |" in markdown
    assert f"{summary['data']['read']} examples read, {summary['data']['kept']} kept" in markdown
    assert "![loss.png](loss.png)" in markdown


def _check_scores_against_the_reference(scored_path: str, eval_counts: dict, config: dict) -> None:
    """The training rows and the held-out rows, scored by one actor pool, each got their own
    scores: ref_logp and ref_kl_logp equal the reference model's forwards in this process."""
    import torch

    from pipeline.logprobs import score_sequences
    from pipeline.models import load_causal_lm, load_tokenizer

    held_out = os.path.join(os.path.dirname(scored_path), "held_out-scored-" + scored_path.rsplit("-scored-", 1)[1])
    assert eval_counts["kept"] >= 2 and eval_counts["reference_cache_hit"] is False
    model = load_causal_lm(config["model"]["name_or_path"], False, torch.float32).eval()
    pad = load_tokenizer(config["model"]["name_or_path"]).pad_token_id
    for path, rows in ((scored_path, None), (held_out, eval_counts["kept"])):
        table = pq.read_table(path)
        assert rows is None or table.num_rows == rows
        prompts = table.column("prompt_ids").to_pylist()
        for completions, scores in (("completion_ids", "ref_logp"), ("kl_completion_ids", "ref_kl_logp")):
            expected = score_sequences(model, prompts, table.column(completions).to_pylist(), pad).numpy()
            assert table.column(scores).to_numpy() == pytest.approx(expected, abs=1e-4), (path, scores)


def _check_mlflow_and_wandb(run, lines: list[dict]) -> None:
    """Both trackers hold every step's metrics once, read back through their own formats."""
    from mlflow.tracking import MlflowClient

    ids = json.loads(next((run / "ray_train").rglob("trainer_state.json")).read_text())["tracking_ids"]
    client = MlflowClient()
    assert client.get_run(ids["mlflow"]).data.params["kto.beta"] == "0.1"
    for name in ("loss", "eval/accuracy"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], name))
        assert history == [(m["step"], pytest.approx(m[name])) for m in lines if name in m], name
    logged = [item for path in sorted(run.glob(f"wandb/offline-run-*-{ids['wandb']}/run-*.wandb"))
              for item in _wandb_history(path)]
    assert [item["_step"] for item in logged] == [1, 2, 3]
    assert [item["loss"] for item in logged] == pytest.approx([m["loss"] for m in lines])
    assert logged[1]["eval/accuracy"] == pytest.approx(lines[1]["eval/accuracy"])


def _wandb_history(path):
    """The history rows of an offline W&B run file: a LevelDB-style log (32 KiB blocks of records
    with 7-byte headers) of `Record` protobufs, after a 7-byte ':W&B' header."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, position, payload = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        payload = chunk if kind in (1, 2) else payload + chunk  # full / first, or middle / last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "history":
                yield {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
