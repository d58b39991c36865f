"""The fixed cost of a small run's Ray Train phase on an embedded Ray: Ray Train's controller as Ray
ships it (a PreemptionWatcher actor, a health check every 2 s) beside ours (pipeline/fit.py's
EMBEDDED_RAY_TRAIN: no watcher, a check every 0.5 s). Each run is `launch.py train` in a process of
its own on a tiny random-init model, 4 steps on 2 workers, the reference already cached; runs
alternate. Prints each run's train_time_s (the Ray Train phase) and wall_time_s.

    python benchmarks/bench_embedded_fit.py [--repeats 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.tiny import make_tiny_model  # noqa: E402

RAY_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0"}


def run(folder: str, model: str, name: str, env: dict) -> dict:
    settings = {"model.name_or_path": model, "data.path": f"{folder}/data/train.parquet", "data.generate_demo": True,
                "eval.path": "null", "eval.property_regex": "null", "kto.max_length": 64, "kto.max_prompt_length": 32,
                "training.max_steps": 4, "training.per_device_train_batch_size": 4, "output.report_to": "[]",
                "output.output_dir": f"{folder}/runs", "output.run_name": name,
                "reference.cache_dir": f"{folder}/cache", "model.cache_dir": f"{folder}/models"}
    overrides = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), "train", *overrides], cwd=folder,
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    with open(f"{folder}/runs/{name}/summary.json") as f:
        summary = json.load(f)
    return {"train_time_s": summary["train_time_s"], "wall_time_s": summary["wall_time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = make_tiny_model(os.path.join(folder, "tiny"))
        base_env = {k: v for k, v in os.environ.items() if k not in RAY_DEFAULTS}
        run(folder, model, "warm-up", base_env)  # the demo data and the reference cache
        results = {"Ray's defaults": [], "ours (embedded)": []}
        for repeat in range(args.repeats):
            results["Ray's defaults"].append(run(folder, model, f"defaults-{repeat}", {**base_env, **RAY_DEFAULTS}))
            results["ours (embedded)"].append(run(folder, model, f"ours-{repeat}", base_env))
    print("| controller | train_time_s (each run) | wall_time_s (each run) |\n| --- | --- | --- |")
    for label, runs in results.items():
        print(f"| {label} | {', '.join(str(r['train_time_s']) for r in runs)} | "
              f"{', '.join(str(r['wall_time_s']) for r in runs)} |")


if __name__ == "__main__":
    main()
