"""`launch.py submit | status | stop`: the whole run as a Ray job, through the Ray Jobs API.

What `ray job submit --working-dir . -- python launch.py train ...` does, with the project's
defaults: the project's own files (an allowlist, staged in a private temporary folder) travel as
the job's working directory, the project's requirements as its `pip` environment, and the job's
driver connects to the cluster it runs on (`--address auto`).
"""

import asyncio
import contextlib
import os
import shlex
import shutil
import tempfile
import time
import tomllib
from typing import Iterator

from ray.job_submission import JobStatus, JobSubmissionClient

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a job's working directory holds: the files that `launch.py train` runs from, chosen by name.
# Ray's working_dir upload has only an exclude list, and a denylist lets through whatever it did not
# foresee (a registry and its ledger.sqlite, feedback folders, .env, a token file), so the allowed
# files are copied into a private folder and that folder is uploaded. Tests, benchmarks and the
# Makefile are not needed to run and stay home; data lives where every node reads it, never in a job.
PROJECT_FILES = ("launch.py", "pyproject.toml", "README.md")
PROJECT_FOLDERS = {"pipeline": (".py",), "actors": (".py",), "configs": (".yaml", ".yml")}
FINISHED = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def project_requirements(extras: list[str] = ()) -> list[str]:
    """pyproject's dependencies and those of the named extras (the reporters a run lists)."""
    with open(os.path.join(PROJECT_ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    return project["dependencies"] + [need for extra in extras for need in project["optional-dependencies"][extra]]


def entrypoint(config_path: str, overrides: list[str], working_dir: str) -> str:
    """The job's command; the config must travel with the working directory."""
    relative = os.path.relpath(os.path.abspath(config_path), working_dir)
    if relative.startswith(".."):
        raise FileNotFoundError(f"--config {config_path} is outside the job's working directory {working_dir}: "
                                "put the config inside it (e.g. configs/) so that the job can read it")
    words = ["python", "launch.py", "train", "--config", relative, "--address", "auto"]
    for override in overrides:
        words += ["--set", override]
    return shlex.join(words)


def project_files(root: str, config_path: str) -> list[str]:
    """The files a job gets, relative to `root`: PROJECT_FILES, the files under PROJECT_FOLDERS with
    their suffixes (regular files only, no dotfiles, no directory symlinks followed: a link could
    point anywhere), and the run's own config wherever it is inside `root`."""
    files = [name for name in PROJECT_FILES if _regular_file(os.path.join(root, name))]
    for folder, suffixes in PROJECT_FOLDERS.items():
        for parent, _, names in os.walk(os.path.join(root, folder)):  # (os.walk does not follow directory links)
            files += [os.path.relpath(os.path.join(parent, name), root) for name in names
                      if name.endswith(suffixes) and not name.startswith(".")
                      and _regular_file(os.path.join(parent, name))]
    config = os.path.relpath(os.path.abspath(config_path), root)
    return sorted(set(files) | {config})


def _regular_file(path: str) -> bool:
    return os.path.isfile(path) and not os.path.islink(path)


@contextlib.contextmanager
def staged_working_dir(root: str, config_path: str) -> Iterator[str]:
    """A private temporary folder (0700) holding copies of project_files(root, config_path): the
    folder that Ray zips and uploads as the job's working directory; removed once submitted."""
    with tempfile.TemporaryDirectory(prefix="kto-job-") as staging:
        for relative in project_files(root, config_path):
            os.makedirs(os.path.dirname(os.path.join(staging, relative)), exist_ok=True)
            shutil.copyfile(os.path.join(root, relative), os.path.join(staging, relative))
        yield staging


def job_runtime_env(working_dir: str, install_requirements: bool = True, extras: list[str] = (),
                    more_requirements: list[str] = ()) -> dict:
    """The job's runtime environment: the (staged) working directory, and as its pip environment the
    project's requirements (those of `extras` too) unless the cluster's image has them, plus
    `more_requirements`. No env_vars here: the job's driver sets the run's own (offline, ...) when
    it joins the cluster, and Ray refuses a job whose runtime_env and driver set the same variable."""
    runtime_env = {"working_dir": working_dir}
    requirements = (project_requirements(extras) if install_requirements else []) + list(more_requirements)
    if requirements:
        runtime_env["pip"] = requirements
    return runtime_env


def submit(address: str, config_path: str, overrides: list[str], working_dir: str = PROJECT_ROOT,
           install_requirements: bool = True, follow: bool = False, extras: list[str] = (),
           more_requirements: list[str] = ()) -> int:
    """Submit `launch.py train` as a job (see job_runtime_env); with `follow`, stream its logs."""
    client = JobSubmissionClient(address)
    command = entrypoint(config_path, overrides, working_dir)
    with staged_working_dir(working_dir, config_path) as staged:  # uploaded by submit_job itself
        runtime_env = job_runtime_env(staged, install_requirements, extras, more_requirements)
        job_id = _submit_when_ready(client, command, runtime_env)
    print(f"submitted job {job_id} to {address}", flush=True)
    print(f"  logs:   python launch.py logs {job_id} --address {address}   (or: ray job logs {job_id})")
    print(f"  status: python launch.py status {job_id} --address {address}")
    print(f"  stop:   python launch.py stop {job_id} --address {address}", flush=True)
    return follow_job(client, job_id) if follow else 0


def _submit_when_ready(client: JobSubmissionClient, command: str, runtime_env: dict, wait_s: float = 120) -> str:
    """Submit; a head that has just started answers "No available agent" until its job agent is up."""
    deadline = time.time() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=command, runtime_env=runtime_env)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.time() > deadline:
                raise
            time.sleep(2)


def follow_job(client: JobSubmissionClient, job_id: str) -> int:
    """Stream the job's logs until it finishes; 0 when it succeeded."""
    async def stream():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(stream())
    status = client.get_job_status(job_id)
    while status not in FINISHED:  # the log stream can close a moment before the status is final
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def status(address: str, job_id: str) -> int:
    info = JobSubmissionClient(address).get_job_info(job_id)
    print(f"job {job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    return 0


def logs(address: str, job_id: str, follow: bool) -> int:
    client = JobSubmissionClient(address)
    if follow:
        return follow_job(client, job_id)
    print(client.get_job_logs(job_id), end="")
    return 0


def stop(address: str, job_id: str) -> int:
    stopped = JobSubmissionClient(address).stop_job(job_id)
    print(f"job {job_id}: " + ("stop requested" if stopped else "was not running"))
    return 0
