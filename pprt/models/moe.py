"""Sparse mixture-of-experts MLP: routing, routed experts and the gated shared expert.

One module for every MoE family (config fields, not subclasses), as transformers
computes them (models/qwen3_moe, qwen2_moe, qwen3_next, qwen3_5_moe):
- router `gate` [E, H]: softmax over all E experts in fp32, top-k; the k weights
  are divided by their sum when `norm_topk_prob` (Qwen3.5-MoE: always), then cast
  to the model dtype;
- routed output: sum over the chosen experts of weight * expert_mlp(x);
- shared expert (qwen2_moe, qwen3_next, qwen3_5_moe): an MLP every token runs,
  scaled by sigmoid(shared_expert_gate(x)) ([1, H]) and added to the routed output.
Experts are one MLP module each, whatever the checkpoint's layout (per-expert
tensors or fused [E, 2I, H] / [E, H, I]: pprt.weights.layout maps either onto them).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .layers import MLP


class MoE(nn.Module):
    """Top-k routed experts plus, when the config has one, the gated shared expert. x: [T, H]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

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
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # [T, H]
        return out
