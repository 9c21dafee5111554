"""A MoE layer's routed experts, stacked for the fused kernels, filled one expert tensor at a time.

In the model a layer's experts are two stacked projections (pprt.models.moe):
gate_up_proj [E, 2I, H] (gate's I rows, then up's) and down_proj [E, H, I]. In
a checkpoint they are per expert (`mlp.experts.{e}.gate_proj.weight`, or an
Int4 / FP8 layer's tensors) or fused in one tensor (Qwen3.5-MoE); the loader
hands `load_projection` readers of canonical per-expert names, and the stack is
allocated once and filled expert by expert, so loading never holds more than
the stack plus one expert's tensors. The stack's bytes equal the per-expert
layers' (what the planner counts).

- float experts: copied into a [E, N, K] parameter of the model dtype;
- quantized experts (GPTQ / AWQ / compressed-tensors Int4, FP8), read by the
  formats' own importers into pprt's Int4Weight / Fp8Weight, or float experts
  quantized at load (RTN Int4, block FP8) as each arrives: gate and up joined
  along N (Int4: scales and zeros with their columns; FP8: scale rows part by
  part), then stacked into an Int4StackedLinear / Fp8StackedLinear, the layouts
  of pprt_kernels.moe_weights.
Knows nothing of checkpoint files (the readers do) or of routing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from pprt_kernels.moe_weights import ExpertFormat, ExpertWeights

from .fp8 import Fp8Weight
from .int4 import Int4Weight

Quantized = Int4Weight | Fp8Weight


@dataclass(slots=True)
class JoinedFp8:
    """FP8 layers of one input joined along N, each keeping its own scale rows (so not an Fp8Weight
    when a part's rows do not fill whole blocks)."""

    weight: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor  # float32 [parts * ceil(N/parts/bn), ceil(K/bk)]
    block: tuple[int, int]


class Stacked(Protocol):
    """What the loader fills: the model's float StackedLinear (meta until loaded)."""

    num_experts: int
    in_features: int
    out_features: int
    weight: nn.Parameter


class _StackedBuffers(nn.Module):
    """E experts' tensors stacked along dim 0 as buffers (so .to() moves them); filled by `set_expert`."""

    _FIELDS: tuple[str, ...] = ()

    def room(self, num_experts: int, w) -> None:
        for field, t in zip(self._FIELDS, self._tensors(w)):
            stacked = None if t is None else torch.empty((num_experts, *t.shape), dtype=t.dtype, device=t.device)
            self.register_buffer(field, stacked)

    def set_expert(self, e: int, w, where: str) -> None:
        """Copy expert `e` in; `where` names it when its layout differs from the layer's."""
        for field, t in zip(self._FIELDS, self._tensors(w)):
            mine = getattr(self, field)
            if (t is None) != (mine is None) or (t is not None and tuple(t.shape) != tuple(mine.shape[1:])) \
                    or self._params(w) != self._params(self):
                raise ValueError(f"{where}: its {type(w).__name__} layout ({field} "
                                 f"{None if t is None else list(t.shape)}, {self._params(w)}) differs from the "
                                 f"layer's other experts ({None if mine is None else list(mine.shape[1:])}, "
                                 f"{self._params(self)})")
            if t is not None:
                mine[e].copy_(t)


class Int4StackedLinear(_StackedBuffers):
    """E Int4 linear maps stacked: qweight int32 [E, K/8, N], scales [E, K/g, N], zeros, perm [E, K] | None."""

    _FIELDS = ("qweight", "scales", "zeros", "perm")

    def __init__(self, num_experts: int, like: Int4Weight) -> None:
        super().__init__()
        self.group_size = like.group_size
        self.room(num_experts, like)

    @staticmethod
    def _tensors(w):
        return (w.qweight, w.scales, w.zeros, w.perm)

    @staticmethod
    def _params(w) -> tuple:
        return (w.group_size,)

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(ExpertFormat.INT4, self.qweight, self.scales, self.zeros, self.group_size, self.perm)

    def extra_repr(self) -> str:
        e, k8, n = self.qweight.shape
        return f"experts={e}, in_features={k8 * 8}, out_features={n}, group_size={self.group_size}, " \
               f"desc_act={self.perm is not None}"


class Fp8StackedLinear(_StackedBuffers):
    """E FP8 linear maps stacked: weight float8_e4m3fn [E, N, K], scale float32 [E, rows, ceil(K/bk)]."""

    _FIELDS = ("weight", "weight_scale")

    def __init__(self, num_experts: int, like: JoinedFp8, parts: int) -> None:
        super().__init__()
        self.block, self.parts = like.block, parts
        self.room(num_experts, like)

    @staticmethod
    def _tensors(w):
        return (w.weight, w.scale)

    @staticmethod
    def _params(w) -> tuple:
        return (w.block,)

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(ExpertFormat.FP8, self.weight, self.weight_scale, block=self.block, parts=self.parts)

    def extra_repr(self) -> str:
        e, n, k = self.weight.shape
        return f"experts={e}, in_features={k}, out_features={n}, block={self.block}"


def concat_out(parts: list[Quantized], where: str) -> Int4Weight | JoinedFp8:
    """Layers of one input side by side along N (out): Int4 with their scales and zeros (one desc_act
    order needed), FP8 with their scale rows one after the other (same block)."""
    first = parts[0]
    for p in parts[1:]:
        if type(p) is not type(first) or p.in_features != first.in_features:
            raise ValueError(f"{where}: cannot join a {type(first).__name__} of in_features {first.in_features} "
                             f"and a {type(p).__name__} of {p.in_features}")
        if isinstance(p, Int4Weight) and (p.group_size != first.group_size or (p.perm is None) != (first.perm is None)
                                          or (p.perm is not None and not torch.equal(p.perm, first.perm))):
            raise ValueError(f"{where}: gate and up have different Int4 groups or desc_act orders (g_idx); "
                             "their joined projection needs one")
        if isinstance(p, Fp8Weight) and p.block != first.block:
            raise ValueError(f"{where}: gate and up have different FP8 blocks {first.block} and {p.block}")
    if isinstance(first, Fp8Weight):
        return JoinedFp8(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]), first.block)
    if len(parts) == 1:
        return first
    return Int4Weight(torch.cat([p.qweight for p in parts], 1), torch.cat([p.scales for p in parts], 1),
                      torch.cat([p.zeros for p in parts], 1), first.group_size, first.perm)


