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


# ---- every field typed and range-checked, naming the file and the field --------------------------

PATH, GEN_PATH = "/models/m/config.json", "/models/m/generation_config.json"


@pytest.mark.parametrize("override, field, shown", [
    (dict(tie_word_embeddings="false"), "tie_word_embeddings", "'false'"),
    (dict(model_type="qwen3", head_dim=16, attention_bias="true"), "attention_bias", "'true'"),
    (dict(use_sliding_window="false"), "use_sliding_window", "'false'"),
    (dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32,
          norm_topk_prob=1), "norm_topk_prob", "1"),
    (dict(hidden_size="64"), "hidden_size", "'64'"),
    (dict(hidden_size=64.0), "hidden_size", "64.0"),
    (dict(num_hidden_layers=0), "num_hidden_layers", "0"),
    (dict(vocab_size=True), "vocab_size", "True"),
    (dict(head_dim=-8), "head_dim", "-8"),
    (dict(intermediate_size=0), "intermediate_size", "0"),
    (dict(rms_norm_eps=0), "rms_norm_eps", "0"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps", "nan"),
    (dict(rms_norm_eps="1e-6"), "rms_norm_eps", "'1e-6'"),
    (dict(rope_theta=float("inf")), "rope_theta", "inf"),
    (dict(rope_theta=-1.0), "rope_theta", "-1.0"),
    (dict(rope_theta="1e6"), "rope_theta", "'1e6'"),
    (dict(rope_scaling={"type": "yarn", "factor": 0, "original_max_position_embeddings": 64}),
     "rope_scaling: factor", "0"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 0}), "rope_parameters: rope_theta", "0"),
    (dict(max_position_embeddings=2.5), "max_position_embeddings", "2.5"),
    (dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32,
          num_hidden_layers=2, mlp_only_layers=[2]), "mlp_only_layers", "[2]"),
    (dict(eos_token_id="2"), "eos_token_id", "'2'"),
    (dict(eos_token_id=[2, -1]), "eos_token_id", "[2, -1]"),
    (dict(torch_dtype=16), "torch_dtype", "16"),
    (dict(quantization_config={"quant_method": "gptq", "bits": "4"}), "quantization_config.bits", "'4'"),
    (dict(quantization_config={"quant_method": "gptq", "desc_act": "false"}), "quantization_config.desc_act",
     "'false'"),
    (dict(quantization_config="gptq"), "quantization_config", "'gptq'"),
    (dict(quantization_config={"quant_method": "gptq", "sym": "false"}), "quantization_config.sym", "'false'"),
    (dict(quantization_config={"quant_method": "gptq", "dynamic": {"+:.*mlp.*": {"sym": "false"}}}),
     "quantization_config.dynamic.+:.*mlp.*.sym", "'false'"),
    (dict(quantization_config={"quant_method": "awq", "zero_point": "false"}), "quantization_config.zero_point",
     "'false'"),
    (dict(quantization_config={"quant_method": "fp8", "weight_block_size": ["128", 128]}),
     "quantization_config.weight_block_size", "['128', 128]"),
    (dict(quantization_config={"quant_method": "fp8", "modules_to_not_convert": "lm_head"}),
     "quantization_config.modules_to_not_convert", "'lm_head'"),
    (dict(quantization_config={"quant_method": "compressed-tensors", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                                           "symmetric": "false"}}}}),
     "quantization_config.config_groups.g.weights.symmetric", "'false'"),
    (dict(quantization_config={"quant_method": "compressed-tensors", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": "4", "type": "int"}}}}),
     "quantization_config.config_groups.g.weights.num_bits", "'4'"),
])
def test_config_fields_are_typed_and_ranged(override, field, shown):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(cfg(**override), path=PATH)
    msg = str(err.value)
    assert msg.startswith(f"{PATH}: {field} "), msg
    assert f"got {shown}" in msg, msg


