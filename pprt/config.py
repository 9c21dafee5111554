"""ModelConfig: one validated, frozen description of a Qwen checkpoint.

Built from the dicts of config.json (and generation_config.json). The rotary
settings are read by `pprt.rope` in every spelling transformers accepts; every
other field is accounted for by `pprt.field_audit` (read, refused, or warned
about with the default context capped). Knows nothing about files or devices:
`weights/checkpoint.py` reads the JSON.

Families: qwen2, qwen3, qwen3_moe, qwen2_moe, and the hybrid Gated DeltaNet
families qwen3_next and qwen3_5 / qwen3_5_moe (shared/QWEN.md section 7; their
per-family rules are in pprt.families). A
Qwen3.5 release is multimodal: its top-level config (`qwen3_5`, `qwen3_5_moe`)
holds the text model in `text_config`, and `tie_word_embeddings` at the top
level as transformers reads it; text-only exports (`qwen3_5_text`,
`qwen3_5_moe_text`) are flat. Only the text model is run: the vision tower and
the MTP head (`mtp_num_hidden_layers`, `num_nextn_predict_layers`) are read
and ignored.

Anything the runtime does not implement (another model_type, sliding window,
a rope setting other than default or YaRN, a quantization other than 4-bit
GPTQ/AWQ, ungated attention in a hybrid family) fails here with a message
naming the field and its value.

`default_context` and `extend_context` decide the context served and the
rotary that serves it: the checkpoint's own window, or YaRN over the window
the checkpoint was trained for (`ModelConfig.trained_window`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from .errors import ConfigError
from .families import (
    FULL_ATTENTION,
    HYBRID_MODEL_TYPES,
    LATER,
    LINEAR_ATTENTION,
    MOE_MODEL_TYPES,
    SUPPORTED_MODEL_TYPES,
    TEXT_MODEL_TYPES,
    LinearAttentionConfig,
    attn_output_gate,
    layer_types,
    linear_attention,
    qkv_bias,
)
from .field_audit import audit_fields
from .quantization import QuantConfig  # noqa: F401  (re-exported: the formats' rules live there)
from .rope import (SUPPORTED_ROPE_TYPES, RopeConfig, native_window, parse_rope,  # noqa: F401
                   partial_rotary_factor, rope_from_user)

log = logging.getLogger("pprt")
# Qwen3.5's rope settings carry mrope sections: for text all three position rows are equal
MROPE_KEYS = frozenset({"mrope_section", "mrope_interleaved"})



@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str  # one of SUPPORTED_MODEL_TYPES (a Qwen3.5 wrapper's text model: qwen3_5 / qwen3_5_moe)
    vocab_size: int
    hidden_size: int  # H
    intermediate_size: int  # I of dense MLP layers
    num_layers: int
    num_heads: int  # n query heads
    num_kv_heads: int  # m key/value heads
    head_dim: int  # h (may differ from H / n)
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # qwen2: always; qwen3: attention_bias
    qk_norm: bool = False  # qwen3, qwen3_moe and the hybrid families
    o_bias: bool = False  # o_proj bias (hybrid families: attention_bias)
    # hybrid families: norms are x_normed * (1 + w); full attention is gated; partial rotary
    zero_centered_norm: bool = False
    attn_output_gate: bool = False  # q_proj [n * 2h, H]: per head query | gate, sigmoid(gate) before o_proj
    partial_rotary_factor: float = 1.0  # rotary on the first int(h * factor) dims of each head
    layer_types: tuple[str, ...] = ()  # per layer FULL_ATTENTION or LINEAR_ATTENTION; () = all full
    linear: LinearAttentionConfig | None = None  # the DeltaNet layers' geometry (hybrid families)
    mtp_num_layers: int = 0  # multi-token-prediction layers in the checkpoint (read, not run)
    # MoE (qwen3_moe, qwen2_moe, qwen3_next, qwen3_5_moe); num_experts == 0 means a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0  # gated shared expert beside the routed ones (0: none)
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: torch.dtype = torch.float32  # the dtype the checkpoint was saved in
    quant: QuantConfig | None = None
    # tokens the positions were trained for without scaling, the window YaRN extends when pprt
    # enables it (pprt.rope.native_window); None means max_position_embeddings
    native_context: int | None = None
    # longest context computed exactly as the checkpoint expects (a warned-about field such as
    # dual_chunk_attention_config limits it); None: no limit
    exact_context: int | None = None
    exact_context_reason: str = ""
    # generation_config.json defaults (temperature, top_p, ...), as read
    generation_defaults: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary, got {self.head_dim}")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok = {self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]"
                )
            if self.moe_intermediate_size <= 0 or self.decoder_sparse_step <= 0:
                raise ConfigError("moe_intermediate_size and decoder_sparse_step must be positive")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for num_hidden_layers = "
                                  f"{self.num_layers}")
            bad = [t for t in self.layer_types if t not in (FULL_ATTENTION, LINEAR_ATTENTION)]
            if bad:
                raise ConfigError(f"layer_types entry {bad[0]!r} is not supported ({FULL_ATTENTION}, "
                                  f"{LINEAR_ATTENTION})")
            if LINEAR_ATTENTION in self.layer_types and self.linear is None:
                raise ConfigError("layer_types has linear_attention layers but the config has no linear_* fields")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ConfigError(f"partial_rotary_factor {self.partial_rotary_factor} gives rotary dims "
                              f"{self.rotary_dim} of head_dim {self.head_dim}: need an even number >= 2")

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that rotary embedding turns: int(head_dim * partial_rotary_factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def hybrid(self) -> bool:
        """True when some layers are Gated DeltaNet (a stage then keeps recurrent state)."""
        return LINEAR_ATTENTION in self.layer_types

    def is_linear(self, layer: int) -> bool:
        """True when `layer` is a Gated DeltaNet (linear attention) layer."""
        return bool(self.layer_types) and self.layer_types[layer] == LINEAR_ATTENTION

    def layers_of(self, lo: int, hi: int) -> tuple[int, int]:
        """(full-attention layers, DeltaNet layers) in [lo, hi): the KV pool and the state pool of a stage."""
        linear = sum(self.is_linear(i) for i in range(lo, hi))
        return hi - lo - linear, linear

    def is_sparse(self, layer: int) -> bool:
        """True when `layer` has a mixture-of-experts MLP (qwen3_moe rule)."""
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def with_rope(self, rope: RopeConfig) -> ModelConfig:
        return dataclasses.replace(self, rope=rope)

    @property
    def trained_window(self) -> int:
        """The window YaRN extends when pprt enables it (native_context, else max_position_embeddings)."""
        return self.native_context or self.max_position_embeddings

    def with_rope_scaling(self, spec: dict | None) -> ModelConfig:
        """This config with a user's rope scaling (config.json's spellings) instead of the file's;
        None keeps the file's. See pprt.rope.rope_from_user. Raises ConfigError."""
        if spec is None:
            return self
        rope = rope_from_user(spec, self.rope.theta, self.max_position_embeddings)
        log.info("rope: using the given rope_scaling %s instead of the checkpoint's", spec)
        return self.with_rope(rope)

    @classmethod
    def from_dict(cls, cfg: dict, generation_config: dict | None = None) -> ModelConfig:
        """Parse config.json (and optionally generation_config.json) contents."""
        top = cfg
        model_type = cfg.get("model_type")
        if model_type in LATER:
            raise ConfigError(f"model_type {model_type!r} is not supported: {LATER[model_type]}")
        if model_type in ("qwen3_5", "qwen3_5_moe"):  # multimodal release: the text model is text_config
            if not isinstance(cfg.get("text_config"), dict):
                raise ConfigError(f"model_type {model_type!r} has no text_config: pprt runs the text model only")
            cfg = {**cfg["text_config"], "quantization_config": top.get("quantization_config")}
        model_type = TEXT_MODEL_TYPES.get(cfg.get("model_type", model_type), cfg.get("model_type", model_type))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")

        def need(key: str):
            if cfg.get(key) is None:
                raise ConfigError(f"config.json has no {key!r}")
            return cfg[key]

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        audit = audit_fields(cfg, model_type=model_type, wrapper=top if top is not cfg else None)
        hybrid = model_type in HYBRID_MODEL_TYPES
        is_moe = model_type in MOE_MODEL_TYPES
        all_sparse = model_type == "qwen3_5_moe"  # every layer routed, top-k always renormalised
        gen = generation_config or {}
        quant = cfg.get("quantization_config")
        tie = top.get("tie_word_embeddings", False) if top is not cfg else cfg.get("tie_word_embeddings", False)
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(cfg.get("intermediate_size") or 0),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=parse_rope(cfg, partial=hybrid, ignore_keys=MROPE_KEYS if hybrid else frozenset()),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(tie),
            qkv_bias=qkv_bias(model_type, cfg),
            qk_norm=model_type not in ("qwen2", "qwen2_moe"),
            o_bias=hybrid and bool(cfg.get("attention_bias", False)),
            zero_centered_norm=hybrid,
            attn_output_gate=attn_output_gate(model_type, cfg),
            partial_rotary_factor=partial_rotary_factor(cfg, 0.25 if hybrid else 1.0),
            layer_types=layer_types(model_type, cfg),
            linear=linear_attention(model_type, cfg) if hybrid else None,
            mtp_num_layers=int(cfg.get("mtp_num_hidden_layers") or cfg.get("num_nextn_predict_layers") or 0),
            # transformers v5 writes `num_local_experts`; real checkpoints `num_experts`
            num_experts=int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0) if is_moe else 0,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0) or 0) if is_moe else 0,
            moe_intermediate_size=int(cfg.get("moe_intermediate_size", 0) or 0) if is_moe else 0,
            norm_topk_prob=all_sparse or bool(cfg.get("norm_topk_prob", model_type == "qwen3_next")),
            decoder_sparse_step=1 if all_sparse else int(cfg.get("decoder_sparse_step", 1) or 1),
            mlp_only_layers=() if all_sparse else tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0)
            if model_type in ("qwen2_moe", "qwen3_next", "qwen3_5_moe") else 0,
            eos_token_ids=_eos_ids(cfg, gen, top),
            torch_dtype=_parse_dtype(cfg.get("torch_dtype") or cfg.get("dtype") or top.get("torch_dtype")
                                     or top.get("dtype") or "float32"),
            quant=QuantConfig.from_dict(quant) if quant else None,
            native_context=native_window(cfg),
            exact_context=audit.exact_context,
            exact_context_reason=audit.exact_context_reason,
            generation_defaults={
                k: gen[k]
                for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "do_sample")
                if gen.get(k) is not None
            },
        )


