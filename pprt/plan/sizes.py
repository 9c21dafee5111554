"""Exact sizes from config.json: weights of a layer as the runtime holds them, KV per token,
recurrent state per sequence. The planner (pprt.plan) cuts and budgets with these.

Notation as in shared/QWEN.md: H, n, m, h, I, V, E, k; db = model dtype bytes.
- A layer's linears (N out, K in): full attention q [n*h (x2 when gated), H], k, v [m*h, H],
  o [H, n*h]; Gated DeltaNet qkv [2*Hk*dk + Hv*dv, H], z [Hv*dv, H], b, a [Hv, H] (Qwen3-Next
  stores them fused: the same bytes), out [H, Hv*dv]; dense MLP gate, up [I, H], down [H, I];
  MoE per expert gate, up [Imoe, H], down [H, Imoe], and a shared expert the same with its
  own intermediate size.
- With Int4 (quant="int4", or a GPTQ/AWQ checkpoint) a linear [N, K] with K a multiple of the
  group g costs K*N/2 + (K/g)*N*(2 + 1) (int4 values, 16-bit scales, uint8 zeros); one with K off
  the group stays in the model dtype, as the loader leaves it. Everything else (embedding, head,
  norms, biases, routers, shared-expert gates, the DeltaNet conv weight, A_log, dt_bias and its
  gated norm) is in the model dtype.
- KV per token: 2 * (full-attention layers) * m * (h * element bytes + s) (auto = model dtype;
  fp8: 1 byte and s = 4, the float32 scale per (slot, kv head) of paged_attention; else s = 0).
- State per sequence: per DeltaNet layer, conv [2*Hk*dk + Hv*dv, K-1] in the model dtype and
  recurrent [Hv, dk, dv] in fp32 (pprt.models.kv.StateSpec holds the same).
"""

from __future__ import annotations

from ..config import ModelConfig

KV_ELEMENT_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4,
                    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
QUANTS = ("none", "int4")
FP8_SCALE_BYTES = 4  # float32 scale per (slot, kv head) of an fp8 cache
SSM_STATE_BYTES = 4  # the recurrent state is float32


def _linears(config: ModelConfig, layer: int) -> list[tuple[int, int, int]]:
    """(N out, K in, count) of the quantizable linears of one layer."""
    H, n, m, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    if config.is_linear(layer):
        lin = config.linear
        mixer = [(lin.conv_dim, H, 1), (lin.value_dim, H, 1), (lin.num_value_heads, H, 2), (H, lin.value_dim, 1)]
    else:
        q = n * h * (2 if config.attn_output_gate else 1)
        mixer = [(q, H, 1), (m * h, H, 2), (H, n * h, 1)]  # q; k and v; o
    if config.is_sparse(layer):
        I, E, S = config.moe_intermediate_size, config.num_experts, config.shared_expert_intermediate_size
        shared = [(S, H, 2), (H, S, 1)] if S else []
        return mixer + [(I, H, 2 * E), (H, I, E)] + shared  # gate and up; down, per expert
    I = config.intermediate_size
    return mixer + [(I, H, 2), (H, I, 1)]


def effective_quant(config: ModelConfig, quant: str, group_size: int) -> tuple[str, int]:
    if quant not in QUANTS:
        raise ValueError(f"quant {quant!r} is not supported (none, int4)")
    if config.quant is not None:  # GPTQ/AWQ checkpoint: kept in the internal Int4 format
        return "int4", config.quant.group_size
    return quant, group_size


