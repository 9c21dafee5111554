"""The building blocks of a Qwen decoder layer, computed as transformers does.

Tokens of all sequences in a step are packed along one axis: hidden states
are [T, H]. Attention reads and writes the paged KV cache through
`AttentionBatch` (see pprt_kernels.paged_attention for the layout) and one
layer's `LayerKV` (K, V and, for an fp8 cache, their scales). The batch's
max_query_len / max_context_len are host ints handed to the kernels, so a
step's attention needs no device sync. Modules
are plain torch and know nothing of processes or stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pprt_kernels.paged_attention import paged_attention, write_kv

from .cache import LayerKV
from .config import ModelConfig, RopeConfig


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


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back, times weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] (fp32) and the cos/sin scale, default or YaRN."""
    d = head_dim
    inv_extrap = 1.0 / (rope.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if rope.type == "default":
        return inv_extrap, 1.0
    # YaRN: blend interpolated and extrapolated frequencies over a linear ramp.
    def correction_dim(rotations: float) -> float:
        return d * math.log(rope.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_extrap * (1 - ramp) + (inv_extrap / rope.factor) * ramp
    scale = rope.attention_factor
    if scale is None:
        scale = 0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0
    return inv_freq, float(scale)


class Rotary(nn.Module):
    """Half-split (NeoX) rotary embedding; cos/sin computed from positions each step."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        inv_freq, self.scale = rope_inv_freq(rope, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, h/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, h]
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, h]; cos, sin [T, h]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


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


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Top-k routed experts (qwen3_moe): softmax over all experts in fp32, top-k, optional renorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # [T, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        # Visit only the experts some token chose; each runs on its tokens at once.
        for e in chosen.unique().tolist():
            token, slot = (chosen == e).nonzero(as_tuple=True)
            y = self.experts[e](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_sparse(index) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, batch: AttentionBatch, cos: torch.Tensor, sin: torch.Tensor,
                kv: LayerKV) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, cos, sin, kv)
        return x + self.mlp(self.post_attention_layernorm(x))
