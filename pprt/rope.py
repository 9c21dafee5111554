"""Rotary settings: every spelling transformers accepts, the native window, and a user's own.

`parse_rope(cfg)` reads config.json's rotary fields exactly as transformers 5
standardizes them (configuration_utils + modeling_rope_utils:
`convert_rope_params_to_dict`, `standardize_rope_params`, `_compute_yarn_parameters`):
- the settings are `rope_scaling` when it is set, else `rope_parameters`
  (old files write top-level `rope_theta` + `rope_scaling`; transformers 5
  writes `rope_parameters` with `rope_theta` inside; recipes mix the two);
- `rope_theta` inside the settings wins over the top-level one (default 10000);
- the kind is `rope_type`, else `type`, else "default";
- YaRN's `original_max_position_embeddings` is a top-level field of that name
  when there is one, else the settings', else `max_position_embeddings`
  (32768 when absent); a null `factor` means max_position_embeddings / original;
  `beta_fast` / `beta_slow` default to 32 / 1; the attention factor is
  `attention_factor`, else mscale / mscale_all_dim's ratio when both are set,
  else 0.1 ln(factor) + 1.
Anything else is refused with a ConfigError naming it, never dropped: another
rope type (linear, dynamic, longrope, llama3, mrope), a key the rope type does
not take, a partial rotary factor other than 1, a value of the wrong type.
The hybrid families (Qwen3-Next, Qwen3.5) take a partial rotary factor
(`partial_rotary_factor(cfg, default)`: the settings' value, else the top-level
one, else the family's default, transformers' precedence) and Qwen3.5's mrope
keys (`mrope_section`, `mrope_interleaved`: for text, the three position rows
are equal, so it is ordinary rotary), which the caller lets through.

`native_window(cfg)` is the context a checkpoint's positions were trained for,
the window YaRN extends when pprt enables it (see its docstring for sources).
`rope_from_user(spec, ...)` reads a user's own rope scaling (LLM(rope_scaling=...),
`--rope-scaling JSON`) in the same spellings.

Knows nothing about files, devices or the rest of the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "yarn")
DEFAULT_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta
DEFAULT_MAX_POSITION = 32768  # Qwen2Config / Qwen3Config / Qwen3MoeConfig default
# The keys each rope type takes (transformers' _validate_<type>_rope_parameters), "type" included.
_KEYS = {
    "default": {"rope_type", "type", "rope_theta", "partial_rotary_factor"},
    "yarn": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor",
             "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"},
}


@dataclass(frozen=True, slots=True)
class RopeConfig:
    theta: float
    type: str = "default"  # "default" or "yarn"
    factor: float = 1.0  # yarn: context extension factor
    original_max_position: int | None = None  # yarn: pre-training window L0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # yarn: None -> 0.1 ln(factor) + 1 (1 when factor <= 1)
    truncate: bool = True  # yarn: floor/ceil the correction range

    def __post_init__(self) -> None:
        if self.type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {self.type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if not (math.isfinite(self.theta) and self.theta > 0):
            raise ConfigError(f"rope_theta must be finite and positive, got {self.theta}")
        if self.type == "yarn":
            if not (math.isfinite(self.factor) and self.factor > 0):
                raise ConfigError(f"rope_scaling.factor must be finite and positive, got {self.factor}")
            if not self.original_max_position or self.original_max_position < 1:
                raise ConfigError("yarn rope_scaling needs original_max_position_embeddings")

    @property
    def window(self) -> int | None:
        """Tokens a YaRN setting serves (factor x original), None for plain rotary."""
        return int(self.factor * self.original_max_position) if self.type == "yarn" else None


def _at(where: str) -> str:
    """The prefix naming where a setting came from ("" when the caller names the file)."""
    return f"{where}: " if where else ""


def _number(where: str, key: str, value: Any, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise ConfigError(f"{_at(where)}{key} must be a {'positive ' if positive else ''}number, got {value!r}")
    return float(value)


def _count(where: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < 1:
        raise ConfigError(f"{_at(where)}{key} must be a positive integer, got {value!r}")
    return int(value)


def _settings(where: str, spec: dict, theta: float, max_position: int,
              original_override: int | None = None, require_original: bool = False,
              partial: bool = False) -> RopeConfig:
    """RopeConfig of one settings dict (see the module docstring), `theta` when it has none.
    partial: a partial rotary factor in (0, 1] is the caller's (else only 1 is taken)."""
    kind = spec["rope_type"] if "rope_type" in spec else spec.get("type", "default")
    if kind not in _KEYS:
        raise ConfigError(f"{_at(where)}rope type {kind!r} is not supported (supported: "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)})")
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise ConfigError(f"{_at(where)}{', '.join(map(repr, unknown))} is not a setting of rope type {kind!r} "
                          f"(it takes {', '.join(sorted(_KEYS[kind] - {'type'}))})")
    theta = _number(where, "rope_theta", spec.get("rope_theta", theta))
    factor_of_head = _number(where, "partial_rotary_factor", spec.get("partial_rotary_factor", 1.0))
    if factor_of_head != 1.0 and not (partial and factor_of_head <= 1.0):
        raise ConfigError(f"{_at(where)}partial_rotary_factor = {spec['partial_rotary_factor']} is not supported for "
                          "this model " + ("(it must lie in (0, 1])" if partial else "(rotary over the whole head only)"))
    if kind == "default":
        return RopeConfig(theta=theta)
    if "factor" not in spec:
        raise ConfigError(f"{_at(where)}yarn needs 'factor'")
    if require_original and "original_max_position_embeddings" not in spec:
        raise ConfigError(f"{_at(where)}yarn needs 'original_max_position_embeddings' (the window the model was "
                          "trained for, which the factor extends)")
    if original_override is not None:
        original = original_override
    else:
        original = _count(where, "original_max_position_embeddings",
                          spec.get("original_max_position_embeddings", max_position))
    factor = spec["factor"]
    factor = max_position / original if factor is None else _number(where, "factor", factor)
    attention = spec.get("attention_factor")
    if attention is not None:
        attention = _number(where, "attention_factor", attention)
    elif spec.get("mscale") and spec.get("mscale_all_dim"):
        def mscale(m: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        attention = mscale(_number(where, "mscale", spec["mscale"], positive=False)) / mscale(
            _number(where, "mscale_all_dim", spec["mscale_all_dim"], positive=False))
    truncate = spec.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"{_at(where)}truncate must be true or false, got {truncate!r}")
    return RopeConfig(theta=theta, type="yarn", factor=factor, original_max_position=original,
                      beta_fast=_number(where, "beta_fast", spec.get("beta_fast") or 32.0, positive=False),
                      beta_slow=_number(where, "beta_slow", spec.get("beta_slow") or 1.0, positive=False),
                      attention_factor=attention, truncate=truncate)


