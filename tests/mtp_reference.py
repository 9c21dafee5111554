"""An independent plain-torch implementation of the MTP head's published formula (the test oracle).

transformers has no MTP module (it ignores `mtp.*`), so this file is the
reference the runtime's head is compared against. It follows the published
formula (shared/QWEN.md "MTP head"; vLLM's qwen3_next_mtp.py / qwen3_5_mtp.py):

    y = mtp.norm(layer(fc(concat(pre_fc_norm_embedding(embed(t[p+1])), pre_fc_norm_hidden(h[p])))))
    logits = lm_head(y)

with h the model's hidden states after its final norm (transformers'
`last_hidden_state`), zero-centred RMSNorms x_normed * (1 + w), and `layer` a
full-attention decoder layer of the family written out here from the tensors:
gated attention (q_proj rows per head: query then gate), q/k norms, partial
rotary (NeoX halves over the first rotary dims), causal softmax attention over
the head's own earlier positions; a dense MLP or top-k routed experts plus the
sigmoid-gated shared expert. Every tensor is read from the safetensors files
(fused experts split here); the geometry comes from transformers' config object.
Nothing of pprt is used.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F


def load_head(path: Path, model) -> dict:
    """The head's tensors (mtp.* with the `mtp.` dropped; experts per expert), the embedding and
    lm_head, and the geometry, from the checkpoint at `path` and its transformers model."""
    from safetensors.torch import load_file

    index = json.loads((path / "model.safetensors.index.json").read_text())
    w = {}
    for shard in sorted(set(index["weight_map"].values())):
        for name, t in load_file(path / shard).items():
            if name.startswith("mtp."):
                w[name[4:]] = t.float()
            elif re.fullmatch(r"model\.(language_model\.)?embed_tokens\.weight", name):
                w["embed"] = t.float()
            elif name == "lm_head.weight":
                w["lm_head"] = t.float()
    w.setdefault("lm_head", w["embed"])  # tied
    fused = w.pop("layers.0.mlp.experts.gate_up_proj", None)
    if fused is not None:  # [E, 2I, H] gate rows first; down [E, H, I]
        down, inter = w.pop("layers.0.mlp.experts.down_proj"), fused.shape[1] // 2
        for e in range(fused.shape[0]):
            w[f"layers.0.mlp.experts.{e}.gate_proj.weight"] = fused[e, :inter]
            w[f"layers.0.mlp.experts.{e}.up_proj.weight"] = fused[e, inter:]
            w[f"layers.0.mlp.experts.{e}.down_proj.weight"] = down[e]
    tc = getattr(model.config, "text_config", model.config)
    rope = tc.rope_parameters
    w["cfg"] = dict(eps=tc.rms_norm_eps, heads=tc.num_attention_heads, kv_heads=tc.num_key_value_heads,
                    head_dim=tc.head_dim, theta=rope["rope_theta"],
                    rotary=int(tc.head_dim * rope.get("partial_rotary_factor", getattr(tc, "partial_rotary_factor", 1))),
                    experts=getattr(tc, "num_experts", 0), top_k=getattr(tc, "num_experts_per_tok", 0),
                    norm_topk=getattr(tc, "norm_topk_prob", True))
    return w


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm: x / rms(x) * (1 + w)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + weight)


def _rotary(x: torch.Tensor, pos: torch.Tensor, theta: float, dim: int) -> torch.Tensor:
    """NeoX rotary on the first `dim` dims of each head. x: [T, heads, h]."""
    inv = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = (pos[:, None].double() * inv).float()  # [T, dim/2]
    cos, sin = angle.cos().repeat(1, 2)[:, None], angle.sin().repeat(1, 2)[:, None]  # [T, 1, dim]
    r, rest = x[..., :dim], x[..., dim:]
    half = torch.cat([-r[..., dim // 2:], r[..., :dim // 2]], dim=-1)
    return torch.cat([r * cos + half * sin, rest], dim=-1)


def _attention(w: dict, x: torch.Tensor, pos: torch.Tensor, c: dict) -> torch.Tensor:
    T, n, m, h = x.shape[0], c["heads"], c["kv_heads"], c["head_dim"]
    p = "layers.0.self_attn."
    qg = (x @ w[p + "q_proj.weight"].T).view(T, n, 2 * h)
    q, gate = qg[..., :h], qg[..., h:]
    k = (x @ w[p + "k_proj.weight"].T).view(T, m, h)
    v = (x @ w[p + "v_proj.weight"].T).view(T, m, h)
    q, k = _norm(q, w[p + "q_norm.weight"], c["eps"]), _norm(k, w[p + "k_norm.weight"], c["eps"])
    q, k = _rotary(q, pos, c["theta"], c["rotary"]), _rotary(k, pos, c["theta"], c["rotary"])
    k, v = k.repeat_interleave(n // m, dim=1), v.repeat_interleave(n // m, dim=1)  # [T, n, h]
    scores = torch.einsum("tnh,snh->nts", q, k) * h**-0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("nts,snh->tnh", scores.softmax(dim=-1), v) * torch.sigmoid(gate)
    return out.reshape(T, n * h) @ w[p + "o_proj.weight"].T


def _mlp(w: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)) @ w[p + "down_proj.weight"].T


def _moe(w: dict, x: torch.Tensor, c: dict) -> torch.Tensor:
    if not c["experts"]:
        return _mlp(w, "layers.0.mlp.", x)
    probs = (x @ w["layers.0.mlp.gate.weight"].T).softmax(dim=-1)  # [T, E]
    top, idx = probs.topk(c["top_k"], dim=-1)
    if c["norm_topk"]:
        top = top / top.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for weight, e in zip(top[t], idx[t]):
            out[t] += weight * _mlp(w, f"layers.0.mlp.experts.{int(e)}.", x[t:t + 1])[0]
    shared = _mlp(w, "layers.0.mlp.shared_expert.", x)
    return out + torch.sigmoid(x @ w["layers.0.mlp.shared_expert_gate.weight"].T) * shared


def head_outputs(w: dict, hidden: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """y [T, H] of the head over T positions at once (causal): hidden [T, H], tokens [T] (each
    position's next token), pos [T]."""
    c = w["cfg"]
    e = _norm(w["embed"][tokens], w["pre_fc_norm_embedding.weight"], c["eps"])
    g = _norm(hidden, w["pre_fc_norm_hidden.weight"], c["eps"])
    x = torch.cat([e, g], dim=-1) @ w["fc.weight"].T
    x = x + _attention(w, _norm(x, w["layers.0.input_layernorm.weight"], c["eps"]), pos, c)
    x = x + _moe(w, _norm(x, w["layers.0.post_attention_layernorm.weight"], c["eps"]), c)
    return _norm(x, w["norm.weight"], c["eps"])


@torch.inference_mode()
def reference_drafts(model, w: dict, tokens: list[int], k: int) -> tuple[list[int], torch.Tensor]:
    """The head's k greedy drafts after `tokens` (the last one sampled, not yet run by the model)
    and their logits [k, V]: position p of the model's hidden states (of tokens[:-1]) with token
    p + 1, then each draft at the next position with the head's own output before it."""
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    ids = torch.tensor([tokens[:-1]])
    hidden = lm(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].float()  # [N-1, H]
    nxt = list(tokens[1:])
    drafts, logits = [], []
    for _ in range(k):
        y = head_outputs(w, hidden, torch.tensor(nxt), torch.arange(len(nxt)))
        row = y[-1] @ w["lm_head"].T  # [V]
        logits.append(row)
        drafts.append(int(row.argmax()))
        hidden = torch.cat([hidden, y[-1:]])  # the next position reads the head's own output ...
        nxt.append(drafts[-1])  # ... and its draft
    return drafts, torch.stack(logits)