@pytest.mark.parametrize("gen, field", [
    ({"temperature": "0.7"}, "temperature"), ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": 2.5}, "top_k"), ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": "0.5"}, "frequency_penalty"),
    ({"do_sample": "false"}, "do_sample"), ({"eos_token_id": [2, "3"]}, "eos_token_id"),
])
def test_generation_config_defaults_are_checked_naming_the_file(gen, field):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(cfg(), gen, path=PATH, generation_path=GEN_PATH)
    assert str(err.value).startswith(f"{GEN_PATH}: {field} "), str(err.value)


def test_cross_field_errors_name_the_file():
    with pytest.raises(ConfigError, match=f"^{PATH}: num_attention_heads \\(4\\) is not a multiple"):
        ModelConfig.from_dict(cfg(num_key_value_heads=3), path=PATH)


def test_null_means_default_and_json_booleans_are_kept():
    c = ModelConfig.from_dict(cfg(head_dim=None, rms_norm_eps=None, tie_word_embeddings=True, num_key_value_heads=None))
    assert (c.head_dim, c.rms_norm_eps, c.tie_word_embeddings, c.num_kv_heads) == (16, 1e-6, True, 4)


# ---- fuzz over the fields pprt reads ---------------------------------------------------------------

import os  # noqa: E402
import re  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

