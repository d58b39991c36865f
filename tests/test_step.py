"""The training step without Ray: what gradient accumulation and z0 must do on one process."""

import copy
import math

import pytest
import torch

from pipeline.logprobs import collate, sequence_logps
from pipeline.models import disable_dropout
from pipeline.train.engines import PlainEngine, make_optimizer
from pipeline.train.step import MicroBatch, StepSettings, train_step


def _rows(tokenizer, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    prompts = [torch.randint(3, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    completions = [torch.randint(3, vocab, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                   + [tokenizer.eos_token_id] for _ in range(n)]
    return prompts, completions


def _model_and_rows(tiny_model, n: int, seed: int, mode: str = "train"):
    """The tiny model (in `mode`), its tokenizer, n random rows and their KL completions (the next row's)."""
    from pipeline.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model)
    model.train(mode == "train")
    prompts, completions = _rows(tokenizer, n=n, seed=seed)
    return tokenizer, model, prompts, completions, [completions[(i + 1) % n] for i in range(n)]


def _micro_batch(prompts, completions, labels, ref, ref_kl, rows):
    return MicroBatch([prompts[i] for i in rows], [completions[i] for i in rows],
                      [completions[(i + 1) % len(prompts)] for i in rows], labels[rows], ref[rows], ref_kl[rows])


def test_accumulation_matches_one_batch_and_z0_is_the_clamped_global_mean(tiny_model):
    from pipeline.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    base = load_causal_lm(tiny_model)
    disable_dropout(base)
    prompts, completions = _rows(tokenizer)
    labels = torch.tensor([True, False, False, True, False, False])
    kl_completions = [completions[(i + 1) % 6] for i in range(6)]
    with torch.no_grad():
        policy_kl = sequence_logps(base, collate(prompts, kl_completions, tokenizer.pad_token_id))
    # A reference below the policy on the KL pairs makes the KL estimate positive: clamp inactive.
    ref = torch.zeros(6)
    ref_kl = policy_kl - torch.linspace(0.1, 0.6, 6)
    settings = StepSettings(beta=0.1, desirable_weight=1.3, undesirable_weight=1.0, loss_type="kto",
                            pad_token_id=tokenizer.pad_token_id)

    results = []
    # Scheduled micro-batches as they come, then regrouped by length under a token budget.
    for groups, max_tokens in (([[0, 1, 2, 3, 4, 5]], 0), ([[0, 1, 2], [3, 4, 5]], 0), ([[0], [1, 2, 3, 4], [5]], 0),
                               ([[0, 1, 2, 3, 4, 5]], 24), ([[0, 1, 2], [3, 4, 5]], 12)):
        model = copy.deepcopy(base).train()
        # Adam turns float-order noise in near-zero gradients into steps of up to lr, so a
        # modest lr keeps that noise under the tolerance while every weight still moves.
        engine = PlainEngine(model, *make_optimizer(model, 1e-4, 0.0, "constant", 0.0, 10), max_grad_norm=1.0)
        batches = [_micro_batch(prompts, completions, labels, ref, ref_kl, g) for g in groups]
        step_settings = StepSettings(**{**settings.__dict__, "max_tokens_per_forward": max_tokens})
        results.append((train_step(engine, batches, step_settings), model.state_dict()))

    first_metrics, first_weights = results[0]
    assert abs(first_metrics["kl_unclamped"] - torch.linspace(0.1, 0.6, 6).mean().item()) < 1e-5
    assert first_metrics["kl"] == first_metrics["kl_unclamped"] or abs(
        first_metrics["kl"] - first_metrics["kl_unclamped"]) < 1e-6
    assert first_metrics["examples"] == 6
    for metrics, weights in results[1:]:
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "grad_norm", "num_tokens"):
            assert abs(metrics[key] - first_metrics[key]) <= 1e-5 * max(1.0, abs(first_metrics[key])), key
        for name in first_weights:
            torch.testing.assert_close(weights[name], first_weights[name], rtol=1e-5, atol=1e-7)


def test_negative_kl_estimate_is_clamped_to_zero(tiny_model):
    tokenizer, model, prompts, completions, kl_completions = _model_and_rows(tiny_model, n=4, seed=1)
    with torch.no_grad():
        policy_kl = sequence_logps(model, collate(prompts, kl_completions, tokenizer.pad_token_id))
    labels = torch.tensor([True, False, True, False])
    batch = _micro_batch(prompts, completions, labels, torch.zeros(4), policy_kl + 2.0, list(range(4)))
    engine = PlainEngine(model, *make_optimizer(model, 1e-3, 0.0, "constant", 0.0, 10), max_grad_norm=1.0)
    settings = StepSettings(0.1, 1.0, 1.0, "kto", tokenizer.pad_token_id)
    metrics = train_step(engine, [batch], settings)
    assert abs(metrics["kl_unclamped"] + 2.0) < 1e-5
    assert metrics["kl"] == 0.0


def test_sequence_logps_sums_the_completion_tokens_log_probs(tiny_model):
    """Against log-softmax over the full logits, computed here row by row without padding."""
    from pipeline.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model).eval()
    prompts, completions = _rows(tokenizer, n=5, seed=2)
    with torch.no_grad():
        got = sequence_logps(model, collate(prompts, completions, tokenizer.pad_token_id))
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            ids = torch.tensor([prompt + completion])
            logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            expected = sum(logps[len(prompt) + j - 1, token] for j, token in enumerate(completion))
            assert abs(got[i].item() - expected.item()) < 1e-4


def test_accuracy_counts_ties_half_and_apo_judges_against_zero(tiny_model):
    """Held-out accuracy with a reference equal to the policy (every implied reward ~1e-6 from z0 = 0):
    every row a tie, 0.5, whatever the float noise; then rows moved clearly to one side by hand."""
    from pipeline.train.step import eval_step, right_side

    assert right_side(torch.tensor([0.3, 0.3, -0.3, 5e-5, -0.2]), torch.tensor([True, False, False, True, True]),
                      torch.tensor(0.1)).tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert right_side(torch.tensor([0.10005, 0.09995]), torch.tensor([True, False]), 0.1).tolist() == [0.5, 0.5]

    tokenizer, model, prompts, completions, kl_completions = _model_and_rows(tiny_model, n=4, seed=3, mode="eval")
    with torch.no_grad():
        own = sequence_logps(model, collate(prompts, completions, tokenizer.pad_token_id))
        own_kl = sequence_logps(model, collate(prompts, kl_completions, tokenizer.pad_token_id))
    labels = torch.tensor([True, False, True, False])
    engine = PlainEngine(model, *make_optimizer(model, 1e-3, 0.0, "constant", 0.0, 10), max_grad_norm=1.0)
    for loss_type in ("kto", "apo_zero_unpaired"):
        settings = StepSettings(0.1, 1.0, 1.0, loss_type, tokenizer.pad_token_id)
        batch = MicroBatch(prompts, completions, kl_completions, labels, own.clone(), own_kl.clone())
        assert eval_step(engine, batch, settings)["eval/accuracy"] == 0.5
        # rows 0 and 1 on their label's side, row 2 on the wrong side, row 3 still a tie
        shifted = own - torch.tensor([1.0, -1.0, -1.0, 0.0])
        batch = MicroBatch(prompts, completions, kl_completions, labels, shifted, own_kl.clone())
        assert eval_step(engine, batch, settings)["eval/accuracy"] == (1 + 1 + 0 + 0.5) / 4


def test_dropout_off_includes_the_attention_dropout_of_the_config():
    """A Llama whose config asks for attention dropout: in training mode two forwards differ until
    disable_dropout, then agree; the config an export would save keeps its value."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.5,
                                         attn_implementation="eager")).train()
    ids = torch.randint(0, 64, (2, 12))
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    disable_dropout(model)
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert model.config.attention_dropout == 0.5


def test_apo_zero_unpaired_runs_no_kl_forward_and_needs_no_kl_reference(tiny_model):
    """Without z0, the KL completions are neither scored (NaN in the cache) nor run by the trainer: the
    step equals one whose KL references are finite, and its loss is the hand formula's."""
    from pipeline.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    base = load_causal_lm(tiny_model)
    disable_dropout(base)
    prompts, completions = _rows(tokenizer, n=4, seed=4)
    labels = torch.tensor([True, False, True, False])
    ref = torch.tensor([-20.0, -25.0, -30.0, -22.0])
    with torch.no_grad():
        logps = sequence_logps(base, collate(prompts, completions, tokenizer.pad_token_id))
    expected = torch.where(labels, 1 - torch.sigmoid(0.1 * (logps - ref)), torch.sigmoid(0.1 * (logps - ref))).mean()
    results = []
    for ref_kl in (torch.full((4,), float("nan")), torch.zeros(4)):
        model = copy.deepcopy(base).train()
        engine = PlainEngine(model, *make_optimizer(model, 1e-3, 0.0, "constant", 0.0, 10), max_grad_norm=1.0)
        batch = _micro_batch(prompts, completions, labels, ref, ref_kl, list(range(4)))
        metrics = train_step(engine, [batch], StepSettings(0.1, 1.0, 1.0, "apo_zero_unpaired", tokenizer.pad_token_id))
        results.append((metrics, model.state_dict()))
    (metrics, weights), (finite_metrics, finite_weights) = results
    assert metrics["kl"] == metrics["kl_unclamped"] == 0.0
    assert abs(metrics["loss"] - expected.item()) < 1e-6 and metrics["loss"] == finite_metrics["loss"]
    for name in weights:
        torch.testing.assert_close(weights[name], finite_weights[name], rtol=0, atol=0)


def test_the_reference_actor_scores_kl_completions_only_for_losses_with_z0(tiny_model):
    import numpy as np
    import pyarrow as pa

    from actors.reference import ReferenceScorer, ScoringOptions
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    prompts, completions = _rows(tokenizer, n=4, seed=5)
    batch = pa.table({"prompt_ids": prompts, "completion_ids": completions,
                      "kl_completion_ids": completions[1:] + completions[:1]})
    scored = {kl: ReferenceScorer("hf", tiny_model, tokenizer.pad_token_id, ScoringOptions(score_kl=kl))(batch)
              for kl in (True, False)}
    assert np.all(np.isnan(scored[False].column("ref_kl_logp").to_numpy()))
    assert np.all(np.isfinite(scored[True].column("ref_kl_logp").to_numpy()))
    np.testing.assert_allclose(scored[False].column("ref_logp").to_numpy(), scored[True].column("ref_logp").to_numpy(),
                               rtol=0, atol=1e-5)


def test_pairwise_steps_keep_pairs_whole_and_do_not_depend_on_grouping(tiny_model):
    """kto_pairwise on 3 pairs: any micro-batching and token budget gives the same step (pairs are
    never split across forwards), and its loss is the mean over pairs of -log sigma(v_w + v_l)."""
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.train.loss import kto_loss
    from pipeline.train.step import forward_groups

    tokenizer = load_tokenizer(tiny_model)
    base = load_causal_lm(tiny_model)
    disable_dropout(base)
    prompts, completions = _rows(tokenizer, n=6, seed=6)
    prompts = [prompts[i - i % 2] for i in range(6)]  # a pair shares its prompt
    labels = torch.tensor([True, False] * 3)
    ref = torch.linspace(-30.0, -20.0, 6)
    kl_completions = [completions[(i + 2) % 6] for i in range(6)]
    with torch.no_grad():
        logps = sequence_logps(base, collate(prompts, completions, tokenizer.pad_token_id))
        policy_kl = sequence_logps(base, collate(prompts, kl_completions, tokenizer.pad_token_id))
    ref_kl = policy_kl - 0.3  # z0 = 0.3
    expected = kto_loss(logps, ref, labels, torch.tensor(0.3), beta=0.1, loss_type="kto_pairwise").mean()
    batches = [MicroBatch(prompts, completions, kl_completions, labels, ref, ref_kl)]
    for max_tokens in (1, 30):
        for group in forward_groups(batches, "completion_ids", max_tokens, pairs=True):
            assert all(group[i] % 2 == 0 and group[i + 1] == group[i] + 1 for i in range(0, len(group), 2))
    results = []
    for groups, max_tokens in (([[0, 1, 2, 3, 4, 5]], 0), ([[0, 1], [2, 3, 4, 5]], 0), ([[0, 1, 2, 3, 4, 5]], 1),
                               ([[0, 1, 2, 3], [4, 5]], 30)):
        model = copy.deepcopy(base).train()
        engine = PlainEngine(model, *make_optimizer(model, 1e-4, 0.0, "constant", 0.0, 10), max_grad_norm=1.0)
        micro = [MicroBatch([prompts[i] for i in g], [completions[i] for i in g], [kl_completions[i] for i in g],
                            labels[g], ref[g], ref_kl[g]) for g in groups]
        settings = StepSettings(0.1, 1.0, 1.0, "kto_pairwise", tokenizer.pad_token_id, max_tokens_per_forward=max_tokens)
        results.append((train_step(engine, micro, settings), model.state_dict()))
    first_metrics, first_weights = results[0]
    assert abs(first_metrics["loss"] - expected.item()) < 1e-5 and abs(first_metrics["kl"] - 0.3) < 1e-5
    for metrics, weights in results[1:]:
        assert abs(metrics["loss"] - first_metrics["loss"]) < 1e-6
        for name in first_weights:
            torch.testing.assert_close(weights[name], first_weights[name], rtol=1e-5, atol=1e-7)


def _scored_table(tmp_path, prompts, completions, ref, ref_kl, labels):
    """A scored Parquet table as the reference stage writes it, provenance columns included."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(prompts)
    table = pa.table({"prompt_ids": prompts, "completion_ids": completions,
                      "kl_completion_ids": [completions[(i + 1) % n] for i in range(n)],
                      "label": labels.tolist(), "ref_logp": ref.tolist(), "ref_kl_logp": ref_kl.tolist(),
                      "source_file": [f"/data/part-{i % 2}.jsonl" for i in range(n)],
                      "source_row": [100 + i for i in range(n)]})
    pq.write_table(table, str(tmp_path / "scored.parquet"))
    return table, str(tmp_path / "scored.parquet")


def test_a_non_finite_loss_or_gradient_stops_the_step_before_the_update_naming_its_rows(tiny_model, tmp_path):
    """One NaN reference log-prob, one infinite KL reference log-prob, or a NaN gradient under a
    finite loss: the step raises before the optimizer runs (every weight unchanged), naming the
    rows at fault; the worker's message names the step and each row's source file and row."""
    from pipeline.train.step import NonFiniteStep
    from pipeline.train.worker import non_finite_message

    tokenizer, model, prompts, completions, _ = _model_and_rows(tiny_model, n=6, seed=3)
    disable_dropout(model)
    labels = torch.tensor([True, False, True, False, True, False])
    settings = StepSettings(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto",
                            pad_token_id=tokenizer.pad_token_id)
    for case, (ref_row, kl_row, fault_rows) in {"nan reference": (4, None, [4]), "inf kl reference": (None, 1, [1]),
                                                "nan gradient": (None, None, [0, 1, 2, 3, 4, 5])}.items():
        ref, ref_kl = torch.full((6,), -20.0), torch.full((6,), -20.0)
        if ref_row is not None:
            ref[ref_row] = float("nan")
        if kl_row is not None:
            ref_kl[kl_row] = float("inf")
        table, scored_path = _scored_table(tmp_path, prompts, completions, ref, ref_kl, labels)
        model.zero_grad(set_to_none=True)  # (a stopped step leaves its gradients; the run would end here)
        engine = PlainEngine(model, *make_optimizer(model, 1e-2, 0.0, "constant", 0.0, 10), max_grad_norm=1.0)
        hook = next(model.parameters()).register_hook(lambda g: g * float("nan")) if case == "nan gradient" else None
        before = {name: value.clone() for name, value in model.state_dict().items()}
        batches = [MicroBatch.from_table(table, [0, 1, 2]), MicroBatch.from_table(table, [3, 4, 5])]
        try:
            with pytest.raises(NonFiniteStep) as stopped:
                train_step(engine, batches, settings)
        finally:
            if hook:
                hook.remove()
        assert stopped.value.rows == fault_rows, case
        assert stopped.value.what == {"nan reference": "loss", "inf kl reference": "KL estimate",
                                      "nan gradient": "gradient"}[case], case
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), (case, name)  # no update applied
        assert not engine.optimizer.state, case  # AdamW never stepped
        message = non_finite_message(stopped.value, step=7, scored_path=scored_path, last_good_step=5)
        assert "step 7" in message and "checkpoint of step 5 is kept" in message, message
        for row in fault_rows:
            assert f"/data/part-{row % 2}.jsonl row {100 + row}" in message, (case, message)
    # The same rows with finite values train: the check stops nothing that is sound.
    ref = torch.full((6,), -20.0)
    model.zero_grad(set_to_none=True)
    table, _ = _scored_table(tmp_path, prompts, completions, ref, ref.clone(), labels)
    engine = PlainEngine(model, *make_optimizer(model, 1e-2, 0.0, "constant", 0.0, 10), max_grad_norm=1.0)
    metrics = train_step(engine, [MicroBatch.from_table(table, [0, 1, 2, 3, 4, 5])], settings)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]) and engine.optimizer.state
