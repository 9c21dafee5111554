"""ModelConfig: one validated, frozen description of a Qwen checkpoint.

Built from the dicts of config.json (and generation_config.json). The rotary
settings are read by `pprt.rope` in every spelling transformers accepts; every
other field is accounted for by `pprt.field_audit` (read, refused, or warned
about with the default context capped). Knows nothing about files or devices:
`weights/checkpoint.py` reads the JSON.

Every field config.py reads is read through `pprt.fields.Fields`, with its
type and range: booleans must be JSON booleans (the string "false" is refused,
not taken as true), sizes positive integers, eps finite and positive; a
generation_config.json default the sampler would refuse is refused here.
Anything wrong or unimplemented (another model_type, sliding window, a rope
setting other than default or YaRN, a quantization pprt does not run) fails
with a ConfigError naming the file, the field and its value.

Families: qwen2, qwen3, qwen3_moe, qwen2_moe, and the hybrid Gated DeltaNet
families qwen3_next and qwen3_5 / qwen3_5_moe (shared/QWEN.md section 7; their
per-family rules are in pprt.families). A Qwen3.5 release is multimodal: its
top-level config (`qwen3_5`, `qwen3_5_moe`) holds the text model in
`text_config`, and `tie_word_embeddings` at the top level as transformers
reads it; text-only exports (`qwen3_5_text`, `qwen3_5_moe_text`) are flat.
Only the text model is run (the vision tower's fields are ignored); the MTP
head's layer count (`mtp_num_hidden_layers`, `num_nextn_predict_layers`; 0 when
absent, as in Qwen3-Next's files) is read for MTP drafting
(pprt.weights.loader.check_mtp_head).

`quantization_config` is parsed by `pprt.quantization` (GPTQ, AWQ, block-wise
FP8, compressed-tensors, per-module rules); config.py only keeps the result.

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
    SHARED_EXPERT_MODEL_TYPES,
    SUPPORTED_MODEL_TYPES,
    TEXT_MODEL_TYPES,
    LinearAttentionConfig,
    attn_output_gate,
    layer_types,
    linear_attention,
    qkv_bias,
)
from .field_audit import audit_fields
from .fields import Fields
from .quantization import QuantConfig  # noqa: F401  (re-exported: the formats' rules live there)
from .rope import (  # noqa: F401
    SUPPORTED_ROPE_TYPES,
    RopeConfig,
    native_window,
    parse_rope,
    partial_rotary_factor,
    rope_from_user,
)

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
    mtp_num_layers: int = 0  # multi-token-prediction layers config.json declares (0: none or absent)
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
        if self.intermediate_size <= 0 and not all(self.is_sparse(i) for i in range(self.num_layers)):
            raise ConfigError(f"intermediate_size must be positive (a layer has a dense MLP), got "
                              f"{self.intermediate_size}")
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
        """True when `layer` has a mixture-of-experts MLP (qwen3_moe rule; every MoE family)."""
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
    def from_dict(cls, cfg: dict, generation_config: dict | None = None, *, path: str = "config.json",
                  generation_path: str = "generation_config.json") -> ModelConfig:
        """Parse config.json (and optionally generation_config.json) contents.

        path, generation_path: the files, named in errors. Raises ConfigError naming the file and the
        field when a field is missing, of the wrong type, out of range or unsupported.
        """
        top, gen = Fields(cfg, path), Fields(generation_config, generation_path)
        model_type = top.string("model_type")
        if model_type in LATER:
            raise top.error("model_type", f"{model_type!r} is not supported: {LATER[model_type]}")
        f = top
        if model_type in ("qwen3_5", "qwen3_5_moe"):  # a multimodal release: the text model is text_config
            f = top.section("text_config")
            if f is None:
                raise top.error("text_config", f"is missing: model_type {model_type!r} runs its text model only")
            model_type = TEXT_MODEL_TYPES.get(f.string("model_type", f"{model_type}_text"), "")
            if not model_type:
                raise f.error("model_type", "must be the text model of the release (qwen3_5_text, qwen3_5_moe_text)")
        model_type = TEXT_MODEL_TYPES.get(model_type, model_type)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise f.error("model_type", f"{model_type!r} is not supported (supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)})")
        wrapper = top.data if f is not top else None
        if f.string("hidden_act", "silu") != "silu":
            raise f.error("hidden_act", f"{f.data['hidden_act']!r} is not supported (only silu)")
        num_layers = f.integer("num_hidden_layers", at_least=1)
        hidden, heads = f.integer("hidden_size", at_least=1), f.integer("num_attention_heads", at_least=1)
        f.flag("use_sliding_window", False)  # typed here; pprt.field_audit decides what they mean
        f.integer("sliding_window", None, at_least=0)
        f.integer("max_window_layers", None, at_least=0)
        hybrid, is_moe = model_type in HYBRID_MODEL_TYPES, model_type in MOE_MODEL_TYPES
        all_sparse = model_type == "qwen3_5_moe"  # every layer routed, top-k always renormalised
        # transformers v5 writes `num_local_experts`; real checkpoints `num_experts`
        experts_key = "num_local_experts" if f.has("num_local_experts") and not f.has("num_experts") else "num_experts"
        quant = top.section("quantization_config")
        with top.naming_file():  # the errors of pprt.rope, pprt.field_audit and ModelConfig's own checks too
            audit = audit_fields(f.data, model_type=model_type, wrapper=wrapper)
            return cls(
                model_type=model_type,
                vocab_size=f.integer("vocab_size", at_least=1),
                hidden_size=hidden,
                intermediate_size=0 if all_sparse else f.integer("intermediate_size", 0, at_least=1),
                num_layers=num_layers,
                num_heads=heads,
                num_kv_heads=f.integer("num_key_value_heads", heads, at_least=1),  # null means heads
                head_dim=f.integer("head_dim", hidden // heads, at_least=1),
                rms_norm_eps=f.number("rms_norm_eps", 1e-6, above=0),
                rope=parse_rope(f.data, partial=hybrid, ignore_keys=MROPE_KEYS if hybrid else frozenset()),
                max_position_embeddings=f.integer("max_position_embeddings", 32768, at_least=1),
                # a release's head is tied as its top level says (transformers reads that one)
                tie_word_embeddings=top.flag("tie_word_embeddings", False),
                qkv_bias=qkv_bias(model_type, f),
                qk_norm=model_type not in ("qwen2", "qwen2_moe"),
                o_bias=hybrid and f.flag("attention_bias", False),
                zero_centered_norm=hybrid,
                attn_output_gate=attn_output_gate(model_type, f),
                partial_rotary_factor=partial_rotary_factor(f.data, 0.25 if hybrid else 1.0),
                layer_types=layer_types(model_type, f, num_layers),
                linear=linear_attention(model_type, f) if hybrid else None,
                mtp_num_layers=f.integer("mtp_num_hidden_layers", None, at_least=0)
                or f.integer("num_nextn_predict_layers", 0, at_least=0),
                num_experts=f.integer(experts_key, at_least=1) if is_moe else 0,
                num_experts_per_tok=f.integer("num_experts_per_tok", at_least=1) if is_moe else 0,
                moe_intermediate_size=f.integer("moe_intermediate_size", at_least=1) if is_moe else 0,
                norm_topk_prob=all_sparse or f.flag("norm_topk_prob", model_type == "qwen3_next"),
                decoder_sparse_step=1 if all_sparse else f.integer("decoder_sparse_step", 1, at_least=1),
                mlp_only_layers=() if all_sparse else f.integers("mlp_only_layers", at_least=0,
                                                                   at_most=num_layers - 1),
                shared_expert_intermediate_size=f.integer("shared_expert_intermediate_size", at_least=1)
                if model_type in SHARED_EXPERT_MODEL_TYPES else 0,
                eos_token_ids=_eos_ids(f, gen, top),
                torch_dtype=_parse_dtype(f.string("torch_dtype", None) or f.string("dtype", None)
                                         or top.string("torch_dtype", None) or top.string("dtype", "float32")),
                quant=QuantConfig.from_fields(quant) if quant is not None else None,
                native_context=native_window(f.data),
                exact_context=audit.exact_context,
                exact_context_reason=audit.exact_context_reason,
                generation_defaults=_generation_defaults(gen),
            )


def _eos_ids(cfg: Fields, gen: Fields, top: Fields) -> tuple[int, ...]:
    """generation_config.json's eos ids first, then config.json's (each an id or a list of ids; a
    Qwen3.5 release: its text_config's, then its top level's)."""
    ids = gen.integers("eos_token_id", at_least=0, single=True) + cfg.integers("eos_token_id", at_least=0, single=True)
    if top is not cfg:
        ids += top.integers("eos_token_id", at_least=0, single=True)
    return tuple(dict.fromkeys(ids))


def _generation_defaults(gen: Fields) -> dict:
    """The sampling defaults of generation_config.json, in the ranges SamplingParams accepts."""
    defaults = {
        "temperature": gen.number("temperature", None, at_least=0),
        "top_p": gen.number("top_p", None, above=0, at_most=1),
        "top_k": gen.integer("top_k", None, at_least=-1),
        "min_p": gen.number("min_p", None, at_least=0, at_most=1),
        "repetition_penalty": gen.number("repetition_penalty", None, above=0),
        "presence_penalty": gen.number("presence_penalty", None, at_least=-2, at_most=2),
        "frequency_penalty": gen.number("frequency_penalty", None, at_least=-2, at_most=2),
        "do_sample": gen.flag("do_sample", None),
    }
    return {k: v for k, v in defaults.items() if v is not None}


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
