"""Held-out checks on the workers, the one evaluator of a run: the eval/ metrics (`eval_step`,
all-reduced like a training step) every eval.eval_steps steps, and before the first update and
at the end the same numbers plus the share of greedy generations that match eval.property_regex.
summary.json, the retrain gate and metrics.jsonl all read these.

Implied reward r = log pi(y|x) - log pi_ref(y|x), with z0 estimated from the held-out KL pairs
as in training. A desirable row counts as right when r - z0 > 0, an undesirable one when
r - z0 < 0 (so with policy == reference every row sits at 0 and none is right).
"""

import math
import re

import pyarrow.parquet as pq
import torch

from pipeline.train.engines import all_reduce_sum, world_size
from pipeline.train.step import EVAL_METRICS, SCORED_COLUMNS, MicroBatch, StepSettings, eval_step


class HeldOut:
    """This rank's share of the held-out set: every world_size-th scored row for the eval/
    metrics, and every world_size-th of its first eval.num_generations distinct prompts for the
    generations."""

    def __init__(self, scored_path: str, eval_config, rank: int, pairs: bool = False):
        table = pq.read_table(scored_path, columns=list(SCORED_COLUMNS))
        world = world_size()
        if pairs:  # kto_pairwise: every world_size-th pair, both of its rows
            mine = [row for k in range(rank, table.num_rows // 2, world) for row in (2 * k, 2 * k + 1)]
        else:
            mine = list(range(rank, table.num_rows, world))
        self.rows = MicroBatch.from_table(table, mine)
        self.pattern = eval_config.property_regex
        self.max_new_tokens = eval_config.max_new_tokens
        prompts = []
        if self.pattern:
            distinct = dict.fromkeys(tuple(p) for p in table.column("prompt_ids").to_pylist())
            prompts = [list(p) for p in distinct][:eval_config.num_generations]
        self.prompts = prompts[rank::world]
        self.generate_calls = math.ceil(len(prompts) / world)  # the busiest rank's share

    def metrics(self, engine, settings: StepSettings) -> dict:
        """The eval/ metrics of the policy as it is now (every rank calls it)."""
        return eval_step(engine, self.rows, settings)

    def check(self, engine, settings: StepSettings, tokenizer, eval_metrics: dict = None) -> dict:
        """The held-out check reported before and after training: the eval/ metrics (this step's,
        if already computed) without their prefix, and the generations' property share."""
        eval_metrics = eval_metrics or self.metrics(engine, settings)
        result = {name: eval_metrics[f"eval/{name}"] for name in EVAL_METRICS}
        if self.pattern:
            result.update(self._property_share(engine, tokenizer, settings.pad_token_id))
        return result

    @torch.inference_mode()
    def _property_share(self, engine, tokenizer, pad_token_id: int) -> dict:
        """Greedy generations of this rank's prompts (one at a time, no padding), matched against
        eval.property_regex and counted across ranks; the sample is rank 0's first (the set's first
        prompt). ZeRO-3 gathers parameters in every forward, so there every rank runs as many
        generations as the busiest one, in lock step (`synced_gpus`)."""
        model = engine.module
        device = next(model.parameters()).device
        regex = re.compile(self.pattern)
        lock_step = engine.equal_forwards and world_size() > 1
        calls = self.generate_calls if lock_step else len(self.prompts)
        texts = []
        model.eval()
        try:
            for i in range(calls):
                ids = self.prompts[i] if i < len(self.prompts) else [pad_token_id]  # (a lock-step filler)
                output = model.generate(input_ids=torch.tensor([ids], device=device),
                                        max_new_tokens=self.max_new_tokens, do_sample=False,
                                        pad_token_id=pad_token_id, synced_gpus=lock_step)
                if i < len(self.prompts):
                    texts.append(tokenizer.decode(output[0, len(ids):], skip_special_tokens=True))
        finally:
            model.train()
        counts = all_reduce_sum(torch.tensor([sum(bool(regex.search(t)) for t in texts), len(texts)],
                                             dtype=torch.float64, device=device))
        result = {"property_share": counts[0].item() / max(counts[1].item(), 1)}
        if texts:
            result["sample_generation"] = texts[0]
        return result
