"""Checkpoint space (pipeline/train/checkpoint.py): what a save will write is estimated before it
writes, from the parameters, and a volume without that much room is refused with the folder, the
bytes needed and the bytes free, before anything of the checkpoint is written."""

import os
import shutil

import torch
from transformers import AutoTokenizer

from pipeline.models import load_causal_lm
from pipeline.train import checkpoint
from pipeline.train.checkpoint import TrainerState
from pipeline.train.engines import PlainEngine, make_optimizer


def folder_bytes(folder) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def test_the_estimate_covers_what_a_ddp_save_writes_and_not_much_more(tmp_path, tiny_model):
    model = load_causal_lm(tiny_model, False)
    engine = PlainEngine(model, *make_optimizer(model, 1e-3, 0.0, "constant", 0.0, 10), max_grad_norm=1.0)
    model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    engine.step()  # AdamW's moments now exist: the optimizer state is as large as it gets
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
