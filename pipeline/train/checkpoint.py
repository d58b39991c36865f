"""A checkpoint's layout, written (by the workers) and read (by a resuming worker and by the
driver) here only. One folder a checkpoint, named by its step and the worker group's start, written
by every rank (in place in local storage, or staged and uploaded: save), which Ray Train registers
only when every rank's part has arrived:

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

from pipeline.cache import publish_file, staging_name, sync_tree

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


def save(engine, state: TrainerState, history: list[str], metrics: dict, rank: int, tokenizer, attempt: str,
         scratch_dir: Optional[str], merge_adapters: bool = False) -> Optional[str]:
    """Every rank writes its part of the checkpoint of `state.step` and reports it with the step's
    metrics (a collective: every rank calls it); rank 0 writes the shared files, trainer_state.json
    last. On a local (or NFS) storage path without a scratch_dir the parts are written in place, in
    the folder Ray Train registers (no copy: a 70B ZeRO-3 checkpoint is written once, not staged
    and copied); otherwise each rank stages its part in scratch_dir and Ray Train uploads it.

    Free space is checked first, on every rank's folder: if one lacks room nothing is written and
    every rank returns the same reason (the run stops, its last checkpoint kept); else None."""
    import ray.train
    from ray.train import CheckpointUploadMode

    from pipeline.train.engines import all_gather_objects  # (the driver imports this module without torch)

    storage = ray.train.get_context().get_storage()
    name = f"checkpoint_{state.step:06d}_{attempt}"  # (a killed attempt's partial folder is never reused)
    in_place = scratch_dir is None  # (the worker sets one for a storage path that is not local)
    folder = os.path.join(storage.experiment_fs_path, name) if in_place else os.path.join(scratch_dir, f"{name}-{rank}")
    problem = space_problem(folder, bytes_needed(engine, rank, merge_adapters), rank, state.step)
    problems = [found for found in all_gather_objects(problem) if found]
    if problems:
        return problems[0]
    os.makedirs(folder, exist_ok=True)
    try:
        _write(folder, engine, state, history, rank, tokenizer, merge_adapters)
        if in_place:
            checkpoint = ray.train.Checkpoint(folder, filesystem=storage.storage_filesystem)
        else:
            checkpoint = ray.train.Checkpoint.from_directory(folder) if os.listdir(folder) else None
        ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint,
                         checkpoint_dir_name=name, delete_local_checkpoint_after_upload=not in_place,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD if in_place else CheckpointUploadMode.SYNC)
    finally:
        if not in_place:
            shutil.rmtree(folder, ignore_errors=True)
    return None


def _write(folder: str, engine, state: TrainerState, history: list[str], rank: int, tokenizer,
           merge_adapters: bool) -> None:
    import torch  # here and in restore: the driver reads checkpoints without importing torch

    engine.export(os.path.join(folder, MODEL), rank)
    engine.save(_engine_state(folder, engine), rank)
    if rank == 0:
        tokenizer.save_pretrained(os.path.join(folder, MODEL))
        if merge_adapters:  # the last checkpoint: a plain model for serving; training is over
            engine.module.merge_and_unload().save_pretrained(os.path.join(folder, MERGED), safe_serialization=True)
            tokenizer.save_pretrained(os.path.join(folder, MERGED))
        torch.save(torch.get_rng_state(), os.path.join(folder, RNG))
        with open(os.path.join(folder, METRICS), "w") as f:
            f.writelines(history)
        _write_state(folder, state)


def bytes_needed(engine, rank: int, merge_adapters: bool) -> int:
    """What this rank is about to write, estimated from its parameters (ZeRO-3: their full sizes,
    ds_numel) with a tenth more for file formats: rank 0 the exported model (with LoRA the adapters;
    the merged model too on the last save); ddp: rank 0 AdamW's two moments of the trained weights;
    DeepSpeed: each rank its ZeRO partition (float32 weights and two moments, 12 bytes a trained
    weight over the world), and the module's weights (ZeRO-3: a partition of them)."""
    params = list(engine.module.parameters())
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731
    every = sum(numel(p) * p.element_size() for p in params)
    trained = sum(numel(p) * p.element_size() for p in params if p.requires_grad)
    lora = hasattr(engine.module, "peft_config")
    export = (trained if lora else every) + (every if merge_adapters else 0) if rank == 0 else 0
    if engine.equal_forwards:  # DeepSpeed
        from pipeline.train.engines import world_size

        workers = world_size()
        states = 12 * sum(numel(p) for p in params if p.requires_grad) // workers
        states += every // workers if engine.zero_stage == 3 else (every if rank == 0 else 0)
    else:
        states = 2 * trained if rank == 0 else 0
    return int(1.1 * (export + states)) + (1 << 20)


def space_problem(folder: str, needed: int, rank: int, step: int) -> Optional[str]:
    """Why `folder` cannot take `needed` bytes (its nearest existing parent's free space), or None."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if needed <= free:
        return None
    return (f"the checkpoint of step {step} needs about {needed:,} bytes ({needed / 2**30:.2f} GiB) on rank {rank} "
            f"in {folder}, and that volume has {free:,} bytes ({free / 2**30:.2f} GiB) free: free space there, or "
            "point output.scratch_dir (or output.storage_path) at a volume with room, then run the same command "
            "to resume")


def remove_incomplete(storage) -> None:
    """Checkpoint folders without trainer_state.json (a killed attempt's partial writes, never
    registered by Ray Train), deleted by rank 0 when a worker group starts, before it saves."""
    filesystem, root = storage.storage_filesystem, storage.experiment_fs_path
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        return
    for entry in filesystem.get_file_info(pafs.FileSelector(root)):
        if (entry.type == pafs.FileType.Directory and entry.base_name.startswith("checkpoint_")
                and filesystem.get_file_info(f"{entry.path}/{STATE}").type == pafs.FileType.NotFound):
            filesystem.delete_dir(entry.path)


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
    with filesystem.open_input_stream(f"{root}/{METRICS}") as source:
        publish_file(os.path.join(run_dir, METRICS), lambda file: file.write(source.read()))
