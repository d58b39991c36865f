"""Beyond the embedded Ray: a simulated three-node cluster with a dashboard, to which `launch.py submit`
sends the session's 2-worker reference run as a Ray job (the Jobs API, the working directory, a pip
environment holding a local wheel) with STRICT_SPREAD placement; the workers land on different
nodes and the result equals the single-node one."""

import base64
import hashlib
import json
import os
import socket
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch_here, reference_overrides

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe_wheel(folder) -> str:
    """A one-module pure-Python wheel, written by hand: what the job's pip environment installs."""
    files = {"kto_probe/__init__.py": b"VERSION = '0.1'\n",
             "kto_probe-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: kto-probe\nVersion: 0.1\n",
             "kto_probe-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
                                              b"Tag: py3-none-any\n"}
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + "kto_probe-0.1.dist-info/RECORD,,\n"
    path = os.path.join(folder, "kto_probe-0.1-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("kto_probe-0.1.dist-info/RECORD", record)
    return path


def test_a_job_on_a_three_node_cluster_spreads_its_workers_and_matches_one_node(
        tmp_path, tiny_model, reference_data, reference_runs, monkeypatch):
    from ray.cluster_utils import Cluster

    # Token authentication would need the same token on both sides; this head is bound to 127.0.0.1.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    dashboard = _free_port()
    # A head with 2 CPUs for the job's driver, the data stage and the reference actor; two nodes of 1 CPU.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 150 * 2**20, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard,
        "dashboard_agent_listen_port": _free_port()})  # the session's Ray holds the default agent port
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        cluster.wait_for_nodes()
        settings = {**reference_overrides(reference_data, 2), "model.name_or_path": tiny_model,
                    "data.generate_demo": False, "data.kl_block_size": 4, "kto.max_length": 64,
                    "kto.max_prompt_length": 32, "kto.desirable_weight": 1.0, "training.learning_rate": 1e-4,
                    "training.warmup_ratio": 0.0, "output.output_dir": str(tmp_path / "runs"),
                    "output.run_name": "spread", "output.report_to": "[]", "scaling.placement_strategy": "STRICT_SPREAD",
                    "reference.cache_dir": str(tmp_path / "cache"), "model.cache_dir": str(tmp_path / "models")}
        overrides = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
        address = f"http://127.0.0.1:{dashboard}"
        submitted = launch_here("submit", "--address", address, "--follow", "--no-requirements",
                                "--pip", _probe_wheel(str(tmp_path)), *overrides)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        job_id = submitted.stdout.split("submitted job ", 1)[1].split()[0]
        assert f"job {job_id}: SUCCEEDED" in submitted.stdout
        status = launch_here("status", job_id, "--address", address)
        assert status.returncode == 0 and "SUCCEEDED" in status.stdout
        unknown = launch_here("status", "no-such-job", "--address", address)
        assert unknown.returncode == 2 and "no-such-job" in unknown.stderr
        # The job ran in a pip environment of its own that holds the wheel.
        session = cluster.head_node.get_session_dir_path()
        installed = [folder for folder, _, _ in os.walk(os.path.join(session, "runtime_resources"))
                     if folder.endswith(os.path.join("site-packages", "kto_probe"))]
        assert installed, f"no kto_probe package under {session}/runtime_resources"
    finally:
        cluster.shutdown()

    run = tmp_path / "runs" / "spread"
    workers = json.loads((run / "workers.json").read_text())
    assert [w["rank"] for w in workers] == [0, 1] and workers[0]["node_id"] != workers[1]["node_id"]
    single_node_metrics, single_node_weights, _, _ = reference_runs[2]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics] == [m["loss"] for m in single_node_metrics]
    weights = load_file(str(run / "model" / "model.safetensors"))
    for name, tensor in single_node_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0)
