"""Tiny random Qwen checkpoints written by transformers, as real ones are laid out.

`make_checkpoint(path, family, **overrides)` builds a transformers model from a
small config, saves it sharded in float32 with `save_pretrained`, rewrites
config.json into the OLD spelling real Qwen checkpoints use (top-level
`rope_theta` + `rope_scaling`, `torch_dtype`, `num_experts`), and adds a tiny
tokenizer. `reference_model(path)` loads it back with transformers: the oracle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_tokenizer import build_tokenizer

VOCAB = 320

FAMILIES = {
    # qwen2: q/k/v bias, head_dim = H / n
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2),
    # qwen3: q/k norm, head_dim (24) != H / n (16)
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24),
    # qwen3_moe: sparse every 2nd layer, layer 3 forced dense, renormalized top-k
    "qwen3_moe": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=32, moe_intermediate_size=32, num_experts=8,
                      num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True),
}


def _model_classes(family: str):
    import transformers as tf

    return {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
    }[family]


def make_checkpoint(path: Path, family: str, *, yarn: dict | None = None, seed: int = 0,
                    max_shard_size: str = "60KB", tokenizer: bool = True, eos_token_id: int | list | None = None,
                    **overrides) -> Path:
    """Write a random `family` checkpoint to `path` and return it.

    yarn: e.g. {"factor": 4.0, "original_max_position_embeddings": 64}.
    """
    config_cls, model_cls = _model_classes(family)
    kwargs = dict(FAMILIES[family], vocab_size=VOCAB, rope_theta=10000.0, max_position_embeddings=4096,
                  initializer_range=0.08, eos_token_id=eos_token_id)
    kwargs.update(overrides)
    theta = kwargs.pop("rope_theta")
    rope = {"rope_type": "default", "rope_theta": theta}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": theta, **yarn}
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs, rope_parameters=rope)).float().eval()
    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    _to_old_spelling(path / "config.json", theta, yarn)
    if tokenizer:
        build_tokenizer(path, vocab_size=VOCAB)
    return path


def _to_old_spelling(config_path: Path, theta: float, yarn: dict | None) -> None:
    cfg = json.loads(config_path.read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = theta
    # Old files say "type" (Qwen2.5 docs) rather than "rope_type".
    cfg["rope_scaling"] = {"type": "yarn", **yarn} if yarn else None
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    if "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    config_path.write_text(json.dumps(cfg, indent=2))


def reference_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation of `prompt` by the transformers model, and each chosen token's logprob.

    The all-ones attention mask is explicit: without one, generate() infers it from
    pad_token_id and masks every prompt token equal to it (id 0 is "!" in Qwen's vocabulary).
    """
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    tokens = out[0, len(prompt):].tolist()
    return tokens, reference_logprobs(model, prompt, tokens)


@torch.inference_mode()
def reference_logprobs(model, prompt: list[int], tokens: list[int]) -> list[float]:
    """Logprob of each of `tokens` given prompt + the tokens before it (one forward pass)."""
    ids = torch.tensor([prompt + tokens])
    logp = torch.log_softmax(model(ids, attention_mask=torch.ones_like(ids)).logits[0].float(), dim=-1)  # [L, V]
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]
