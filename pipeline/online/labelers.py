"""Labelers: each sample gets a score (a verifier's bool as 1 / 0, a reward model's logit, a judge's
P(yes)), and each round's samples become KTO feedback by a selection rule (select.py).

`Labeler` is a Ray Data callable class (one per actor: a model labeler loads its model once). It never
raises on a sample: a labeler that raises is that sample's `error` (the sample is quarantined with
it); a return that is not a bool or a finite number is a `fatal` verdict, which stops the round with
a message naming the labeler and the sample (a checker returning the wrong thing is a bug to fix,
not data to drop).

    function      `module:function(prompt, completion) -> bool | float`; the prompt as the prompt set
                  gives it (text, or the list of messages), the completion as text
    reward_model  a local Hugging Face sequence-classification folder: one label -> its logit; two ->
                  logit[1] - logit[0] (the log-odds of the second, positive class)
    judge         a local causal LM folder, run by the sampler's engine kind (hf or vllm), asked
                  online.judge_template; score = P(" yes") / (P(" yes") + P(" no")) for its next words
"""

import importlib
import json
import math
import numbers
import os

import numpy as np
import pyarrow as pa
import ray

from actors.reference import ScoringOptions
from pipeline.online.select import check_verdicts, held_out_result, select

LABEL_COLUMNS = {"score": pa.float64(), "error": pa.string(), "fatal": pa.string()}


def plain_prompt(prompt) -> str:
    """A prompt as one text: itself, or a conversation's turns joined (what a judge template shows)."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


class Labeler:
    def __init__(self, kind: str, labeler: str, judge_template: str = "", backend: str = "hf",
                 options=None):
        self.kind, self.name = kind, labeler
        if kind == "function":
            module, _, function = labeler.partition(":")
            self.function = getattr(importlib.import_module(module), function)
        elif kind == "reward_model":
            self._load_reward_model(labeler, options)
        else:
            self._load_judge(labeler, judge_template, backend, options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = [json.loads(t) for t in batch.column("prompt_json").to_pylist()]
        completions = batch.column("completion").to_pylist()
        if self.kind == "function":
            scores, errors, fatal = self._call_function(prompts, completions)
        else:
            scores, errors = self._call_model(prompts, completions)
            fatal = [None] * len(scores)
        for name, values in (("score", scores), ("error", errors), ("fatal", fatal)):
            batch = batch.append_column(name, pa.array(values, LABEL_COLUMNS[name]))
        return batch

    def _call_function(self, prompts: list, completions: list):
        scores, errors, fatal = [], [], []
        for prompt, completion in zip(prompts, completions):
            try:
                value = self.function(prompt, completion)
            except Exception as error:  # the sample is quarantined with what it raised
                scores.append(None), errors.append(f"{type(error).__name__}: {error}"[:500]), fatal.append(None)
                continue
            score, problem = as_score(value)
            scores.append(score), errors.append(None), fatal.append(problem)
        return scores, errors, fatal

    def _call_model(self, prompts: list, completions: list) -> tuple[list, list]:
        """A model's scores for the batch; where the batch fails, each sample alone, so that only the
        samples at fault are quarantined (with the error)."""
        try:
            return self._model_scores(prompts, completions), [None] * len(prompts)
        except Exception:
            scores, errors = [], []
            for prompt, completion in zip(prompts, completions):
                try:
                    scores.append(self._model_scores([prompt], [completion])[0]), errors.append(None)
                except Exception as error:
                    scores.append(None), errors.append(f"{type(error).__name__}: {error}"[:500])
            return scores, errors

    def _load_reward_model(self, folder: str, options) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, trust_remote_code=options.trust_remote_code, dtype=getattr(torch, options.dtype)).to(self.device)
        self.model.eval()
        self.max_len = options.max_model_len
        if self.model.config.pad_token_id is None:  # it finds each row's last token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # a text too long loses the prompt's start, not the answer's end

    def _load_judge(self, folder: str, template: str, backend: str, options) -> None:
        from actors.reference import BACKENDS
        from pipeline.models import load_tokenizer

        self.tokenizer = load_tokenizer(folder, options.trust_remote_code)
        self.template, self.max_len = template, options.max_model_len
        self.engine = BACKENDS[backend](folder, self.tokenizer.pad_token_id, options)
        self.answers = [self.tokenizer(" yes", add_special_tokens=False)["input_ids"],
                        self.tokenizer(" no", add_special_tokens=False)["input_ids"]]

    def _model_scores(self, prompts: list, completions: list) -> list[float]:
        if self.kind == "reward_model":
            return reward_scores(self.model, self.tokenizer, prompts, completions, self.max_len)
        yes, no = self.answers
        room = self.max_len - max(len(yes), len(no))  # a question longer than the engine takes loses its start
        asked = [self.tokenizer(self.template.format(prompt=plain_prompt(p), completion=c))["input_ids"][-room:]
                 for p, c in zip(prompts, completions)]
        logps = np.asarray(self.engine.score(asked + asked, [yes] * len(asked) + [no] * len(asked)), np.float64)
        n = len(asked)
        return (1.0 / (1.0 + np.exp(logps[n:] - logps[:n]))).tolist()  # P(yes) / (P(yes) + P(no))


def reward_scores(model, tokenizer, prompts: list, completions: list, max_length: int,
                  batch_size: int = 16) -> list[float]:
    """A sequence-classification model's score of each (prompt, completion): a conversation through
    the tokenizer's chat template (as TRL's reward models are trained), text joined."""
    import torch

    texts = [tokenizer.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
             if isinstance(p, list) and tokenizer.chat_template else plain_prompt(p) + c
             for p, c in zip(prompts, completions)]
    scores = []
    for first in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[first:first + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length).to(model.device)
        with torch.no_grad():
            logits = model(**encoded).logits.float()
        scores += (logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]).tolist()
    return scores


def as_score(value) -> tuple[float | None, str | None]:
    """A labeler's return as a score, or what is wrong with it: a bool (numpy's too) is 1 / 0, a
    finite real number itself; anything else (None, text, NaN, infinity, a list) is refused."""
    if isinstance(value, (bool, np.bool_)):
        return float(value), None
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return float(value), None
    return None, f"returned {value!r} ({type(value).__name__}); expected a bool or a finite number"


def label_samples(samples_path: str, kind: str, labeler: str, judge_template: str, backend: str,
                  options: ScoringOptions, where: str, replicas: int, gpus: float, selection, threshold: float) -> dict:
    """Ray task: the labeler over the samples (its pool: one actor for a function, `replicas` for a
    model), its verdicts checked; then the round's feedback written (selection = (rule, threshold, round,
    mask_truncated)), or the held-out result returned."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # a task's bars only fill the driver's log
    dataset = ray.data.read_parquet(samples_path).map_batches(
        Labeler, fn_constructor_kwargs={"kind": kind, "labeler": labeler, "judge_template": judge_template,
                                        "backend": backend, "options": options},
        batch_format="pyarrow", batch_size=64, compute=ray.data.ActorPoolStrategy(size=1 if kind == "function"
                                                                                  else replicas),
        num_cpus=1, num_gpus=0 if kind == "function" else gpus)
    table = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
    check_verdicts(table, labeler, where)
    if selection is None:
        return held_out_result(table, threshold)
    rule, threshold, r, mask_truncated = selection
    folder = os.path.dirname(samples_path)
    return select(table, rule, threshold, r, os.path.join(folder, "feedback.parquet"),
                  os.path.join(folder, "quarantined.parquet"), mask_truncated)
