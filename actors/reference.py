"""The reference actor: summed completion log-probs under the frozen reference model, for
each row and for its KL pair, computed once before training so no trainer holds a reference.

Used as a Ray Data callable class on an actor pool (`Dataset.map_batches(ReferenceScorer,
compute=ActorPoolStrategy(size=N))`). A backend turns token ids into summed log-probs; every
backend takes the same token ids and returns the same columns, so the trainer cannot tell
which engine scored its data. `hf` (a transformers forward in float32) is here; `vllm` plugs
in beside it.
"""

import numpy as np
import torch

from pipeline.logprobs import collate, length_grouped_batches, sequence_logps
from pipeline.models import load_causal_lm


class HFBackend:
    """A transformers forward, float32 log-softmax, length-grouped batches under a token budget."""

    def __init__(self, model_path: str, pad_token_id: int, max_tokens_per_batch: int,
                 trust_remote_code: bool = False):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(model_path, trust_remote_code).to(self.device).eval()
        self.pad_token_id = pad_token_id
        self.max_tokens_per_batch = max_tokens_per_batch

    @torch.inference_mode()
    def score(self, prompt_ids: list, completion_ids: list) -> np.ndarray:
        lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
        out = np.empty(len(lengths), dtype=np.float32)
        for group in length_grouped_batches(lengths, self.max_tokens_per_batch, max_rows=64):
            batch = collate([prompt_ids[i] for i in group], [completion_ids[i] for i in group],
                            self.pad_token_id, self.device)
            out[group] = sequence_logps(self.model, batch).cpu().numpy()
        return out


BACKENDS = {"hf": HFBackend}


class ReferenceScorer:
    """Adds `ref_logp` (the row's completion) and `ref_kl_logp` (its KL completion) to a batch."""

    def __init__(self, backend: str, model_path: str, pad_token_id: int, max_tokens_per_batch: int = 4096,
                 trust_remote_code: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"reference backend {backend!r} is not available; choose one of {sorted(BACKENDS)}")
        self.backend = BACKENDS[backend](model_path, pad_token_id, max_tokens_per_batch, trust_remote_code)

    def __call__(self, batch: dict) -> dict:
        prompts = [list(p) for p in batch["prompt_ids"]]
        completions = [list(c) for c in batch["completion_ids"]]
        kl_completions = [list(c) for c in batch["kl_completion_ids"]]
        # One call over both halves lets the length grouping mix them and pad less.
        scores = self.backend.score(prompts + prompts, completions + kl_completions)
        n = len(prompts)
        return {"row_index": batch["row_index"], "ref_logp": scores[:n], "ref_kl_logp": scores[n:]}
