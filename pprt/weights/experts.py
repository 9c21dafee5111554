"""A MoE layer's routed experts, stacked for the fused kernels, filled one expert tensor at a time.

In the model a layer's experts are two stacked projections (pprt.models.moe):
gate_up_proj [E, 2I, H] (gate's I rows, then up's) and down_proj [E, H, I]. In
a checkpoint they are per expert (`mlp.experts.{e}.gate_proj.weight`, GPTQ/AWQ
`.qweight` / `.qzeros` / `.scales`) or fused in one tensor (Qwen3.5-MoE); the
loader hands `load_projection` readers of canonical per-expert names, and the
stack is allocated once and filled expert by expert, so loading never holds
more than the stack plus one expert's tensor. The stack's bytes equal the
per-expert layers' (what the planner counts).

- float weights: copied into a [E, N, K] parameter of the model dtype;
- GPTQ/AWQ experts: each converted into pprt's Int4 format (pprt.weights.int4),
  gate and up concatenated along N with their scales and zeros, stacked into an
  `Int4StackedLinear` ([E, K/8, N] ...: pprt_kernels.moe_weights' INT4 layout);
- quantize-at-load: each expert's tensor quantized (RTN) as it arrives.
Knows nothing of checkpoint files (the readers do) or of routing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from pprt_kernels.moe_weights import ExpertFormat, ExpertWeights

from .int4 import Int4Weight, quantize_rtn


class Stacked(Protocol):
    """What the loader fills: the model's float StackedLinear (meta until loaded)."""

    num_experts: int
    in_features: int
    out_features: int
    weight: nn.Parameter


class Int4StackedLinear(nn.Module):
    """E Int4 linear maps stacked (buffers, so .to() moves them); the fused MoE kernels read them."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 perm: torch.Tensor | None = None) -> None:
        super().__init__()
        self.group_size = group_size
        self.register_buffer("qweight", qweight)  # int32 [E, K/8, N]
        self.register_buffer("scales", scales)  # [E, K/g, N]
        self.register_buffer("zeros", zeros)  # uint8 [E, K/g, N]
        self.register_buffer("perm", perm)  # int64 [E, K] or None
        self.expert_weights()  # validates the layout

    @classmethod
    def like(cls, num_experts: int, w: Int4Weight) -> Int4StackedLinear:
        """Uninitialised room for `num_experts` experts shaped like `w`, on its device."""
        def room(t: torch.Tensor) -> torch.Tensor:
            return torch.empty((num_experts, *t.shape), dtype=t.dtype, device=t.device)

        return cls(room(w.qweight), room(w.scales), room(w.zeros), w.group_size,
                   room(w.perm) if w.perm is not None else None)

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 8

    @property
    def out_features(self) -> int:
        return self.qweight.shape[2]

    def set_expert(self, e: int, w: Int4Weight, where: str) -> None:
        """Copy expert `e`'s weight in; `where` names it in errors."""
        if w.group_size != self.group_size or (w.perm is None) != (self.perm is None) \
                or tuple(w.qweight.shape) != tuple(self.qweight.shape[1:]):
            raise ValueError(f"{where}: Int4 layout (group_size {w.group_size}, K x N {w.in_features} x "
                             f"{w.out_features}, desc_act {w.perm is not None}) differs from the layer's other "
                             f"experts ({self.group_size}, {self.in_features} x {self.out_features}, "
                             f"{self.perm is not None})")
        self.qweight[e].copy_(w.qweight)
        self.scales[e].copy_(w.scales)
        self.zeros[e].copy_(w.zeros)
        if self.perm is not None:
            self.perm[e].copy_(w.perm)

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(ExpertFormat.INT4, self.qweight, self.scales, self.zeros, self.group_size, self.perm)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, " \
               f"group_size={self.group_size}, desc_act={self.perm is not None}"


def concat_out(parts: list[Int4Weight], where: str) -> Int4Weight:
    """Int4 weights of one input side by side along N (out): W = [W_0; W_1; ...], scales and zeros with them."""
    first = parts[0]
    for p in parts[1:]:
        if p.group_size != first.group_size or p.in_features != first.in_features:
            raise ValueError(f"{where}: cannot stack Int4 layers of group_size / in_features "
                             f"{first.group_size}/{first.in_features} and {p.group_size}/{p.in_features}")
        if (p.perm is None) != (first.perm is None) or (p.perm is not None and not torch.equal(p.perm, first.perm)):
            raise ValueError(f"{where}: gate and up are stored with different desc_act orders (g_idx); "
                             "their merged projection needs one")
    if len(parts) == 1:
        return first
    return Int4Weight(torch.cat([p.qweight for p in parts], 1), torch.cat([p.scales for p in parts], 1),
                      torch.cat([p.zeros for p in parts], 1), first.group_size, first.perm)


def load_projection(
    target: Stacked,
    experts_prefix: str,  # canonical "model.layers.{i}.mlp.experts"
    names: tuple[str, ...],  # ("gate_proj", "up_proj"): stacked along N in this order; or ("down_proj",)
    read_float: Callable[[str, tuple[int, int]], torch.Tensor],  # tensor name, [n, K] -> on device, model dtype
    read_int4: Callable[[str, int, int], Int4Weight] | None,  # linear prefix, K, n -> on device; None: float file
    rtn_group: int | None,  # quantize float experts at load with this group; None: keep float
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """Fill `target` (float) in place and return it, or return the Int4StackedLinear that replaces it.

    Raises ValueError naming the expert whose tensors do not fit the others.
    """
    e_count, n, k = target.num_experts, target.out_features, target.in_features
    if n % len(names):
        raise ValueError(f"{experts_prefix}: {n} outputs do not split into {names}")
    n_each = n // len(names)
    if read_int4 is None and rtn_group is None:
        stack = torch.empty((e_count, n, k), device=device, dtype=dtype)
        for e in range(e_count):
            for j, name in enumerate(names):
                stack[e, j * n_each:(j + 1) * n_each].copy_(
                    read_float(f"{experts_prefix}.{e}.{name}.weight", (n_each, k)))
        target.weight = nn.Parameter(stack, requires_grad=False)
        return target  # type: ignore[return-value]
    out: Int4StackedLinear | None = None
    for e in range(e_count):
        where = f"{experts_prefix}.{e}.{'+'.join(names)}"
        if read_int4 is not None:
            parts = [read_int4(f"{experts_prefix}.{e}.{name}", k, n_each) for name in names]
        else:
            parts = [quantize_rtn(read_float(f"{experts_prefix}.{e}.{name}.weight", (n_each, k)), rtn_group)
                     for name in names]
        w = concat_out(parts, where)
        if out is None:
            out = Int4StackedLinear.like(e_count, w)
        out.set_expert(e, w, where)
    return out
