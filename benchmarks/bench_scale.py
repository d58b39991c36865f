"""End to end at two sizes: does every process's memory stay flat as the feedback grows, and the
training step's speed with it? `launch.py train` (embedded Ray) on hh-rlhf-shaped rows, tiny model as
policy and reference, 2 training workers, 20 steps, each size in a fresh process tree, side by side.

    python benchmarks/bench_scale.py [--sizes 200000,2000000] [--out runs/bench-scale]

Rows: bench_data.py's (the shared hh-rlhf KTO rows repeated, a row number appended to each prompt).
Stages, from the run's log lines (their timestamps) and a watch on the reference cache folder:
data = the cache folder's first entry (the data stage's staging folder) to the `data (train)` line;
reference = to the `reference (train)` line; step file = to the `training:` line; training = to the
process's exit (worker start-up, 20 steps, the final save). Memory: VmHWM (peak RSS, shared
object-store pages that a process maps included) of every process of the tree, read every 0.5 s from
/proc by a thread of this process, grouped by role (the driver, each training worker, each reference
actor, the step-file task, Ray Data workers, raylet, ...). Object store: the raylet's own figure of
plasma bytes in use (what `ray memory --stats-only` prints), asked every 0.5 s over gRPC, its peak.
Disk: du of reference.cache_dir (data stage output, scored file, step file) over the rows read.
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from benchmarks.bench_data import HH_RLHF, write_rows  # noqa: E402

# Role of a process, from any title it showed (first match wins; a Ray worker keeps the most specific).
ROLES = [("train worker", "RayTrainWorker"), ("reference actor", "ReferenceScorer"),
         ("step-file task", "write_step_file"), ("train controller", "TrainController"),
         ("raylet", "/raylet"), ("gcs_server", "gcs_server"), ("ray data / task worker", "ray::"),
         ("ray system", "")]
STAGE_LINES = [("data", re.compile(r"kto: data \(train\)")), ("reference", re.compile(r"kto: reference \(train\)")),
               ("step file", re.compile(r"kto: training: \d+ steps"))]


def bench_config(path: str, work: str, data: str, model: str, steps: int, workers: int) -> None:
    import yaml

    config = {"data": {"path": data, "generate_demo": False},
              "model": {"name_or_path": model, "cache_dir": os.path.join(work, "models")},
              "reference": {"cache_dir": os.path.join(work, "cache")},
              "kto": {"max_length": 128, "max_prompt_length": 96},
              "training": {"max_steps": steps, "per_device_train_batch_size": 8},
              "scaling": {"num_workers": workers},
              "eval": {"path": None, "property_regex": None},
              "output": {"output_dir": os.path.join(work, "runs"), "run_name": "scale", "report_to": []}}
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)


def status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) // 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssShmem") if k in fields}


class Watch:
    """A thread sampling the process tree of `pid` (and the cache folder), and one asking the raylet
    for the object store's use, until stop()."""

    def __init__(self, pid: int, cache_dir: str):
        import psutil

        self.root, self.cache_dir, self.stop_event = psutil.Process(pid), cache_dir, threading.Event()
        self.procs: dict[int, dict] = {}  # pid -> {titles, hwm, anon, shmem}
        self.cache_first_entry = None
        self.store_peak, self.store_error = 0, None
        self.threads = [threading.Thread(target=self._tree, daemon=True),
                        threading.Thread(target=self._store, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _tree(self) -> None:
        import psutil

        while not self.stop_event.is_set():
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for process in tree:
                try:
                    title = " ".join(process.cmdline())[:300]
                    mem = status(process.pid)
                except (psutil.Error, OSError):
                    continue
                seen = self.procs.setdefault(process.pid, {"titles": set(), "hwm": 0, "anon": 0, "shmem": 0})
                seen["titles"].add(title)
                if mem.get("VmHWM", 0) > seen["hwm"]:  # when the peak last rose: which stage set it
                    seen["hwm"], seen["hwm_at"] = mem["VmHWM"], time.time()
                seen["anon"] = max(seen["anon"], mem.get("RssAnon", 0))
                seen["shmem"] = max(seen["shmem"], mem.get("RssShmem", 0))
            if self.cache_first_entry is None and os.path.isdir(self.cache_dir) and os.listdir(self.cache_dir):
                self.cache_first_entry = time.time()
            time.sleep(0.5)

    def _store(self) -> None:
        """The raylet's plasma bytes in use, through the call behind `ray memory --stats-only`."""
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)  # the token the run's Ray uses, if any
        state = None
        while not self.stop_event.is_set():
            try:
                if state is None:
                    address = next(found.group(1) for p in list(self.procs.values()) for t in list(p["titles"])
                                   if (found := re.search(r"--gcs-address=(\S+)", t)))  # the raylet's flag
                    connected = get_state_from_address(address)
                    node = next(n for n in connected.node_table() if n["Alive"])
                    state = connected
                reply = get_memory_info_reply(state, node["NodeManagerAddress"], node["NodeManagerPort"], 2.0)
                self.store_peak = max(self.store_peak, reply.store_stats.object_store_bytes_used)
            except StopIteration:
                pass  # Ray is not up yet
            except Exception as error:  # Ray going down at the end, or not reachable: keep the peak so far
                self.store_error = repr(error)[:200]
            time.sleep(0.5)

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=5)


