"""Exact sizes from config.json: weights of a layer as the runtime holds them, KV per token,
recurrent state per sequence. The planner (pprt.plan) cuts and budgets with these.

Notation as in shared/QWEN.md: H, n, m, h, I, V, E, k; db = model dtype bytes.
- A layer's linears (N out, K in): full attention q [n*h (x2 when gated), H], k, v [m*h, H],
  o [H, n*h]; Gated DeltaNet qkv [2*Hk*dk + Hv*dv, H], z [Hv*dv, H], b, a [Hv, H] (Qwen3-Next
  stores them fused: the same bytes), out [H, Hv*dv]; dense MLP gate, up [I, H], down [H, I];
  MoE per expert gate, up [Imoe, H], down [H, Imoe], and a shared expert the same with its
  own intermediate size.
- Each linear [N, K] is counted in the format the loader will hold it in (`module_format`):
  the checkpoint's quantization_config module by module (GPTQ `dynamic` rules,
  `modules_to_not_convert`, compressed-tensors groups and `ignore`), else quantize-at-load
  (`quant`). Int4 costs K*N/2 + ceil(K/g)*N*(db + 1) (int4 values, scales in the model dtype,
  uint8 zeros; + 8K with desc_act), FP8 N*K + ceil(N/bn)*ceil(K/bk)*4 (float32 block scales),
  float N*K*db (a layer that quant="int4" cannot group stays float; see pprt.quantization).
  MoE experts count per expert whatever the file's layout: a fused FP8 file holds the same
  bytes when I is a multiple of the block's rows (every release), and a few more scale bytes
  otherwise (pprt.weights.fp8.load_fp8_rows re-expresses gate's and up's scales in finer blocks).
  Everything else (embedding, head, norms, biases, routers, shared-expert gates, the DeltaNet
  conv weight, A_log, dt_bias and its gated norm) is in the model dtype.
- KV per token: 2 * (full-attention layers) * m * (h * element bytes + s) (auto = model dtype;
  fp8: 1 byte and s = 4, the float32 scale per (slot, kv head) of paged_attention; else s = 0).
- State per sequence: per DeltaNet layer, conv [2*Hk*dk + Hv*dv, K-1] in the model dtype and
  recurrent [Hv, dk, dv] in fp32 (pprt.models.kv.StateSpec holds the same).
- MTP head (drafting on): fc [H, 2H], three norms and one full-attention layer (MoE where the
  model is), linears in their formats as above; its KV is one more full-attention layer's.
"""

from __future__ import annotations

import functools

from ..config import ModelConfig, default_context
from ..quantization import AT_LOAD, FLOAT, RTN_GROUP_SIZES, Kind, ModuleFormat, at_load_format

KV_ELEMENT_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4,
                    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
QUANTS = ("none",) + AT_LOAD  # quantize-at-load of a float checkpoint
FP8_SCALE_BYTES = 4  # float32 scale per (slot, kv head) of an fp8 cache
SSM_STATE_BYTES = 4  # the recurrent state is float32


def _linears(config: ModelConfig, layer: int) -> list[tuple[str, int, int]]:
    """(module name, N out, K in) of every linear of decoder layer `layer` (routers and
    shared-expert gates excluded: they stay in the model dtype and count as plain tensors)."""
    return _layer_linears(config, f"model.layers.{layer}.", config.is_linear(layer), config.is_sparse(layer))


def _layer_linears(config: ModelConfig, p: str, linear: bool, sparse: bool) -> list[tuple[str, int, int]]:
    """The linears of a decoder layer named `p` (a DeltaNet mixer when `linear`, MoE when `sparse`)."""
    H, n, m, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    if linear:
        lin, a = config.linear, p + "linear_attn."
        if lin.fused_projections:  # Qwen3-Next
            out = [(a + "in_proj_qkvz", lin.conv_dim + lin.value_dim, H), (a + "in_proj_ba", 2 * lin.num_value_heads, H)]
        else:
            out = [(a + "in_proj_qkv", lin.conv_dim, H), (a + "in_proj_z", lin.value_dim, H),
                   (a + "in_proj_b", lin.num_value_heads, H), (a + "in_proj_a", lin.num_value_heads, H)]
        out.append((a + "out_proj", H, lin.value_dim))
    else:
        q = n * h * (2 if config.attn_output_gate else 1)
        out = [(p + "self_attn.q_proj", q, H), (p + "self_attn.k_proj", m * h, H),
               (p + "self_attn.v_proj", m * h, H), (p + "self_attn.o_proj", H, n * h)]
    if sparse:
        I = config.moe_intermediate_size
        mlps = [(f"{p}mlp.experts.{e}.", I) for e in range(config.num_experts)]
        if config.shared_expert_intermediate_size:
            mlps.append((f"{p}mlp.shared_expert.", config.shared_expert_intermediate_size))
    else:
        mlps = [(p + "mlp.", config.intermediate_size)]
    for q, I in mlps:
        out += [(q + "gate_proj", I, H), (q + "up_proj", I, H), (q + "down_proj", H, I)]
    return out


