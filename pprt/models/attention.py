"""Full attention over the paged KV cache.

Attention reads and writes the paged KV cache through `AttentionBatch` (see
pprt_kernels.paged_attention for the layout) and one layer's `LayerKV` (K, V
and, for an fp8 cache, their scales). The batch's max_query_len /
max_context_len are host ints handed to the kernels, so a step's attention
needs no device sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pprt_kernels.paged_attention import paged_attention, write_kv

from ..config import ModelConfig
from .kv import LayerKV
from .layers import RMSNorm, apply_rotary


@dataclass(slots=True)
class AttentionBatch:
    """Where this step's tokens sit in the paged cache (all int tensors on the stage's device)."""

    positions: torch.Tensor  # [T] absolute position of each token
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each token
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_start_loc: torch.Tensor  # [B + 1] int32, sequence b owns rows [qsl[b], qsl[b+1])
    context_lens: torch.Tensor  # [B] int32, cached tokens of b including this step's
    max_query_len: int  # longest query of the step (1 = pure decode)
    max_context_len: int  # longest context_lens entry (host int: the kernels' grid needs no sync)

    def __post_init__(self) -> None:
        T = self.positions.shape[0]
        if self.slot_mapping.shape != (T,):
            raise ValueError(f"slot_mapping has shape {tuple(self.slot_mapping.shape)}, expected ({T},)")
        if self.query_start_loc.shape[0] != self.block_tables.shape[0] + 1:
            raise ValueError("query_start_loc must have one more entry than block_tables has rows")
        if not 1 <= self.max_query_len <= self.max_context_len:
            raise ValueError(f"need 1 <= max_query_len ({self.max_query_len}) <= max_context_len "
                             f"({self.max_context_len})")


class Attention(nn.Module):
    """GQA self-attention over the paged cache; q/k/v bias (qwen2) or q/k norm (qwen3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, m, h, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.n, self.m, self.h = n, m, h
        self.q_proj = nn.Linear(H, n * h, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(H, m * h, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(H, m * h, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(n * h, H, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.scale = h**-0.5

    def forward(self, x: torch.Tensor, batch: AttentionBatch, cos: torch.Tensor, sin: torch.Tensor,
                kv: LayerKV) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.n, self.h)  # [T, n, h]
        k = self.k_proj(x).view(T, self.m, self.h)  # [T, m, h]
        v = self.v_proj(x).view(T, self.m, self.h)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        write_kv(k, v, kv.k, kv.v, batch.slot_mapping, k_scale=kv.k_scale, v_scale=kv.v_scale)
        out = paged_attention(q, kv.k, kv.v, batch.block_tables, batch.query_start_loc, batch.context_lens,
                              self.scale, k_scale=kv.k_scale, v_scale=kv.v_scale,
                              max_query_len=batch.max_query_len, max_context_len=batch.max_context_len)  # [T, n, h]
        return self.o_proj(out.reshape(T, self.n * self.h))
