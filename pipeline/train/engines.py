"""How a worker turns the step's gradients into an update, and how it saves and restores that state.

Two strategies share `train_step`:
- `PlainEngine` (strategy `ddp`): every worker holds the whole model and optimizer; gradients are
  summed with one explicit bucketed all-reduce after the step's backwards (what DDP does, without
  DDP's rule that every rank runs the same number of backwards: a rank's share of a step may be
  empty or differently grouped).
- `DeepSpeedEngine` (strategy `deepspeed`): ZeRO stage 1, 2 or 3 partitions optimizer states,
  gradients and (stage 3) parameters across workers. ZeRO-3 gathers parameters in every forward
  and ZeRO-2/3 reduce in every backward, so all ranks must run the same number of both:
  `equal_forwards` tells `train_step` to pad a rank's forwards with empty-weight ones.

An engine saves and loads its own state (optimizer, scheduler; DeepSpeed: each rank's partition)
at a path that checkpoint.py, which owns the checkpoint's layout, gives it.
"""

import math
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from transformers import get_scheduler


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(item: Any) -> list:
    """Every rank's `item`, in rank order (a collective: every rank calls it)."""
    if world_size() == 1:
        return [item]
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, item)
    return everyone


def all_reduce_gradients(grads: list[torch.Tensor], bucket_bytes: int = 32 * 2**20) -> None:
    """SUM the gradients across workers in place, a bucket of flattened tensors at a time: few
    collectives, and at most one bucket of extra memory (not a second copy of every gradient)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads + [None]:
        if grad is not None:
            bucket.append(grad)
            size += grad.numel() * grad.element_size()
        if bucket and (grad is None or size >= bucket_bytes):
            flat = all_reduce_sum(_flatten_dense_tensors(bucket))
            for target, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                target.copy_(reduced)
            bucket, size = [], 0


class PlainEngine:
    equal_forwards = False

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, max_grad_norm: float):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.max_grad_norm = max_grad_norm if max_grad_norm > 0 else math.inf

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, before_update: Callable[[float], None] = lambda grad_norm: None) -> float:
        """Sum gradients across workers, clip, hand the gradient norm before clipping (the same on
        every rank) to `before_update`, which may raise to refuse the update; update."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # a rank without rows this step still takes part in the sum
                p.grad = torch.zeros_like(p)
        if world_size() > 1:
            all_reduce_gradients([p.grad for p in params])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm).item()
        before_update(grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def save(self, path: str, rank: int) -> None:
        """The optimizer and scheduler state as one file (every rank holds the same)."""
        if rank == 0:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, path)

    def load(self, path: str) -> None:
        state = torch.load(path, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def export(self, folder: str, rank: int) -> None:
        if rank == 0:
            self.module.save_pretrained(folder, safe_serialization=True)


def deepspeed_config(zero_stage: int, offload_optimizer: bool, offload_param: bool, bf16: bool,
                     max_grad_norm: float, per_device_train_batch_size: int) -> dict:
    """The DeepSpeed config this project runs: the caller owns accumulation (one `step()` a global
    step, however many backwards a rank ran), gradients are clipped by DeepSpeed's global norm."""
    zero: dict = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bf16}
    if offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": bf16}
    precision = {}
    if bf16:  # bfloat16 forwards and backwards; a step's several backwards summed, and ranks reduced, in float32
        precision = {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
    return {
        **precision,
        "train_micro_batch_size_per_gpu": per_device_train_batch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # torch's AdamW: no JIT-compiled DeepSpeed Adam, and the same update as the ddp strategy
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }


def skip_deepspeed_shm_build(on_gpu: bool) -> None:
    """On CPUs, DeepSpeed's communication backend compiles a shared-memory all-reduce with g++ the
    first time a machine starts it (measured 55 s on 2 cores: on every fresh CI machine), a kernel
    only its inference all-reduce calls; training's collectives go through torch.distributed
    (gloo). Marked unavailable before DeepSpeed starts its backend, it is not built."""
    if not on_gpu:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    equal_forwards = True
    # ZeRO-3: transformers' HfDeepSpeedConfig, which it consults through a weak reference whenever it
    # builds parameters; held here so that it lives as long as the engine.
    zero3_loading = None

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, config: dict):
        import deepspeed  # here: the ddp strategy must not need it

        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=config)
        self.engine.checkpoint_engine = weights_only_checkpoint_engine(self.engine)
        self.module = self.engine.module
        self.zero_stage = config["zero_optimization"]["stage"]

    def learning_rate(self) -> float:
        return self.engine.get_lr()[0]

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks; the step's loss is already normalised by the
        # global row count, so a sum is wanted: scale by the world size.
        self.engine.backward(loss * world_size(), scale_wrt_gas=False)

    def step(self, before_update: Callable[[float], None] = lambda grad_norm: None) -> float:
        """DeepSpeed keeps its gradients in its own partitioned buffers: what is visible of them on
        the parameters is checked (all ranks alike) before its step, its global norm after it (a
        non-finite one is refused before any checkpoint, though the update already happened)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        local = torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else torch.zeros(())
        visible = torch.tensor([float(not torch.isfinite(local))], device=next(self.module.parameters()).device)
        if all_reduce_sum(visible).item():
            before_update(math.nan)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        before_update(norm)
        return norm

    def save(self, path: str, rank: int) -> None:
        """DeepSpeed's own checkpoint folder: each rank writes its partition (a collective)."""
        self.engine.save_checkpoint(path, tag="state")

    def load(self, path: str) -> None:
        loaded, _ = self.engine.load_checkpoint(path, tag="state")
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed state in {path}; was it written by strategy ddp?")

    def export(self, folder: str, rank: int) -> None:
        """A full Hugging Face folder on rank 0. ZeRO-3 holds a shard of every parameter on each rank:
        gather them a layer at a time (a collective: every rank calls this)."""
        state = self.engine._zero3_consolidated_16bit_state_dict() if self.zero_stage == 3 else None
        if rank == 0:
            self.module.save_pretrained(folder, state_dict=state, safe_serialization=True)


