"""A MoE layer's routed experts stacked for the fused kernels, filled expert by expert while loading.

The model names its experts as checkpoints do, one MLP each
(`mlp.experts.{e}.gate_proj` ...), so the loader, the formats (formats.py),
the checkpoint layout and the planner treat every expert linear like any
other. The fused kernels read them stacked (pprt_kernels.moe_weights):
gate_up [E, 2I, H] (gate's I rows, then up's) and down [E, H, I]. As soon as
the loader has placed one expert linear (float, Int4 of any importer or
quantized at load, FP8), `stack_expert` copies it into its layer's stack
(allocated on the first expert) and drops it; so loading holds the stacks plus
one expert's tensors, and the bytes equal the per-expert layers' (what the
planner counts). Gate and up join along N: Int4 with their scales and zeros
(one desc_act order needed), FP8 with their own scale rows.
Knows nothing of checkpoint files or of routing.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from pprt_kernels.moe_weights import ExpertFormat, ExpertWeights

from .fp8 import Fp8Linear, Fp8Weight
from .int4 import Int4Linear, Int4Weight

_EXPERT_LINEAR = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_PARTS = {"gate_proj": ("gate_up", 0, 2), "up_proj": ("gate_up", 1, 2), "down_proj": ("down", 0, 1)}


def expert_linear(prefix: str) -> tuple[str, int, str] | None:
    """(MoE module prefix, expert, projection) when `prefix` names one routed expert's linear."""
    m = _EXPERT_LINEAR.match(prefix)
    return (m[1], int(m[2]), m[3]) if m else None


class _Stack(nn.Module):
    """E experts' tensors of one projection, `parts` layers joined along N; filled by `set_part`.
    Buffers (so .to() moves them), except a float weight, which stays a parameter as in nn.Linear."""

    def __init__(self, num_experts: int, parts: int, like: dict[str, torch.Tensor], n_dim: dict[str, int],
                 params: tuple) -> None:
        super().__init__()
        self.parts, self.params, self.filled = parts, params, 0
        self.n_dim = n_dim  # tensor name -> its dim along which the parts join (in one expert's tensor)
        for name, t in like.items():
            shape = list(t.shape)
            if n_dim[name] >= 0:
                shape[n_dim[name]] *= parts
            stacked = torch.empty((num_experts, *shape), dtype=t.dtype, device=t.device)
            if isinstance(self, FloatStack):
                self.register_parameter(name, nn.Parameter(stacked, requires_grad=False))
            else:
                self.register_buffer(name, stacked)

    def set_part(self, e: int, part: int, tensors: dict[str, torch.Tensor], params: tuple, where: str) -> None:
        mine = set(self._buffers) | set(self._parameters)
        if params != self.params or set(tensors) != mine:
            raise ValueError(f"{where}: stored as {params} ({sorted(tensors)}), unlike the layer's other experts "
                             f"{self.params} ({sorted(mine)})")
        for name, t in tensors.items():
            dim = self.n_dim[name]
            size = t.shape[dim]
            dest = getattr(self, name)[e].narrow(dim, part * size, size) if dim >= 0 else getattr(self, name)[e]
            if tuple(dest.shape) != tuple(t.shape):
                raise ValueError(f"{where}: {name} has shape {list(t.shape)}, the layer's others {list(dest.shape)}")
            if dim < 0 and part > 0 and not torch.equal(dest, t):  # shared by the parts (desc_act order)
                raise ValueError(f"{where}: gate and up are stored with different {name} (desc_act orders); "
                                 "their joined projection needs one")
            with torch.no_grad():
                dest.copy_(t)
        self.filled += 1


class FloatStack(_Stack):
    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(ExpertFormat.FLOAT, self.weight)


class Int4Stack(_Stack):
    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(ExpertFormat.INT4, self.qweight, self.scales, self.zeros, self.params[1],
                             getattr(self, "perm", None))


class Fp8Stack(_Stack):
    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(ExpertFormat.FP8, self.weight, self.weight_scale, block=self.params[1], parts=self.parts)


