"""Stage: a contiguous range of a Qwen model's decoder layers.

`Stage(config, layers=(lo, hi))` holds the embedding only when lo == 0 and
the final norm and head only when hi == num_layers. With `mtp=True` the last
stage also holds the model's MTP head (`mtp.*`, pprt.models.mtp) and, for it,
the embedding (a tied head is then that embedding). Parameter names are the
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
from .batch import StepBatch
from .decoder import DecoderLayer
from .kv import KVCache, StateCache
from .layers import RMSNorm, Rotary
from .mtp import MTPHead


class Stage(nn.Module):
    def __init__(self, config: ModelConfig, layers: tuple[int, int] | None = None, mtp: bool = False):
        super().__init__()
        lo, hi = layers if layers is not None else (0, config.num_layers)
        if not 0 <= lo < hi <= config.num_layers:
            raise ValueError(f"layers {(lo, hi)} is not a non-empty range within [0, {config.num_layers})")
        self.config, self.lo, self.hi = config, lo, hi
        self.is_first, self.is_last = lo == 0, hi == config.num_layers
        with_mtp = mtp and self.is_last
        norm = dict(eps=config.rms_norm_eps, zero_centered=config.zero_centered_norm)
        with torch.device("meta"):
            self.model = nn.Module()
            if self.is_first or with_mtp:
                # _weight skips the random init, which on meta tensors would import torch._dynamo (~1.5 s)
                self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                                       _weight=torch.empty(config.vocab_size, config.hidden_size))
            self.model.layers = nn.ModuleDict({str(i): DecoderLayer(config, i) for i in range(lo, hi)})
            if self.is_last:
                self.model.norm = RMSNorm(config.hidden_size, **norm)
                if not (config.tie_word_embeddings and hasattr(self.model, "embed_tokens")):
                    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.mtp = MTPHead(config) if with_mtp else None
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

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits [R, V] of normed hidden states x [R, H] (last stage; a tied head is the embedding)."""
        head = self.lm_head if hasattr(self, "lm_head") else None
        logits = head(x) if head is not None else x @ self.model.embed_tokens.weight.t()
        return logits.float()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, batch: StepBatch, cache: KVCache, state: StateCache | None = None,
                logits_indices: torch.Tensor | None = None,
                with_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run this stage.

        x: token ids [T] on the first stage, else hidden states [T, H]. cache: the KV pool of
        the stage's full-attention layers; state: the state pool of its DeltaNet layers
        (None when it has none). Returns hidden states [T, H], or on the last stage the fp32
        logits [R, V] of the rows in `logits_indices` (all rows when None); with `with_hidden`
        (last stage) also every row's hidden state after the final norm [T, H] (the MTP head's input).
        """
        if self.is_first:
            x = self.model.embed_tokens(x)  # [T, H]
        cos, sin = self.rotary.cos_sin(batch.positions, x.dtype)
        for layer, i in zip(self.model.layers.values(), self._pool_index):
            x = layer(x, batch, cos, sin, state.layer(i) if layer.is_linear else cache.layer(i))
        if not self.is_last:
            return x
        if with_hidden:
            normed = self.model.norm(x)  # [T, H]; a row-wise norm: the same rows as normed after indexing
            rows = normed[logits_indices] if logits_indices is not None else normed
            return self.logits(rows), normed
        if logits_indices is not None:
            x = x[logits_indices]
        return self.logits(self.model.norm(x))