def parse_rope(cfg: dict, where: str = "", *, partial: bool = False,
               ignore_keys: frozenset[str] = frozenset()) -> RopeConfig:
    """The rotary settings of config.json `cfg`, as transformers computes them (module docstring).

    partial: the model takes a partial rotary factor (read by `partial_rotary_factor`);
    ignore_keys: settings the model's config class ignores (Qwen3.5's mrope keys).
    Raises ConfigError naming the field (after `where`, when given) for anything it would not
    compute the same way.
    """
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(scaling, dict):
        raise ConfigError(f"{_at(where)}rope_scaling must be an object, got {scaling!r}")
    name = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    spec = {k: v for k, v in scaling.items() if k not in ignore_keys}
    if "partial_rotary_factor" in cfg:  # transformers moves it into the rope settings
        spec.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    max_position = _count(where, "max_position_embeddings", cfg.get("max_position_embeddings", DEFAULT_MAX_POSITION))
    original = None
    if "original_max_position_embeddings" in cfg:  # a top-level one wins (transformers' Phi-3 rule)
        original = _count(where, "original_max_position_embeddings", cfg["original_max_position_embeddings"])
    theta = cfg.get("rope_theta", DEFAULT_THETA)
    if "rope_theta" not in spec:  # the top-level value is used: a wrong one is named as itself
        theta = _number(where, "rope_theta", theta)
    return _settings(f"{_at(where)}{name}" if scaling else where, spec, theta, max_position, original,
                     partial=partial)


