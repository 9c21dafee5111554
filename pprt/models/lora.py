"""A stage's LoRA adapters: slot stacks per site, applied to each token by its own adapter.

`LoraBank` holds up to `max_loras` adapters in numbered slots. An adapter is
{target: (A, scale * B)} (pprt.weights.lora's `stage_tensors`). Each target adds
to a *site*, one output of the loaded model (`locate`):
- a linear layer of its own (`o_proj`, `down_proj`, DeltaNet projections, ...);
- a merged linear (`qkv_proj`, `gate_up_proj`: the loader joins q/k/v and gate/up,
  pprt.weights.merge) whose output rows [start, start + rows) are the target's part;
- a MoE layer's routed experts, `<moe>.experts.gate_up_proj` (parts gate_proj rows
  [0, I), up_proj [I, 2I), or the fused gate_up_proj [0, 2I)) and `.experts.down_proj`.
For every site some loaded adapter adapts, the bank keeps two stacks over the L
slots, A [L, (E,) R, K] and B [L, (E,) N, R], where R sums each part's largest
rank: a part's A rows sit at its rank offset and its B block at (its output rows,
its rank columns), zeros elsewhere. So one shrink reads the concatenated A's and
one expand writes every part's delta into its own rows (a block-diagonal B); the
zero blocks cost B reads and memory (for q/k/v with rank r each: B is N x 3r where
separate stacks would hold N_q r + N_k r + N_v r), not launches.

A linear site gets a forward hook adding `pprt_kernels.lora.lora_delta` of the
step's tokens to its output (float nn.Linear, Int4 or FP8 layers alike: the
adapter stays in the activation dtype). An expert site gives its MoE layer an
`expert_lora` callable returning the step's pprt_kernels.moe_lora.ExpertLora,
which the fused MoE pass applies per (token, expert) pair. `bind(indices)` sets
the step's per-token slots ([T], -1: no adapter) before the stage runs; None, or
no adapted site, costs nothing. Every site must see all T tokens of the step in
order, as attention, DeltaNet, MLP and MoE layers do.

`merge_lora` folds one adapter into float base weights instead (W[rows] += scale B A,
merged layers and stacked float experts included): no per-token cost, every request
gets it.

Knows nothing of files (pprt.weights.lora reads them) or of which request uses which slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pprt_kernels.lora import lora_delta
from pprt_kernels.moe_lora import ExpertLora
from pprt_kernels.moe_weights import ExpertFormat

from .layers import MERGED_LAYERS

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True, slots=True)
class Site:
    """One output adapters add to (see the module docstring)."""

    name: str  # "...self_attn.qkv_proj", "...self_attn.o_proj", "...mlp.experts.gate_up_proj"
    module: str  # the linear whose output it is, or the MoE layer of an expert site
    parts: dict[str, tuple[int, int]]  # target -> (first output row, rows), in output order
    in_features: int  # K
    out_features: int  # N
    experts: int = 0  # E of an expert site; 0 for a linear


def locate(model: nn.Module, target: str) -> Site:
    """The site `target` adds to in the loaded `model`. Raises ValueError naming an unknown target."""
    parent, _, leaf = target.rpartition(".")
    if parent.endswith(".experts"):  # routed experts: the MoE layer's stacked projections
        moe_name = parent[: -len(".experts")]
        moe = model.get_submodule(moe_name)
        E, H, I = moe.num_experts, moe.hidden_size, moe.intermediate_size
        if leaf == "down_proj":
            return Site(f"{parent}.down_proj", moe_name, {target: (0, H)}, I, H, E)
        parts = {f"{parent}.gate_proj": (0, I), f"{parent}.up_proj": (I, I), f"{parent}.gate_up_proj": (0, 2 * I)}
        if target not in parts:
            raise ValueError(f"LoRA target {target!r} is not a projection of the routed experts")
        return Site(f"{parent}.gate_up_proj", moe_name, parts, H, 2 * I, E)
    owner = model.get_submodule(parent)
    for merged, names in MERGED_LAYERS.items():
        layer = getattr(owner, merged, None)
        if leaf in names and layer is not None:
            parts, start = {}, 0
            for name, size in zip(names, owner.merged_sizes(merged)):
                parts[f"{parent}.{name}"] = (start, size)
                start += size
            return Site(f"{parent}.{merged}", f"{parent}.{merged}", parts, layer.in_features, start)
    layer = getattr(owner, leaf, None)
    if layer is None or not hasattr(layer, "out_features"):
        raise ValueError(f"LoRA target {target!r} is not a linear layer of this stage")
    return Site(target, target, {target: (0, layer.out_features)}, layer.in_features, layer.out_features)


class LoraBank:
    """Adapter slots of one stage (see the module docstring)."""

    def __init__(self, model: nn.Module, max_loras: int, device: torch.device, dtype: torch.dtype):
        if max_loras <= 0:
            raise ValueError(f"max_loras must be positive, got {max_loras}")
        self.model, self.max_loras, self.device, self.dtype = model, max_loras, device, dtype
        self.slots: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # slot -> {target: (A, B)}
        self.sites: dict[str, Site] = {}  # target -> its site
        self._named: dict[str, Site] = {}  # site name -> site
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # site name -> (a, b)
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}  # linear site name -> its hook
        self._indices: torch.Tensor | None = None

    def add(self, slot: int, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put an adapter ({target: (A, scale * B)}) in `slot`, replacing what was there. Raises
        ValueError naming a target this stage does not have or whose shapes do not fit it."""
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"LoRA slot {slot} outside [0, {self.max_loras})")
        for target, (a, b) in tensors.items():
            _check(self._site(target), target, a, b)
        old = self.slots.pop(slot, {})
        self.slots[slot] = tensors
        self._rebuild({self.sites[t].name for t in set(old) | set(tensors)})

    def remove(self, slot: int) -> None:
        self._rebuild({self.sites[t].name for t in self.slots.pop(slot, {})})

    def bind(self, indices: torch.Tensor | None) -> None:
        """The step's adapter slot of each token ([T] int32 on the device; -1: none), or None for no adapter."""
        self._indices = indices

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self._stacks.values())

    def stack(self, site: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (A, B) stacks of a site by name (None when no adapter adapts it). For tests and inspection."""
        return self._stacks.get(site)

    def _site(self, target: str) -> Site:
        if target not in self.sites:
            site = locate(self.model, target)
            self.sites[target] = self._named.setdefault(site.name, site)
        return self.sites[target]

    def _rebuild(self, names: set[str]) -> None:
        for name in names:
            entries = [(slot, target, a, b) for slot, tensors in self.slots.items()
                       for target, (a, b) in tensors.items() if self.sites[target].name == name]
            site = self._named[name]
            if not entries:
                self._stacks.pop(name, None)
                self._detach(site)
                continue
            ranks = {part: max((a.shape[-2] for _, t, a, _ in entries if t == part), default=0)
                     for part in site.parts}
            offsets, start = {}, 0
            for part, rank in ranks.items():
                offsets[part] = start
                start += rank
            lead = (self.max_loras, site.experts) if site.experts else (self.max_loras,)
            like = dict(device=self.device, dtype=self.dtype)
            a_stack = torch.zeros(*lead, start, site.in_features, **like)  # [L, (E,) R, K]
            b_stack = torch.zeros(*lead, site.out_features, start, **like)  # [L, (E,) N, R]
            for slot, target, a, b in entries:
                r0, r = offsets[target], a.shape[-2]
                row0, rows = site.parts[target]
                a_stack[slot, ..., r0:r0 + r, :] = a
                b_stack[slot, ..., row0:row0 + rows, r0:r0 + r] = b
            self._stacks[name] = (a_stack, b_stack)
            self._attach(site)

    def _attach(self, site: Site) -> None:
        if site.experts:
            moe = self.model.get_submodule(site.module)
            if moe.expert_lora is None:
                moe.expert_lora = self._expert_lora(site.module)
        elif site.name not in self._hooks:
            self._hooks[site.name] = self.model.get_submodule(site.module).register_forward_hook(self._hook(site))

    def _detach(self, site: Site) -> None:
        if not site.experts:
            handle = self._hooks.pop(site.name, None)
            if handle is not None:
                handle.remove()
        elif all(f"{site.module}.experts.{p}" not in self._stacks for p in ("gate_up_proj", "down_proj")):
            self.model.get_submodule(site.module).expert_lora = None

    def _hook(self, site: Site):
        name = site.name

        def add_delta(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._indices is None:
                return output
            x = inputs[0]  # [T, K]
            if x.shape[0] != self._indices.shape[0]:
                raise RuntimeError(f"LoRA on {name}: the layer saw {x.shape[0]} tokens, the step has "
                                   f"{self._indices.shape[0]}")
            a, b = self._stacks[name]
            return output + lora_delta(x, a, b, self._indices)  # [T, N]

        return add_delta

    def _expert_lora(self, moe: str):
        gate_up, down = f"{moe}.experts.gate_up_proj", f"{moe}.experts.down_proj"

        def current() -> ExpertLora | None:
            if self._indices is None:
                return None
            return ExpertLora(self._indices, self._stacks.get(gate_up), self._stacks.get(down))

        return current


def _check(site: Site, target: str, a: torch.Tensor, b: torch.Tensor) -> None:
    lead = (site.experts,) if site.experts else ()
    rows = site.parts[target][1]
    r = a.shape[-2] if a.dim() == len(lead) + 2 else -1
    if tuple(a.shape) != (*lead, r, site.in_features) or tuple(b.shape) != (*lead, rows, r):
        raise ValueError(f"LoRA target {target}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                         f"[{', '.join(map(str, lead + ('r', site.in_features)))}] and "
                         f"[{', '.join(map(str, lead + (rows, 'r')))}]")


def _float_weight(model: nn.Module, site: Site, target: str) -> torch.Tensor:
    """The float weight the site's deltas fold into: [N, K], or [E, N, K] for experts."""
    if site.experts:
        stacked = model.get_submodule(site.module).stacked
        stack = stacked.down if site.name.endswith(".down_proj") else stacked.gate_up
        if stack is not None and stack.expert_weights().format is ExpertFormat.FLOAT:
            return stack.weight
        kind = "unloaded" if stack is None else stack.expert_weights().format.value
    else:
        module = model.get_submodule(site.module)
        if type(module) is nn.Linear and module.weight.dtype in _FLOATS:
            return module.weight
        kind = type(module).__name__
    raise ValueError(f"merge=True needs float base weights, but {target} is a {kind} layer: serve the adapter "
                     "unmerged")


@torch.no_grad()
def merge_lora(model: nn.Module, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Fold {target: (A, scale * B)} into the float weights of `model` (W[part rows] += B A, in fp32;
    per expert for expert targets).

    Raises ValueError naming the target when its weight is not float (Int4 / FP8 bases keep the
    adapter unmerged); nothing is changed then.
    """
    plan = []
    for target, (a, b) in tensors.items():
        site = locate(model, target)
        _check(site, target, a, b)
        plan.append((site.parts[target], a, b, _float_weight(model, site, target)))
    for (row0, rows), a, b, w in plan:
        part = w[..., row0:row0 + rows, :]  # [(E,) rows, K]
        part.copy_((part.float() + b.float() @ a.float()).to(w.dtype))