def roles(procs: dict, driver: int, workers_json: str, stage_at) -> dict[str, dict]:
    """{role: {peak VmHWM, the stage it was reached in, peak RssAnon, peak RssShmem (MiB), processes}},
    training workers by rank."""
    ranks = {}
    if os.path.exists(workers_json):
        with open(workers_json) as f:
            ranks = {w["pid"]: w["rank"] for w in json.load(f)}
    out: dict[str, dict] = {}
    for pid, seen in procs.items():
        titles = " | ".join(sorted(seen["titles"]))
        if pid == driver:
            role = "driver"
        elif pid in ranks:
            role = f"train worker rank {ranks[pid]}"
        else:
            role = next(name for name, marker in ROLES if marker in titles)
        entry = out.setdefault(role, {"peak_rss_mib": 0, "peak_anon_mib": 0, "peak_shmem_mib": 0, "processes": 0})
        entry["processes"] += 1
        if seen["hwm"] > entry["peak_rss_mib"]:
            entry["peak_rss_stage"] = stage_at(seen.get("hwm_at", 0))
        for key, field in (("peak_rss_mib", "hwm"), ("peak_anon_mib", "anon"), ("peak_shmem_mib", "shmem")):
            entry[key] = max(entry[key], seen[field])
    return dict(sorted(out.items()))


def stage_times(log_path: str, started: float, data_started: float, ended: float) -> dict:
    marks = {}
    with open(log_path, errors="replace") as f:
        for line in f:
            for name, pattern in STAGE_LINES:
                if name not in marks and pattern.search(line):
                    marks[name] = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    if len(marks) < len(STAGE_LINES):
        return {"missing_log_lines": sorted({n for n, _ in STAGE_LINES} - set(marks))}
    return {"start-up": data_started - started, "data": marks["data"] - data_started,
            "reference": marks["reference"] - marks["data"], "step file": marks["step file"] - marks["reference"],
            "training": ended - marks["step file"], "total": ended - started}


def stage_clock(stages: dict, started: float):
    """t -> the stage running at time t (from the stages' durations, in order)."""
    def at(t: float) -> str:
        end = started
        for name in ("start-up", "data", "reference", "step file", "training"):
            end += stages.get(name, 0.0)
            if t <= end:
                return name
        return "shut-down"
    return at


def du_mib(path: str) -> float:
    return sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(path) for f in fs) / 2**20


