"""MTPHead: the multi-token-prediction head of Qwen3-Next and the Qwen3.5 family (`mtp.*`).

Given the model's hidden state at position p and the embedding of the token at
p + 1, the head predicts the token at p + 2:

    e = pre_fc_norm_embedding(embed(token[p + 1]))       # [T, H]
    g = pre_fc_norm_hidden(hidden[p])                     # [T, H]
    x = fc(concat(e, g))                                  # mtp.fc [H, 2H]: the embedding half first
    x = layers.0(x)                                       # a full-attention decoder layer at position p
    y = norm(x)                                           # mtp.norm
    logits = lm_head(y)                                   # the model's own head (tied: the embedding)

The three norms are the family's zero-centred RMSNorm (x_normed * (1 + w)).
The layer is a full-attention decoder layer of the family (gated attention,
q/k norms, partial rotary at position p; MoE with the shared expert where the
model is MoE) over its own paged KV. `hidden[p]` is the model's hidden state
after its final norm (`model.norm`), and a further draft step takes `y` (after
`mtp.norm`) as its hidden state with the token it drafted.

Source: vLLM's `qwen3_next_mtp.py` and `qwen3_5_mtp.py` (Qwen3NextMultiTokenPredictor
/ Qwen3_5MultiTokenPredictor.forward: `torch.cat([inputs_embeds, hidden_states])`
after `pre_fc_norm_embedding` / `pre_fc_norm_hidden`, both GemmaRMSNorm (1 + w),
then `fc`, the layer built with layer_type="full_attention", then `self.norm`;
logits from the shared `lm_head`) and SGLang's `qwen3_next_mtp.py` (the same
order and norms). In both engines the target hidden states handed to the head
are the model's forward output, which ends with the final norm (vLLM
Qwen3NextModel.forward returns `self.norm(hidden_states, residual)`; SGLang keeps
the hidden states its logits processor receives), and later draft steps feed
the head its own normed output. transformers ignores `mtp.*`.

The embedding and the head belong to the Stage that holds this module (the
last stage, which then also holds the embedding); this module knows nothing
of which positions are filled or drafted (pprt.distributed.mtp_drafts).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .batch import StepBatch
from .decoder import DecoderLayer
from .kv import LayerKV
from .layers import RMSNorm


class MTPHead(nn.Module):
    """The `mtp.*` tensors of a checkpoint with one MTP layer (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        norm = dict(eps=cfg.rms_norm_eps, zero_centered=cfg.zero_centered_norm)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(H, **norm)
        self.pre_fc_norm_hidden = RMSNorm(H, **norm)
        # one full-attention layer; MoE (with its shared expert) when the model has experts
        self.layers = nn.ModuleDict({"0": DecoderLayer(cfg, 0, linear=False, sparse=cfg.num_experts > 0)})
        self.norm = RMSNorm(H, **norm)

    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor, batch: StepBatch, cos: torch.Tensor,
                sin: torch.Tensor, kv: LayerKV) -> torch.Tensor:
        """hidden: [T, H] the model's normed hidden states at `batch.positions` (or the head's own
        output one step back); embeds: [T, H] embeddings of the tokens one position later. Writes
        the layer's K and V at `batch.slot_mapping` and attends over the pool through the batch's
        block tables. Returns y [T, H] (after mtp.norm): the head's logits are lm_head(y)."""
        x = torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1)  # [T, 2H]
        x = self.layers["0"](self.fc(x), batch, cos, sin, kv)  # [T, H]
        return self.norm(x)
