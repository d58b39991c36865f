"""Beyond the embedded Ray: a simulated three-node cluster with a dashboard, to which `launch.py submit`
sends the session's 2-worker reference run as a Ray job (the Jobs API, the working directory; the
cluster's Python has the project, as a cluster image would) with STRICT_SPREAD placement; the
workers land on different nodes and the result equals the single-node one. The job's pip
environment is checked as the runtime environment submit sends: Ray installs one by cloning the
whole virtualenv on every node (measured: +150 s for one small wheel on three nodes here)."""

import json
import os
import socket
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED_CACHE, launch_here, reference_overrides

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_job_on_a_three_node_cluster_spreads_its_workers_and_matches_one_node(
        tmp_path, tiny_model, reference_data, reference_runs, monkeypatch):
    from ray.cluster_utils import Cluster

    # Token authentication would need the same token on both sides; this head is bound to 127.0.0.1.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # The cluster's image has the project installed: its `python` is this one (a job's entrypoint runs
    # `python launch.py ...` with the PATH of the node it starts on).
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    dashboard = _free_port()
    # A head with 2 CPUs for the job's driver; two nodes of 1 CPU. The job finds its rows scored in
    # the session's reference cache (the single-node run scored them): it only trains.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 150 * 2**20, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard,
        "dashboard_agent_listen_port": _free_port()})  # the session's Ray holds the default agent port
    try:
        for node in range(2):  # (each node a folder of its own for runtime environments, as on its own disk)
            cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20,
                             runtime_env_dir_name=f"runtime_resources_node{node}")
        cluster.wait_for_nodes()
        settings = {**reference_overrides(reference_data, 2), "model.name_or_path": tiny_model,
                    "data.generate_demo": False, "data.kl_block_size": 4, "kto.max_length": 64,
                    "kto.max_prompt_length": 32, "kto.desirable_weight": 1.0, "training.learning_rate": 1e-4,
                    "training.warmup_ratio": 0.0, "output.output_dir": str(tmp_path / "runs"),
                    "output.run_name": "spread", "output.report_to": "[]", "scaling.placement_strategy": "STRICT_SPREAD",
                    "reference.cache_dir": SHARED_CACHE, "model.cache_dir": str(tmp_path / "models")}
        overrides = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
        address = f"http://127.0.0.1:{dashboard}"
        submitted = launch_here("submit", "--address", address, "--follow", "--no-requirements", *overrides)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        job_id = submitted.stdout.split("submitted job ", 1)[1].split()[0]
        assert f"job {job_id}: SUCCEEDED" in submitted.stdout
        status = launch_here("status", job_id, "--address", address)
        assert status.returncode == 0 and "SUCCEEDED" in status.stdout
        unknown = launch_here("status", "no-such-job", "--address", address)
        assert unknown.returncode == 2 and "no-such-job" in unknown.stderr
    finally:
        cluster.shutdown()

    run = tmp_path / "runs" / "spread"
    assert json.loads((run / "summary.json").read_text())["data"]["reference_cache_hit"] is True
    workers = json.loads((run / "workers.json").read_text())
    assert [w["rank"] for w in workers] == [0, 1] and workers[0]["node_id"] != workers[1]["node_id"]
    single_node_metrics, single_node_weights, _, _ = reference_runs[2]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics] == [m["loss"] for m in single_node_metrics]
    weights = load_file(str(run / "model" / "model.safetensors"))
    for name, tensor in single_node_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0)


def test_a_job_gets_the_requirements_it_asks_for():
    from pipeline.jobs import PROJECT_ROOT, job_runtime_env, project_requirements

    everything = job_runtime_env(PROJECT_ROOT, extras=["mlflow"], more_requirements=["kto-probe==0.1"])
    assert everything["working_dir"] == PROJECT_ROOT and "excludes" not in everything
    assert everything["pip"][:-1] == project_requirements(["mlflow"]) and everything["pip"][-1] == "kto-probe==0.1"
    assert any(need.startswith("mlflow-skinny") for need in everything["pip"])
    image = job_runtime_env(PROJECT_ROOT, install_requirements=False, more_requirements=["/wheels/probe.whl"])
    assert image["pip"] == ["/wheels/probe.whl"]
    assert "pip" not in job_runtime_env(PROJECT_ROOT, install_requirements=False)
