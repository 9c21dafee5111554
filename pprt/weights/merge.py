"""Merged projections: q/k/v into one linear and gate/up into one, joined along N as they are placed.

A decoder layer's attention reads x through three matmuls (q, k, v) and its
MLP through two (gate, up); each is a weight read and a launch. Once the
loader has placed all of a group (`merge_if_complete`), its parts are joined
into one layer of the same format, the parts' outputs side by side:

- float: the weights [N_i, K] (and biases) concatenated along N;
- Int4: qweight [K/8, N_i], scales and zeros [K/g, N_i] concatenated along N
  (packing runs along K, so columns join as they are), one group size and one
  desc_act order (`perm`) for all parts;
- FP8: weight [N_i, K] and the block scales [N_i/bn, K/bk] along N, when every
  part's N_i is a whole number of scale blocks.

Float parts that the file stores as float and nothing quantizes at load are
not joined afterwards but read straight into their slice of the merged layer
(`FloatMerges`, allocated when the first part arrives): loading holds no second
copy of them. Parts whose formats differ (a per-module quantization rule), Int4
parts with different orders or FP8 parts that end inside a scale block stay
apart: the modules run them one by one. The model's modules (Attention, MLP) hold the
merged layer as `qkv_proj` / `gate_up_proj` and split its output by the parts'
sizes; the parts' names stay the checkpoint's for the loader, the formats and
the planner. `linear_modules` shows every placed linear under its checkpoint
name again (views of the merged and stacked tensors), for tests and inspection.
Knows nothing of checkpoint files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.layers import MERGED_LAYERS
from .experts import expert_linear, expert_modules
from .fp8 import Fp8Linear, Fp8Weight
from .int4 import Int4Linear, Int4Weight

GROUPS = {parts: merged for merged, parts in MERGED_LAYERS.items()}
_LINEARS = (nn.Linear, Int4Linear, Fp8Linear)


def _placed(module: nn.Module | None) -> bool:
    if not isinstance(module, _LINEARS):
        return False
    return all(t.device.type != "meta" for t in (*module.parameters(), *module.buffers()))


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where one float part goes in its group's merged layer."""

    parent: str  # module prefix of the Attention / MLP
    merged: str  # qkv_proj or gate_up_proj
    parts: tuple[str, ...]
    start: int  # first output row of this part
    size: int
    total: int


class FloatMerges:
    """Groups whose parts all load as plain float, filled in place as their tensors are read.

    linears: the loader's plan of every linear (pprt.weights.formats.LinearLoad by prefix).
    """

    def __init__(self, stage: nn.Module, linears: dict):
        self.stage = stage
        self.slots: dict[str, _Slot] = {}
        self._pending: dict[tuple[str, str], set[tuple[str, str]]] = {}
        for prefix, module in stage.named_modules():
            for parts, merged in GROUPS.items():
                if not hasattr(module, "merged_sizes") or not hasattr(module, merged):
                    continue
                if expert_linear(f"{prefix}.{parts[0]}") is not None:
                    continue  # a routed expert's: stacked instead (experts.py)
                loads = [linears.get(f"{prefix}.{p}") for p in parts]
                if any(lin is None or lin.from_file or lin.at_load is not None for lin in loads):
                    continue
                if len({(lin.in_features, lin.has_bias) for lin in loads}) != 1:
                    continue
                sizes, start = module.merged_sizes(merged), 0
                for p, size in zip(parts, sizes):
                    self.slots[f"{prefix}.{p}"] = _Slot(prefix, merged, parts, start, size, sum(sizes))
                    start += size

    def place(self, prefix: str, pname: str, tensor: torch.Tensor) -> bool:
        """Copy a read `weight` / `bias` of layer `prefix` into its merged layer; False when `prefix`
        is not a part of such a group (the caller places it as usual)."""
        slot = self.slots.get(prefix)
        if slot is None:
            return False
        parent = self.stage.get_submodule(slot.parent)
        merged = getattr(parent, slot.merged)
        key = (slot.parent, slot.merged)
        if merged is None:
            part = getattr(parent, slot.parts[0])
            bias = part.bias is not None
            merged = nn.Linear(part.in_features, slot.total, bias=bias, device="meta")
            like = dict(dtype=tensor.dtype, device=tensor.device)
            merged.weight = nn.Parameter(torch.empty(slot.total, part.in_features, **like), requires_grad=False)
            if bias:
                merged.bias = nn.Parameter(torch.empty(slot.total, **like), requires_grad=False)
            setattr(parent, slot.merged, merged)
            self._pending[key] = {(p, n) for p in slot.parts for n in (("weight", "bias") if bias else ("weight",))}
        with torch.no_grad():
            getattr(merged, pname)[slot.start:slot.start + slot.size].copy_(tensor)
        self._pending[key].discard((prefix.rpartition(".")[2], pname))
        if not self._pending[key]:  # every part is in: the parts' modules go
            for p in slot.parts:
                setattr(parent, p, None)
        return True