def partial_rotary_factor(cfg: dict, default: float) -> float:
    """The share of each head that rotary turns: the rope settings' value (rope_scaling, else
    rope_parameters), else the top-level `partial_rotary_factor` (old Qwen3-Next files), else
    `default` (0.25 for the hybrid families, transformers' class default). parse_rope validates it."""
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if isinstance(scaling, dict) and scaling.get("partial_rotary_factor") is not None:
        return float(scaling["partial_rotary_factor"])
    if cfg.get("partial_rotary_factor") is not None:
        return float(cfg["partial_rotary_factor"])
    return default


def rope_from_user(spec: dict, theta: float, max_position: int, where: str = "rope_scaling") -> RopeConfig:
    """A user's rope scaling (config.json's spellings), replacing the checkpoint's.

    `theta` and `max_position` are the checkpoint's, used where `spec` has none. YaRN must
    name its `original_max_position_embeddings`: the checkpoint's max_position_embeddings
    is not always the window it was trained for (Qwen3: 40960 against 32768).
    {"rope_type": "default"} turns scaling off. Raises ConfigError naming what is wrong.
    """
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a JSON object such as {{\"rope_type\": \"yarn\", \"factor\": 4.0, "
                          f"\"original_max_position_embeddings\": 32768}}, got {spec!r}")
    return _settings(where, spec, theta, max_position, require_original=True)


# Published windows that config.json does not state by itself. max_position_embeddings 40960
# in qwen2 / qwen3 / qwen3_moe configs is 32768 of trained context plus room for output: the
# Qwen3 model cards (Qwen/Qwen3-8B, Qwen3-30B-A3B, ... "Processing Long Texts") say "Qwen3
# natively supports context lengths of up to 32,768 tokens", that max_position_embeddings is
# set to 40,960 to reserve room for output, and give YaRN as factor 4.0 over
# original_max_position_embeddings 32768 for 131,072; QwQ-32B (qwen2, 40960) gives the same
# recipe. Other windows are what the config says: Qwen2.5-Instruct 32,768 (YaRN factor 4 for
# 131,072, per its model cards), Qwen3-2507 / Qwen3-Coder and Qwen3.5 262,144.
_TRAINED_WINDOW = {("qwen2", 40960): 32768, ("qwen3", 40960): 32768, ("qwen3_moe", 40960): 32768}


def native_window(cfg: dict) -> int:
    """Tokens the checkpoint's positions were trained for without scaling: the window YaRN
    extends (its original_max_position_embeddings) when pprt enables it for a longer context.

    A `dual_chunk_attention_config` (Qwen2.5-1M, Qwen3-2507 1M configs) states its own in
    `original_max_position_embeddings` (262,144). A qwen2 / qwen3 / qwen3_moe config with
    max_position_embeddings 40960 means 32,768 (see _TRAINED_WINDOW's sources). Otherwise
    max_position_embeddings.
    """
    max_position = cfg.get("max_position_embeddings", DEFAULT_MAX_POSITION)
    dca = cfg.get("dual_chunk_attention_config")
    if isinstance(dca, dict) and dca.get("original_max_position_embeddings"):
        return _count("", "dual_chunk_attention_config.original_max_position_embeddings",
                      dca["original_max_position_embeddings"])
    return _TRAINED_WINDOW.get((cfg.get("model_type"), max_position), max_position)
