"""DecoderLayer: one Qwen decoder layer, a token mixer then an MLP, each around a residual.

The mixer is full attention over a paged KV pool or (hybrid families) Gated
DeltaNet over a state pool; the MLP is dense or a mixture of experts. By
default both follow the config's rule for layer `index` (`is_linear`,
`is_sparse`); the MTP head's layer (pprt.models.mtp) is built with them given
(full attention, MoE when the model is). Knows nothing of stages or pools
beyond the one it is handed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention
from .batch import StepBatch
from .deltanet import GatedDeltaNet
from .kv import LayerKV, LayerState
from .layers import MLP, RMSNorm
from .moe import MoE


class DecoderLayer(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)). x: [T, H].

    linear / sparse: the mixer is Gated DeltaNet / the MLP is MoE (None: the config's rule for `index`).
    """

    def __init__(self, cfg: ModelConfig, index: int, *, linear: bool | None = None, sparse: bool | None = None):
        super().__init__()
        linear = cfg.is_linear(index) if linear is None else linear
        sparse = cfg.is_sparse(index) if sparse is None else sparse
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.zero_centered_norm)
        if linear:
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.zero_centered_norm)
        self.mlp = MoE(cfg) if sparse else MLP(cfg.hidden_size, cfg.intermediate_size)

    @property
    def is_linear(self) -> bool:
        return hasattr(self, "linear_attn")

    def forward(self, x: torch.Tensor, batch: StepBatch, cos: torch.Tensor, sin: torch.Tensor,
                pool: LayerKV | LayerState) -> torch.Tensor:
        h = self.input_layernorm(x)
        h = self.linear_attn(h, batch, pool) if self.is_linear else self.self_attn(h, batch, cos, sin, pool)
        h, x = self.post_attention_layernorm.add_forward(h, x)  # norm(x + h), x + h
        return x + self.mlp(h)
