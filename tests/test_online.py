"""Online KTO (pipeline/online/): the labeler kinds on real tiny models, the selection rules, the
prompt set's quarantine, the round ledger, the sampler's seeded sampling and weight sync (transformers
here; vLLM's CPU build in the slow tier), and `launch.py online` killed at two phases and resumed:
each round's rows sampled and trained once, a round at learning rate 0 samples what the one before did."""

import hashlib
import json
import math
import os
import re
import sqlite3
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch_here, tokenizer_text
from pipeline.online.labelers import Labeler, as_score
from pipeline.online.ledger import RoundLedger
from pipeline.online.prompts import prepare_prompts, round_rows
from pipeline.online.sampler import SAMPLE_SCHEMA, Sampler, Sampling
from pipeline.online.select import LabelerError, check_verdicts, held_out_result, select

TESTS = os.path.dirname(os.path.abspath(__file__))


def samples_table(completions: list[str], prompts: list, per_prompt: int) -> pa.Table:
    """Samples as the sampler writes them: per_prompt completions a prompt, in order."""
    n = len(completions)
    return pa.table({"prompt_index": [i // per_prompt for i in range(n)],
                     "prompt_json": [json.dumps(prompts[i // per_prompt]) for i in range(n)],
                     "sample": [i % per_prompt for i in range(n)], "completion": completions,
                     "completion_tokens": [len(c.split()) for c in completions], "finished": [True] * n},
                    schema=SAMPLE_SCHEMA)


# --- labelers -------------------------------------------------------------------------------------

def test_function_labeler_scores_quarantines_and_refuses_bad_returns(tmp_path):
    completions = ["the cat", "a cat", "the dog", "", "sky is the blue", "no"]
    table = samples_table(completions, ["q0", "q1", "q2"], per_prompt=2)
    labelled = Labeler("function", "online_labelers:has_the")(table)
    assert labelled.column("score").to_pylist() == [1.0, 0.0, None, 0.0, 1.0, 0.0]
    assert labelled.column("error").to_pylist()[2] == "ValueError: a dog in the completion"
    check_verdicts(labelled, "online_labelers:has_the", "round 1")  # raising is not fatal: quarantined
    counts = select(labelled, "threshold", 0.5, 1, str(tmp_path / "feedback.parquet"), str(tmp_path / "q.parquet"))
    feedback, quarantined = pq.read_table(tmp_path / "feedback.parquet"), pq.read_table(tmp_path / "q.parquet")
    # rows in = kept + quarantined; the empty completion is quarantined too (the data stage would reject it)
    assert counts["samples"] == 6 == feedback.num_rows + quarantined.num_rows
    assert sorted(quarantined.column("reason").to_pylist()) == ["empty_completion",
                                                                "labeler_raised: ValueError: a dog in the completion"]
    assert counts["desirable"] == 2 and counts["undesirable"] == 2 and counts["unused"] == 0
    # interleaved: the first rows answer different prompts (a KL block mixes prompts)
    assert feedback.column("prompt_index").to_pylist() == [0, 2, 0, 2]  # (prompt 1's two were quarantined)
    assert feedback.column("completion").to_pylist() == ["the cat", "sky is the blue", "a cat", "no"]
    assert feedback.column("label").to_pylist() == [True, True, False, False]
    assert feedback.column("prompt").to_pylist() == ["q0", "q2", "q0", "q2"]
    # a completion cut at max_tokens: trained by default, quarantined as `truncated` on request
    cut = labelled.set_column(labelled.schema.get_field_index("finished"), "finished",
                              pa.array([True, True, True, True, False, True]))
    for mask, kept in ((False, 4), (True, 3)):
        counts = select(cut, "threshold", 0.5, 1, str(tmp_path / "f.parquet"), str(tmp_path / "q.parquet"), mask)
        assert counts["truncated"] == 1 and counts["desirable"] + counts["undesirable"] == kept
    assert pq.read_table(tmp_path / "q.parquet").column("reason").to_pylist()[-1] == "truncated"
    for function, shown in (("returns_text", "'yes' (str)"), ("returns_nan", "nan (float)")):
        labelled = Labeler("function", f"online_labelers:{function}")(table)
        with pytest.raises(LabelerError, match=rf"labeler online_labelers:{function} returned {re.escape(shown)}.*round 3 prompt 0 "
                                               r"sample 0 \(completion 'the cat'\)"):
            check_verdicts(labelled, f"online_labelers:{function}", "round 3")
    assert as_score(np.bool_(True)) == (1.0, None) and as_score(2) == (2.0, None)
    assert as_score(None)[0] is None and as_score(math.inf)[0] is None and as_score([1])[0] is None


def test_best_worst_selection_and_held_out_pass_rate(tmp_path):
    completions = ["aaaa", "a", "aa", "bb", "bb", "cc", "x", "xyz", "xy"]  # prompt 1's samples tie: no pair
    table = Labeler("function", "online_labelers:length_score")(samples_table(completions, ["q0", "q1", "q2"], 3))
    counts = select(table, "best_worst", 0.5, 2, str(tmp_path / "f.parquet"), str(tmp_path / "q.parquet"))
    feedback = pq.read_table(tmp_path / "f.parquet")
    chosen = sorted(zip(feedback.column("prompt_index").to_pylist(), feedback.column("sample").to_pylist(),
                        feedback.column("label").to_pylist()))
    assert chosen == [(0, 0, True), (0, 1, False), (2, 0, False), (2, 1, True)]
    assert counts["desirable"] == 2 and counts["undesirable"] == 2 and counts["unused"] == 5
    assert feedback.column("round").to_pylist() == [2] * 4 and feedback.column("score").to_pylist()[0] in (4.0, 3.0)
    result = held_out_result(table, threshold=3.0)
    assert result["pass_rate"] == pytest.approx(2 / 9) and result["samples"] == 9 and result["labeler_raised"] == 0


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory, tiny_model):
    """The tiny model, a second one (other weights, same tokenizer), a tiny reward model, and two
    models whose output head is tied to the embeddings (SmolLM2's layout; vLLM's CPU build keeps a
    packed copy of that head, which an in-place reload must prepare again)."""
    from tiny import make_tiny_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    other = make_tiny_model(str(tmp_path_factory.mktemp("tiny-other")), tokenizer_text(), seed=1)
    reward = str(tmp_path_factory.mktemp("tiny-reward"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    LlamaForSequenceClassification(config).save_pretrained(reward)
    tokenizer.save_pretrained(reward)
    tied = tuple(make_tiny_model(str(tmp_path_factory.mktemp(f"tiny-tied-{seed}")), tokenizer_text(), seed=seed,
                                 tie_word_embeddings=True) for seed in (2, 3))
    return tiny_model, other, reward, *tied


def test_reward_model_and_judge_labelers_equal_direct_forwards(tiny_family):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from actors.reference import ScoringOptions

    model, _, reward, *_ = tiny_family
    prompts = [[{"role": "user", "content": "what color is the sky"}], [{"role": "user", "content": "hello"}]]
    completions = ["blue", "the sky is blue please", "good", "no"]
    table = samples_table(completions, prompts, per_prompt=2)
    options = ScoringOptions()
    scores = Labeler("reward_model", reward, options=options)(table).column("score").to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(reward)
    classifier = AutoModelForSequenceClassification.from_pretrained(reward).eval()
    for i, (completion, score) in enumerate(zip(completions, scores)):  # each alone: no padding at all
        text = tokenizer.apply_chat_template(prompts[i // 2] + [{"role": "assistant", "content": completion}],
                                             tokenize=False)
        with torch.no_grad():
            expected = classifier(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)
    template = "Q: {prompt}\nA: {completion}\nGood? Reply yes or no.\nReply:"
    judged = Labeler("judge", model, judge_template=template, backend="hf", options=options)(table)
    lm = AutoModelForCausalLM.from_pretrained(model).eval()
    tok = AutoTokenizer.from_pretrained(model)
    for i, (completion, score) in enumerate(zip(completions, judged.column("score").to_pylist())):
        asked = tok(template.format(prompt=prompts[i // 2][0]["content"], completion=completion))["input_ids"]
        logps = []
        for answer in (" yes", " no"):
            ids = tok(answer, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = lm(torch.tensor([asked + ids])).logits[0].log_softmax(-1)
            logps.append(sum(logits[len(asked) - 1 + j, t].item() for j, t in enumerate(ids)))
        assert 0 < score < 1 and score == pytest.approx(1 / (1 + math.exp(logps[1] - logps[0])), abs=1e-5)


# --- prompts, rounds, ledger ---------------------------------------------------------------------

def test_prompt_set_quarantines_bad_rows_and_splits_by_prompt(tmp_path):
    rows = [{"prompt": f"question {i}?"} for i in range(40)] + [
        {"prompt": ""}, {"prompt": [{"role": "user"}]}, {"other": 1}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    counts = prepare_prompts(str(path), str(tmp_path / "out"), 0.25, 1000)
    assert counts["read"] == 44 == counts["train"] + counts["held_out"] + counts["rejected"]
    assert counts["rejected_by_reason"] == {"empty_prompt": 1, "malformed_messages": 1, "missing_prompt": 1,
                                            "unreadable_json": 1}
    assert 4 <= counts["held_out"] <= 16  # about a quarter, by hash
    assert prepare_prompts(str(path), str(tmp_path / "again"), 0.25, 1000) == counts
    assert pq.read_table(tmp_path / "out" / "held_out.parquet").equals(
        pq.read_table(tmp_path / "again" / "held_out.parquet"))  # the same split on every run
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": [{"role": "user", "content": "b"}]}))
    with pytest.raises(Exception, match="mixes text prompts and conversations"):
        prepare_prompts(str(mixed), str(tmp_path / "m"), 0.0, 1000)
    # each pass over the prompts visits every one once, in a new order; rounds are reproducible
    first = round_rows(10, 1, 4, 0) + round_rows(10, 2, 4, 0) + round_rows(10, 3, 4, 0)
    assert sorted(first[:10]) == list(range(10)) and first == round_rows(10, 1, 12, 0)
    assert round_rows(10, 1, 4, 1) != round_rows(10, 1, 4, 0)


def test_round_ledger_moves_forward_only(tmp_path):
    ledger = RoundLedger(str(tmp_path / "online.sqlite"))
    ledger.begin(1, "base", "base")
    ledger.advance(1, "sampled", counts={"samples": 8}, timings={"sample_s": 1.0})
    row = ledger.advance(1, "labelled", counts={"desirable": 3}, timings={"label_s": 2.0})
    assert row["counts"] == {"samples": 8, "desirable": 3} and row["timings"] == {"sample_s": 1.0, "label_s": 2.0}
    with pytest.raises(RuntimeError, match="round 1 is labelled; it cannot move to sampled"):
        ledger.advance(1, "sampled")
    ledger.advance(1, "trained", model_path="/m1")
    with pytest.raises(RuntimeError, match="round 1 is trained; it cannot move to trained"):
        ledger.advance(1, "trained", model_path="/other")  # each phase is recorded once
    with pytest.raises(RuntimeError, match="it cannot move to skipped"):
        ledger.advance(1, "skipped")
    assert ledger.latest_model() == "/m1" and ledger.latest_model(0) is None
    done = ledger.advance(1, "done")
    with pytest.raises(RuntimeError, match="round 1 is done"):
        ledger.advance(1, "done")
    assert ledger.begin(1, "other", "other") == done  # a finished row is never rewritten, by anyone
    ledger.close()


# --- the sampler: seeded sampling and weight sync ------------------------------------------------

def sequence_logps(folder: str, prompt_ids: list, completion_ids: list) -> list[float]:
    """The summed completion log-probs of each row under transformers' own float32 forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for p, c in zip(prompt_ids, completion_ids):
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0].float().log_softmax(-1)
        out.append(sum(logits[len(p) - 1 + j, t].item() for j, t in enumerate(c)))
    return out


def check_sampler(sampler, folders: tuple[str, str], prompts_path: str, out: str, tolerance: float) -> None:
    """Samples under one seed repeat with the same weights and change with others; after each sync the
    sampler scores a fixed sequence as transformers does with the folder's weights."""
    model, other = folders
    sampling = Sampling(n=3, temperature=1.0, top_p=0.9, max_tokens=8, seed=5)

    def draw(name):
        sampler.sample(prompts_path, [0, 1], sampling, os.path.join(out, name))
        return pq.read_table(os.path.join(out, name)).column("completion").to_pylist()

    fixed = ([[5, 9, 17, 33], [7, 8]], [[40, 41, 42, 2], [60]])
    first = draw("a.parquet")
    assert len(first) == 6 and first == draw("again.parquet")  # same weights, same seed: the same samples
    for folder in (other, model):
        assert sampler.sync(folder, "in_place") >= 0
        np.testing.assert_allclose(sampler.score(*fixed), sequence_logps(folder, *fixed), rtol=0, atol=tolerance)
        if folder == other:
            assert draw("other.parquet") != first  # new weights, new samples
    assert draw("back.parquet") == first  # weights back in place: the first samples again (a round at lr 0)
    sampler.sync(other, "reload")
    np.testing.assert_allclose(sampler.score(*fixed), sequence_logps(other, *fixed), rtol=0, atol=tolerance)


def test_a_completion_reads_as_it_does_after_its_prompt(tmp_path):
    """SentencePiece marks a word's leading space on the word: decoded alone, a completion's first word
    would lose it, and the feedback text (prompt + completion, re-tokenized by the data stage) would
    not be what was sampled."""
    from types import SimpleNamespace

    from tiny import make_sentencepiece_tokenizer

    tokenizer = make_sentencepiece_tokenizer(str(tmp_path / "sp"))
    ids = tokenizer("the cat is blue", add_special_tokens=False)["input_ids"]
    prompt = tokenizer("the cat", add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt)] == prompt and tokenizer.decode(ids[len(prompt):]) == "is blue"
    assert Sampler.completion_text(SimpleNamespace(tokenizer=tokenizer), prompt, ids[len(prompt):]) == " is blue"


def test_hf_sampler_samples_by_seed_and_syncs_exactly(tmp_path, tiny_family):
    from actors.reference import ScoringOptions

    model, other, _, *tied = tiny_family
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_json": [json.dumps([{"role": "user", "content": "what is the sky"}]),
                                             json.dumps([{"role": "user", "content": "hello there"}])]}), prompts)
    sampler = Sampler("hf", model, model, ScoringOptions(), max_prompt_length=32)
    # the prompt's ids are the data stage's (chat template, generation prompt)
    assert sampler.prompt_ids([{"role": "user", "content": "hi"}]) == sampler.tokenizer(
        "<|im_start|>user\nhi<eos>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    check_sampler(sampler, (model, other), str(prompts), str(tmp_path), tolerance=1e-4)
    check_sampler(Sampler("hf", tied[0], model, ScoringOptions(), 32), tied, str(prompts), str(tmp_path / "tied"),
                  tolerance=1e-4)


class Remote:
    """A Ray actor's methods called as plain methods (ray.get of each call)."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name):
        import ray

        return lambda *args: ray.get(getattr(self.actor, name).remote(*args))


@pytest.mark.slow
def test_vllm_sampler_samples_by_seed_and_syncs_in_place_exactly(tmp_path, tiny_family, ray_local):
    """vLLM's CPU build in a Ray actor, on models with a tied head: in-place reload_weights gives the
    engine the folder's weights
    (its log-probs of fixed sequences equal transformers' within the engines' agreement, see
    test_reference.py), samples repeat under a seed with the same weights and change with new ones."""
    from actors.reference import ScoringOptions
    from test_reference import AGREEMENT_NATS

    model, _, _, *tied = tiny_family
    prompts = tmp_path / "prompts.parquet"
    # two short prompts, then enough long ones that a call's prompts x samples pass the 4,096 tokens vLLM's
    # CPU build prefills in one step (a partly prefilled seeded request once crashed it)
    long = [json.dumps(" ".join(["the sky is blue and the cat is red"] * 5) + f" {i}") for i in range(72)]
    pq.write_table(pa.table({"prompt_json": [json.dumps("the cat is"), json.dumps("what color is the sky")] + long}),
                   prompts)
    options = ScoringOptions(max_model_len=64, cache_root=str(tmp_path / "vllm"))
    sampler = ray_local.remote(Sampler).options(num_cpus=1).remote("vllm", tied[0], model, options, 32)
    try:
        check_sampler(Remote(sampler), tied, str(prompts), str(tmp_path), tolerance=AGREEMENT_NATS)
        sampling, draws = Sampling(n=2, temperature=1.0, top_p=1.0, max_tokens=4, seed=9), []
        for name in ("all.parquet", "all-again.parquet"):
            stats = ray_local.get(sampler.sample.remote(str(prompts), None, sampling, str(tmp_path / name)))
            draws.append(pq.read_table(tmp_path / name).column("completion").to_pylist())
        assert stats["samples"] == 148 and draws[0] == draws[1]
    finally:
        ray_local.kill(sampler)


@pytest.fixture(scope="module")
def online_run(tmp_path_factory, tiny_model):
    """`launch.py online` (2 rounds of 4 prompts x 4 samples on 2 samplers, 2 steps each) killed once round 1's labels
    are written, then once round 2's training is done (each time before the ledger records it), then the
    same command again to the end with a third round at learning rate 0; what each run left behind."""
    root = tmp_path_factory.mktemp("online")
    prompts = root / "prompts.jsonl"
    words = "the a cat dog sky is blue green red what why how".split()
    prompts.write_text("".join(json.dumps({"prompt": " ".join(words[(i * 7 + j) % len(words)] for j in range(5))
                                           + "?"}) + "\n" for i in range(24)))
    config = {
        "online": {"prompts": str(prompts), "held_out_fraction": 0.25, "rounds": 2, "prompts_per_round": 4,
                   "samples_per_prompt": 4, "temperature": 1.0, "max_tokens": 8, "labeler_kind": "function",
                   "labeler": "online_labelers:even_length", "steps_per_round": 2, "num_samplers": 2},
        "data": {"kl_block_size": 4, "max_rejected_fraction": 0.5},
        "model": {"name_or_path": tiny_model, "cache_dir": str(root / "models")},
        "reference": {"cache_dir": str(root / "cache")},
        "kto": {"max_length": 48, "max_prompt_length": 32},
        "training": {"learning_rate": 1e-2, "warmup_ratio": 0.0, "per_device_train_batch_size": 4},
        "scaling": {"num_workers": 1},
        "output": {"output_dir": str(root / "runs"), "run_name": "online", "report_to": []},
    }
    path = root / "online.yaml"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, ROOT]), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, os.path.join(ROOT, "launch.py"), "online", "--config", str(path)]
    run_dir = root / "runs" / "online"
    killed, before = [], []
    for fault in ("1:labelled", "2:trained"):  # after the phase's files are written, before the ledger says so
        killed.append(subprocess.run(command, env={**env, "KTO_ONLINE_FAULT": fault}, capture_output=True,
                                     text=True, timeout=900))
        r = int(fault[0])
        folder = run_dir / "rounds" / f"round-{r:04d}"
        before.append({"samples": hashlib.sha256((folder / "samples.parquet").read_bytes()).hexdigest(),
                       "model_mtime": os.stat(folder / "run" / "model" / "model.safetensors").st_mtime_ns
                       if r == 2 else None,
                       "ledger": [tuple(row) for row in sqlite3.connect(run_dir / "online.sqlite").execute(
                           "SELECT round, status FROM rounds ORDER BY round")]})
    # to the end, and one round more at learning rate 0 (a resume may add rounds)
    resumed = subprocess.run(command + ["--set", "online.rounds=3", "--set", "training.learning_rate=0"], env=env,
                             capture_output=True, text=True, timeout=900)
    return killed, before, resumed, run_dir


@pytest.mark.slow
def test_online_run_resumes_after_a_kill_and_trains_each_round_once(online_run):
    killed, before, resumed, run_dir = online_run
    assert [k.returncode for k in killed] == [-9, -9], killed[-1].stderr[-3000:]
    assert before[0]["ledger"] == [(0, "done"), (1, "sampled")]
    assert before[1]["ledger"] == [(0, "done"), (1, "done"), (2, "labelled")]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "round 2 was trained before the run stopped" in resumed.stderr
    ledger = RoundLedger(str(run_dir / "online.sqlite"))
    rounds = ledger.rounds()
    ledger.close()
    assert [(r["round"], r["status"]) for r in rounds] == [(0, "done"), (1, "done"), (2, "done"), (3, "done")]
    # resumed at the phase where it stopped: the samples drawn before each kill, round 2 not trained again
    for r, seen in zip((1, 2), before):
        folder = run_dir / "rounds" / f"round-{r:04d}"
        assert hashlib.sha256((folder / "samples.parquet").read_bytes()).hexdigest() == seen["samples"]
    assert os.stat(run_dir / "rounds" / "round-0002" / "run" / "model" / "model.safetensors").st_mtime_ns == \
        before[1]["model_mtime"]
    base = rounds[0]["policy_model"]
    for r in rounds[1:]:
        folder = run_dir / "rounds" / f"round-{r['round']:04d}"
        with open(folder / "run" / "metrics.jsonl") as f:
            assert [json.loads(line)["step"] for line in f] == [1, 2]  # each step once
        c = r["counts"]
        assert c["samples"] == 16 == c["desirable"] + c["undesirable"] + c["unused"] + c["quarantined"]
        assert pq.read_table(folder / "feedback.parquet").num_rows == c["desirable"] + c["undesirable"]
        assert c["desirable"] and c["undesirable"] and c["trained_rows"] <= c["desirable"] + c["undesirable"]
        assert r["reference_model"] == base and set(r["timings"]) >= {"sample_s", "label_s", "train_s", "sync_s"}
    # each round samples from the policy the previous round trained
    assert [r["policy_model"] for r in rounds[1:]] == [base, rounds[1]["model_path"], rounds[2]["model_path"]]
    # the held-out prompts, sampled with the same seed each round: new weights, new samples; at learning
    # rate 0 (round 3) the weights stay and so do the samples
    held_out = [pq.read_table(run_dir / "rounds" / f"round-{r:04d}" / "held_out_samples.parquet")
                .column("completion").to_pylist() for r in (0, 1, 2, 3)]
    assert held_out[0] != held_out[1] and held_out[1] != held_out[2] and held_out[0] != held_out[2]
    assert held_out[3] == held_out[2]
    weights = [load_file(os.path.join(r["model_path"], "model.safetensors")) for r in rounds[2:]]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert all(r["held_out"]["samples"] == len(held_out[0]) > 0 for r in rounds)
    assert "held-out pass" in resumed.stdout and resumed.stdout.count("done") >= 3
    # the sampler takes exactly the weights the trainers wrote (the run's last sync, done again here)
    from actors.reference import ScoringOptions

    sampler = Sampler("hf", base, base, ScoringOptions(), 32)
    sampler.sync(rounds[2]["model_path"], "in_place")
    fixed = ([[5, 9, 17, 33], [7, 8]], [[40, 41, 42, 2], [60]])
    np.testing.assert_allclose(sampler.score(*fixed), sequence_logps(rounds[2]["model_path"], *fixed), atol=1e-4)
    assert np.abs(np.array(sampler.score(*fixed)) - sequence_logps(base, *fixed)).max() > 1e-3  # they moved
    report = launch_here("report", str(run_dir))
    assert report.returncode == 0, report.stderr
    text = (run_dir / "report" / "report.md").read_text()
    assert text.count("| done |") == 4 and (run_dir / "report" / "pass_rate.png").stat().st_size > 0


def test_a_one_sided_round_trains_with_a_warning_or_is_skipped():
    from pipeline.online.loop import one_sided

    counts = {"desirable": 0, "undesirable": 12, "unused": 0, "quarantined": 4}
    assert one_sided(counts, require_both=False) == (
        False, "0 desirable and 12 undesirable samples (0 unused, 4 quarantined): training on one side of the KTO "
               "loss (online.require_both_labels: true skips such rounds)")
    skip, message = one_sided(counts, require_both=True)
    assert skip and "skipped (online.require_both_labels: true)" in message
    assert one_sided({**counts, "desirable": 1, "undesirable": 0}, require_both=False)[0]  # one row cannot pair
    assert one_sided({**counts, "desirable": 1}, require_both=True) == (False, "")


def test_the_reference_follows_the_policy_every_k_rounds(tmp_path):
    from pipeline.online.loop import reference_for

    ledger = RoundLedger(str(tmp_path / "online.sqlite"))
    for r, status in ((1, "done"), (2, "skipped"), (3, "done"), (4, "done")):
        ledger.begin(r, "p", "r")
        for phase in ("sampled", "labelled") + (("trained",) if status == "done" else ()):
            ledger.advance(r, phase, **({"model_path": f"/m{r}"} if phase == "trained" else {}))
        ledger.advance(r, status)
    assert [reference_for(r, 0, ledger, "/base") for r in (1, 5)] == ["/base", "/base"]
    # every 2 rounds: rounds 1-2 the base, 3-4 the policy after round 2 (skipped: round 1's), 5 round 4's
    assert [reference_for(r, 2, ledger, "/base") for r in (1, 2, 3, 4, 5)] == ["/base", "/base", "/m1", "/m1", "/m4"]
    ledger.close()
