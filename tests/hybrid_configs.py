"""config.json of the released hybrid checkpoints, in the spellings their files use (shared/QWEN.md section 7).

Qwen3-Next ships the OLD spelling (top-level rope_theta, partial_rotary_factor,
full_attention_interval, per-expert tensors); Qwen3.5 releases are multimodal
(`qwen3_5` / `qwen3_5_moe` with the text model in `text_config`, `rope_parameters`
holding mrope fields and partial_rotary_factor, `layer_types` listed). Vision configs
are abbreviated: pprt reads none of their fields.
"""

from __future__ import annotations


def _layer_types(n: int, interval: int = 4) -> list[str]:
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]


def qwen35(hidden: int, layers: int, heads: int, kv_heads: int, v_heads: int, *, moe: dict | None = None,
           intermediate: int | None = None, tie: bool = False) -> dict:
    text = {
        "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text", "attention_bias": False,
        "attention_dropout": 0.0, "attn_output_gate": True, "dtype": "bfloat16", "eos_token_id": 248044,
        "full_attention_interval": 4, "head_dim": 256, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "layer_types": _layer_types(layers), "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": v_heads,
        "linear_value_head_dim": 128, "mamba_ssm_dtype": "float32", "max_position_embeddings": 262144,
        "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False, "num_attention_heads": heads,
        "num_hidden_layers": layers, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-06,
        "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "rope_type": "default",
                            "rope_theta": 10000000, "partial_rotary_factor": 0.25},
        "use_cache": True, "vocab_size": 248320,
    }
    if moe:
        text.update(moe)
    else:
        text["intermediate_size"] = intermediate
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5_moe" if moe else "qwen3_5", "image_token_id": 248056, "video_token_id": 248057,
        "vision_start_token_id": 248053, "vision_end_token_id": 248054, "tie_word_embeddings": tie,
        "text_config": text,
        "vision_config": {"model_type": "qwen3_5_moe" if moe else "qwen3_5", "depth": 27, "hidden_size": 1152,
                          "num_heads": 16, "out_hidden_size": hidden, "patch_size": 16},
    }


def _moe(experts: int, top_k: int, inter: int) -> dict:
    return {"num_experts": experts, "num_experts_per_tok": top_k, "moe_intermediate_size": inter,
            "shared_expert_intermediate_size": inter, "router_aux_loss_coef": 0.001, "output_router_logits": False}


QWEN35_27B = qwen35(5120, 64, 24, 4, 48, intermediate=17408)
QWEN35_35B_A3B = qwen35(2048, 40, 16, 2, 32, moe=_moe(256, 8, 512))
QWEN35_122B_A10B = qwen35(3072, 48, 32, 2, 64, moe=_moe(256, 8, 1024))
QWEN35_397B_A17B = qwen35(4096, 60, 32, 2, 64, moe=_moe(512, 10, 1024))
QWEN3_NEXT_80B_A3B = {
    "architectures": ["Qwen3NextForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "full_attention_interval": 4,
    "head_dim": 256, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 5120, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_value_head_dim": 128,
    "max_position_embeddings": 262144, "mlp_only_layers": [], "model_type": "qwen3_next",
    "moe_intermediate_size": 512, "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 512,
    "num_experts_per_tok": 10, "num_hidden_layers": 48, "num_key_value_heads": 2, "output_router_logits": False,
    "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 5000000,
    "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 512, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
# Qwen1.5-MoE-A2.7B (qwen2_moe): no qkv_bias field (q/k/v bias always), norm_topk_prob false
QWEN15_MOE_A27B = {
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 8192,
    "max_window_layers": 21, "model_type": "qwen2_moe", "moe_intermediate_size": 1408, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 16, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 5632, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}
HYBRID_CONFIGS = {"qwen3.5-27b": QWEN35_27B, "qwen3.5-35b-a3b": QWEN35_35B_A3B, "qwen3.5-122b-a10b": QWEN35_122B_A10B,
                  "qwen3.5-397b-a17b": QWEN35_397B_A17B, "qwen3-next-80b-a3b": QWEN3_NEXT_80B_A3B}