def weights_only_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine, loading with torch.load(weights_only=True): DeepSpeed's
    own loads unpickle anything (weights_only=False), and a checkpoint folder on shared storage is
    as trusted as everyone who can write there. Tensors, containers and plain values load; of other
    classes, only the three DeepSpeed's ZeRO optimizer states hold (measured: stages 1, 2 and 3,
    float32 and bfloat16), rebuilt from plain values by torch's restricted unpickler, never by
    calling what the file names. Anything else stops the resume with torch's UnpicklingError."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:  # (this project configures no other)
        raise RuntimeError(f"DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}: only "
                           "TorchCheckpointEngine is loaded with weights_only=True here")

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                return torch.load(path, map_location=map_location, weights_only=True)

    loader = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
    loader.__dict__.update(engine.checkpoint_engine.__dict__)  # its save settings, as DeepSpeed configured them
    return loader


def make_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float, scheduler_type: str,
                   warmup_ratio: float, total_steps: int, fused: bool = False):
    """AdamW over the trainable parameters (with LoRA: the adapters only) and its learning-rate schedule.
    `fused`: torch's one-kernel AdamW (CPU and CUDA), for an optimizer that torch steps itself
    (DeepSpeed ZeRO steps its own partitions): 3% of a CPU step on SmolLM2 (benchmarks/NOTES.md)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay, fused=fused or None)
    scheduler = get_scheduler(scheduler_type, optimizer, num_warmup_steps=math.ceil(warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def deepspeed_settings(config) -> Optional[dict]:
    """The DeepSpeed config of a run with strategy `deepspeed` (bf16 as training.bf16 says); None for ddp."""
    if config.scaling.strategy != "deepspeed":
        return None
    ds = config.deepspeed
    return deepspeed_config(ds.zero_stage, ds.offload_optimizer, ds.offload_param, bf16=config.trainer_bf16,
                            max_grad_norm=config.training.max_grad_norm,
                            per_device_train_batch_size=config.training.per_device_train_batch_size)


def build_engine(config, model: torch.nn.Module, total_steps: int, ds_config: Optional[dict]):
    """The run's strategy around a loaded model: `ddp` (summed by hand) or DeepSpeed ZeRO."""
    t = config.training
    optimizer, scheduler = make_optimizer(model, t.learning_rate, t.weight_decay, t.lr_scheduler_type,
                                          t.warmup_ratio, total_steps, fused=not ds_config)
    if ds_config:
        return DeepSpeedEngine(model, optimizer, scheduler, ds_config)
    return PlainEngine(model, optimizer, scheduler, t.max_grad_norm)