def load_projection(
    target: Stacked,
    experts_prefix: str,  # canonical "model.layers.{i}.mlp.experts"
    names: tuple[str, ...],  # ("gate_proj", "up_proj"): joined along N in this order; or ("down_proj",)
    read_float: Callable[[str, tuple[int, int]], torch.Tensor] | None,  # weight name, [n, K] -> device, model dtype
    read_quantized: Callable[[str], Quantized] | None,  # linear prefix -> on device (the file stores it quantized)
    quantize: Callable[[torch.Tensor], Quantized] | None,  # quantize-at-load of a float expert weight
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """Fill `target` (float) in place and return it, or return the stacked quantized module that replaces it.

    Exactly one way in: read_quantized, or read_float (with or without `quantize`).
    Raises ValueError naming the expert whose tensors do not fit the others.
    """
    e_count, n, k = target.num_experts, target.out_features, target.in_features
    if n % len(names):
        raise ValueError(f"{experts_prefix}: {n} outputs do not split into {names}")
    n_each = n // len(names)
    if read_quantized is None and quantize is None:
        stack = torch.empty((e_count, n, k), device=device, dtype=dtype)
        for e in range(e_count):
            for j, name in enumerate(names):
                stack[e, j * n_each:(j + 1) * n_each].copy_(
                    read_float(f"{experts_prefix}.{e}.{name}.weight", (n_each, k)))
        target.weight = nn.Parameter(stack, requires_grad=False)
        return target  # type: ignore[return-value]
    out: Int4StackedLinear | Fp8StackedLinear | None = None
    for e in range(e_count):
        where = f"{experts_prefix}.{e}.{'+'.join(names)}"
        if read_quantized is not None:
            parts = [read_quantized(f"{experts_prefix}.{e}.{name}") for name in names]
        else:
            parts = [quantize(read_float(f"{experts_prefix}.{e}.{name}.weight", (n_each, k))) for name in names]
        if any((p.out_features, p.in_features) != (n_each, k) for p in parts):
            raise ValueError(f"{where}: expected [{n_each}, {k}] per part, got "
                             f"{[[p.out_features, p.in_features] for p in parts]}")
        w = concat_out(parts, where)
        if out is None:
            out = Fp8StackedLinear(e_count, w, len(names)) if isinstance(w, JoinedFp8) else \
                Int4StackedLinear(e_count, w)
        out.set_expert(e, w, where)
    return out