def module_format(config: ModelConfig, name: str, k_in: int, quant: str = "none", group_size: int = 128) -> ModuleFormat:
    """The format linear `name` [*, k_in] is held in, as the loader decides it: the checkpoint's
    quantization_config when there is one (`quant` is not applied to a quantized checkpoint),
    else quantize-at-load (`quant`: "int4" takes group_size, or the largest of 128, 64, 32 that
    divides k_in, or stays float; "fp8" block 128 x 128), else float."""
    if quant not in QUANTS:
        raise ValueError(f"quant {quant!r} is not supported ({', '.join(QUANTS)})")
    if config.quant is not None:
        return config.quant.module(name)
    if quant == "none":
        return FLOAT
    if quant == "int4" and group_size != RTN_GROUP_SIZES[0] and k_in % group_size == 0:
        return ModuleFormat(Kind.INT4, "rtn", group_size=group_size, sym=False)
    return at_load_format(quant, k_in)


@functools.lru_cache(maxsize=1 << 14)
def _layer_linear_bytes(config: ModelConfig, layer: int, quant: str, group_size: int,
                        dtype_bytes: int) -> tuple[int, int, frozenset[Kind]]:
    """(bytes of the layer's linears, elements of its largest quantized one, formats used).
    Memoized: a config's layers repeat across the planner's many candidate plans."""
    total, biggest, kinds = 0, 0, set()
    for name, n_out, k_in in _linears(config, layer):
        fmt = module_format(config, name, k_in, quant, group_size)
        total += fmt.nbytes(n_out, k_in, dtype_bytes)
        kinds.add(fmt.kind)
        if fmt.kind is not Kind.FLOAT:
            biggest = max(biggest, n_out * k_in)
    return total, biggest, frozenset(kinds)


def weight_formats(config: ModelConfig, quant: str = "none", group_size: int = 128) -> str:
    """The weight formats of the decoder layers: "none", "int4", "fp8" or "int4+fp8"."""
    kinds = set().union(*(_layer_linear_bytes(config, i, quant, group_size, 2)[2] for i in range(config.num_layers)))
    used = [k.value for k in (Kind.INT4, Kind.FP8) if k in kinds]
    return "+".join(used) or "none"


def int4_linear_bytes(n_out: int, k_in: int, group_size: int = 128, scale_bytes: int = 2) -> int:
    """Internal Int4 format: packed int4 values, scales in the model dtype and uint8 zeros per group."""
    return ModuleFormat(Kind.INT4, group_size=group_size).nbytes(n_out, k_in, scale_bytes)


def layer_weight_bytes(config: ModelConfig, layer: int, quant: str = "none", dtype_bytes: int = 2,
                       group_size: int = 128) -> int:
    """Bytes of decoder layer `layer` as the runtime holds it (each linear in its format)."""
    H, n, m, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    total = _layer_linear_bytes(config, layer, quant, group_size, dtype_bytes)[0]
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


def mtp_weight_bytes(config: ModelConfig, quant: str = "none", dtype_bytes: int = 2, group_size: int = 128) -> int:
    """The MTP head (`mtp.*`, pprt.models.mtp) as the runtime holds it: fc [H, 2H], its three norms,
    and one full-attention decoder layer (MoE with the shared expert when the model has experts),
    each linear in its format as for the decoder layers. The embedding and head it shares are not
    counted here."""
    H, n, m, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    sparse = config.num_experts > 0
    linears = [("mtp.fc", H, 2 * H)] + _layer_linears(config, "mtp.layers.0.", False, sparse)
    total = sum(module_format(config, name, k, quant, group_size).nbytes(n_out, k, dtype_bytes)
                for name, n_out, k in linears)
    plain = 3 * H + 2 * H  # pre-fc norms and mtp.norm; the layer's two norms
    plain += (n * h * (2 if config.attn_output_gate else 1) + 2 * m * h) if config.qkv_bias else 0
    plain += (H if config.o_bias else 0) + (2 * h if config.qk_norm else 0)
    if sparse:
        plain += config.num_experts * H + (H if config.shared_expert_intermediate_size else 0)
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
    """The context the model serves by default (`pprt.config.default_context`): its window, or
    its YaRN's, capped where a field pprt does not implement would change the math."""
    return default_context(config)
