"""A stage's pools: the paged KV cache of its full-attention layers and the state slots of its
Gated DeltaNet layers.

KV: one block pool holding K and V of the stage's full-attention layers.

Block ids are global: the driver's `BlockManager` (pprt.engine.blocks) hands them out and every
stage holds the same number of blocks, each storing K and V for that stage's
layers only. A sequence's token t lives in block `table[t // block_size]` at
offset `t % block_size`.

The pool is one tensor per K and V: [layers, num_blocks, block_size, m, h].
An fp8 pool (float8_e4m3fn) also keeps one float32 scale per (slot, kv head)
for K and for V: [layers, num_blocks, block_size, m] each, written by
`write_kv` with the tokens (pprt_kernels.kv_cache's recommended form;
pprt.plan counts the same 4 bytes per token and kv head). `KVCache.layer(i)`
hands one layer's views to Attention as a `LayerKV`. A stage with no
full-attention layer (a hybrid model's stage of DeltaNet layers only) has a
pool of 0 bytes per block: it still takes the global block ids, and holds nothing.

State: hybrid models (Qwen3-Next, Qwen3.5) keep, per running sequence, the
state of each DeltaNet layer: the conv state [conv_dim, K-1] (the last K-1
inputs of the short conv, model dtype) and the recurrent state [Hv, dk, dv]
(fp32). Slot ids are global like block ids: the driver's `SlotManager`
(pprt.engine.blocks) hands one to each running sequence, every stage holds the
same number of slots, and a stage without DeltaNet layers holds none. The
kernels read and update a sequence's state in place through its slot, so no
state is gathered or scattered per step. `StateCache.layer(i)` hands one
layer's views to GatedDeltaNet as a `LayerState`; `reset(slots)` zeroes the
slots of sequences that start (or restart after preemption) at position 0.
With prefix caching the pool holds more slots than running sequences: the
driver keeps state snapshots there, and `copy(src, dst)` moves a whole
state (every layer, conv and recurrent) from slot to slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from pprt_kernels.kv_cache import FP8, new_kv_scales

KV_DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": FP8}
KV_DTYPES = tuple(KV_DTYPE_NAMES.values())


def parse_kv_dtype(kv_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: "auto" (the model dtype), bf16, fp16, fp32 or fp8 (e4m3)."""
    if kv_dtype == "auto":
        return model_dtype
    if kv_dtype not in KV_DTYPE_NAMES:
        raise ValueError(f"kv_dtype {kv_dtype!r} is not one of auto, {', '.join(KV_DTYPE_NAMES)}")
    return KV_DTYPE_NAMES[kv_dtype]


def kv_dtype_name(dtype: torch.dtype) -> str:
    """The short name of a KV cache dtype (the planner's spelling)."""
    return next(name for name, d in KV_DTYPE_NAMES.items() if d == dtype)
SCALE_BYTES = 4  # float32 scale per (slot, kv head) of an fp8 cache, for K and for V


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """The geometry of one stage's pool."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_layers < 0:
            raise ValueError(f"CacheSpec.num_layers must be >= 0, got {self.num_layers}")
        for name in ("num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CacheSpec.{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"CacheSpec.dtype {self.dtype} is not a KV cache type "
                             f"({', '.join(str(d) for d in KV_DTYPES)})")

    @property
    def quantized(self) -> bool:
        """True for an fp8 pool, which keeps scales beside the codes."""
        return self.dtype == FP8

    @property
    def bytes_per_block(self) -> int:
        """K and V of every layer of the stage for one block, fp8 scales included."""
        per_head = self.head_dim * self.dtype.itemsize + (SCALE_BYTES if self.quantized else 0)
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * per_head

    def blocks_for(self, budget_bytes: int) -> int | None:
        """Blocks `budget_bytes` hold; None (no limit) for a pool of 0 bytes per block."""
        if self.bytes_per_block == 0:
            return None
        return max(0, budget_bytes // self.bytes_per_block)


class LayerKV(NamedTuple):
    """One layer's views of the pool, as `write_kv` / `paged_attention` take them."""

    k: torch.Tensor  # [num_blocks, block_size, m, h]
    v: torch.Tensor  # [num_blocks, block_size, m, h]
    k_scale: torch.Tensor | None  # [num_blocks, block_size, m] float32 (fp8 pools), else None
    v_scale: torch.Tensor | None


