"""Beyond the embedded Ray: a simulated multi-node cluster (STRICT_SPREAD puts the two workers on
different nodes, and the result equals the single-node one), and a real head on this machine that
runs a training job submitted through the Ray Jobs API."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import torch
from safetensors.torch import load_file

from conftest import launch, train_and_load, write_feedback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def _tiny_overrides(tmp_path, tiny_model, data, run_name) -> list[str]:
    settings = {"model.name_or_path": tiny_model, "data.path": data, "data.generate_demo": False,
                "data.kl_block_size": 4, "eval.path": None, "kto.max_length": 64, "kto.max_prompt_length": 32,
                "kto.desirable_weight": 1.0,  # configs/default.yaml says auto; the in-process runs use 1.0
                "training.learning_rate": 1e-4, "training.warmup_ratio": 0.0, "training.max_steps": 3,
                "training.per_device_train_batch_size": 2, "scaling.num_workers": 2,
                "output.output_dir": str(tmp_path / "runs"), "output.run_name": run_name,
                "reference.cache_dir": str(tmp_path / "cache"), "model.cache_dir": str(tmp_path / "models")}
    return [item for key, value in settings.items() for item in ("--set", f"{key}={'null' if value is None else value}")]


def test_strict_spread_places_workers_on_different_nodes(tmp_path, tiny_model, ray_local):
    from ray.cluster_utils import Cluster

    data = write_feedback(str(tmp_path / "data" / "feedback.parquet"), rows=10)
    single_node_metrics, single_node_weights = train_and_load(tmp_path / "single", tiny_model, data, **{
        "scaling.num_workers": 2, "training.per_device_train_batch_size": 2, "output.run_name": "single"})

    # A head with 2 CPUs for the data stage and the reference actor, two nodes of 1 CPU each.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 150 * 2**20})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        cluster.wait_for_nodes()
        result = launch("train", "--address", cluster.address, *_tiny_overrides(tmp_path, tiny_model, data, "spread"),
                        "--set", "scaling.placement_strategy=STRICT_SPREAD")
    finally:
        cluster.shutdown()
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "spread"
    workers = json.loads((run / "workers.json").read_text())
    assert [w["rank"] for w in workers] == [0, 1] and workers[0]["node_id"] != workers[1]["node_id"]

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics] == [m["loss"] for m in single_node_metrics]
    weights = load_file(str(run / "model" / "model.safetensors"))
    for name, tensor in single_node_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0)


def test_submit_runs_a_training_job_on_a_real_head(tmp_path, tiny_model):
    data = write_feedback(str(tmp_path / "data" / "feedback.parquet"), rows=10)
    # Token authentication would need the same token on both sides; this head is bound to 127.0.0.1.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    dashboard = _free_port()
    head = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", f"--port={_free_port()}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         # (the agent's own port too: the session's embedded Ray already holds the default one)
         f"--dashboard-agent-listen-port={_free_port()}", "--num-cpus=4", "--disable-usage-stats", "--block"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 120
        while not _answers(f"{address}/api/version"):
            assert time.time() < deadline and head.poll() is None, "the Ray head did not come up"
            time.sleep(1)
        submitted = launch("submit", "--address", address, "--follow",
                           *_tiny_overrides(tmp_path, tiny_model, data, "job"), env=env)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        job_id = submitted.stdout.split("submitted job ", 1)[1].split()[0]
        assert f"job {job_id}: SUCCEEDED" in submitted.stdout
        status = launch("status", job_id, "--address", address, env=env)
        assert status.returncode == 0 and "SUCCEEDED" in status.stdout
        unknown = launch("status", "no-such-job", "--address", address, env=env)
        assert unknown.returncode == 2 and "no-such-job" in unknown.stderr
    finally:
        # Stop this head only (its process group), not the Ray instances of other tests.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(10)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(head.pid, signal.SIGKILL)
    run = tmp_path / "runs" / "job"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (run / "model" / "model.safetensors").is_file()
