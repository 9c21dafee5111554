"""Stage: a contiguous range of a Qwen model's decoder layers.

`Stage(config, layers=(lo, hi))` holds the embedding only when lo == 0 and
the final norm and head only when hi == num_layers. Parameter names are the
canonical checkpoint tensor names (`model.layers.{i}.self_attn.q_proj.weight`,
...); pprt.weights.layout maps them onto a checkpoint's actual layout (a
multimodal wrapper's `model.language_model.` prefix, fused experts, a tied head).

Each layer's token mixer follows `config.layer_types`: full attention over the
stage's paged KV pool, or (hybrid families) Gated DeltaNet over its state pool.
Pool index i of either kind is the stage's i-th layer of that kind, so a stage
with no full-attention layer has an empty KV pool and one with no DeltaNet
layer no state pool.

Modules are built on the meta device; `pprt.weights.loader` materializes them. The
stage knows nothing of ranks or processes: a pipeline is several stages.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention
from .batch import StepBatch
from .deltanet import GatedDeltaNet
from .kv import KVCache, LayerKV, LayerState, StateCache
from .layers import MLP, RMSNorm, Rotary
from .moe import MoE


class DecoderLayer(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)); the mixer is full attention or Gated DeltaNet."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.zero_centered_norm)
        if cfg.is_linear(index):
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.zero_centered_norm)
        self.mlp = MoE(cfg) if cfg.is_sparse(index) else MLP(cfg.hidden_size, cfg.intermediate_size)

    @property
    def is_linear(self) -> bool:
        return hasattr(self, "linear_attn")

    def forward(self, x: torch.Tensor, batch: StepBatch, cos: torch.Tensor, sin: torch.Tensor,
                pool: LayerKV | LayerState) -> torch.Tensor:
        h = self.input_layernorm(x)
        h = self.linear_attn(h, batch, pool) if self.is_linear else self.self_attn(h, batch, cos, sin, pool)
        h, x = self.post_attention_layernorm.add_forward(h, x)  # norm(x + h), x + h
        return x + self.mlp(h)


class Stage(nn.Module):
    def __init__(self, config: ModelConfig, layers: tuple[int, int] | None = None):
        super().__init__()
        lo, hi = layers if layers is not None else (0, config.num_layers)
        if not 0 <= lo < hi <= config.num_layers:
            raise ValueError(f"layers {(lo, hi)} is not a non-empty range within [0, {config.num_layers})")
        self.config, self.lo, self.hi = config, lo, hi
        self.is_first, self.is_last = lo == 0, hi == config.num_layers
        norm = dict(eps=config.rms_norm_eps, zero_centered=config.zero_centered_norm)
        with torch.device("meta"):
            self.model = nn.Module()
            if self.is_first:
                # _weight skips the random init, which on meta tensors would import torch._dynamo (~1.5 s)
                self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                                       _weight=torch.empty(config.vocab_size, config.hidden_size))
            self.model.layers = nn.ModuleDict({str(i): DecoderLayer(config, i) for i in range(lo, hi)})
            if self.is_last:
                self.model.norm = RMSNorm(config.hidden_size, **norm)
                if not (config.tie_word_embeddings and self.is_first):
                    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.rotary = Rotary(config.rope, config.rotary_dim)  # real tensors, not loaded
        # each layer's index in the pool of its kind (KV for full attention, state for DeltaNet)
        counts = {False: 0, True: 0}
        self._pool_index = []
        for layer in self.model.layers.values():
            self._pool_index.append(counts[layer.is_linear])
            counts[layer.is_linear] += 1
        self.num_attention_layers, self.num_linear_layers = counts[False], counts[True]

    @property
    def num_layers(self) -> int:
        return self.hi - self.lo

    def checkpoint_name(self, param_name: str) -> str:
        """The canonical tensor holding `param_name` (the tied head reads the embedding)."""
        if param_name == "lm_head.weight" and self.config.tie_word_embeddings:
            return "model.embed_tokens.weight"
        return param_name

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, batch: StepBatch, cache: KVCache, state: StateCache | None = None,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Run this stage.

        x: token ids [T] on the first stage, else hidden states [T, H]. cache: the KV pool of
        the stage's full-attention layers; state: the state pool of its DeltaNet layers
        (None when it has none). Returns hidden states [T, H], or on the last stage the fp32
        logits [R, V] of the rows in `logits_indices` (all rows when None).
        """
        if self.is_first:
            x = self.model.embed_tokens(x)  # [T, H]
        cos, sin = self.rotary.cos_sin(batch.positions, x.dtype)
        for layer, i in zip(self.model.layers.values(), self._pool_index):
            x = layer(x, batch, cos, sin, state.layer(i) if layer.is_linear else cache.layer(i))
        if not self.is_last:
            return x
        if logits_indices is not None:
            x = x[logits_indices]
        x = self.model.norm(x)
        head = self.lm_head if hasattr(self, "lm_head") else None
        logits = head(x) if head is not None else x @ self.model.embed_tokens.weight.t()
        return logits.float()
