"""A checkpoint's layout, written (by the workers) and read (by a resuming worker and by the
driver) here only. One folder a checkpoint, written by every rank and merged by Ray Train, which
registers it only when every rank's part has arrived:

    model/              the Hugging Face export (safetensors, config, tokenizer): usable as is
                        (with LoRA: the adapter, `PeftModel.from_pretrained(base, path)`)
    merged/             a LoRA run's last checkpoint with lora.save_merged: the base with the adapters folded in
    optimizer.pt        ddp: optimizer and scheduler state
    deepspeed/          deepspeed: the engine's own state, one optimizer partition a rank
    rng.pt              rank 0's torch RNG state
    metrics.jsonl       every step's metrics so far
    trainer_state.json  written last, so its presence marks a complete checkpoint: the step, the world
                        size, the strategy, the MLflow / W&B run ids, the step-0 drift check and the
                        held-out checks before training and (in the last checkpoint) after it
"""

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import pyarrow.fs as pafs

from pipeline.cache import staging_name, sync_folder_of, sync_tree

MODEL, MERGED, METRICS, STATE, RNG = "model", "merged", "metrics.jsonl", "trainer_state.json", "rng.pt"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done: the data position of a resumed run
    world_size: int = 1
    strategy: str = "ddp"
    tracking_ids: dict = field(default_factory=dict)  # MLflow / W&B run ids, continued on resume
    step0_drift: Optional[dict] = None  # the drift check before the first update (or why it was skipped)
    eval_before: Optional[dict] = None  # held-out checks of the initial policy ...
    eval_after: Optional[dict] = None  # ... and of the final one


def _engine_state(folder: str, engine) -> str:
    return os.path.join(folder, "deepspeed" if engine.equal_forwards else "optimizer.pt")


def save(engine, state: TrainerState, history: list[str], metrics: dict, rank: int, tokenizer,
         merge_adapters: bool = False) -> None:
    """Every rank writes its part into a folder of its own and reports it with the step's metrics
    (a collective: every rank calls it); rank 0 writes the shared files, trainer_state.json last."""
    import ray.train
    import torch  # here and in restore: the driver reads checkpoints without importing torch

    with tempfile.TemporaryDirectory() as folder:
        engine.export(os.path.join(folder, MODEL), rank)
        engine.save(_engine_state(folder, engine), rank)
        if rank == 0:
            tokenizer.save_pretrained(os.path.join(folder, MODEL))
            if merge_adapters:  # the last checkpoint: a plain model for serving; training is over
                engine.module.merge_and_unload().save_pretrained(os.path.join(folder, MERGED),
                                                                 safe_serialization=True)
                tokenizer.save_pretrained(os.path.join(folder, MERGED))
            torch.save(torch.get_rng_state(), os.path.join(folder, RNG))
            with open(os.path.join(folder, METRICS), "w") as f:
                f.writelines(history)
            _write_state(folder, state)
        checkpoint = ray.train.Checkpoint.from_directory(folder) if os.listdir(folder) else None
        ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint)


def save_state_only(state: TrainerState, rank: int) -> None:
    """A checkpoint of trainer_state.json alone (a collective: every rank calls it): how the workers
    tell the driver that the run must not start (the step-0 drift check) without raising an error,
    which Ray Train would retry scaling.max_failures times, reloading the model each time."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            _write_state(folder, state)
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)


def _write_state(folder: str, state: TrainerState) -> None:
    with open(os.path.join(folder, STATE), "w") as f:
        json.dump(dataclasses.asdict(state), f)


def restore(folder: str) -> tuple[TrainerState, list[str]]:
    """A resuming worker's state and metrics lines; restores the RNG. The model (model_dir) and
    the engine's state (load_engine) are read once the engine is built."""
    state_path = os.path.join(folder, STATE)
    if not os.path.exists(state_path):
        raise RuntimeError(f"checkpoint {folder} has no {STATE}: it was not completely written")
    with open(state_path) as f:
        state = TrainerState(**json.load(f))
    with open(os.path.join(folder, METRICS)) as f:
        history = f.readlines()
    import torch

    torch.set_rng_state(torch.load(os.path.join(folder, RNG), weights_only=True))
    return state, history


def model_dir(folder: str) -> str:
    return os.path.join(folder, MODEL)


def load_engine(folder: str, engine) -> None:
    engine.load(_engine_state(folder, engine))


def read_state(checkpoint) -> TrainerState:
    """The driver's view of a checkpoint (a local path, NFS, s3://): its trainer state."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE}") as source:
        return TrainerState(**json.loads(source.read()))


def copy_results(checkpoint, run_dir: str) -> None:
    """The driver's part: the last checkpoint's model/ (and merged/), and metrics.jsonl, copied into
    the run directory from wherever the checkpoints live. Each is copied beside its place (a staging
    name of this host and process), synced to disk, then renamed into place: a crash never leaves a
    half-copied model that looks whole (the checkpoint stays; the same command copies it again)."""
    filesystem, root = checkpoint.filesystem, checkpoint.path
    for name in (MODEL, MERGED):
        target = os.path.join(run_dir, name)
        if filesystem.get_file_info(f"{root}/{name}").type != pafs.FileType.Directory:
            shutil.rmtree(target, ignore_errors=True)
            continue
        staging = staging_name(target)
        try:
            os.makedirs(staging)
            pafs.copy_files(f"{root}/{name}", staging, source_filesystem=filesystem,
                            destination_filesystem=pafs.LocalFileSystem())
            sync_tree(staging)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # (gone already once renamed)
    target = os.path.join(run_dir, METRICS)
    staging = staging_name(target)
    try:
        with filesystem.open_input_stream(f"{root}/{METRICS}") as source, open(staging, "wb") as out:
            out.write(source.read())
        sync_tree(staging)
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    sync_folder_of(target)
