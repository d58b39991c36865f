"""A run survives the loss of a node: on a simulated cluster of three 1-CPU nodes (two training
workers and one node to spare), every process of the node of a training worker is killed mid-run,
as when a machine is lost; with scaling.max_failures 1 Ray Train starts a new worker group on the
surviving nodes from the latest registered checkpoint, and the run finishes with every step once
and the weights, bit for bit, of the session's uninterrupted 2-worker reference run (whose settings
it shares, so that it trains no reference of its own and finds its rows scored in the session's cache).

When to strike: Ray Train registers a checkpoint once its controller has polled every worker's
report for it, and a worker's report queue holds one report, so once the checkpoint of step 1 is
registered the report of step 3 cannot be taken before two more polls, POLL_S apart: the node is
lost (within milliseconds) well before the run could end."""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
from ray._private import ray_constants
from safetensors.torch import load_file

from conftest import REFERENCE_STEPS, ROOT, SHARED_CACHE, reference_overrides

pytestmark = pytest.mark.slow

# The GCS declares a node dead after 5 missed health checks of its raylet, every 3 s by Ray's default;
# until then the lost node's CPU counts as free and the new worker group's placement group waits for it
# (measured: declared dead 12.7 s after the loss; the new group started 2.5 s later). Every 1 s here.
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
# Ray Train's poll of the workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; Ray's default 2 s on a cluster), set
# here for a known pace: a worker's next report waits for the poll that takes its last one.
POLL_S = "1"


class Driver:
    """`launch.py train` against the cluster in a process of its own (the test process holds the
    session's Ray), its output read as it comes."""

    def __init__(self, overrides: list[str], run_dir):
        self.run_dir = run_dir
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": POLL_S}
        self.process = subprocess.Popen([sys.executable, "launch.py", "train", *overrides], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def output(self) -> str:
        return "".join(self.lines)

    def registered_step(self) -> int:
        """The step of the latest checkpoint Ray Train's controller has registered (0: none yet)."""
        try:
            snapshot = json.loads((self.run_dir / "ray_train" / "checkpoint_manager_snapshot.json").read_text())
            return max(result["metrics"]["step"] for result in snapshot["checkpoint_results"])
        except (OSError, ValueError, KeyError):  # not written yet, or being written
            return 0

    def wait_for_checkpoint(self, step: int, timeout: float = 300) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            registered = self.registered_step()
            if registered >= step:
                return registered
            assert self.process.poll() is None, self.output()[-3000:]
            time.sleep(0.02)
        raise TimeoutError(f"no checkpoint of step {step} registered in {self.run_dir}:\n{self.output()[-3000:]}")

    def finish(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def crash(cluster, node) -> None:
    """Every process of the node (its raylet, its agents, the workers it started) SIGKILLed at
    once, as when its machine is lost; then the cluster forgets it."""
    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    for process in [raylet, *raylet.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    cluster.remove_node(node, allow_graceful=False)


def test_a_run_loses_a_node_and_finishes_as_if_it_had_not(tmp_path, tiny_model, reference_data, reference_runs,
                                                            monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # (as in test_cluster: a head bound to this machine)
    # The head runs the driver and Ray Train's controller (they take no CPU) and may host a worker: it
    # is never the node lost. Three CPUs: two workers and one for the data stage (cluster.start_ray's check).
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 100 * 2**20, "include_dashboard": False,
        "dashboard_agent_listen_port": _free_port(),  # the session's Ray holds the default agent port
        "_system_config": HEALTH_CHECKS})
    driver = None
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        cluster.wait_for_nodes()
        nodes = {cluster.head_node.node_id, *(node.node_id for node in cluster.worker_nodes)}
        settings = {**reference_overrides(reference_data, 2), "model.name_or_path": tiny_model,
                    "data.generate_demo": False, "data.kl_block_size": 4, "kto.max_length": 64,
                    "kto.max_prompt_length": 32, "kto.desirable_weight": 1.0, "training.learning_rate": 1e-4,
                    "training.warmup_ratio": 0.0, "training.save_steps": 1, "scaling.max_failures": 1,
                    "output.output_dir": str(tmp_path / "runs"), "output.run_name": "node-loss",
                    "output.report_to": "[]", "reference.cache_dir": SHARED_CACHE,
                    "model.cache_dir": str(tmp_path / "models")}
        overrides = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
        run = tmp_path / "runs" / "node-loss"
        driver = Driver([*overrides, "--address", cluster.address], run)

        struck_after = driver.wait_for_checkpoint(1)
        before = json.loads((run / "workers.json").read_text())
        assert {w["node_id"] for w in before} <= nodes and before[0]["node_id"] != before[1]["node_id"]
        # rank 0 (which writes metrics.jsonl and workers.json) unless it is on the head
        victim = next(w for w in before if w["node_id"] != cluster.head_node.node_id)
        crash(cluster, next(node for node in cluster.worker_nodes if node.node_id == victim["node_id"]))
        code = driver.finish()
        assert code == 0, driver.output()[-5000:]
    finally:
        if driver and driver.process.poll() is None:
            driver.process.kill()
        cluster.shutdown()

    output = driver.output()
    resumed = re.search(r"resuming from the checkpoint of step (\d+) of (\d+)", output)
    assert resumed, output[-3000:]
    # (from the checkpoint registered when the node was lost, or a later one registered as it was lost;
    # before the last step: the new group trained)
    assert struck_after <= int(resumed[1]) < REFERENCE_STEPS == int(resumed[2])
    after = json.loads((run / "workers.json").read_text())
    assert [w["rank"] for w in after] == [0, 1]
    assert victim["node_id"] not in {w["node_id"] for w in after} and {w["node_id"] for w in after} <= nodes
    assert not {w["pid"] for w in after} & {w["pid"] for w in before}  # a new worker group did the rest
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["reference_cache_hit"] is True

    reference_metrics, reference_weights, _, _ = reference_runs[2]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, REFERENCE_STEPS + 1))  # each step once
    assert [m["loss"] for m in metrics] == [m["loss"] for m in reference_metrics]
    weights = load_file(str(run / "model" / "model.safetensors"))
    assert weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0)  # resumed exactly: bit for bit