def merge_if_complete(parent: nn.Module) -> bool:
    """Join the group of `parent` (an Attention or MLP module) once all its parts are placed.

    Sets `parent.<merged>` and drops the parts; returns True when it merged. Parts it cannot
    join (see the module docstring) stay as they are.
    """
    for parts, merged in GROUPS.items():
        if not hasattr(parent, merged) or getattr(parent, merged) is not None:
            continue
        layers = [getattr(parent, p, None) for p in parts]
        if not all(_placed(m) for m in layers):
            continue
        joined = join(layers)
        if joined is None:
            continue
        setattr(parent, merged, joined)
        for p in parts:
            setattr(parent, p, None)
        return True
    return False


def join(layers: list[nn.Module]) -> nn.Module | None:
    """One layer whose output is the layers' outputs side by side, or None when they cannot join."""
    kinds = {type(m) for m in layers}
    if len(kinds) != 1:
        return None
    biases = [m.bias for m in layers]
    if any(b is None for b in biases) != all(b is None for b in biases):
        return None
    bias = torch.cat([b.data for b in biases]) if biases[0] is not None else None
    if kinds == {nn.Linear}:
        weights = [m.weight for m in layers]
        if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
            return None
        out = nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=bias is not None,
                        device="meta")
        out.weight = nn.Parameter(torch.cat([w.data for w in weights]), requires_grad=False)
        if bias is not None:
            out.bias = nn.Parameter(bias, requires_grad=False)
        return out
    if kinds == {Int4Linear}:
        ws = [m.weight for m in layers]
        same = len({(w.group_size, w.in_features, w.scales.dtype) for w in ws}) == 1
        perms = [w.perm for w in ws]
        if not same or not (all(p is None for p in perms) or
                            all(p is not None and torch.equal(p, perms[0]) for p in perms)):
            return None
        w = Int4Weight(torch.cat([w.qweight for w in ws], dim=1), torch.cat([w.scales for w in ws], dim=1),
                       torch.cat([w.zeros for w in ws], dim=1), ws[0].group_size, perms[0])
        return Int4Linear(w, bias)
    ws = [m.fp8_weight for m in layers]
    bn = ws[0].block[0]
    if len({(w.block, w.weight.shape[1]) for w in ws}) != 1 or any(w.weight.shape[0] % bn for w in ws):
        return None
    return Fp8Linear(Fp8Weight(torch.cat([w.weight for w in ws]), torch.cat([w.scale for w in ws]), ws[0].block),
                     bias)


def split(merged: nn.Module, sizes: list[int]) -> list[nn.Module]:
    """The parts of a merged layer as layers of their own (views of its tensors), N sizes `sizes`."""
    out, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        bias = merged.bias[rows] if merged.bias is not None else None
        if isinstance(merged, Int4Linear):
            w = merged.weight
            part = Int4Linear(Int4Weight(w.qweight[:, rows], w.scales[:, rows], w.zeros[:, rows], w.group_size,
                                         w.perm), bias)
        elif isinstance(merged, Fp8Linear):
            bn = merged.block[0]
            w = merged.fp8_weight
            part = Fp8Linear(Fp8Weight(w.weight[rows], w.scale[start // bn:(start + n) // bn], w.block), bias)
        else:
            part = nn.Linear(merged.in_features, n, bias=bias is not None, device="meta")
            part.weight = nn.Parameter(merged.weight[rows], requires_grad=False)
            if bias is not None:
                part.bias = nn.Parameter(bias, requires_grad=False)
        out.append(part)
        start += n
    return out


def named_weights(root: nn.Module) -> dict[str, torch.Tensor]:
    """Every float parameter under `root` by its checkpoint name (`...self_attn.q_proj.weight`), merged
    and stacked float linears as views; quantized layers are left out. For tests and inspection."""
    linears = linear_modules(root)
    inside = {name for name, m in root.named_modules() if isinstance(m, _LINEARS)}
    inside |= {name for name, m in root.named_modules() if name.endswith(".stacked")}
    out = {n: p for n, p in root.named_parameters() if not any(n.startswith(m + ".") for m in inside)}
    for name, m in linears.items():
        if isinstance(m, nn.Linear):
            out[f"{name}.weight"] = m.weight
            if m.bias is not None:
                out[f"{name}.bias"] = m.bias
    return out


def linear_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Every placed linear under `root` by its checkpoint name (`...self_attn.q_proj`,
    `...mlp.experts.3.up_proj`), merged and stacked ones as views. For tests and inspection."""
    out = {p: m for p, m in root.named_modules() if isinstance(m, _LINEARS)}
    for prefix, module in root.named_modules():
        for parts, merged in GROUPS.items():
            layer = getattr(module, merged, None) if hasattr(module, "merged_sizes") else None
            if isinstance(layer, _LINEARS):
                del out[f"{prefix}.{merged}"]
                for p, part in zip(parts, split(layer, module.merged_sizes(merged))):
                    out[f"{prefix}.{p}"] = part
    out.update(expert_modules(root))
    return out
