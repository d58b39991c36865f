"""The MLP (SwiGLU) and RMSNorm of Llama-family decoders, computed as transformers computes them but
keeping only their inputs for the backward, which recomputes the rest (elementwise work only).

A training forward's activations are most of a step's memory beyond the model states, and these two
keep most of them: autograd saves the MLP's gate and up outputs, the SiLU of the gate and their
product (four [tokens, intermediate] tensors; these functions keep two), and each RMSNorm its
float32 input and normalised output (these keep the input and one number a token). On SmolLM2-135M
that is ~0.5 of the 1.2 MB a token keeps (benchmarks/NOTES.md). The idea is Liger's fused kernels
(GPU-only, Triton); this is plain torch, so it runs on CPUs too.

Applied by pipeline.models.load_causal_lm to transformers' own PACKABLE_MODEL_TYPES; a layer whose
projections are no plain Linear when it runs (LoRA adapters, DeepSpeed ZeRO-3's partitioned weights)
runs transformers' own forward.
"""

import contextlib
import types

import torch
import torch.nn.functional as F


def _autocast(device_type: str):
    """The autocast the forward runs under, to run its backward under (as torch.amp.custom_bwd does)."""
    if not torch.amp.is_autocast_available(device_type):  # (the meta device of `launch.py plan`)
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                          enabled=torch.is_autocast_enabled(device_type))


class _SwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)), saving x, gate(x) and up(x)."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        ctx.autocast = _autocast(x.device.type)
        gate, up = F.linear(x, w_gate), F.linear(x, w_up)
        ctx.save_for_backward(x, gate, up, w_gate, w_up, w_down)
        return F.linear(F.silu(gate) * up, w_down)

    @staticmethod
    def backward(ctx, grad_out):
        x, gate, up, w_gate, w_up, w_down = ctx.saved_tensors
        # Under the forward's autocast, as autograd would run these products: each cast to its dtype,
        # each gradient cast back to its input's dtype.
        with ctx.autocast:
            sigmoid = torch.sigmoid(gate)
            silu = gate * sigmoid
            grad_hidden = F.linear(grad_out, w_down.t())
            grad_up = grad_hidden * silu
            grad_gate = grad_hidden * up * (sigmoid * (1 + gate * (1 - sigmoid)))
            rows = lambda t: t.flatten(0, -2)  # noqa: E731
            grad_w_down = rows(grad_out).t().mm(rows(silu * up))
            grad_w_gate, grad_w_up = rows(grad_gate).t().mm(rows(x)), rows(grad_up).t().mm(rows(x))
            grad_x = F.linear(grad_gate, w_gate.t()).to(x.dtype) + F.linear(grad_up, w_up.t()).to(x.dtype)
        return grad_x, grad_w_gate.to(w_gate.dtype), grad_w_up.to(w_up.dtype), grad_w_down.to(w_down.dtype)


class _RMSNorm(torch.autograd.Function):
    """weight * (x / sqrt(mean(x^2) + eps)) in float32, cast back to x's dtype before the weight,
    saving x and the reciprocal root a token."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_weight = (grad_out * normed.to(x.dtype)).flatten(0, -2).sum(0)
        grad_normed = (grad_out * weight).float()
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


def _plain(*linears) -> bool:
    """Plain bias-free Linears whose weights are whole here (not ZeRO-3 partitions, which DeepSpeed
    gathers around each Linear's own forward)."""
    return all(type(m) is torch.nn.Linear and m.bias is None and not hasattr(m.weight, "ds_id") for m in linears)


def _lean_mlp(self, x):
    if not (torch.is_grad_enabled() and _plain(self.gate_proj, self.up_proj, self.down_proj)):
        return type(self).forward(self, x)
    return _SwiGLU.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


def _lean_norm(self, x):
    if not (torch.is_grad_enabled() and not hasattr(self.weight, "ds_id")):
        return type(self).forward(self, x)
    return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


def apply(model: torch.nn.Module) -> int:
    """Gives the model's SwiGLU MLPs and RMSNorms these forwards; returns how many modules changed."""
    if getattr(model.config, "hidden_act", None) != "silu":
        return 0
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("MLP") and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(_lean_mlp, module)
            changed += 1
        elif name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_lean_norm, module)
            changed += 1
    return changed
