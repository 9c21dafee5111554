"""ModelConfig from config.json in old and new spellings, and its errors."""

import pytest
import torch

from pprt.config import ConfigError, ModelConfig

BASE = dict(model_type="qwen2", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
            torch_dtype="bfloat16")


def cfg(**kw):
    return {**BASE, **kw}


def test_old_rope_spelling_with_type_and_rope_type():
    for key in ("type", "rope_type"):
        c = ModelConfig.from_dict(cfg(rope_theta=1e6, rope_scaling={key: "yarn", "factor": 4.0,
                                                                    "original_max_position_embeddings": 32768}))
        assert (c.rope.theta, c.rope.type, c.rope.factor, c.rope.original_max_position) == (1e6, "yarn", 4.0, 32768)


def test_new_rope_spelling():
    c = ModelConfig.from_dict(cfg(rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    assert (c.rope.theta, c.rope.type) == (5e5, "default")


def test_family_rules():
    q2 = ModelConfig.from_dict(cfg())
    assert q2.qkv_bias and not q2.qk_norm and q2.head_dim == 16 and q2.num_experts == 0
    q3 = ModelConfig.from_dict(cfg(model_type="qwen3", head_dim=24, attention_bias=False))
    assert not q3.qkv_bias and q3.qk_norm and q3.head_dim == 24
    moe = ModelConfig.from_dict(cfg(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=32, decoder_sparse_step=2, mlp_only_layers=[3],
                                    norm_topk_prob=True, num_hidden_layers=6))
    assert [moe.is_sparse(i) for i in range(6)] == [False, True, False, False, False, True]
    assert moe.norm_topk_prob
    v5 = ModelConfig.from_dict(cfg(model_type="qwen3_moe", num_local_experts=4, num_experts_per_tok=1,
                                   moe_intermediate_size=32))
    assert v5.num_experts == 4


def test_kv_heads_null_means_heads_and_eos_ids_merge():
    c = ModelConfig.from_dict(cfg(num_key_value_heads=None, eos_token_id=151643),
                              {"eos_token_id": [151645, 151643], "temperature": 0.7, "top_p": 0.8})
    assert c.num_kv_heads == 4
    assert c.eos_token_ids == (151645, 151643)
    assert c.generation_defaults == {"temperature": 0.7, "top_p": 0.8}


@pytest.mark.parametrize("override, words", [
    (dict(model_type="llama"), "model_type 'llama'"),
    (dict(use_sliding_window=True, sliding_window=64, max_window_layers=1), "use_sliding_window"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "'dynamic'"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(vocab_size=None), "vocab_size"),
    (dict(quantization_config={"quant_method": "gptq", "bits": 8}), "bits = 8"),
    (dict(quantization_config={"quant_method": "bitsandbytes"}), "'bitsandbytes'"),
    (dict(quantization_config={"quant_method": "awq", "version": "gemv"}), "'gemv'"),
    (dict(torch_dtype="float64"), "'float64'"),
])
def test_errors_name_the_field(override, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        ModelConfig.from_dict(cfg(**override))


# ---- hybrid families and qwen2_moe -------------------------------------------------------------

from hybrid_configs import (HYBRID_CONFIGS, QWEN3_NEXT_80B_A3B, QWEN15_MOE_A27B, QWEN35_27B,  # noqa: E402
                            QWEN35_35B_A3B)


@pytest.mark.parametrize("name", list(HYBRID_CONFIGS))
def test_real_hybrid_configs(name):
    raw = HYBRID_CONFIGS[name]
    text = raw.get("text_config", raw)
    c = ModelConfig.from_dict(raw)
    assert c.hybrid and c.zero_centered_norm and c.attn_output_gate and c.qk_norm
    assert c.rotary_dim == 64 and c.head_dim == 256 and not c.qkv_bias and not c.o_bias
    types = [c.is_linear(i) for i in range(c.num_layers)]
    assert types == [(i + 1) % 4 != 0 for i in range(c.num_layers)]  # 3 linear + 1 full
    lin = c.linear
    assert (lin.num_key_heads, lin.num_value_heads, lin.key_head_dim, lin.conv_kernel) == (
        16, text["linear_num_value_heads"], 128, 4)
    assert lin.fused_projections == (c.model_type == "qwen3_next")
    assert c.vocab_size == text["vocab_size"] and c.max_position_embeddings == 262144
    assert c.rope.theta == (5e6 if c.model_type == "qwen3_next" else 1e7)
    if "num_experts" in text:
        assert all(c.is_sparse(i) for i in range(c.num_layers)) and c.norm_topk_prob
        assert c.shared_expert_intermediate_size == text["shared_expert_intermediate_size"]
    assert c.torch_dtype == torch.bfloat16


def test_qwen35_wrapper_reads_text_config_and_top_level_tie():
    c = ModelConfig.from_dict(QWEN35_27B, {"eos_token_id": [248046, 248044]})
    assert c.model_type == "qwen3_5" and c.num_layers == 64 and c.intermediate_size == 17408
    assert c.eos_token_ids == (248046, 248044) and c.mtp_num_layers == 1
    assert not c.tie_word_embeddings
    text = dict(QWEN35_27B["text_config"], tie_word_embeddings=True)
    assert not ModelConfig.from_dict({**QWEN35_27B, "text_config": text}).tie_word_embeddings
    assert ModelConfig.from_dict({**QWEN35_27B, "tie_word_embeddings": True}).tie_word_embeddings
    flat = ModelConfig.from_dict(dict(QWEN35_27B["text_config"], tie_word_embeddings=True))  # a text-only export
    assert flat.model_type == "qwen3_5" and flat.tie_word_embeddings


def test_layer_types_from_interval_and_partial_rotary_spellings():
    old = dict(QWEN3_NEXT_80B_A3B, full_attention_interval=2, num_hidden_layers=6)
    c = ModelConfig.from_dict(old)
    assert [c.is_linear(i) for i in range(6)] == [True, False] * 3 and c.layers_of(1, 5) == (2, 2)
    assert c.partial_rotary_factor == 0.25 and c.norm_topk_prob
    new = {k: v for k, v in QWEN3_NEXT_80B_A3B.items() if k not in ("partial_rotary_factor", "rope_theta")}
    new["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}
    assert ModelConfig.from_dict(new).rotary_dim == 128
    absent = {k: v for k, v in QWEN3_NEXT_80B_A3B.items() if k != "partial_rotary_factor"}
    assert ModelConfig.from_dict(absent).rotary_dim == 64  # the family default, as transformers
    listed = dict(QWEN3_NEXT_80B_A3B, layer_types=["linear_attention"] * 47 + ["full_attention"])
    assert ModelConfig.from_dict(listed).layers_of(0, 48) == (1, 47)  # layer_types wins over the interval
    assert ModelConfig.from_dict(QWEN3_32B_LIKE).partial_rotary_factor == 1.0


QWEN3_32B_LIKE = cfg(model_type="qwen3", head_dim=128)


def test_qwen2_moe_rules():
    c = ModelConfig.from_dict(QWEN15_MOE_A27B)
    assert c.qkv_bias and not c.qk_norm and not c.zero_centered_norm and not c.hybrid
    assert not c.norm_topk_prob and c.shared_expert_intermediate_size == 5632 and c.rotary_dim == c.head_dim == 128
    assert all(c.is_sparse(i) for i in range(24))
    assert not ModelConfig.from_dict(dict(QWEN15_MOE_A27B, qkv_bias=False)).qkv_bias
    sparse3 = ModelConfig.from_dict(dict(QWEN15_MOE_A27B, decoder_sparse_step=3, mlp_only_layers=[5]))
    assert [i for i in range(9) if sparse3.is_sparse(i)] == [2, 8]
    # qwen3_5_moe: every layer routed and renormalised, whatever the file says
    moe_text = dict(QWEN35_35B_A3B["text_config"], norm_topk_prob=False, mlp_only_layers=[0], decoder_sparse_step=2)
    m = ModelConfig.from_dict({**QWEN35_35B_A3B, "text_config": moe_text})
    assert m.norm_topk_prob and all(m.is_sparse(i) for i in range(40))


@pytest.mark.parametrize("change, words", [
    (dict(model_type="qwen4_exp"), "qwen4_exp.*hyper-connections"),
    (dict(model_type="qwen3_5_vision"), "qwen3_5_vision.*vision tower"),
    (dict(text_config=None), "no text_config"),
    (dict(text_config={"attn_output_gate": False}), "attn_output_gate = False"),
    (dict(text_config={"mamba_ssm_dtype": "bfloat16"}), "mamba_ssm_dtype 'bfloat16'"),
    (dict(text_config={"layer_types": ["linear_attention"] * 3}), "layer_types has 3 entries"),
    (dict(text_config={"layer_types": ["sliding_attention"] * 64}), "sliding_attention"),
    (dict(text_config={"linear_num_value_heads": 20}), r"linear_num_value_heads \(20\) is not a multiple"),
    (dict(text_config={"rope_parameters": {"rope_theta": 1e7, "partial_rotary_factor": 0.001}}),
     "partial_rotary_factor"),
])
def test_hybrid_errors_name_the_field(change, words):
    raw = dict(QWEN35_27B)
    for key, value in change.items():
        raw[key] = dict(raw[key], **value) if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    with pytest.raises(ConfigError, match=words):
        ModelConfig.from_dict(raw)


def test_linear_attention_layers_only_in_hybrid_families():
    with pytest.raises(ConfigError, match="linear_attention.*not supported"):
        ModelConfig.from_dict(cfg(model_type="qwen3", head_dim=16, layer_types=["linear_attention", "full_attention"]))
    assert not ModelConfig.from_dict(cfg(layer_types=["full_attention"] * 2)).hybrid


# ---- the field audit of the new families, against transformers ----------------------------------

HYBRID_CLASSES = {"qwen2_moe": "Qwen2MoeConfig", "qwen3_next": "Qwen3NextConfig", "qwen3_5": "Qwen3_5TextConfig",
                  "qwen3_5_moe": "Qwen3_5MoeTextConfig"}


def _config_reads(source: str) -> set[str]:
    import re

    return set(re.findall(r"\bconfig\.([a-z][a-z_]*)", source)) | set(
        re.findall(r"getattr\((?:self\.)?config, \"([a-z_]+)\"", source))


@pytest.mark.parametrize("model_type", HYBRID_CLASSES)
def test_new_families_fields_and_model_reads_are_accounted_for(model_type):
    """Every field of transformers' config class, every config attribute its text model reads, and
    every size it would guess (pprt refuses instead) match pprt.field_audit's lists."""
    import dataclasses
    import importlib
    import inspect

    import transformers

    from pprt.field_audit import _GUESSED, HARMLESS, INERT, READ, WARNED, WRAPPER

    cls = getattr(transformers, HYBRID_CLASSES[model_type])
    fields = {f.name for f in dataclasses.fields(cls)} | set(cls().to_dict())
    assert fields - (READ[model_type] | HARMLESS[model_type] | WARNED | INERT) == set()
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    text_only = [c for n, c in vars(module).items() if inspect.isclass(c) and c.__module__ == module.__name__
                 and not any(w in n for w in ("Vision", "Visual", "ConditionalGeneration", "Patch"))]
    reads = set().union(*(_config_reads(inspect.getsource(c)) for c in text_only))
    training_only = {"initializer_range", "attention_dropout", "output_router_logits", "router_aux_loss_coef",
                     "pad_token_id", "get_text_config", "text_config", "vision_config"}
    assert reads - READ[model_type] - training_only - WRAPPER == set()  # the wrapper's: the multimodal model
    defaults = cls()
    for name, guess in _GUESSED[model_type].items():
        assert getattr(defaults, name) == guess, name


@pytest.mark.parametrize("wrapper", ["Qwen3_5Config", "Qwen3_5MoeConfig"])
def test_qwen35_wrapper_fields_are_accounted_for(wrapper):
    import dataclasses

    import transformers

    from pprt.field_audit import INERT, WRAPPER

    cls = getattr(transformers, wrapper)
    assert ({f.name for f in dataclasses.fields(cls)} | set(cls().to_dict())) - WRAPPER - INERT == set()


@pytest.mark.parametrize("name", list(HYBRID_CONFIGS) + ["qwen1.5-moe"])
def test_real_new_family_configs_load_without_a_warning(name, caplog):
    import logging

    raw = HYBRID_CONFIGS.get(name, QWEN15_MOE_A27B)
    with caplog.at_level(logging.WARNING, logger="pprt"):
        ModelConfig.from_dict(dict(raw))
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="pprt"):
        top = dict(raw, fancy=1) if "text_config" in raw else raw
        text = dict(raw["text_config"], fancier=2) if "text_config" in raw else None
        ModelConfig.from_dict(dict(top, text_config=text) if text else dict(raw, fancier=2))
    assert "fancier" in caplog.text and ("(top level) fancy" in caplog.text or "text_config" not in raw)


def test_a_missing_linear_size_is_refused_rather_than_guessed():
    text = {k: v for k, v in QWEN35_27B["text_config"].items() if k != "linear_num_value_heads"}
    with pytest.raises(ConfigError, match=r"no 'linear_num_value_heads' \(transformers would assume 32"):
        ModelConfig.from_dict({**QWEN35_27B, "text_config": text})
