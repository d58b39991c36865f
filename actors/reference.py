"""The reference actor: summed completion log-probs under the frozen reference model, for
each row and for its KL pair, computed once before training so no trainer holds a reference.

Used as a Ray Data callable class on an actor pool (`Dataset.map_batches(ReferenceScorer,
compute=ActorPoolStrategy(size=N))`); the model or engine loads once per actor. A backend
turns token ids into summed log-probs: both take the same token ids and return the same
numbers (to float32 precision), so the trainer cannot tell which engine scored its data.

torch, transformers and vLLM are imported inside the backends, in the actor's process: the
driver imports this module only to hand the class to Ray Data.
"""

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class ScoringOptions:
    dtype: str = "float32"
    max_tokens_per_batch: int = 4096  # hf
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1  # vllm
    gpu_memory_utilization: float = 0.9  # vllm on GPUs
    max_model_len: int = 1024  # vllm: the longest sequence it will be sent
    cache_root: str = ".cache/vllm"  # vllm's own compile and kernel caches
    score_kl: bool = True  # false for losses without z0 (apo_zero_unpaired): ref_kl_logp is NaN

    @classmethod
    def from_config(cls, config) -> "ScoringOptions":
        """The options of a run's reference actors, from its `reference` and `model` sections."""
        r = config.reference
        return cls(dtype=r.dtype, max_tokens_per_batch=r.max_tokens_per_batch,
                   trust_remote_code=config.model.trust_remote_code, tensor_parallel_size=r.tensor_parallel_size,
                   gpu_memory_utilization=r.gpu_memory_utilization, cache_root=os.path.join(r.cache_dir, "vllm"),
                   score_kl=config.kto.loss_type != "apo_zero_unpaired")


class HFBackend:
    """A transformers forward, float32 log-softmax, length-grouped batches under a token budget."""

    def __init__(self, model_path: str, pad_token_id: int, options: ScoringOptions):
        import torch

        from pipeline.models import load_causal_lm

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(False)  # it plans anew for every batch shape (see train.py)
        self.model = load_causal_lm(model_path, options.trust_remote_code, getattr(torch, options.dtype))
        self.model = self.model.to(self.device).eval()
        self.pad_token_id = pad_token_id
        self.max_tokens_per_batch = options.max_tokens_per_batch

    def score(self, prompt_ids: list, completion_ids: list) -> np.ndarray:
        from pipeline.logprobs import score_sequences

        return score_sequences(self.model, prompt_ids, completion_ids, self.pad_token_id, self.device,
                               self.max_tokens_per_batch).numpy()


class VLLMBackend:
    """A vLLM engine asked for the log-prob of every prompt token (`prompt_logprobs=0`: the
    actual token only) of prompt + completion, generating one throw-away token; the
    completion positions are summed. Runs on vLLM's CUDA build or its CPU build alike."""

    def __init__(self, model_path: str, pad_token_id: int, options: ScoringOptions, **engine_args):
        import torch

        # In-process engine: starts in seconds inside a Ray actor and exits cleanly.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CACHE_ROOT", os.path.abspath(options.cache_root))
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; scoring keeps no long-lived cache
        from vllm import LLM, SamplingParams

        self.llm = LLM(
            model=model_path,
            dtype=options.dtype,
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization,
            max_model_len=options.max_model_len,
            trust_remote_code=options.trust_remote_code,
            skip_tokenizer_init=True,  # token ids in, numbers out: the text was tokenized once, upstream
            enforce_eager=True,
            # Requests that ask for prompt log-probs skip prefix-cache reads anyway (measured: the
            # same values with it on and off), so the cache would only cost memory.
            enable_prefix_caching=False,
            **engine_args,
        )
        self.sampling = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)

    def score(self, prompt_ids: list, completion_ids: list) -> np.ndarray:
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=p + c) for p, c in zip(prompt_ids, completion_ids)]
        outputs = self.llm.generate(requests, self.sampling, use_tqdm=False)
        out = np.empty(len(requests), dtype=np.float32)
        for i, (output, prompt, completion) in enumerate(zip(outputs, prompt_ids, completion_ids)):
            positions = output.prompt_logprobs  # position 0 has none; position t holds token t's log-prob
            out[i] = sum(positions[len(prompt) + j][token].logprob for j, token in enumerate(completion))
        return out


BACKENDS = {"hf": HFBackend, "vllm": VLLMBackend}


class ReferenceScorer:
    """Adds `ref_logp` (the row's completion) and `ref_kl_logp` (its KL completion) to a batch."""

    def __init__(self, backend: str, model_path: str, pad_token_id: int, options: ScoringOptions):
        if backend not in BACKENDS:
            raise ValueError(f"reference backend {backend!r} is not available; choose one of {sorted(BACKENDS)}")
        self.backend = BACKENDS[backend](model_path, pad_token_id, options)
        self.score_kl = options.score_kl

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch.column("prompt_ids").to_pylist()  # plain Python ints, as vLLM asserts
        completions = batch.column("completion_ids").to_pylist()
        kl_completions = batch.column("kl_completion_ids").to_pylist() if self.score_kl else []
        # One call over both halves: the hf length grouping mixes them and pads less, and vLLM
        # schedules them all in one submission.
        scores = np.asarray(self.backend.score(prompts + prompts[:len(kl_completions)], completions + kl_completions),
                            np.float32)
        n = len(prompts)
        kl_scores = scores[n:] if self.score_kl else np.full(n, np.nan, np.float32)
        return batch.append_column("ref_logp", pa.array(scores[:n])).append_column("ref_kl_logp", pa.array(kl_scores))
