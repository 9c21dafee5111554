"""Every config.json field of the supported families, and what pprt does with each.

(qwen2 / qwen3 / qwen3_moe below; qwen2_moe, qwen3_next and the Qwen3.5 text configs
follow the same rules with their own lists, from transformers' Qwen2MoeConfig,
Qwen3NextConfig, Qwen3_5TextConfig and Qwen3_5MoeTextConfig and their modeling code;
a Qwen3.5 wrapper's top-level fields are listed in WRAPPER.)

A field the model's math depends on is either implemented (config.py reads
it), or refused with a ConfigError naming it, or (where transformers ignores
it too) warned about, with the context pprt serves by default capped to
where the math is still the checkpoint's. Nothing that changes the math is
accepted silently. The lists below come from transformers 5's Qwen2Config /
Qwen3Config / Qwen3MoeConfig and the attributes its qwen2 / qwen3 /
qwen3_moe modeling code reads (tests/test_field_audit.py checks both
against the installed transformers, so a new field there fails a test here):

- read: sizes, norms, rotary (pprt.rope), biases, MoE layout, eos ids, dtype,
  quantization_config;
- checked: `use_sliding_window`, `sliding_window`, `max_window_layers`,
  `layer_types`: a layer that would use sliding-window attention is refused
  (transformers: on qwen2 / qwen3 the layers from max_window_layers on, or
  those layer_types names; on qwen3_moe every layer);
- warned and capped: `dual_chunk_attention_config` (Qwen2.5-1M, Qwen3-2507 1M
  configs). Neither pprt nor transformers implements dual chunk attention; a
  sequence within one chunk (chunk_size - local_size tokens, and no longer
  than its original_max_position_embeddings) computes exactly plain attention,
  so the default context stops there;
- absent but needed: where transformers would fill in a size of its own
  (num_key_value_heads 32, Qwen3's head_dim 128, intermediate_size, the MoE
  sizes), pprt refuses rather than guess;
- inert: fields that do not change inference (training-only settings, token
  ids other than eos, HF bookkeeping, the generation defaults transformers
  drops from config.json);
- anything else is not read by pprt nor by transformers' model: one warning
  names them.

Knows nothing about files or devices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import ConfigError

log = logging.getLogger("pprt")

_COMMON = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "eos_token_id", "torch_dtype", "dtype", "quantization_config",
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "original_max_position_embeddings",
    "use_sliding_window", "sliding_window",
}
READ = {
    "qwen2": _COMMON | {"max_window_layers", "layer_types"},
    "qwen3": _COMMON | {"max_window_layers", "layer_types", "attention_bias"},
    "qwen3_moe": _COMMON | {"attention_bias", "num_experts", "num_local_experts", "num_experts_per_tok",
                            "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"},
}
_MOE = {"num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
        "shared_expert_intermediate_size"}
_LINEAR = {"linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
           "linear_conv_kernel_dim", "layer_types", "full_attention_interval", "attention_bias"}
# read and not run: the multi-token-prediction head (its own issue), the recurrent state's dtype
# (only float32 is taken), the gated attention switch (only true is taken)
_QWEN35 = _COMMON | _LINEAR | {"attn_output_gate", "mamba_ssm_dtype", "mtp_num_hidden_layers",
                               "mtp_use_dedicated_embeddings"}
READ.update({
    "qwen2_moe": _COMMON | _MOE | {"max_window_layers", "layer_types", "qkv_bias", "norm_topk_prob",
                                   "decoder_sparse_step", "mlp_only_layers"},
    "qwen3_next": _COMMON | _MOE | _LINEAR | {"norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
                                              "num_nextn_predict_layers"},
    "qwen3_5": _QWEN35,
    "qwen3_5_moe": _QWEN35 | _MOE,
})
# Real Qwen3-MoE configs carry max_window_layers, which only qwen2 / qwen3 use. Qwen3.5-MoE's
# config class deletes the dense and routing-rule fields (every layer routed, top-k always
# renormalised): present in a file they change nothing, in transformers as in pprt.
HARMLESS = {"qwen2": set(), "qwen3": set(), "qwen3_moe": {"max_window_layers"}, "qwen2_moe": set(),
            "qwen3_next": set(), "qwen3_5": set(),
            "qwen3_5_moe": {"intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"}}
# The top-level fields of a Qwen3.5 release (Qwen3_5Config / Qwen3_5MoeConfig): the text model is
# text_config; the vision tower and its token ids are not run (text only).
WRAPPER = {"model_type", "architectures", "text_config", "vision_config", "image_token_id", "video_token_id",
           "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings", "quantization_config",
           "torch_dtype", "dtype", "eos_token_id", "bos_token_id", "pad_token_id", "transformers_version",
           "_name_or_path", "use_cache", "initializer_range"}
WARNED = {"dual_chunk_attention_config"}
INERT = {
    # transformers' PreTrainedConfig bookkeeping
    "architectures", "auto_map", "transformers_version", "_name_or_path", "name_or_path", "_commit_hash",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type", "return_dict",
    "output_hidden_states", "output_attentions", "use_return_dict", "tokenizer_class",
    # training-only
    "initializer_range", "attention_dropout", "output_router_logits", "router_aux_loss_coef", "use_cache",
    # token ids that do not change the logits (eos_token_id is read)
    "bos_token_id", "pad_token_id",
    # generation defaults transformers drops from config.json (pprt reads generation_config.json)
    "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_length", "min_length",
    "num_beams", "num_return_sequences", "length_penalty", "no_repeat_ngram_size", "typical_p",
}
# Sizes transformers fills in from its class defaults when config.json lacks them.
_LINEAR_GUESSES = {"linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
                   "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4}
_GUESSED = {
    "qwen2": {"num_key_value_heads": 32, "intermediate_size": 22016},
    "qwen3": {"num_key_value_heads": 32, "intermediate_size": 22016, "head_dim": 128},
    "qwen3_moe": {"num_key_value_heads": 4, "num_experts": 128, "num_experts_per_tok": 8,
                  "moe_intermediate_size": 768},
    "qwen2_moe": {"num_key_value_heads": 16, "intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
                  "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632},
    "qwen3_next": {"num_key_value_heads": 2, "head_dim": 256, "intermediate_size": 5632, "num_experts": 512,
                   "num_experts_per_tok": 10, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
                   **_LINEAR_GUESSES},
    "qwen3_5": {"num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 12288, **_LINEAR_GUESSES},
    "qwen3_5_moe": {"num_key_value_heads": 2, "head_dim": 256, "num_experts": 256, "num_experts_per_tok": 8,
                    "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, **_LINEAR_GUESSES},
}
_HYBRID = ("qwen3_next", "qwen3_5", "qwen3_5_moe")  # layer_types name linear/full layers: checked by pprt.families
_MAX_WINDOW_LAYERS = 28  # Qwen2Config / Qwen3Config default
_SLIDING_WINDOW = 4096  # the classes' default window, when use_sliding_window is set without one


def _at(where: str) -> str:
    return f"{where}: " if where else ""


@dataclass(frozen=True, slots=True)
class FieldAudit:
    exact_context: int | None  # longest context computed as the checkpoint expects; None: no limit
    exact_context_reason: str  # which field limits it ("" when none)
    ignored: tuple[str, ...]  # fields neither pprt nor transformers' model reads


def audit_fields(cfg: dict, where: str = "", *, model_type: str | None = None,
                 wrapper: dict | None = None) -> FieldAudit:
    """Check every field of config.json `cfg` (a supported model_type, or `model_type` when given:
    a Qwen3.5 text config says qwen3_5_text); see the module docstring. `wrapper`: the top level
    of a Qwen3.5 release whose text_config `cfg` is.

    Raises ConfigError naming the field for what pprt does not implement; logs one warning per
    warned field and one for the ignored ones.
    """
    model_type = model_type or cfg["model_type"]
    for name, guess in _GUESSED[model_type].items():
        if name == "intermediate_size" and model_type == "qwen3_moe":
            continue
        if name not in cfg and not (name == "num_experts" and "num_local_experts" in cfg):
            raise ConfigError(f"{_at(where)}config.json has no {name!r} (transformers would assume {guess}, its "
                              f"{model_type} default; pprt does not guess a size)")
    if model_type not in _HYBRID:
        _check_sliding_window(cfg, where, model_type)
    cap, reason = None, ""
    dca = cfg.get("dual_chunk_attention_config")
    if dca is not None:
        cap, reason = _dual_chunk_cap(dca, cfg, where)
        log.warning("%sdual_chunk_attention_config is not implemented (transformers ignores it too): a sequence "
                    "of up to %d tokens (one chunk) computes exactly what it would, so the default context stops "
                    "there; a longer max_context runs plain attention past it", _at(where), cap)
    ignored = tuple(sorted(set(cfg) - READ[model_type] - HARMLESS[model_type] - WARNED - INERT))
    if wrapper is not None:
        ignored += tuple(sorted(f"(top level) {k}" for k in set(wrapper) - WRAPPER - INERT))
    if ignored:
        log.warning("%sconfig.json fields %s are not read by pprt, nor by transformers' %s model: ignored",
                    _at(where), ", ".join(ignored), model_type)
    return FieldAudit(cap, reason, ignored)


def _check_sliding_window(cfg: dict, where: str, model_type: str) -> None:
    """Refuse any layer that transformers would run with sliding-window attention."""
    n = cfg.get("num_hidden_layers")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0  # config.py refuses a bad one
    window = cfg.get("sliding_window", _SLIDING_WINDOW) if cfg.get("use_sliding_window") else None
    if model_type == "qwen3_moe":  # every layer slides when the window is on
        if window is not None:
            raise ConfigError(f"{_at(where)}use_sliding_window = true with sliding_window = {window} is not "
                              "supported (sliding-window attention is not implemented)")
        return
    types = cfg.get("layer_types")
    if types is None and model_type == "qwen2_moe":  # every other layer below max_window_layers slides
        start = cfg.get("max_window_layers", _MAX_WINDOW_LAYERS)
        types = ["sliding_attention" if window is not None and i % 2 == 0 and i < start else "full_attention"
                 for i in range(n)]
    elif types is None:
        start = cfg.get("max_window_layers", _MAX_WINDOW_LAYERS)
        types = ["sliding_attention" if window is not None and i >= start else "full_attention" for i in range(n)]
    elif not isinstance(types, list) or (n and len(types) != n):
        raise ConfigError(f"{_at(where)}layer_types must list one type per layer ({n}), got {types!r}")
    unknown = sorted({t for t in types if t not in ("full_attention", "sliding_attention")}, key=str)
    if unknown:
        raise ConfigError(f"{_at(where)}layer_types {unknown} is not supported (only full_attention)")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if sliding:
        fields = "layer_types" if cfg.get("layer_types") is not None else "use_sliding_window / max_window_layers"
        raise ConfigError(f"{_at(where)}{fields} put layers {sliding} on sliding-window attention (window "
                          f"{window}), which is not supported (sliding-window attention is not implemented)")


def _dual_chunk_cap(dca: object, cfg: dict, where: str) -> tuple[int, str]:
    if not isinstance(dca, dict):
        raise ConfigError(f"{_at(where)}dual_chunk_attention_config must be an object, got {dca!r}")
    limits = []
    chunk, local = dca.get("chunk_size"), dca.get("local_size")
    if isinstance(chunk, int) and isinstance(local, int) and chunk > local >= 0:
        limits.append(chunk - local)  # positions inside one chunk: plain attention
    original = dca.get("original_max_position_embeddings")
    if isinstance(original, int) and original > 0:
        limits.append(original)
    if not limits:
        raise ConfigError(f"{_at(where)}dual_chunk_attention_config {dca!r} has neither chunk_size / local_size nor "
                          "original_max_position_embeddings: pprt cannot tell how far plain attention is exact")
    return min(limits), "dual_chunk_attention_config"
