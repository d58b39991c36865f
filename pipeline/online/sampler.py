"""The sampler: a Ray actor holding the current policy in a generation engine (a vLLM engine, or
transformers' generate where vLLM cannot run), alive across rounds so that a round's new weights
can be loaded into it in place.

It samples a round's prompts from the policy it holds and writes the samples to Parquet (the
driver gets counts and paths, never the samples), and gets the next policy by `sync`: `in_place`
loads the round's safetensors into the running engine (vLLM's `reload_weights`, transformers'
`load_state_dict`), `reload` builds a new engine from the round's model folder.

The engines are the reference actor's backends (actors/reference.py) with generation added: the
same loader, dtype and options, and the same `score` (summed log-probs of given completions), which
is how a test checks that the sampler holds exactly the trainer's weights after a sync.
"""

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from actors.reference import HFBackend, ScoringOptions, VLLMBackend
from pipeline.cache import publish_file
from pipeline.data.tokenize import appends_eos, cut_prompt

SAMPLE_SCHEMA = pa.schema([("prompt_index", pa.int64()), ("prompt_json", pa.string()), ("sample", pa.int32()),
                           ("completion", pa.string()), ("completion_tokens", pa.int32()), ("finished", pa.bool_())])
HF_SEQUENCES_PER_GENERATE = 64  # prompts x samples in one generate call (bounds its KV cache)


@dataclass
class Sampling:
    """What vLLM's SamplingParams calls them."""
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int

    @classmethod
    def from_config(cls, online, seed: int) -> "Sampling":
        return cls(online.samples_per_prompt, online.temperature, online.top_p, online.max_tokens, seed)


class HFEngine(HFBackend):
    def generate(self, prompt_ids: list[list[int]], sampling: Sampling, stop: list[int]) -> list[list[list[int]]]:
        """n completions a prompt (token ids, up to and without the first stop id): seeded once for the
        whole call, so the same prompts, weights and seed give the same samples."""
        import torch

        greedy = sampling.temperature == 0
        torch.manual_seed(sampling.seed)
        per_call = max(1, HF_SEQUENCES_PER_GENERATE // sampling.n)
        out = []
        for first in range(0, len(prompt_ids), per_call):
            chunk = prompt_ids[first:first + per_call]
            width = max(map(len, chunk))
            ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            with torch.no_grad():
                generated = self.model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=not greedy, max_new_tokens=sampling.max_tokens,
                    num_return_sequences=1 if greedy else sampling.n, pad_token_id=self.pad_token_id,
                    eos_token_id=stop, **({} if greedy else {"temperature": sampling.temperature,
                                                            "top_p": sampling.top_p, "top_k": 0}))
            rows = [_until_stop(row, stop) for row in generated[:, width:].tolist()]
            per_prompt = 1 if greedy else sampling.n
            out += [rows[i * per_prompt:(i + 1) * per_prompt] * (sampling.n if greedy else 1)
                    for i in range(len(chunk))]
        return out

    def load_weights(self, folder: str) -> None:
        """The folder's safetensors into the running model, in place (tied weights stay tied)."""
        import glob

        import torch
        from safetensors.torch import load_file

        state = {}
        for file in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            state.update(load_file(file, device=str(self.device)))
        with torch.no_grad():
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise ValueError(f"{folder}: its weights do not fit the sampler's model (missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]})")


