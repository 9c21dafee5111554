"""The paged KV cache of a stage: one block pool holding K and V of the stage's layers.

Block ids are global: the driver's `BlockManager` (pprt.engine.blocks) hands them out and every
stage holds the same number of blocks, each storing K and V for that stage's
layers only. A sequence's token t lives in block `table[t // block_size]` at
offset `t % block_size`.

The pool is one tensor per K and V: [layers, num_blocks, block_size, m, h].
An fp8 pool (float8_e4m3fn) also keeps one float32 scale per (slot, kv head)
for K and for V: [layers, num_blocks, block_size, m] each, written by
`write_kv` with the tokens (pprt_kernels.paged_attention's recommended form;
pprt.plan counts the same 4 bytes per token and kv head). `KVCache.layer(i)`
hands one layer's views to Attention as a `LayerKV`.
Later model families add per-sequence recurrent state beside the blocks; it
would live in another pool keyed by sequence, not in these tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from pprt_kernels.paged_attention import FP8, new_kv_scales

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
        for name in ("num_layers", "num_kv_heads", "head_dim"):
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

    def blocks_for(self, budget_bytes: int) -> int:
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
