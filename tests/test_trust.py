"""Trust boundaries of the caches and the checkpoint storage (issue 16, items 5, 6, 7 and 12): a
cached table of a kind this pipeline does not write is refused from its footer, before a row is
read; caches are keyed by content, so a change with its mtime restored is a new input; a checkpoint
folder belongs to one run; cache folders are private; staging files do not outlive a failure."""

import json
import os
import pathlib
import pickle
import shutil
import stat
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT, launch_here, tiny_config, write_feedback
from pipeline import cache
from pipeline.cache import CacheError, check_folder, check_table, fingerprint, private_folder, publish_folder


class Touch:
    """A pickle whose loading creates `marker`: what a planted payload would run instead."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def scored_table(rows: int = 3) -> pa.Table:
    ids = pa.array([[1, 2]] * rows, pa.list_(pa.int32()))
    return pa.table({"row_index": pa.array(range(rows), pa.int64()), "prompt_ids": ids, "completion_ids": ids,
                     "label": [True] * rows, "source_file": ["f"] * rows, "source_row": pa.array(range(rows)),
                     "kl_completion_ids": ids, "ref_logp": pa.array([-1.0] * rows, pa.float32()),
                     "ref_kl_logp": pa.array([-2.0] * rows, pa.float32())})


def test_a_pickled_extension_column_is_refused_from_the_footer_without_running_its_payload(tmp_path):
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectArray

    marker = tmp_path / "payload-ran"
    good = tmp_path / "examples-scored-good.parquet"
    pq.write_table(scored_table(), good)
    check_table(str(good), "scored")  # what the pipeline writes passes
    planted = tmp_path / "examples-scored-planted.parquet"
    table = scored_table()
    pq.write_table(table.set_column(table.schema.get_field_index("ref_logp"), "ref_logp",
                                    ArrowPythonObjectArray.from_objects([Touch(str(marker))] * 3)), planted)
    with pytest.raises(CacheError, match=f"{planted}.*extension type"):
        check_table(str(planted), "scored")
    assert not marker.exists()
    # The refusal matters: the workers' read (pq.read_table, then to_pylist) runs the payload.
    pq.read_table(planted, columns=["ref_logp"]).column("ref_logp").to_pylist()
    assert marker.exists()


def test_an_unregistered_extension_type_is_refused_too(tmp_path):
    """An extension type this process has not registered reads back as its storage type, with the
    extension's name in the field metadata: the raw footer still names it."""

    class Planted(pa.ExtensionType):
        def __init__(self):
            super().__init__(pa.float32(), "planted.payload")

        def __arrow_ext_serialize__(self):
            return b""

        @classmethod
        def __arrow_ext_deserialize__(cls, storage_type, serialized):
            return cls()

    pa.register_extension_type(Planted())
    try:
        table = scored_table()
        storage = table.column("ref_logp").combine_chunks()
        path = tmp_path / "examples-scored-x.parquet"
        pq.write_table(table.set_column(7, "ref_logp", pa.ExtensionArray.from_storage(Planted(), storage)), path)
    finally:
        pa.unregister_extension_type("planted.payload")
    assert pq.read_schema(path).field("ref_logp").type == pa.float32()  # looks like the right type
    with pytest.raises(CacheError, match="extension type"):
        check_table(str(path), "scored")


def test_cached_tables_must_have_exactly_their_kinds_schema(tmp_path):
    table = scored_table()
    wrong_type = tmp_path / "wrong-type.parquet"
    pq.write_table(table.set_column(7, "ref_logp", table.column("ref_logp").cast(pa.float64())), wrong_type)
    with pytest.raises(CacheError, match="ref_logp: double"):
        check_table(str(wrong_type), "scored")
    examples = tmp_path / "examples"
    examples.mkdir()
    pq.write_table(table.drop_columns(["ref_logp", "ref_kl_logp"]), examples / "part-00000.parquet")
    check_folder(str(examples), "examples")
    (examples / "part-00001.parquet").write_bytes(pickle.dumps(Touch(str(tmp_path / "never"))))
    with pytest.raises(CacheError, match="part-00001.parquet.*not a readable Parquet file"):
        check_folder(str(examples), "examples")
    rejected = tmp_path / "rejected.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "anything": [1], "reason": ["empty_completion"]}), rejected)
    check_table(str(rejected), "rejected")  # the input's own columns, and a reason


def test_a_change_with_its_mtime_restored_changes_the_fingerprint(tmp_path):
    data = tmp_path / "feedback.jsonl"
    data.write_text('{"prompt": "what?", "completion": "yes.", "label": true}\n')
    before = os.stat(data)
    key = fingerprint([str(data)], [], {"max_length": 64})
    with open(data, "r+b") as f:  # the label flipped in place, the size kept
        f.write(data.read_bytes().replace(b"true", b"ture"))
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))  # as rsync -t / cp -p restore it
    after = os.stat(data)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert fingerprint([str(data)], [], {"max_length": 64}) != key


def fake_hub_snapshot(hub_cache: pathlib.Path, name: str, files: dict) -> pathlib.Path:
    """A model in the Hugging Face cache's layout: blobs, a snapshot of symlinks, refs/main."""
    repo = hub_cache / f"models--{name.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file, content in files.items():
        (repo / "blobs" / file).write_bytes(content)
        (snapshot / file).symlink_to(repo / "blobs" / file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    return repo / "blobs"


def test_a_hub_model_is_keyed_by_its_files_and_large_files_by_their_inode_and_ctime(tmp_path, monkeypatch):
    import time

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(cache, "HASHED_MODEL_FILE_MAX", 1000)
    blobs = fake_hub_snapshot(tmp_path / "hub", "org/tiny", {"config.json": b'{"vocab_size": 512}',
                                                              "model.safetensors": b"w" * 4096})
    key = fingerprint([], ["org/tiny"], {})
    for file, old, new in (("config.json", b"512", b"513"), ("model.safetensors", b"w", b"v")):
        before = os.stat(blobs / file)
        time.sleep(0.05)  # (ctime ticks at the kernel's clock granularity)
        with open(blobs / file, "r+b") as f:
            f.write((blobs / file).read_bytes().replace(old, new, 1))
        os.utime(blobs / file, ns=(before.st_atime_ns, before.st_mtime_ns))
        changed = fingerprint([], ["org/tiny"], {})
        assert changed != key, file
        key = changed
    with pytest.raises(FileNotFoundError, match="'org/absent' is neither a local folder nor in the local"):
        fingerprint([], ["org/absent"], {})


def test_a_checkpoint_folder_belongs_to_one_run(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.fit import check_resumable, checkpoint_storage, delete_checkpoints

    def config(output_dir: str, **more):
        return tiny_config(tmp_path, "tiny", "data.parquet", **{
            "output.output_dir": str(tmp_path / output_dir), "output.storage_path": str(tmp_path / "shared"),
            "output.run_name": "kto", **more})

    alice = config("alice")
    assert check_resumable(alice) is False  # a fresh run claims the folder
    _, folder, _ = checkpoint_storage(alice)
    os.makedirs(os.path.join(folder, "checkpoint_000001"))
    with open(os.path.join(alice.run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(alice.to_dict(), f)  # (run.py writes it after the claim)
    owner = json.loads(open(os.path.join(folder, "OWNER.json")).read())
    alice_id = open(os.path.join(alice.run_dir, "run_id")).read()
    assert owner["run_id"] == alice_id and owner["run_dir"] == alice.run_dir

    bob, bob_over = config("bob"), config("bob", **{"output.resume": False})
    for attempt in (lambda: check_resumable(bob), lambda: check_resumable(bob_over), lambda: delete_checkpoints(bob)):
        with pytest.raises(ConfigError) as refused:
            attempt()
        bob_id = open(os.path.join(bob.run_dir, "run_id")).read()
        assert all(part in str(refused.value) for part in (alice.run_dir, alice_id, bob.run_dir, bob_id, folder))
    assert os.path.isdir(os.path.join(folder, "checkpoint_000001"))  # nothing of alice's was deleted

    os.remove(os.path.join(alice.run_dir, "run_id"))  # alice's run directory made afresh: another run
    with pytest.raises(ConfigError, match="belongs to another run"):
        check_resumable(config("alice"))
    with open(os.path.join(alice.run_dir, "run_id"), "w") as f:
        f.write(alice_id)
    assert check_resumable(config("alice")) is True  # the owner resumes
    delete_checkpoints(alice)
    assert not os.path.exists(folder)


def test_cache_folders_are_private_whatever_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        made = private_folder(str(tmp_path / "cache" / "reference"))
        opened = tmp_path / "open"
        opened.mkdir()
        opened.chmod(0o777)
        private_folder(str(opened))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(opened).st_mode) == 0o700


def test_staging_files_are_removed_when_a_write_fails(tmp_path):
    """A conversion whose write hits a full device (/dev/full), and a data stage whose input is a
    corrupt Parquet file: each leaves the cache as it was, without a staging folder."""
    from pipeline.data.checks import examine
    from pipeline.data.formats import DataError

    target = tmp_path / "models" / "converted"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")

    def write_to_a_full_disk(staging: str) -> None:
        os.symlink("/dev/full", os.path.join(staging, "model.safetensors"))
        with open(os.path.join(staging, "model.safetensors"), "wb") as f:
            f.write(b"weights")
            f.flush()

    with pytest.raises(OSError, match="No space left"):
        publish_folder(str(target), write_to_a_full_disk)
    assert os.listdir(tmp_path / "models") == ["converted"] and os.listdir(target) == ["config.json"]

    data = tmp_path / "feedback.parquet"
    data.write_bytes(b"PAR1 not really" * 10)
    config = tiny_config(tmp_path, str(tmp_path / "tokenizer"), str(data), **{
        "reference.cache_dir": str(tmp_path / "reference")})
    os.makedirs(tmp_path / "tokenizer")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        examine(config, str(data), str(tmp_path / "tokenizer"))
    assert os.listdir(tmp_path / "reference") == []


DEEPSPEED_PROBE = """
import os, sys, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
from transformers import LlamaConfig, LlamaForCausalLM
from pipeline.train.engines import DeepSpeedEngine, deepspeed_config, make_optimizer, skip_deepspeed_shm_build
skip_deepspeed_shm_build(on_gpu=False)
folder = sys.argv[1]
def engine(stage):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    return DeepSpeedEngine(model, *make_optimizer(model, 1e-2, 0.0, "linear", 0.0, 10),
                           deepspeed_config(stage, False, False, bf16=stage == 3, max_grad_norm=1.0,
                                            per_device_train_batch_size=2))
def step(e, ids):
    loss = e.engine(input_ids=ids, labels=ids).loss
    e.backward(loss)
    e.step()
    return loss.item()
for stage in (1, 3):
    ids = torch.randint(0, 64, (2, 8))
    first = engine(stage)
    step(first, ids)
    first.save(os.path.join(folder, f"zero{stage}"), 0)
    resumed = engine(stage)
    resumed.load(os.path.join(folder, f"zero{stage}"))
    print("resumed", stage, [step(first, ids) for _ in range(2)] == [step(resumed, ids) for _ in range(2)], flush=True)
state = os.path.join(folder, "zero1", "state")
planted = next(name for name in os.listdir(state) if "optim_states" in name)
with open(os.path.join(state, planted), "wb") as f:
    f.write(bytes.fromhex(sys.argv[3]))
try:
    engine(1).load(os.path.join(folder, "zero1"))
    print("loaded the planted file")
except Exception as error:
    print("refused", type(error).__name__, flush=True)
"""


@pytest.mark.slow  # (a DeepSpeed process of its own: 13 s on 2 cores)
def test_deepspeed_and_ddp_resume_load_with_weights_only(tmp_path):
    """A DeepSpeed resume (ZeRO-1 float32, ZeRO-3 bfloat16, one CPU rank) continues exactly as the
    engine it saved; a planted pickle among its files is refused without running, as is one in
    place of the ddp strategy's optimizer.pt."""
    import socket

    from pipeline.train.engines import PlainEngine

    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(Touch(str(marker)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run([sys.executable, "-c", DEEPSPEED_PROBE, str(tmp_path), str(port), payload.hex()],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("resumed", "refused", "loaded"))]
    assert lines == ["resumed 1 True", "resumed 3 True", "refused UnpicklingError"], result.stdout
    assert not marker.exists()

    import torch

    from pipeline.train.engines import make_optimizer

    (tmp_path / "optimizer.pt").write_bytes(payload)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(pickle.UnpicklingError):
        PlainEngine(model, *make_optimizer(model, 1e-3, 0.0, "linear", 0.0, 10), 1.0).load(str(tmp_path / "optimizer.pt"))
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: loaded as DeepSpeed's own loader would, it runs
    assert marker.exists()


def test_precompute_retokenizes_a_change_with_its_mtime_restored_and_refuses_a_planted_cache(tmp_path, tiny_model,
                                                                                               ray_local):
    """Through `launch.py precompute`: a label flipped in place with the size and mtime kept is
    tokenized and scored anew; the cache folders are 0700; a scored file with a pickled column
    planted in the cache stops the next precompute (exit 2, the file named) before it is read."""
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectArray

    data = tmp_path / "feedback.parquet"
    table = pq.read_table(write_feedback(str(data), rows=12, seed=3))
    write = dict(compression="NONE", use_dictionary=False)  # a flipped bit keeps the file's size
    pq.write_table(table, data, **write)
    settings = ["--set", f"model.name_or_path={tiny_model}", "--set", f"data.path={data}",
                "--set", "data.generate_demo=false", "--set", "eval.path=null", "--set", "data.kl_block_size=4",
                "--set", f"reference.cache_dir={tmp_path / 'cache'}", "--set", f"output.output_dir={tmp_path / 'runs'}",
                "--set", f"model.cache_dir={tmp_path / 'models'}"]

    def precompute():
        result = launch_here("precompute", *settings)
        return result, (json.loads(result.stdout) if result.returncode == 0 else None)

    first, counts = precompute()
    assert first.returncode == 0, first.stderr[-3000:]
    before = os.stat(data)
    labels = table.column("label").to_pylist()
    labels[0] = not labels[0]
    pq.write_table(table.set_column(2, "label", pa.array(labels)), data, **write)
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(data).st_size, os.stat(data).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second, recounted = precompute()
    assert second.returncode == 0, second.stderr[-3000:]
    assert recounted["data"]["fingerprint"] != counts["data"]["fingerprint"]
    assert recounted["data"]["desirable"] == counts["data"]["desirable"] + (1 if labels[0] else -1)
    assert recounted["data"]["reference_cache_hit"] is False
    folder = os.path.dirname(recounted["scored"])
    for private in (tmp_path / "cache", folder):
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o700

    marker = tmp_path / "payload-ran"
    scored = pq.read_table(recounted["scored"])
    at = scored.schema.get_field_index("ref_logp")
    pq.write_table(scored.set_column(at, "ref_logp", ArrowPythonObjectArray.from_objects(
        [Touch(str(marker))] * scored.num_rows)), recounted["scored"])
    third, _ = precompute()
    assert third.returncode == 2 and recounted["scored"] in third.stderr and "extension type" in third.stderr
    assert not marker.exists()
    shutil.rmtree(folder)  # (the session's Ray lives on: leave no planted file behind)