def cache_breakdown(cache: str) -> dict:
    """MiB of the whole cache and of its parts: examples/ (data stage), the scored file, the step file."""
    scored = [p for p in glob.glob(os.path.join(cache, "**", "*-scored-*.parquet"), recursive=True)
              if "-steps-" not in p]
    steps = glob.glob(os.path.join(cache, "**", "*-steps-*.parquet"), recursive=True)
    return {"total_mib": du_mib(cache), "scored_mib": sum(os.path.getsize(p) for p in scored) / 2**20,
            "steps_mib": sum(os.path.getsize(p) for p in steps) / 2**20,
            "examples_mib": sum(du_mib(d) for d in glob.glob(os.path.join(cache, "*", "examples")))}


def run_size(size: int, args, model: str) -> dict:
    import statistics

    work = os.path.join(args.work, f"rows-{size}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    generated = time.time()
    write_rows(os.path.join(work, "data"), size)
    generated = time.time() - generated
    config = os.path.join(work, "bench.yaml")
    bench_config(config, work, os.path.join(work, "data"), model, args.max_steps, args.workers)
    ray_tmp = f"/tmp/bs{os.getpid()}-{size}"  # short: Ray's socket paths must stay under 108 characters
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
           "RAY_TMPDIR": ray_tmp}
    log_path = os.path.join(args.out, f"launch-{size}.log")
    print(f"[{size} rows] data written in {generated:.0f} s; training (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        started = time.time()
        child = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), "train", "--config", config],
                                 cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        watch = Watch(child.pid, os.path.join(work, "cache"))
        code = child.wait()
        ended = time.time()
    time.sleep(1.0)  # the last samples of Ray's processes as they go down
    watch.stop()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if code:
        with open(log_path) as f:
            sys.exit(f"launch.py train exited {code} at {size} rows:\n{f.read()[-3000:]}")
    run_dir = os.path.join(work, "runs", "scale")
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        step_times = [json.loads(line)["step_time_s"] for line in f]
    stages = stage_times(log_path, started, watch.cache_first_entry or started, ended)
    read, kept = summary["data"]["read"], summary["data"]["kept"]
    cache = cache_breakdown(os.path.join(work, "cache"))
    result = {
        "rows": size, "read": read, "kept": kept, "rejected": summary["data"]["rejected"], "stages_s": stages,
        "data_rows_per_s": read / stages["data"] if "data" in stages else None,
        "reference_rows_per_s": kept / stages["reference"] if "reference" in stages else None,
        "step_time_s_median": statistics.median(step_times[1:] or step_times),  # the first step warms up
        "step_time_s_mean": statistics.mean(step_times[1:] or step_times), "steps": len(step_times),
        "summary_wall_time_s": summary["wall_time_s"], "summary_train_time_s": summary["train_time_s"],
        "summary_driver_peak_rss_mib": summary["driver_peak_rss_mib"],
        "memory": roles(watch.procs, child.pid, os.path.join(run_dir, "workers.json"), stage_clock(stages, started)),
        "object_store_peak_mib": watch.store_peak / 2**20, "object_store_error": watch.store_error,
        "cache": cache, "cache_bytes_per_row": cache["total_mib"] * 2**20 / read,
        "titles": {pid: sorted(p["titles"]) for pid, p in watch.procs.items()},
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def table(results: list[dict]) -> list[str]:
    first, last = results[0], results[-1]
    head = f"{'':44}" + "".join(f"{r['rows']:>14,}" for r in results) + f"{'ratio':>10}"
    lines = [head]

    def row(name, values, fmt="{:>14.1f}", ratio=True):
        cells = "".join(fmt.format(v) if v is not None else f"{'-':>14}" for v in values)
        r = f"{values[-1] / values[0]:>9.2f}x" if ratio and len(values) > 1 and values[0] and values[-1] else ""
        lines.append(f"{name:44}{cells}{r}")

    for stage in ("start-up", "data", "reference", "step file", "training", "total"):
        row(f"wall s: {stage}", [r["stages_s"].get(stage) for r in results])
    row("data stage rows/s", [r["data_rows_per_s"] for r in results], "{:>14,.0f}")
    row("reference rows/s", [r["reference_rows_per_s"] for r in results], "{:>14,.0f}")
    row("step time s (median of 2..N)", [r["step_time_s_median"] for r in results], "{:>14.3f}")
    all_roles = sorted({role for r in results for role in r["memory"]})
    for role in all_roles:
        mem = [r["memory"].get(role, {}) for r in results]
        row(f"peak RSS MiB: {role}", [m.get("peak_rss_mib") for m in mem], "{:>14,.0f}")
        lines[-1] += "   peak in: " + " / ".join(m.get("peak_rss_stage", "?") for m in mem)
    for role in all_roles:
        mem = [r["memory"].get(role, {}) for r in results]
        row(f"  peak RssAnon MiB: {role}", [m.get("peak_anon_mib") for m in mem], "{:>14,.0f}")
    row("object store peak MiB", [r["object_store_peak_mib"] for r in results], "{:>14,.0f}")
    row("reference cache MiB", [r["cache"]["total_mib"] for r in results], "{:>14,.0f}")
    row("cache bytes / row read", [r["cache_bytes_per_row"] for r in results], "{:>14,.0f}")
    for part in ("examples", "scored", "steps"):
        row(f"  {part} MiB", [r["cache"][f"{part}_mib"] for r in results], "{:>14,.1f}")
    if len(results) > 1:
        over = [role for role in all_roles if role in first["memory"] and role in last["memory"]
                and last["memory"][role]["peak_rss_mib"] > 1.2 * first["memory"][role]["peak_rss_mib"]]
        lines.append(f"goal: every process's peak RSS at {last['rows']:,} <= 1.2x at {first['rows']:,}: "
                     + ("met" if not over else "NOT met by " + ", ".join(over)))
        lines.append("goal: training step at the larger size no slower: " + (
            "met" if last["step_time_s_median"] <= first["step_time_s_median"] * 1.05 else "NOT met")
            + " (within 5% noise)")
    lines.append(f"goal: data stage >= 4,000 rows/s on {os.cpu_count()} cores: " + ", ".join(
        f"{r['rows']:,}: {'met' if (r['data_rows_per_s'] or 0) >= 4000 else 'NOT met'}" for r in results))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="200000,2000000")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-scale"))
    parser.add_argument("--work", default=None, help="scratch folder for data, cache and runs (default: <out>/work)")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep each size's data, cache and run folders")
    parser.add_argument("--baseline", default=None, help="a scale-<rows>.json of an earlier run: the table's first "
                                                         "column (a size measured before, in its own process tree)")
    args = parser.parse_args()
    args.out = os.path.abspath(args.out)
    args.work = os.path.abspath(args.work or os.path.join(args.out, "work"))
    os.makedirs(args.out, exist_ok=True)
    from tiny import make_tiny_model
    import pyarrow.parquet as pq

    text = []
    if os.path.exists(HH_RLHF):  # the tokenizer learns real text, as tests/conftest.py's tiny_model does
        table_ = pq.read_table(HH_RLHF, columns=["prompt", "completion"]).slice(0, 400)
        text = table_.column("prompt").to_pylist() + table_.column("completion").to_pylist()
    model = make_tiny_model(os.path.join(args.work, "tiny-llama"), text)
    results = []
    if args.baseline:
        with open(args.baseline) as f:
            results.append(json.load(f))
    for size in [int(s) for s in args.sizes.split(",")]:
        results.append(run_size(size, args, model))
        with open(os.path.join(args.out, f"scale-{size}.json"), "w") as f:
            json.dump(results[-1], f, indent=1)
        print("\n".join(table(results)), flush=True)
    with open(os.path.join(args.out, "scale.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
