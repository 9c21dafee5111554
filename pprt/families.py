"""What each supported model_type is: its family rules and the fields only some families have.

The per-family half of reading config.json (pprt.config builds the one
ModelConfig from it): which model types exist and which are hybrid or MoE, how a
Qwen3.5 wrapper names its text model, the layer pattern (`layer_types`, else
`full_attention_interval`), gated attention,
q/k/v bias per family, and the Gated DeltaNet geometry (`linear_*`), with
transformers' class defaults where a field is absent (models/qwen3_next,
qwen3_5, qwen3_5_moe, qwen2_moe configuration files). Each refusal names the
field. Knows nothing of files, tensors or devices.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .fields import Fields

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "qwen3_next", "qwen3_5", "qwen3_5_moe")
HYBRID_MODEL_TYPES = ("qwen3_next", "qwen3_5", "qwen3_5_moe")  # Gated DeltaNet + gated full attention
MOE_MODEL_TYPES = ("qwen3_moe", "qwen2_moe", "qwen3_next", "qwen3_5_moe")
SHARED_EXPERT_MODEL_TYPES = ("qwen2_moe", "qwen3_next", "qwen3_5_moe")  # a sigmoid-gated shared expert
# A multimodal wrapper's text model, and the model_type of text-only exports
TEXT_MODEL_TYPES = {"qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe"}
LATER = {"qwen4_exp": "hyper-connections, hashed n-gram embeddings and sparse attention are a later issue",
         "qwen3_5_vision": "a vision tower alone has no text model to run",
         "qwen3_5_moe_vision": "a vision tower alone has no text model to run"}
FULL_ATTENTION, LINEAR_ATTENTION = "full_attention", "linear_attention"  # layer_types entries


@dataclass(frozen=True, slots=True)
class LinearAttentionConfig:
    """Geometry of the Gated DeltaNet layers (`linear_*` fields of config.json)."""

    num_key_heads: int  # Hk
    num_value_heads: int  # Hv, a multiple of Hk
    key_head_dim: int  # dk
    value_head_dim: int  # dv
    conv_kernel: int  # K of the short causal conv over q, k, v
    fused_projections: bool = False  # qwen3_next: in_proj_qkvz / in_proj_ba grouped per key head

    def __post_init__(self) -> None:
        names = {"num_key_heads": "linear_num_key_heads", "num_value_heads": "linear_num_value_heads",
                 "key_head_dim": "linear_key_head_dim", "value_head_dim": "linear_value_head_dim",
                 "conv_kernel": "linear_conv_kernel_dim"}
        for attr, field_name in names.items():
            if getattr(self, attr) <= 0:
                raise ConfigError(f"{field_name} must be positive, got {getattr(self, attr)}")
        if self.num_value_heads % self.num_key_heads:
            raise ConfigError(f"linear_num_value_heads ({self.num_value_heads}) is not a multiple of "
                              f"linear_num_key_heads ({self.num_key_heads})")
        if self.conv_kernel < 2:
            raise ConfigError(f"linear_conv_kernel_dim must be >= 2, got {self.conv_kernel}")

    @property
    def key_dim(self) -> int:  # Hk * dk: width of q and of k
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:  # Hv * dv: width of v, z and the output
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:  # channels of the conv: q, k and v
        return 2 * self.key_dim + self.value_dim

    def state_bytes(self, conv_dtype_bytes: int, ssm_dtype_bytes: int = 4) -> int:
        """One sequence's state in one layer: conv [conv_dim, K-1] + recurrent [Hv, dk, dv]."""
        conv = self.conv_dim * (self.conv_kernel - 1) * conv_dtype_bytes
        return conv + self.num_value_heads * self.key_head_dim * self.value_head_dim * ssm_dtype_bytes



def qkv_bias(model_type: str, f: Fields) -> bool:
    """q/k/v bias: qwen2 always; qwen2_moe its own `qkv_bias` (true when absent: Qwen1.5-MoE files
    lack it); the others `attention_bias`."""
    if model_type == "qwen2":
        return True
    if model_type == "qwen2_moe":
        return f.flag("qkv_bias", True)
    return f.flag("attention_bias", False)


def attn_output_gate(model_type: str, f: Fields) -> bool:
    """The hybrids' full attention is gated; transformers builds the gated q_proj whatever
    `attn_output_gate` says, so false is refused."""
    if model_type not in HYBRID_MODEL_TYPES:
        return False
    if not f.flag("attn_output_gate", True):
        raise f.error("attn_output_gate", f"= false is not supported for {model_type} (its full attention is "
                      "always gated)")
    return True


def layer_types(model_type: str, f: Fields, num_layers: int) -> tuple[str, ...]:
    """Hybrid families: `layer_types` when present, else layer i is full attention iff
    (i + 1) % full_attention_interval == 0 (default 4, transformers' BC default). () for the
    others (pprt.field_audit has checked their layer_types for sliding layers)."""
    if model_type not in HYBRID_MODEL_TYPES:
        return ()
    types = f.strings("layer_types", None)
    if types is not None:
        if "sliding_attention" in types:
            raise f.error("layer_types", "has sliding_attention layers: sliding-window attention is not implemented")
        return types
    interval = f.integer("full_attention_interval", 4, at_least=1)
    return tuple(FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(num_layers))


def linear_attention(model_type: str, f: Fields) -> LinearAttentionConfig:
    """The linear_* fields (pprt.field_audit has refused a missing one: no size is guessed);
    refuses a non-fp32 recurrent state."""
    ssm_dtype = f.string("mamba_ssm_dtype", None)
    if ssm_dtype is not None and ssm_dtype.removeprefix("torch.") not in ("float32", "float"):
        raise f.error("mamba_ssm_dtype", f"{ssm_dtype!r} is not supported (the recurrent state is float32)")
    return LinearAttentionConfig(
        num_key_heads=f.integer("linear_num_key_heads", at_least=1),
        num_value_heads=f.integer("linear_num_value_heads", at_least=1),
        key_head_dim=f.integer("linear_key_head_dim", at_least=1),
        value_head_dim=f.integer("linear_value_head_dim", at_least=1),
        conv_kernel=f.integer("linear_conv_kernel_dim", at_least=2),
        fused_projections=model_type == "qwen3_next",
    )
