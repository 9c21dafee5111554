"""The building blocks of a Qwen decoder layer, computed as transformers does:
RMSNorm (plain, zero-centred and gated), rotary embeddings (default and YaRN,
full or partial) and the dense MLP.

Tokens of all sequences in a step are packed along one axis: hidden states
are [T, H]. Modules are plain torch and know nothing of processes or stages.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pprt_kernels.rms_norm import add_rms_norm, rms_norm
from pprt_kernels.rotary import apply_rotary

from ..config import RopeConfig


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last axis, in fp32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """Plain: rms(x) cast back, times weight (Qwen2/Qwen3).
    Zero-centred (Qwen3-Next, Qwen3.5: weights stored around 0): rms(x) * (1 + weight) in fp32,
    then cast back (transformers' Qwen3NextRMSNorm; the cast comes last, unlike the plain norm)."""

    def __init__(self, dim: int, eps: float, zero_centered: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps, self.zero_centered = eps, zero_centered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., dim] (one kernel on GPU: pprt_kernels.rms_norm)."""
        return rms_norm(x, self.weight, self.eps, self.zero_centered)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), the add fused into the norm's kernel on GPU."""
        return add_rms_norm(x, residual, self.weight, self.eps, self.zero_centered)


class GatedRMSNorm(nn.Module):
    """The Gated DeltaNet output norm: weight * rms(x) cast back, times silu(gate) in fp32, cast back
    (transformers' Qwen3NextRMSNormGated; weights around 1). x, gate: [..., dim]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = self.weight * _rms(x, self.eps).to(x.dtype)
        return (normed * F.silu(gate.float())).to(x.dtype)


def rope_inv_freq(rope: RopeConfig, rotary_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim / 2] (fp32) and the cos/sin scale, default or YaRN.
    rotary_dim: head_dim, or int(head_dim * partial_rotary_factor) for partial rotary."""
    d = rotary_dim
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
    """Half-split (NeoX) rotary embedding over the first `rotary_dim` dims of each head; cos/sin
    computed from positions each step."""

    def __init__(self, rope: RopeConfig, rotary_dim: int):
        super().__init__()
        inv_freq, self.scale = rope_inv_freq(rope, rotary_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, r/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, r]
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-split rotary on the first r dims of each head of q [T, n, h] and k [T, m, h]; cos, sin
    [T, r] from `Rotary.cos_sin`. Returns the turned (q, k): on GPU one kernel turning them in
    place (pprt_kernels.rotary), on CPU new tensors."""
    return apply_rotary(q, k, cos, sin)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up as one matmul once the loader joined them (gate_up_proj)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.intermediate = intermediate
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.register_module("gate_up_proj", None)  # pprt.weights.merge

    def merged_sizes(self, name: str) -> list[int]:
        """Output sizes of the parts of the merged layer `name` (gate_up_proj: gate, up)."""
        return [self.intermediate, self.intermediate]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I] each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)