class VLLMEngine(VLLMBackend):
    def __init__(self, model_path: str, pad_token_id: int, options: ScoringOptions):
        import torch

        # vLLM's CPU build cannot rewind a seeded request's generator when it discards the token of a
        # partly prefilled prompt ("RuntimeError: CPU Generator does not use offset", once a round's
        # prompts x samples pass its 4,096 tokens a step): whole prompts a step there.
        cpu = {} if torch.cuda.is_available() else {
            "enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, options.max_model_len)}
        super().__init__(model_path, pad_token_id, options, **cpu)

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling, stop: list[int]) -> list[list[list[int]]]:
        """n completions a prompt; prompt i is seeded with seed + i (vLLM seeds each request), so a
        prompt's samples do not depend on what else is in the batch."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_tokens, seed=sampling.seed + i, stop_token_ids=stop,
                                 detokenize=False) for i in range(len(prompt_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        return [[_until_stop(list(c.token_ids), stop) for c in output.outputs] for output in outputs]

    def load_weights(self, folder: str) -> None:
        """vLLM's in-place reload from a model folder; cached prefixes were computed with the old weights.
        A head tied to the embeddings is prepared again: vLLM's CPU build keeps a packed copy of it that
        its reload leaves stale (measured: 0.14 nats off on SmolLM2 after an embedding-only change)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})
        self.llm.apply_model(_prepare_tied_head)
        self.llm.reset_prefix_cache()


def _prepare_tied_head(model) -> None:
    """In the vLLM worker: a tied output head's post-load processing again (a no-op on GPUs)."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if head is not None and method is not None and getattr(model.config, "tie_word_embeddings", False):
        method.process_weights_after_loading(head)


ENGINES = {"hf": HFEngine, "vllm": VLLMEngine}


def _until_stop(ids: list[int], stop: list[int]) -> list[int]:
    ends = [ids.index(token) for token in stop if token in ids]
    return ids[:min(ends)] if ends else ids


def stop_ids(model_path: str, tokenizer) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS and the model's generation config's (Llama 3
    ends a turn with <|eot_id|>, listed there beside <|end_of_text|>)."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} - {None}
    try:
        configured = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json
        configured = None
    ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return sorted(ids)


class Sampler:
    """Ray actor: the current policy, its tokenizer, and the rendering of prompts as the data stage
    renders them (pipeline/data/tokenize.py), so a sample is scored and trained on the prompt it was
    sampled from."""

    def __init__(self, backend: str, model_path: str, tokenizer_path: str, options: ScoringOptions,
                 max_prompt_length: int):
        from pipeline.models import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path, options.trust_remote_code)
        self.appends_eos = appends_eos(self.tokenizer)
        self.stop = stop_ids(model_path, self.tokenizer)
        self.backend, self.options, self.max_prompt_length = backend, options, max_prompt_length
        if backend == "hf":
            import torch

            # Ray gives an actor that books no CPU one thread; the sampler runs alone in its phase
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        self.engine = ENGINES[backend](model_path, self.tokenizer.pad_token_id, options)
        self.model_path = model_path

    def prompt_ids(self, prompt) -> list[int]:
        """A prompt's token ids as the data stage makes them: a conversation through the chat template
        with the generation prompt; text with the tokenizer's special tokens, no final EOS; cut from
        the left to max_prompt_length keeping the BOS."""
        tok = self.tokenizer
        if isinstance(prompt, list):
            ids = tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt, add_special_tokens=True)["input_ids"]
            ids = ids[:-1] if self.appends_eos else ids
        return cut_prompt(ids, tok.bos_token_id, self.max_prompt_length)

    def completion_text(self, prompt: list[int], completion: list[int]) -> str:
        """The completion's text as it reads after its prompt: decoded together with the prompt and the
        prompt's text cut off (alone, a SentencePiece completion would lose its leading space)."""
        decode = self.tokenizer.decode
        whole, head = decode(prompt + completion, skip_special_tokens=True), decode(prompt, skip_special_tokens=True)
        return whole[len(head):] if whole.startswith(head) else decode(completion, skip_special_tokens=True)

    def sample(self, prompts_path: str, rows: list[int] | None, sampling: Sampling, out_path: str) -> dict:
        """Sample the prompts at `rows` of a prompt file (all of them: None) into out_path (written
        whole by pipeline/cache.py's publish_file: present means complete, and is kept: a run killed after
        sampling and before its ledger said so trains on the samples it drew). Returns counts and seconds."""
        started = time.time()
        if os.path.exists(out_path):
            tokens = pq.read_table(out_path, columns=["completion_tokens"]).column(0)
            return {"samples": len(tokens), "tokens": sum(tokens.to_pylist()), "seconds": 0.0, "reused": True}
        table = pq.read_table(prompts_path)
        rows = list(range(table.num_rows)) if rows is None else rows
        texts = table.column("prompt_json").take(pa.array(rows, pa.int64())).to_pylist()
        prompts = [self.prompt_ids(json.loads(t)) for t in texts]
        completions = self.engine.generate(prompts, sampling, self.stop)
        columns = {name: [] for name in SAMPLE_SCHEMA.names}
        for row, text, prompt, samples in zip(rows, texts, prompts, completions):
            for k, ids in enumerate(samples):
                for name, value in zip(SAMPLE_SCHEMA.names, (
                        row, text, k, self.completion_text(prompt, ids), len(ids), len(ids) < sampling.max_tokens)):
                    columns[name].append(value)
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        publish_file(out_path, lambda file: pq.write_table(pa.table(columns, schema=SAMPLE_SCHEMA), file))
        return {"samples": len(columns["sample"]), "tokens": sum(columns["completion_tokens"]),
                "seconds": round(time.time() - started, 2), "sampling": asdict(sampling)}

    def sync(self, model_path: str, mode: str) -> float:
        """Take the weights of `model_path` (in_place or reload); seconds taken."""
        started = time.time()
        if model_path != self.model_path:
            if mode == "in_place":
                self.engine.load_weights(model_path)
            else:
                self.engine = None  # the old engine's memory goes before the new one loads
                import gc

                gc.collect()
                self.engine = ENGINES[self.backend](model_path, self.tokenizer.pad_token_id, self.options)
            self.model_path = model_path
        return round(time.time() - started, 3)

    def score(self, prompt_ids: list, completion_ids: list) -> list[float]:
        """Summed log-probs of the completions under the weights the engine holds."""
        return [float(x) for x in self.engine.score(prompt_ids, completion_ids)]