class KVCache:
    """The block pool of one stage.

    pad_block: one more block past `num_blocks` that no sequence owns: the padded rows of a
    CUDA-graph decode step (pprt.distributed.graphs) write their keys and values there.
    """

    def __init__(self, spec: CacheSpec, num_blocks: int, device: torch.device | str, pad_block: bool = False):
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.spec, self.num_blocks = spec, num_blocks
        self.pad_block = num_blocks if pad_block else None  # its block id
        shape = (spec.num_layers, num_blocks + int(pad_block), spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=spec.dtype, device=device)
        self.v = torch.zeros(shape, dtype=spec.dtype, device=device)
        self.k_scale = self.v_scale = None
        if spec.quantized:  # [layers, num_blocks, block_size, m] float32
            self.k_scale = new_kv_scales(self.k.flatten(0, 1)).view(shape[:-1])
            self.v_scale = new_kv_scales(self.v.flatten(0, 1)).view(shape[:-1])

    def layer(self, i: int) -> LayerKV:
        """The stage's i-th layer: K and V blocks [num_blocks, block_size, m, h], and fp8 scales."""
        if self.k_scale is None:
            return LayerKV(self.k[i], self.v[i], None, None)
        return LayerKV(self.k[i], self.v[i], self.k_scale[i], self.v_scale[i])

    @property
    def nbytes(self) -> int:
        scales = self.k_scale.nbytes + self.v_scale.nbytes if self.k_scale is not None else 0
        return self.k.nbytes + self.v.nbytes + scales


@dataclass(frozen=True, slots=True)
class StateSpec:
    """The geometry of one stage's state pool: its DeltaNet layers' conv and recurrent states."""

    num_layers: int  # DeltaNet layers of the stage (0: no pool)
    conv_dim: int  # channels of the short conv (q, k and v)
    conv_width: int  # K - 1: inputs the conv keeps per channel
    num_heads: int  # Hv
    key_dim: int  # dk
    value_dim: int  # dv
    conv_dtype: torch.dtype  # the model dtype
    ssm_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.num_layers < 0:
            raise ValueError(f"StateSpec.num_layers must be >= 0, got {self.num_layers}")
        for name in ("conv_dim", "conv_width", "num_heads", "key_dim", "value_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"StateSpec.{name} must be positive, got {getattr(self, name)}")

    @property
    def bytes_per_slot(self) -> int:
        """Conv and recurrent state of every DeltaNet layer of the stage for one sequence."""
        conv = self.conv_dim * self.conv_width * self.conv_dtype.itemsize
        ssm = self.num_heads * self.key_dim * self.value_dim * self.ssm_dtype.itemsize
        return self.num_layers * (conv + ssm)

    def slots_for(self, budget_bytes: int) -> int | None:
        """Slots `budget_bytes` hold; None (no limit) for a stage without DeltaNet layers."""
        if self.bytes_per_slot == 0:
            return None
        return max(0, budget_bytes // self.bytes_per_slot)


class LayerState(NamedTuple):
    """One DeltaNet layer's views of the pool, as causal_conv1d / gated_delta_rule take them."""

    conv: torch.Tensor  # [num_slots, conv_dim, K-1] model dtype
    ssm: torch.Tensor  # [num_slots, Hv, dk, dv] float32


class StateCache:
    """The state slots of one stage: [layers, num_slots, ...] per kind of state.

    pad_slot: one more slot past `num_slots` that no sequence owns: the padded rows of a
    CUDA-graph decode step (pprt.distributed.graphs) update it.
    """

    def __init__(self, spec: StateSpec, num_slots: int, device: torch.device | str, pad_slot: bool = False):
        if num_slots <= 0:
            raise ValueError(f"the state pool needs at least one slot, got {num_slots}")
        self.spec, self.num_slots = spec, num_slots
        self.pad_slot = num_slots if pad_slot else None  # its slot id
        L, n = spec.num_layers, num_slots + int(pad_slot)
        self.conv = torch.zeros(L, n, spec.conv_dim, spec.conv_width, dtype=spec.conv_dtype, device=device)
        self.ssm = torch.zeros(L, n, spec.num_heads, spec.key_dim, spec.value_dim, dtype=spec.ssm_dtype,
                               device=device)

    def layer(self, i: int) -> LayerState:
        """The stage's i-th DeltaNet layer: conv [num_slots, conv_dim, K-1], recurrent [num_slots, Hv, dk, dv]."""
        return LayerState(self.conv[i], self.ssm[i])

    def reset(self, slots: torch.Tensor) -> None:
        """Zero the state of `slots` ([S] int, on the pool's device) in every layer."""
        if slots.numel() and self.spec.num_layers:
            self.conv[:, slots] = 0
            self.ssm[:, slots] = 0

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the state of slots `src` to slots `dst` ([S] int each, on the pool's device; distinct
        dst, none of them a src) in every layer (speculative decoding's snapshot and rollback, the
        prefix cache's snapshots)."""
        if src.numel() and self.spec.num_layers:
            self.conv[:, dst] = self.conv[:, src]
            self.ssm[:, dst] = self.ssm[:, src]

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes
