"""A stage's LoRA adapters: slot stacks per adapted layer, applied to each token by its own adapter.

`LoraBank` holds up to `max_loras` adapters in numbered slots. For every linear
layer some loaded adapter adapts it keeps two stacks, A [L, R, in] and scale * B
[L, out, R] (L = max_loras, R = the largest rank loaded there, zeros elsewhere),
and a forward hook on the layer that adds `pprt_kernels.lora.lora_delta` of the
step's tokens to its output. The hook works on any base module: float nn.Linear,
Int4 or FP8 layers (the adapter stays in the activation dtype). `bind(indices)`
sets the step's per-token slots ([T], -1: no adapter) before the stage runs;
None, or no adapted layer, costs nothing.

Every hooked layer must see all T tokens of the step in order, as the attention,
DeltaNet and dense-MLP projections (and a shared expert) do; routed experts see
token subsets and are refused when the adapter is read (pprt.weights.lora).

`merge_lora` folds one adapter into float base weights instead (W += scale B A):
no per-token cost, every request gets it.

Knows nothing of files (pprt.weights.lora reads them) or of which request uses which slot.
"""

from __future__ import annotations

import torch
from torch import nn

from pprt_kernels.lora import lora_delta


class LoraBank:
    """Adapter slots of one stage (see the module docstring)."""

    def __init__(self, model: nn.Module, max_loras: int, device: torch.device, dtype: torch.dtype):
        if max_loras <= 0:
            raise ValueError(f"max_loras must be positive, got {max_loras}")
        self.model, self.max_loras, self.device, self.dtype = model, max_loras, device, dtype
        self.slots: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # slot -> {module: (A, B)}
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (a [L, R, in], b [L, out, R])
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._indices: torch.Tensor | None = None

    def add(self, slot: int, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put an adapter ({module: (A [r, in], scale * B [out, r])}) in `slot`, replacing what was there."""
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"LoRA slot {slot} outside [0, {self.max_loras})")
        old = self.slots.pop(slot, {})
        self.slots[slot] = tensors
        self._rebuild(set(old) | set(tensors))

    def remove(self, slot: int) -> None:
        self._rebuild(set(self.slots.pop(slot, {})))

    def bind(self, indices: torch.Tensor | None) -> None:
        """The step's adapter slot of each token ([T] int32 on the device; -1: none), or None for no adapter."""
        self._indices = indices

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self._stacks.values())

    def _rebuild(self, modules: set[str]) -> None:
        for name in modules:
            parts = [(s, t[name]) for s, t in self.slots.items() if name in t]
            if not parts:
                self._stacks.pop(name, None)
                self._hooks.pop(name).remove()
                continue
            (a0, b0) = parts[0][1]
            rank = max(a.shape[0] for _, (a, _) in parts)
            a_stack = torch.zeros(self.max_loras, rank, a0.shape[1], device=self.device, dtype=self.dtype)
            b_stack = torch.zeros(self.max_loras, b0.shape[0], rank, device=self.device, dtype=self.dtype)
            for slot, (a, b) in parts:
                a_stack[slot, : a.shape[0]] = a
                b_stack[slot, :, : b.shape[1]] = b
            self._stacks[name] = (a_stack, b_stack)
            if name not in self._hooks:
                self._hooks[name] = self.model.get_submodule(name).register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def add_delta(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._indices is None:
                return output
            x = inputs[0]  # [T, in]
            if x.shape[0] != self._indices.shape[0]:
                raise RuntimeError(f"LoRA on {name}: the layer saw {x.shape[0]} tokens, the step has "
                                   f"{self._indices.shape[0]}")
            a, b = self._stacks[name]
            return output + lora_delta(x, a, b, self._indices)

        return add_delta


@torch.no_grad()
def merge_lora(model: nn.Module, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]], module_type=nn.Linear) -> None:
    """Fold {module: (A [r, in], scale * B [out, r])} into the float weights of `model` (W += B A, in fp32).

    Raises ValueError naming the layer when its weight is not a float nn.Linear (Int4 / FP8 bases
    keep the adapter unmerged).
    """
    for name in tensors:
        module = model.get_submodule(name)
        if type(module) is not module_type or not module.weight.dtype.is_floating_point:
            raise ValueError(f"merge=True needs float base weights, but {name} is a {type(module).__name__}: "
                             "serve the adapter unmerged")
    for name, (a, b) in tensors.items():
        w = model.get_submodule(name).weight
        w.copy_((w.float() + b.float() @ a.float()).to(w.dtype))