class SamplerPool:
    """online.num_samplers Sampler actors, on the driver's side: every sync goes to all of them, and a
    call's prompts are split among them in contiguous shares (prompt i keeps the seed it has with one
    vLLM sampler: each share's seed starts at its first index), their parts joined into one file."""

    def __init__(self, count: int, num_gpus: float, *args):
        import ray

        # Idle while the workers train, a sampler books no CPU (the loop runs one phase at a time).
        self.actors = [ray.remote(Sampler).options(num_cpus=0, num_gpus=num_gpus).remote(*args) for _ in range(count)]

    def stop(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

    def sync(self, model_path: str, mode: str) -> float:
        import ray

        return max(ray.get([actor.sync.remote(model_path, mode) for actor in self.actors]))

    def sample(self, prompts_path: str, rows: list[int], sampling: Sampling, out_path: str) -> dict:
        import ray

        size = -(-len(rows) // len(self.actors))
        starts = list(range(0, len(rows), size))
        if os.path.exists(out_path) or len(starts) == 1:
            return ray.get(self.actors[0].sample.remote(prompts_path, rows, sampling, out_path))
        parts = [f"{out_path}.part{j}" for j in range(len(starts))]
        stats = ray.get([actor.sample.remote(prompts_path, rows[start:start + size],
                                             dataclasses.replace(sampling, seed=sampling.seed + start), part)
                         for actor, start, part in zip(self.actors, starts, parts)])
        ray.get(ray.remote(join_parts).options(num_cpus=0).remote(parts, out_path))
        return {"samples": sum(s["samples"] for s in stats), "tokens": sum(s["tokens"] for s in stats),
                "seconds": max(s["seconds"] for s in stats), "sampling": stats[0]["sampling"]}


def join_parts(parts: list[str], out_path: str) -> None:
    """Ray task: the samplers' parts as one file, in order (published whole; the parts go after)."""
    joined = pa.concat_tables([pq.read_table(part) for part in parts])
    publish_file(out_path, lambda file: pq.write_table(joined, file))
    for part in parts:
        os.remove(part)
