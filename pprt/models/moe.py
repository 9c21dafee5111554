"""Sparse mixture-of-experts MLP: routing, routed experts and the gated shared expert.

One module for every MoE family (config fields, not subclasses), as transformers
computes them (models/qwen3_moe, qwen2_moe, qwen3_next, qwen3_5_moe):
- router `gate` [E, H]: softmax over all E experts in fp32, top-k; the k weights
  are divided by their sum when `norm_topk_prob` (Qwen3.5-MoE: always), then cast
  to the model dtype;
- routed output: sum over the chosen experts of weight * expert_mlp(x);
- shared expert (qwen2_moe, qwen3_next, qwen3_5_moe): an MLP every token runs,
  scaled by sigmoid(shared_expert_gate(x)) ([1, H]) and added to the routed output.
The routed experts run as one fused pass (pprt_kernels.fused_moe: routing on
the device, token-expert pairs sorted by expert, two grouped GEMMs; torch's
grouped GEMM where it serves, the Triton kernels elsewhere on a GPU, the
reference on CPU): a fixed number of launches and no host sync whatever the
routing. The shared expert runs beside it. Experts are built as one MLP module
each, named as checkpoints name them, whatever the checkpoint's layout
(per-expert tensors or fused [E, 2I, H] / [E, H, I]: pprt.weights.layout maps
either onto them); the loader moves each into `stacked` (gate_up [E, 2I, H],
down [E, H, I]: pprt.weights.experts) as soon as it is placed, so a loaded
layer's `experts` is empty. LoRA adapters on the routed experts reach the fused pass
through `expert_lora` (set by pprt.models.lora.LoraBank: the step's ExpertLora, or None).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pprt_kernels.fused_moe import fused_moe
from pprt_kernels.moe_lora import ExpertLora
from pprt_kernels.moe_weights import ExpertWeights

from ..config import ModelConfig
from .layers import MLP


class MoE(nn.Module):
    """Top-k routed experts plus, when the config has one, the gated shared expert. x: [T, H]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.hidden_size, self.intermediate_size = cfg.hidden_size, cfg.moe_intermediate_size
        self.expert_lora: Callable[[], ExpertLora | None] | None = None  # LoRA on the routed experts, per step
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        self.stacked = nn.Module()  # filled by the loader (pprt.weights.experts.stack_expert)
        self.stacked.gate_up = self.stacked.down = None
        self._weights: tuple[ExpertWeights, ExpertWeights] | None = None  # the stacks as the kernels take them
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._weights is None:
            if self.stacked.gate_up is None or len(self.experts):
                raise RuntimeError("the MoE layer's experts are not loaded (stacked) yet")
            self._weights = (self.stacked.gate_up.expert_weights(), self.stacked.down.expert_weights())
        gate_up, down = self._weights
        lora = self.expert_lora() if self.expert_lora is not None else None
        out = fused_moe(x, self.gate(x), gate_up, down, self.top_k, self.norm_topk, lora)  # [T, H]
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # [T, H]
        return out
