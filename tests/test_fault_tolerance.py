"""A run survives a killed training worker (Ray Train restarts the group from the latest
checkpoint) and a killed driver (the same command again resumes): no step lost or run twice,
and the final weights equal an uninterrupted run's. One run takes both blows, one after the other:
it runs as a user runs it, in a process of its own, so that its driver can be killed."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, launch_here, write_feedback

pytestmark = pytest.mark.slow
STEPS = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, ray_local):
    """A config file for a 2-worker run of STEPS steps checkpointed every 3, and the result of the
    same run uninterrupted (trained in this process, on the session's Ray)."""
    root = tmp_path_factory.mktemp("fault")
    data = write_feedback(str(root / "feedback.parquet"), rows=STEPS * 4)
    config = {
        "data": {"path": data, "kl_block_size": 4, "generate_demo": False},
        "model": {"name_or_path": tiny_model, "cache_dir": str(root / "models")},
        "reference": {"cache_dir": str(root / "cache")},
        "kto": {"max_length": 64, "max_prompt_length": 32},
        "training": {"learning_rate": 1e-4, "warmup_ratio": 0.0, "per_device_train_batch_size": 2,
                     "max_steps": STEPS, "save_steps": 3},
        "scaling": {"num_workers": 2, "max_failures": 1},
        "eval": {"path": None},
        "output": {"output_dir": str(root / "runs"), "run_name": "uninterrupted"},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    # (checkpointed only at the end: where a run saves must not change what it computes)
    result = launch_here("train", "--config", str(path), "--set", "training.save_steps=0")
    assert result.returncode == 0, result.stderr[-3000:]
    return str(path), root / "runs", _weights(root / "runs" / "uninterrupted")


def _weights(run) -> dict:
    return load_file(str(run / "model" / "model.safetensors"))


class Run:
    """`launch.py train` in a process of its own, its output read as it comes."""

    def __init__(self, config: str, run_name: str, run_dir):
        self.metrics = run_dir / "metrics.jsonl"
        self.process = subprocess.Popen(
            [sys.executable, "launch.py", "train", "--config", config, "--set", f"output.run_name={run_name}"],
            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},  # for the kill
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()

    def wait_for(self, step: int, said: str = "", registered: bool = False) -> None:
        """Until metrics.jsonl has `step` lines, the output holds `said` and, with `registered`, Ray
        Train's controller has registered a checkpoint (it collects the workers' reports when it
        polls them, so a checkpoint written a moment before a worker dies may never count)."""
        snapshot = self.metrics.parent / "ray_train" / "checkpoint_manager_snapshot.json"
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.metrics.exists() and len(self.metrics.read_text().splitlines()) >= step and (
                    said in "".join(self.lines)) and (not registered or _registered(snapshot)):
                return
            assert self.process.poll() is None, "".join(self.lines)[-3000:]
            time.sleep(0.02)
        raise TimeoutError(f"no step {step} in {self.metrics}, or no {said!r} in the output")


def _registered(snapshot) -> bool:
    try:
        return bool(json.loads(snapshot.read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):  # not written yet, or being written
        return False


def _check_finished_like(run, uninterrupted: dict) -> None:
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    weights = _weights(run)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0)  # resumed exactly: bit for bit


def test_a_killed_worker_and_then_a_killed_driver_lose_no_step(setup):
    """One run survives both: Ray Train restarts a killed worker's group from the latest
    checkpoint; the same command again resumes a run whose driver was killed."""
    config, runs, uninterrupted = setup
    run = runs / "killed"
    killed = Run(config, "killed", run)
    killed.wait_for(4, registered=True)  # a checkpoint every 3 steps; step 4 is not in one
    victim = next(w for w in json.loads((run / "workers.json").read_text()) if w["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    # The restarted group goes on from the latest registered checkpoint.
    killed.wait_for(7, said="resuming from the checkpoint of step")
    restarted = json.loads((run / "workers.json").read_text())
    assert victim["pid"] not in {w["pid"] for w in restarted}  # a new worker group did the rest
    killed.process.kill()  # now the driver, in the middle of the run
    killed.process.wait()
    assert len((run / "metrics.jsonl").read_text().splitlines()) < STEPS  # killed before the end

    again = launch_here("train", "--config", config, "--set", "output.run_name=killed")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming run 'killed'" in again.stderr
    assert json.loads((run / "summary.json").read_text())["resumed"] is True
    _check_finished_like(run, uninterrupted)