NAN, INF = float("nan"), float("inf")
BAD_INT = ["64", 64.5, 0, -3, True, False, [64], {"a": 1}, NAN, INF, 2.0]
BAD_FLOAT = ["1e-6", 0, -1.0, True, NAN, INF, -INF, [1.0]]
BAD_BOOL = ["false", "true", 0, 1, "no", [True]]
# field -> (valid values, invalid values); a qwen3_moe config, so that every field is read.
CONFIG_FIELDS = {
    "hidden_size": ([64, 128], BAD_INT),
    "num_attention_heads": ([4, 8], BAD_INT),
    "num_key_value_heads": ([1, 2, 4], BAD_INT),
    "head_dim": ([16, 32], BAD_INT),
    "vocab_size": ([320, 1000], BAD_INT),
    "intermediate_size": ([96], BAD_INT),
    "num_hidden_layers": ([2, 4], BAD_INT),
    "max_position_embeddings": ([4096, 40960], BAD_INT),
    "num_experts": ([8], BAD_INT),
    "num_experts_per_tok": ([1, 2], BAD_INT),
    "moe_intermediate_size": ([32], BAD_INT),
    "decoder_sparse_step": ([1, 2], BAD_INT),
    "rms_norm_eps": ([1e-6, 1e-5], BAD_FLOAT),
    "rope_theta": ([1e4, 1e6, 5000000], BAD_FLOAT),
    "tie_word_embeddings": ([True, False], BAD_BOOL),
    "attention_bias": ([True, False], BAD_BOOL),
    "norm_topk_prob": ([True, False], BAD_BOOL),
    "use_sliding_window": ([False], BAD_BOOL + [True]),
    "mlp_only_layers": ([[], [0], [0, 1]], ["0", [0.0], [True], [99], [-1], 0]),
    "eos_token_id": ([2, [2, 3]], ["2", [2, "3"], -1, True, 2.0, [[2]]]),
    "torch_dtype": (["bfloat16", "float32", "float16"], [16, "float64", True, ["bfloat16"]]),
    "hidden_act": (["silu"], ["gelu", 5, "SiLU"]),
    "sliding_window": ([4096, 32768], ["4096", 4.5, -1, True]),
    "rope_scaling": ([{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
                      {"rope_type": "default"}],
                     ["yarn", {"type": "yarn", "factor": "4"}, {"type": "dynamic", "factor": 2.0},
                      {"type": "yarn", "factor": 4.0, "truncate": "false"}, {"type": "yarn", "factor": NAN}]),
}
PRESENT = {"intermediate_size"}  # absent is legal only when no layer is dense: not drawn
GEN_FIELDS = {
    "temperature": ([0, 0.7, 1], ["0.7", -1, NAN, INF, True]),
    "top_p": ([0.8, 1], [0, 1.5, "0.8", NAN]),
    "top_k": ([20, 0, -1], [2.5, "20", -2, True]),
    "min_p": ([0, 0.05], [1.5, -0.1, "0"]),
    "repetition_penalty": ([1.05, 1], [0, -1, "1.1", INF]),
    "presence_penalty": ([1.5, 0, -2], [2.5, "1.5", NAN]),
    "frequency_penalty": ([0.5, 2], [-3, INF, "0"]),
    "do_sample": ([True, False], ["false", 1]),
    "eos_token_id": ([2, [2, 0]], ["2", [2, None], -5]),
}


def _draw_fields(data, fields: dict, label: str) -> tuple[dict, set[str]]:
    values, bad = {}, set()
    for name, (good, wrong) in fields.items():
        kinds = ["valid", "valid", "valid", "valid", "invalid"] + (["absent"] if name not in PRESENT else [])
        kind = data.draw(st.sampled_from(kinds), label=name)
        if kind == "valid":
            values[name] = data.draw(st.sampled_from(good), label=name)
        elif kind == "invalid":
            values[name] = data.draw(st.sampled_from(wrong), label=name)
            bad.add(name)
    return values, bad


@settings(max_examples=int(os.environ.get("PPRT_FUZZ_EXAMPLES", "200")), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_config_fuzz_every_read_field_is_checked(data):
    values, bad = _draw_fields(data, CONFIG_FIELDS, "config")
    gen, bad_gen = _draw_fields(data, GEN_FIELDS, "generation")
    required = {"hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers", "num_experts",
                "num_experts_per_tok", "moe_intermediate_size", "num_key_value_heads"}
    bad |= {f for f in required if f not in values}  # a required field absent is an error too
    raw = dict(values, model_type="qwen3_moe")
    try:
        config = ModelConfig.from_dict(raw, gen, path=PATH, generation_path=GEN_PATH)
    except ConfigError as e:
        msg = str(e)
        named = [f for f in bad if re.match(rf"{re.escape(PATH)}: ({f}[ :.]|config.json has no '{f}')", msg)] + \
            [f for f in bad_gen if msg.startswith(f"{GEN_PATH}: {f} ")]
        assert named, f"error names no wrong field of {sorted(bad)} / {sorted(bad_gen)}: {msg}"
        return
    assert not bad and not bad_gen, f"accepted wrong fields {sorted(bad)} / {sorted(bad_gen)}"
    heads = raw["num_attention_heads"]
    expected = dict(hidden_size=raw["hidden_size"], num_heads=heads, vocab_size=raw["vocab_size"],
                    num_layers=raw["num_hidden_layers"], num_kv_heads=raw.get("num_key_value_heads", heads),
                    head_dim=raw.get("head_dim", raw["hidden_size"] // heads),
                    tie_word_embeddings=raw.get("tie_word_embeddings", False),
                    qkv_bias=raw.get("attention_bias", False), norm_topk_prob=raw.get("norm_topk_prob", False),
                    rms_norm_eps=raw.get("rms_norm_eps", 1e-6), mlp_only_layers=tuple(raw.get("mlp_only_layers", ())))
    assert {k: getattr(config, k) for k in expected} == expected
    assert config.rope.theta == raw.get("rope_theta", 10000.0)
    assert config.rope.type == raw.get("rope_scaling", {}).get("type", "default")
    assert set(config.generation_defaults) == set(gen) - {"eos_token_id"}


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
    (dict(text_config=None), "text_config is missing"),
    (dict(text_config={"attn_output_gate": False}), "text_config.attn_output_gate = false"),
    (dict(text_config={"attn_output_gate": "true"}), "text_config.attn_output_gate must be true or false"),
    (dict(text_config={"linear_num_key_heads": 16.0}), "text_config.linear_num_key_heads must be an integer"),
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
