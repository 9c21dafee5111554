"""The Gated DeltaNet layer (linear attention) of Qwen3-Next and Qwen3.5, over per-sequence state slots.

As transformers computes it (models/qwen3_next/modeling_qwen3_next.py,
Qwen3NextGatedDeltaNet; models/qwen3_5, Qwen3_5GatedDeltaNet), for tokens of
several sequences packed along one axis (x [T, H]; Hk key heads of dk, Hv value
heads of dv, Hv a multiple of Hk):

    qkv [T, 2*Hk*dk + Hv*dv], z [T, Hv, dv], b, a [T, Hv]   projections of x
    qkv = silu(causal_conv1d(qkv))                         depthwise, kernel K, per sequence
    q, k [T, Hk, dk] -> each key head serves Hv/Hk consecutive value heads
    beta = sigmoid(b);  g = -exp(A_log) * softplus(a + dt_bias)   (g in fp32)
    o = gated_delta_rule(l2norm(q) * dk^-0.5, l2norm(k), v, g, beta)   [T, Hv, dv]
    out = out_proj(gated_rmsnorm(o, z))                    per value head

Projections: Qwen3.5 stores them apart (`in_proj_qkv`, `in_proj_z`, `in_proj_b`,
`in_proj_a`); Qwen3-Next fuses them as `in_proj_qkvz` [Hk * (2dk + 2(Hv/Hk)dv), H]
and `in_proj_ba` [2Hv, H], each grouped per key head (q, k, then that head's
value heads' v, then their z; b then a): `_split_fused` takes them apart.

State: the conv state and the recurrent state of every sequence live in the
stage's pool (pprt.models.kv.StateCache); the batch names each sequence's slot,
and the kernels (pprt_kernels.causal_conv1d, pprt_kernels.gated_delta) read and
update it in place. A chunk that starts at position 0 finds its slot zeroed.
Plain torch around the kernels; no ranks, no knowledge of the driver.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pprt_kernels.causal_conv1d import causal_conv1d
from pprt_kernels.gated_delta import gated_delta_rule

from ..config import ModelConfig
from .batch import StepBatch
from .kv import LayerState
from .layers import GatedRMSNorm


class GatedDeltaNet(nn.Module):
    """One Gated DeltaNet token mixer; parameter names are the checkpoint's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        lin, H = cfg.linear, cfg.hidden_size
        self.hk, self.hv, self.dk, self.dv = lin.num_key_heads, lin.num_value_heads, lin.key_head_dim, lin.value_head_dim
        self.key_dim, self.value_dim, self.fused = lin.key_dim, lin.value_dim, lin.fused_projections
        if self.fused:
            self.in_proj_qkvz = nn.Linear(H, 2 * self.key_dim + 2 * self.value_dim, bias=False)
            self.in_proj_ba = nn.Linear(H, 2 * self.hv, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(H, lin.conv_dim, bias=False)
            self.in_proj_z = nn.Linear(H, self.value_dim, bias=False)
            self.in_proj_b = nn.Linear(H, self.hv, bias=False)
            self.in_proj_a = nn.Linear(H, self.hv, bias=False)
        self.conv1d = nn.Module()  # holds `weight` [conv_dim, 1, K] under the checkpoint's name; no bias
        self.conv1d.weight = nn.Parameter(torch.empty(lin.conv_dim, 1, lin.conv_kernel), requires_grad=False)
        self.dt_bias = nn.Parameter(torch.empty(self.hv), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.hv), requires_grad=False)
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, H, bias=False)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """qkv [T, conv_dim] (q | k | v, each head-major), z [T, Hv, dv], b [T, Hv], a [T, Hv]."""
        T = x.shape[0]
        if self.fused:
            return self._split_fused(self.in_proj_qkvz(x), self.in_proj_ba(x))
        z = self.in_proj_z(x).view(T, self.hv, self.dv)
        return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)

    def _split_fused(self, qkvz: torch.Tensor, ba: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Qwen3-Next's per-key-head grouping -> the Qwen3.5 layout (transformers' fix_query_key_value_ordering)."""
        T, r = qkvz.shape[0], self.hv // self.hk  # value heads per key head
        q, k, v, z = qkvz.view(T, self.hk, 2 * self.dk + 2 * r * self.dv).split(
            [self.dk, self.dk, r * self.dv, r * self.dv], dim=-1)  # [T, Hk, ...] each
        b, a = ba.view(T, self.hk, 2 * r).split([r, r], dim=-1)  # [T, Hk, r] each
        qkv = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=-1)  # [T, conv_dim]
        return qkv, z.reshape(T, self.hv, self.dv), b.reshape(T, self.hv), a.reshape(T, self.hv)

    def forward(self, x: torch.Tensor, batch: StepBatch, state: LayerState) -> torch.Tensor:
        T = x.shape[0]
        qkv, z, b, a = self._project(x)
        qkv = causal_conv1d(qkv, self.conv1d.weight[:, 0, :], None, state.conv, batch.state_indices,
                            batch.query_start_loc, activation="silu")  # [T, conv_dim]
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        r = self.hv // self.hk
        q = q.reshape(T, self.hk, self.dk).repeat_interleave(r, dim=1)  # [T, Hv, dk]
        k = k.reshape(T, self.hk, self.dk).repeat_interleave(r, dim=1)
        v = v.reshape(T, self.hv, self.dv)
        beta = b.sigmoid()  # [T, Hv], model dtype (as transformers)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # [T, Hv] fp32 log-decay
        o = gated_delta_rule(q, k, v, g, beta, state.ssm, batch.state_indices, batch.query_start_loc,
                             scale=self.dk**-0.5, use_qk_l2norm=True, max_query_len=batch.max_query_len)
        o = self.norm(o, z)  # [T, Hv, dv]
        return self.out_proj(o.reshape(T, self.value_dim))
