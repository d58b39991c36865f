"""Checkpoint space (pipeline/train/checkpoint.py): what a save will write is estimated before it
writes, from the parameters, and a volume without that much room is refused with the folder, the
bytes needed and the bytes free, before anything of the checkpoint is written."""

import os
import shutil
import subprocess

import torch
import pytest
from transformers import AutoTokenizer

from pipeline.models import load_causal_lm
from pipeline.train import checkpoint
from pipeline.train.checkpoint import TrainerState
from pipeline.train.engines import PlainEngine, make_optimizer


def folder_bytes(folder) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def stepped_engine(tiny_model) -> PlainEngine:
    """The tiny model after one AdamW step: its moments exist, the optimizer state is as large as it gets."""
    model = load_causal_lm(tiny_model, False)
    engine = PlainEngine(model, *make_optimizer(model, 1e-3, 0.0, "constant", 0.0, 10), max_grad_norm=1.0)
    model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    engine.step()
    return engine


def test_the_estimate_covers_what_a_ddp_save_writes_and_not_much_more(tmp_path, tiny_model):
    engine = stepped_engine(tiny_model)
    model = engine.module
    parameters = sum(p.numel() for p in model.parameters())
    estimate = checkpoint.bytes_needed(engine, 0, merge_adapters=False)
    # hand arithmetic: float32 weights (4 bytes) exported, two float32 moments (8 bytes), a tenth more, 1 MiB
    assert estimate == int(1.1 * 12 * parameters) + 2**20
    assert checkpoint.bytes_needed(engine, 1, merge_adapters=False) == 2**20  # (rank 1 of ddp writes nothing)
    checkpoint._write(str(tmp_path / "ckpt"), engine, TrainerState(step=1), ["{}\n"], 0,
                      AutoTokenizer.from_pretrained(tiny_model), merge_adapters=False)
    written = folder_bytes(tmp_path / "ckpt")
    assert written <= estimate <= 1.5 * written + 2**20, (written, estimate)


def test_a_volume_without_room_is_named_with_the_bytes_needed_and_free(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    target = tmp_path / "scratch" / "checkpoint_000004_ab12cd34-1"  # (not made yet: its volume is checked)
    assert checkpoint.space_problem(str(target), 2**20, 1, 4) is None
    problem = checkpoint.space_problem(str(target), free + 2**40, 1, 4)
    assert problem.startswith(f"the checkpoint of step 4 needs about {free + 2**40:,} bytes")
    assert f"on rank 1 in {target}" in problem and "output.scratch_dir" in problem
    free_named = int(problem.split("that volume has ", 1)[1].split(" bytes", 1)[0].replace(",", ""))
    assert abs(free_named - free) < 2**30  # (the volume is shared: its free space moves a little)
    assert not target.parent.exists()


@pytest.fixture
def small_volume(tmp_path):
    """A 4 MiB tmpfs: a volume this test can fill (mounting needs root, or CAP_SYS_ADMIN)."""
    path = tmp_path / "volume"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}): the full-volume case runs where "
                    "the tests may mount one (as root)")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)


def test_on_a_filled_volume_the_check_refuses_what_the_write_would_fail_on(small_volume, tiny_model):
    engine, tokenizer = stepped_engine(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    needed = checkpoint.bytes_needed(engine, 0, merge_adapters=False)
    filler = small_volume / "other-runs-files"
    with open(filler, "wb") as f:  # leave half of what the checkpoint needs
        f.write(b"\0" * (shutil.disk_usage(small_volume).free - needed // 2))
    target = small_volume / "checkpoint_000001_ab12cd34"
    problem = checkpoint.space_problem(str(target), needed, 0, 1)
    assert problem and f"in {target}, and that volume has" in problem
    # what the check spares the run: a write that dies half-way on a full volume (torch.save: RuntimeError)
    with pytest.raises((OSError, RuntimeError)):
        checkpoint._write(str(target), engine, TrainerState(step=1), ["{}\n"], 0, tokenizer, merge_adapters=False)
    shutil.rmtree(target)
    filler.unlink()  # room again: the check passes and the same checkpoint is written whole
    assert checkpoint.space_problem(str(target), needed, 0, 1) is None
    checkpoint._write(str(target), engine, TrainerState(step=1), ["{}\n"], 0, tokenizer, merge_adapters=False)
    assert (target / "trainer_state.json").exists() and folder_bytes(target) <= needed
