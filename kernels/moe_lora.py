"""LoRA adapters on a MoE layer's routed experts: every (token, expert) pair gets its token's adapter for that expert.

For expert e, adapter l changes the expert's two projections (with the scale folded into B):
    gate_up(x) += (x @ A_gu[l, e]^T) @ B_gu[l, e]^T     before silu(gate) * up
    down(h)    += (h @ A_dn[l, e]^T) @ B_dn[l, e]^T     before the routing weight
which is what PEFT computes for transformers' fused expert parameters (its ParamWrapper adds
scale * B_e A_e to `gate_up_proj[e]` [2I, H] and `down_proj[e]` [H, I]; peft/tuners/lora/layer.py)
and for per-expert nn.Linear modules alike. The stacks, zero-padded in rank as pprt_kernels.lora's:
    gate_up: a [L, E, R, H], b [L, E, 2I, R];   down: a [L, E, R', I], b [L, E, H, R']
A pair's row of the stacks flattened to [L*E, ...] is `slot * E + expert` (-1 for a token without
an adapter: no delta). The deltas are pprt_kernels.lora's batched gather (`lora_delta`: Triton on
GPU, the torch reference elsewhere) over the T*k pairs in pair order (pair p = token p // k, its
(p % k)-th expert): no host sync, shapes fixed by T, k and the stacks.

Cost: each pair reads its adapter-expert's A and B (R*(H + 2I) + R'*(I + H) elements); pairs of
one (adapter, expert) do not share the reads, as a grouped (SGMV-style) formulation would.
This module holds no kernel of its own and knows nothing of models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pprt_kernels.lora import lora_delta

Delta = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(slots=True)
class ExpertLora:
    """One step's adapters on one MoE layer's routed experts (see the module docstring)."""

    slots: torch.Tensor  # [T] int32/int64 each token's adapter slot; -1: none
    gate_up: tuple[torch.Tensor, torch.Tensor] | None  # a [L, E, R, H], b [L, E, 2I, R]; None: not adapted
    down: tuple[torch.Tensor, torch.Tensor] | None  # a [L, E, R', I], b [L, E, H, R']

    def __post_init__(self) -> None:
        if self.slots.dim() != 1 or self.slots.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ExpertLora.slots must be int32/int64 [T], got {self.slots.dtype} "
                             f"{tuple(self.slots.shape)}")
        stacks = [s for s in (self.gate_up, self.down) if s is not None]
        if not stacks:
            raise ValueError("ExpertLora adapts neither gate_up nor down")
        for a, b in stacks:
            if a.dim() != 4 or b.dim() != 4 or a.shape[:2] != b.shape[:2] or a.shape[2] != b.shape[3]:
                raise ValueError(f"ExpertLora stacks must be a [L, E, R, K] and b [L, E, N, R], got "
                                 f"{tuple(a.shape)} and {tuple(b.shape)}")
        if len({tuple(a.shape[:2]) for a, _ in stacks}) != 1:
            raise ValueError("ExpertLora: gate_up and down stacks disagree on [L, E]")

    @property
    def num_experts(self) -> int:
        return next(a for a, _ in (s for s in (self.gate_up, self.down) if s is not None)).shape[1]


def pair_index(lora: ExpertLora, ids: torch.Tensor) -> torch.Tensor:
    """[T*k] int64 row of each pair in the [L*E, ...] stacks (slot * E + expert; -1 without an adapter).
    ids: [T, k] the experts each token chose."""
    if ids.shape[0] != lora.slots.shape[0]:
        raise ValueError(f"ExpertLora has slots of {lora.slots.shape[0]} tokens, the routing {ids.shape[0]}")
    slot = lora.slots.to(torch.int64)[:, None]  # [T, 1]
    return torch.where(slot >= 0, slot * lora.num_experts + ids.to(torch.int64), -1).reshape(-1)


def _flat(stack: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = stack
    (L, E, R, K), N = a.shape, b.shape[2]
    return a.reshape(L * E, R, K), b.reshape(L * E, N, R)


def gate_up_delta(x: torch.Tensor, top_k: int, lora: ExpertLora, index: torch.Tensor,
                  delta: Delta = lora_delta) -> torch.Tensor:
    """[T*k, 2I] in x.dtype: each pair's gate_up delta, in pair order. x: [T, H]; index: pair_index."""
    a, b = _flat(lora.gate_up)
    return delta(x.repeat_interleave(top_k, dim=0), a, b, index)  # x row of pair p: p // k


def down_delta(h: torch.Tensor, lora: ExpertLora, index: torch.Tensor, delta: Delta = lora_delta) -> torch.Tensor:
    """[P, H] in h.dtype: the down delta of P pairs, h [P, I] their silu(gate) * up and index [P] their rows."""
    a, b = _flat(lora.down)
    return delta(h, a, b, index)