def int4_linear_bytes(n_out: int, k_in: int, group_size: int = 128) -> int:
    """Internal Int4 format: packed int4 values, 16-bit scales and uint8 zeros per group."""
    groups = -(-k_in // group_size)
    return (k_in * n_out + 1) // 2 + groups * n_out * 2 + groups * n_out


def linear_bytes(n_out: int, k_in: int, quant: str, dtype_bytes: int, group_size: int) -> int:
    """One linear as the runtime holds it (Int4 only where K fits the group)."""
    if quant == "int4" and k_in % group_size == 0:
        return int4_linear_bytes(n_out, k_in, group_size)
    return n_out * k_in * dtype_bytes


def layer_weight_bytes(config: ModelConfig, layer: int, quant: str = "none", dtype_bytes: int = 2,
                       group_size: int = 128) -> int:
    """Bytes of decoder layer `layer` as the runtime holds it."""
    quant, group_size = effective_quant(config, quant, group_size)
    H, n, m, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    total = sum(count * linear_bytes(n_out, k_in, quant, dtype_bytes, group_size)
                for n_out, k_in, count in _linears(config, layer))
    plain = 2 * H  # input and post-attention norms
    if config.is_linear(layer):
        lin = config.linear
        plain += lin.conv_dim * lin.conv_kernel + 2 * lin.num_value_heads + lin.value_head_dim  # conv, A_log, dt, norm
    else:
        q_rows = n * h * (2 if config.attn_output_gate else 1)
        plain += (q_rows + 2 * m * h) if config.qkv_bias else 0
        plain += H if config.o_bias else 0
        plain += 2 * h if config.qk_norm else 0
    if config.is_sparse(layer):
        plain += config.num_experts * H  # router
        plain += H if config.shared_expert_intermediate_size else 0  # shared-expert gate [1, H]
    return total + plain * dtype_bytes


def embedding_bytes(config: ModelConfig, dtype_bytes: int = 2) -> int:
    return config.vocab_size * config.hidden_size * dtype_bytes


def head_bytes(config: ModelConfig, dtype_bytes: int = 2, *, shares_embedding_stage: bool = True) -> int:
    """Final norm + lm_head on the last stage. A tied head costs nothing more when the last
    stage also holds the embedding, and a copy of it when it does not."""
    head = 0 if config.tie_word_embeddings and shares_embedding_stage else embedding_bytes(config, dtype_bytes)
    return head + config.hidden_size * dtype_bytes


def kv_element_bytes(kv_dtype: str, dtype_bytes: int = 2) -> int:
    if kv_dtype == "auto":
        return dtype_bytes
    if kv_dtype not in KV_ELEMENT_BYTES:
        raise ValueError(f"kv_dtype {kv_dtype!r} is not supported (auto, {', '.join(KV_ELEMENT_BYTES)})")
    return KV_ELEMENT_BYTES[kv_dtype]


def kv_bytes_per_token(config: ModelConfig, layers: int | tuple[int, int], kv_dtype: str = "auto",
                       dtype_bytes: int = 2) -> int:
    """K and V of one token over `layers` (a count of full-attention layers, or a range (lo, hi) of
    which the full-attention layers count); an fp8 cache also keeps one float32 scale per (token,
    kv head) for K and for V (paged_attention's recommended form)."""
    count = layers if isinstance(layers, int) else config.layers_of(*layers)[0]
    elem = kv_element_bytes(kv_dtype, dtype_bytes)
    scale = FP8_SCALE_BYTES if elem == 1 else 0
    return 2 * count * config.num_kv_heads * (config.head_dim * elem + scale)


def state_bytes_per_sequence(config: ModelConfig, layers: tuple[int, int], dtype_bytes: int = 2) -> int:
    """Conv and recurrent state of one sequence over the DeltaNet layers of range (lo, hi); 0 without any."""
    if config.linear is None:
        return 0
    return config.layers_of(*layers)[1] * config.linear.state_bytes(dtype_bytes, SSM_STATE_BYTES)


def context_limit(config: ModelConfig) -> int:
    """The longest context the model's positions are meant for."""
    rope = config.rope
    if rope.type == "yarn" and rope.original_max_position:
        return max(config.max_position_embeddings, int(rope.factor * rope.original_max_position))
    return config.max_position_embeddings
