"""Full attention over the paged KV cache: Qwen2/Qwen3 attention and the gated attention of
the hybrid families (Qwen3-Next, Qwen3.5).

Attention reads and writes the paged KV cache through the step's `StepBatch`
(see pprt_kernels.paged_attention for the layout) and one layer's `LayerKV` (K, V
and, for an fp8 cache, their scales). The batch's max_query_len /
max_context_len are host ints handed to the kernels, so a step's attention
needs no device sync.

One module covers every family (config fields, not subclasses):
- qkv_bias: q/k/v bias (qwen2, qwen2_moe; qwen3 and the hybrids: attention_bias);
- qk_norm: RMSNorm over head_dim per head on q and k before rotary (qwen3 and later;
  zero-centred in the hybrids);
- attn_output_gate (hybrids): q_proj is [n * 2h, H]; each head's row block is its
  query (first h) then its gate (second h); the attention output is multiplied by
  sigmoid(gate) before o_proj, which then has a bias when attention_bias is set;
- rotary on the first rotary_dim dims of each head (partial rotary; cos/sin come in
  at that width).
"""

from __future__ import annotations

import torch
from torch import nn

from pprt_kernels.kv_cache import write_kv
from pprt_kernels.paged_attention import paged_attention

from ..config import ModelConfig
from .batch import StepBatch
from .kv import LayerKV
from .layers import RMSNorm, rotate_qk


class Attention(nn.Module):
    """GQA self-attention over the paged cache (see the module docstring for the variants)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, m, h, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.n, self.m, self.h, self.gated = n, m, h, cfg.attn_output_gate
        self.q_proj = nn.Linear(H, n * h * (2 if self.gated else 1), bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(H, m * h, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(H, m * h, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(n * h, H, bias=cfg.o_bias)
        self.register_module("qkv_proj", None)  # q, k and v joined by the loader (pprt.weights.merge)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, cfg.zero_centered_norm)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, cfg.zero_centered_norm)
        self.scale = h**-0.5

    def merged_sizes(self, name: str) -> list[int]:
        """Output sizes of the parts of the merged layer `name` (qkv_proj: q, k, v)."""
        return [self.n * self.h * (2 if self.gated else 1), self.m * self.h, self.m * self.h]

    def forward(self, x: torch.Tensor, batch: StepBatch, cos: torch.Tensor, sin: torch.Tensor,
                kv: LayerKV) -> torch.Tensor:
        T = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.merged_sizes("qkv_proj"), dim=-1)  # one matmul
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.gated:
            q, gate = q.view(T, self.n, 2 * self.h).chunk(2, dim=-1)  # [T, n, h] each
        else:
            q, gate = q.view(T, self.n, self.h), None  # [T, n, h]
        k = k.view(T, self.m, self.h)  # [T, m, h]
        v = v.view(T, self.m, self.h)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate_qk(q, k, cos, sin)  # in place on GPU
        write_kv(k, v, kv.k, kv.v, batch.slot_mapping, k_scale=kv.k_scale, v_scale=kv.v_scale)
        out = paged_attention(q, kv.k, kv.v, batch.block_tables, batch.query_start_loc, batch.context_lens,
                              self.scale, k_scale=kv.k_scale, v_scale=kv.v_scale,
                              max_query_len=batch.max_query_len, max_context_len=batch.max_context_len)  # [T, n, h]
        out = out.reshape(T, self.n * self.h)
        if gate is not None:
            out = out * torch.sigmoid(gate.reshape(T, self.n * self.h))
        return self.o_proj(out)
