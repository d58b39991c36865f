"""Issue 16, item 9: what leaves the machine. A `submit` uploads the project's own files (an
allowlist), never the registry, feedback, .env or SQLite files beside them; the Ray runtime
environment, which the dashboard shows, never carries a tracker's credentials. Fast: no Ray starts
(the upload is checked by zipping the staged folder with Ray's own packaging code)."""

import os
import zipfile

import pytest

from pipeline.config import load_config
from pipeline.jobs import PROJECT_ROOT, entrypoint, job_runtime_env, project_files, staged_working_dir

SECRET = "s3cr3t-never-in-a-runtime-env"


def _write(root, relative: str, text: str = "x") -> None:
    path = os.path.join(root, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _ray_package(folder: str, zip_path: str) -> set[str]:
    """The files Ray's working_dir upload would carry from `folder` (its own zip code, .gitignore rules too)."""
    from pathlib import Path

    from ray._private.runtime_env.packaging import create_package

    create_package(folder, Path(zip_path), include_gitignore=True)
    with zipfile.ZipFile(zip_path) as package:
        return {name for name in package.namelist() if not name.endswith("/")}


def test_a_submit_uploads_the_projects_own_files_and_nothing_beside_them(tmp_path):
    root = str(tmp_path / "project")
    own = ["launch.py", "pyproject.toml", "README.md", "pipeline/__init__.py", "pipeline/config.py",
           "pipeline/data/formats.py", "actors/reference.py", "configs/default.yaml", "configs/kuberay/job.yaml",
           "experiments/mine.yaml"]  # (the last: the run's own config, wherever it is in the project)
    strangers = ["registry/ledger.sqlite", "registry/retrain.lock", "registry/cycles/000001/model/model.safetensors",
                 "data/feedback/date=2026-12-01/part-0.parquet", "feedback/late.jsonl", "data/demo/train.parquet",
                 ".env", "configs/.env", "configs/.secrets.yaml", "state.sqlite", "ledger.sqlite-wal",
                 "pipeline/notes.sqlite", "configs/token.json", ".venv/bin/python", "runs/kto/model.safetensors",
                 ".cache/reference/abc/part-0.parquet", ".git/config", "pipeline/__pycache__/config.cpython-311.pyc",
                 "tests/test_x.py", "benchmarks/vs_trl.py", "Makefile", "ray_kto.egg-info/PKG-INFO",
                 "experiments/other.yaml"]
    for relative in own + strangers:
        _write(root, relative, f"{relative}: {SECRET if relative in strangers else 'code'}")
    _write(str(tmp_path), "outside/secrets.yaml", SECRET)
    os.symlink(os.path.join(root, ".env"), os.path.join(root, "pipeline", "leak.py"))  # a file link: refused
    os.symlink(str(tmp_path / "outside"), os.path.join(root, "configs", "linked"))  # a folder link: not followed
    os.symlink("..", os.path.join(root, "pipeline", "up"))  # a loop: not followed
    with open(os.path.join(root, ".gitignore"), "w") as f:  # (a .gitignore that would not have helped)
        f.write("runs/\n")
    config = os.path.join(root, "experiments", "mine.yaml")

    with staged_working_dir(root, config) as staged:
        assert os.stat(staged).st_mode & 0o077 == 0  # private while it exists
        uploaded = _ray_package(staged, str(tmp_path / "package.zip"))
        runtime_env = job_runtime_env(staged, install_requirements=False)
        assert runtime_env == {"working_dir": staged}  # no env_vars, no excludes: the folder is the allowlist
        # The entrypoint's config path is the same relative path inside the upload.
        assert "--config experiments/mine.yaml" in entrypoint(config, [], root)
    assert not os.path.exists(staged)
    assert uploaded == set(own)
    with zipfile.ZipFile(tmp_path / "package.zip") as package:
        assert all(SECRET not in package.read(name).decode() for name in package.namelist() if not name.endswith("/"))
        assert package.read("pipeline/config.py").decode() == "pipeline/config.py: code"
    with pytest.raises(FileNotFoundError, match="outside the job's working directory"):
        entrypoint(str(tmp_path / "outside" / "secrets.yaml"), [], root)


def test_the_real_project_uploads_its_code_and_configs_only():
    files = project_files(PROJECT_ROOT, os.path.join(PROJECT_ROOT, "configs", "default.yaml"))
    for needed in ("launch.py", "pyproject.toml", "pipeline/config.py", "pipeline/jobs.py", "actors/reference.py",
                   "configs/default.yaml", "configs/retrain.yaml", "configs/kuberay/raycronjob-retrain.yaml"):
        assert needed in files
    assert {f.split("/")[0] for f in files} == {"launch.py", "pyproject.toml", "README.md", "pipeline", "actors",
                                                 "configs"}
    assert all(f.endswith((".py", ".yaml", ".toml", ".md")) for f in files)
    # Nothing the code needs is left behind: every file of the code and config folders but caches travels.
    for folder in ("pipeline", "actors", "configs"):
        for parent, dirs, names in os.walk(os.path.join(PROJECT_ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in names:
                assert os.path.relpath(os.path.join(parent, name), PROJECT_ROOT) in files, (parent, name)


def test_tracker_credentials_never_travel_in_the_runtime_environment(monkeypatch, caplog):
    """Every MLflow and W&B variable those libraries define is set; only the allowlisted, non-secret
    ones reach the runtime environment, and only for the trackers that output.report_to lists."""
    import mlflow.environment_variables as mlflow_variables
    import wandb.env as wandb_variables

    from pipeline.cluster import TRACKER_VARIABLES, runtime_env
    from pipeline.train.trackers import TRACKERS

    defined = {value.name for value in vars(mlflow_variables).values() if hasattr(value, "name")
               and str(value.name).startswith("MLFLOW_")}
    defined |= {value for value in vars(wandb_variables).values() if isinstance(value, str)
                and value.startswith("WANDB_")}
    assert {"MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "WANDB_API_KEY"} <= defined and len(defined) > 100
    for name in defined:
        monkeypatch.setenv(name, f"{name}-{SECRET}")
    allowed = {name for names in TRACKER_VARIABLES.values() for name in names}
    assert set(TRACKER_VARIABLES) == set(TRACKERS) and allowed <= defined  # (names the libraries really read)
    assert not [name for name in allowed if any(word in name for word in (
        "PASSWORD", "TOKEN", "KEY", "USER", "SECRET", "CREDENTIAL", "INSECURE", "SSL", "CERT", "AUTH"))]

    env = runtime_env(load_config(None, ("output.report_to=[mlflow, wandb]",)))["env_vars"]
    forwarded = {name for name in env if name.startswith(("MLFLOW_", "WANDB_"))}
    assert forwarded == allowed
    for secret in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
                   "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_CLIENT_CERT_PATH", "WANDB_API_KEY",
                   "WANDB_USERNAME", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_CREDENTIALS_FILE"):
        assert secret not in env and all(f"{secret}-{SECRET}" not in value for value in env.values())
    assert env["WANDB_PROJECT"] == f"WANDB_PROJECT-{SECRET}"  # (the values here are all marked; real ones are not)

    assert not [n for n in runtime_env(load_config(None, ("output.report_to=[tensorboard]",)))["env_vars"]
                if n.startswith(("MLFLOW_", "WANDB_"))]
    # A tracking URL with a user and password in it is a secret too: not forwarded, and said so.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://kto:{SECRET}@mlflow.example.com")
    monkeypatch.setenv("WANDB_BASE_URL", f"https://kto:{SECRET}@wandb.example.com")
    with caplog.at_level("WARNING", logger="pipeline.cluster"):
        env = runtime_env(load_config(None, ("output.report_to=[mlflow, wandb]",)))["env_vars"]
    assert "MLFLOW_TRACKING_URI" not in env and "WANDB_BASE_URL" not in env
    assert all(SECRET not in value for name, value in env.items() if name not in allowed)
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert "MLFLOW_TRACKING_URI holds a user or password" in warned and "WANDB_BASE_URL" in warned
    assert SECRET not in warned
