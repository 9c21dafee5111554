"""ModelConfig from config.json in old and new spellings, and its errors."""

import pytest

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