def _tensors(module: nn.Module, where: str) -> tuple[type[_Stack], dict[str, torch.Tensor], dict[str, int], tuple]:
    """One loaded expert linear as (stack class, tensors, join dim of each, format parameters)."""
    if getattr(module, "bias", None) is not None:
        raise ValueError(f"{where}: routed experts have no bias")
    if isinstance(module, Int4Linear):
        w: Int4Weight = module.weight
        tensors = {"qweight": w.qweight, "scales": w.scales, "zeros": w.zeros}
        dims = {"qweight": 1, "scales": 1, "zeros": 1}  # [K/8, N], [K/g, N]: N is dim 1
        if w.perm is not None:
            tensors["perm"], dims["perm"] = w.perm, -1  # one [K] order for all parts
        return Int4Stack, tensors, dims, ("int4", w.group_size)
    if isinstance(module, Fp8Linear):
        f: Fp8Weight = module.fp8_weight
        return Fp8Stack, {"weight": f.weight, "weight_scale": f.scale}, {"weight": 0, "weight_scale": 0}, \
            ("fp8", f.block)
    if isinstance(module, nn.Linear):
        return FloatStack, {"weight": module.weight.data}, {"weight": 0}, ("float", module.weight.dtype)
    raise ValueError(f"{where}: cannot stack a {type(module).__name__}")


def stack_expert(moe: nn.Module, expert: int, proj: str, module: nn.Module, where: str) -> None:
    """Copy one placed expert linear into `moe`'s stacks and drop it from `moe.experts`.

    `moe` has `experts` (per-expert MLPs), `stacked` (whose `gate_up` / `down` are set here) and
    `num_experts`. Raises ValueError naming the linear when its format or shape differs from the
    layer's other experts. When every expert is in, `moe.experts` is emptied.
    """
    name, part, parts = _PARTS[proj]
    cls, tensors, dims, params = _tensors(module, where)
    stack = getattr(moe.stacked, name)
    if stack is None:
        stack = cls(moe.num_experts, parts, tensors, dims, params)
        setattr(moe.stacked, name, stack)
    elif not isinstance(stack, cls):
        raise ValueError(f"{where}: a {params[0]} layer, but the layer's other experts are {stack.params[0]}")
    stack.set_part(expert, part, tensors, params, where)
    setattr(moe.experts[expert], proj, None)  # its tensors now live in the stack
    if all(s is not None and s.filled == s.parts * moe.num_experts
           for s in (moe.stacked.gate_up, moe.stacked.down)):
        moe.experts = nn.ModuleList()


def unstack(moe: nn.Module) -> dict[tuple[int, str], torch.Tensor | Int4Weight | Fp8Weight]:
    """The inverse view: (expert, projection) -> that linear's weight as it was placed (float [N, K],
    Int4Weight or Fp8Weight), sharing the stacks' memory. For tests and inspection."""
    out = {}
    for proj, (name, part, parts) in _PARTS.items():
        stack = getattr(moe.stacked, name)
        for e in range(moe.num_experts):
            if isinstance(stack, FloatStack):
                n = stack.weight.shape[1] // parts
                out[(e, proj)] = stack.weight[e, part * n:(part + 1) * n]
            elif isinstance(stack, Int4Stack):
                n = stack.qweight.shape[2] // parts
                cols = slice(part * n, (part + 1) * n)
                out[(e, proj)] = Int4Weight(stack.qweight[e, :, cols], stack.scales[e, :, cols],
                                            stack.zeros[e, :, cols], stack.params[1],
                                            stack.perm[e] if "perm" in stack._buffers else None)
            else:
                n, r = stack.weight.shape[1] // parts, stack.weight_scale.shape[1] // parts
                out[(e, proj)] = Fp8Weight(stack.weight[e, part * n:(part + 1) * n],
                                           stack.weight_scale[e, part * r:(part + 1) * r], stack.params[1])
    return out


def expert_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Every stacked expert linear under `root` as the module it was placed as (nn.Linear, Int4Linear,
    Fp8Linear), named `<moe>.experts.{e}.{proj}`, sharing the stacks' memory. For tests and inspection."""
    out = {}
    for prefix, moe in root.named_modules():
        if not hasattr(moe, "stacked") or getattr(moe.stacked, "gate_up", None) is None:
            continue
        for (e, proj), w in unstack(moe).items():
            if isinstance(w, Int4Weight):
                layer = Int4Linear(w)
            elif isinstance(w, Fp8Weight):
                layer = Fp8Linear(w)
            else:
                layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
                layer.weight = nn.Parameter(w, requires_grad=False)
            out[f"{prefix}.experts.{e}.{proj}"] = layer
    return out