def _eos_ids(cfg: dict, gen: dict, top: dict) -> tuple[int, ...]:
    """generation_config.json's eos ids first, then config.json's (a wrapper's text_config, then its top)."""
    ids: list[int] = []
    for source in (gen.get("eos_token_id"), cfg.get("eos_token_id"), top.get("eos_token_id")):
        if source is None:
            continue
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)


_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def _parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    name = str(name).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported (float32, float16, bfloat16)")
    return _DTYPES[name]


parse_dtype = _parse_dtype


def default_context(config: ModelConfig) -> int:
    """The context served when none is asked for: max_position_embeddings, or the window the
    checkpoint's YaRN serves (factor x original) when larger, capped at the exact context
    (ModelConfig.exact_context) when a field pprt does not implement limits it."""
    window = max(config.max_position_embeddings, config.rope.window or 0)
    return min(window, config.exact_context) if config.exact_context else window


def extend_context(config: ModelConfig, max_context: int) -> ModelConfig:
    """The config that serves `max_context` tokens.

    Past max_position_embeddings of a checkpoint without rope scaling, YaRN is enabled as Qwen
    documents it: original = the trained window (ModelConfig.trained_window: 32768 for a
    Qwen3 config saying 40960), factor = max_context / original (131072 -> factor 4). A rope
    scaling from the file or the user is used as it is (a warning past the window it serves).
    Past exact_context the checkpoint expects math pprt does not implement: a warning.
    """
    if config.exact_context and max_context > config.exact_context:
        log.warning("max_context %d exceeds the %d tokens pprt computes exactly for this checkpoint: past them it "
                    "runs plain attention where the checkpoint's %s expects otherwise (as transformers does)",
                    max_context, config.exact_context, config.exact_context_reason)
    rope = config.rope
    if rope.type == "yarn":
        window = max(config.max_position_embeddings, rope.window)
        log.info("rope: YaRN (factor %g, original %d) serves up to %d tokens",
                 rope.factor, rope.original_max_position, window)
        if max_context > window:
            log.warning("max_context %d exceeds the %d tokens this YaRN was set up for "
                        "(factor %g x original %d): quality past it is unknown",
                        max_context, window, rope.factor, rope.original_max_position)
        return config
    if max_context <= config.max_position_embeddings or config.exact_context:
        return config
    native = config.trained_window
    factor = max_context / native
    log.warning("max_context %d exceeds max_position_embeddings %d: enabling YaRN (factor %.4g, original %d) "
                "over the trained window; static YaRN also applies to short prompts",
                max_context, config.max_position_embeddings, factor, native)
    rope = RopeConfig(theta=rope.theta, type="yarn", factor=factor, original_max_position=native)
    return dataclasses.replace(config.with_rope(rope), max_position_embeddings=max_context)
