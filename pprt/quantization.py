"""What a checkpoint's `quantization_config` says, module by module, from config.json alone.

pprt runs weights only in reduced precision (activations stay in the model dtype):
- Int4, W4A16 (`weights/int4.py`): GPTQ, AWQ, compressed-tensors `pack-quantized`
  (int, 4 bits, group or channel), and `quant="int4"` at load (RTN);
- FP8, W8A16 (`weights/fp8.py`): the official block-wise FP8 (`quant_method: "fp8"`),
  compressed-tensors `float-quantized` (channel, tensor, block), and `quant="fp8"`
  at load (block 128 x 128, the official layout).

`QuantConfig.module(name)` gives one linear layer's `ModuleFormat` by the config's
own rules: GPTQ `dynamic` (regexes, first match wins, a leading `-:` leaves the
module unquantized, positive rules may change group_size / sym / desc_act),
`modules_to_not_convert` (AWQ, FP8; matched as transformers matches it), and
compressed-tensors `config_groups` targets and `ignore`. Rules see a module's
name with and without the `language_model.` of Qwen3.5 releases. The loader then
also looks at the file (a module stored in float loads as float); the planner
counts `ModuleFormat.nbytes`. Knows nothing about tensors or files.

Formats and sources: shared/QWEN.md sections 4 and 8; GPTQModel's `dynamic`;
transformers' `should_convert_module`; compressed-tensors' `QuantizationArgs`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from enum import Enum

from .errors import ConfigError
from .fields import Fields

log = logging.getLogger("pprt")

METHODS = ("gptq", "awq", "fp8", "compressed-tensors")
AT_LOAD = ("int4", "fp8")  # quantize-at-load modes (LLM(quant=...), --quant)
RTN_GROUP_SIZES = (128, 64, 32)  # quant="int4": the largest dividing in_features, else the layer stays float
FP8_BLOCK = (128, 128)  # quant="fp8" and the official FP8 files
FP8_MAX = 448.0  # largest finite float8_e4m3fn


class Kind(Enum):
    FLOAT = "float"
    INT4 = "int4"
    FP8 = "fp8"


@dataclass(frozen=True, slots=True)
class ModuleFormat:
    """How one linear layer [N out, K in] is held: float, Int4 or FP8, and with which parameters."""

    kind: Kind
    method: str = ""  # "gptq", "awq", "fp8", "compressed-tensors", "rtn" (at load); "" for float
    group_size: int = 0  # int4: rows of K per scale; 0 = one group over all of K (per channel)
    sym: bool = True  # int4
    desc_act: bool = False  # int4 (gptq, compressed-tensors actorder): rows may be permuted
    checkpoint_format: str = "gptq"  # gptq: "gptq" (v1, zeros minus one) or "gptq_v2"
    block: tuple[int, int] = (0, 0)  # fp8: (rows, cols) of one scale; 0 = the whole dimension

    def group(self, k: int) -> int:
        """The Int4 group of a layer with in_features k."""
        return self.group_size or k

    def fp8_block(self, n: int, k: int) -> tuple[int, int]:
        """The FP8 scale block of a layer [n, k]: (1, k) per channel, (n, k) per tensor."""
        return self.block[0] or n, self.block[1] or k

    def nbytes(self, n: int, k: int, dtype_bytes: int = 2) -> int:
        """Bytes of the weight of a layer [n out, k in] as pprt holds it (bias not included).

        float: n*k*dtype_bytes. Int4: packed values k*n/2, scales in the model dtype and uint8
        zeros per group and column, and an int64 row permutation with desc_act. FP8: one byte per
        weight and one float32 scale per block.
        """
        if self.kind is Kind.INT4:
            groups = -(-k // self.group(k))
            return (k * n + 1) // 2 + groups * n * (dtype_bytes + 1) + (8 * k if self.desc_act else 0)
        if self.kind is Kind.FP8:
            bn, bk = self.fp8_block(n, k)
            return n * k + -(-n // bn) * -(-k // bk) * 4
        return n * k * dtype_bytes


FLOAT = ModuleFormat(Kind.FLOAT)


def never_quantized(name: str) -> bool:
    """The head and the routers (MoE `mlp.gate`, `shared_expert_gate`) stay in the model dtype
    at load whatever is asked (QWEN.md sections 4 and 8)."""
    return name == "lm_head" or name.endswith((".mlp.gate", "shared_expert_gate"))


def rtn_group_size(in_features: int) -> int | None:
    """quant="int4": the largest of 128, 64, 32 dividing in_features; None when none does."""
    return next((g for g in RTN_GROUP_SIZES if in_features % g == 0), None)


def at_load_format(quant: str, in_features: int) -> ModuleFormat:
    """What quantize-at-load makes of a float layer: Int4 RTN (asymmetric) with the largest
    group that divides in_features, FP8 block 128 x 128, or float when Int4 has no group."""
    if quant == "fp8":
        return ModuleFormat(Kind.FP8, "rtn", block=FP8_BLOCK)
    if quant != "int4":
        raise ValueError(f"quant={quant!r} is not supported (None, 'int4' or 'fp8')")
    group = rtn_group_size(in_features)
    return ModuleFormat(Kind.INT4, "rtn", group_size=group, sym=False) if group else FLOAT


def name_variants(name: str) -> tuple[str, ...]:
    """`name` as pprt calls it and as a Qwen3.5 release does (`model.language_model.*`), or back."""
    if name.startswith("model.language_model."):
        return name, "model." + name.removeprefix("model.language_model.")
    if name.startswith("model."):
        return name, "model.language_model." + name.removeprefix("model.")
    return (name,)


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"quantization_config.{where}: {pattern!r} is not a valid regular expression ({e})") from None


@dataclass(frozen=True, slots=True)
class DynamicRule:
    """One GPTQ `dynamic` entry: a regex matched (re.match) against module names."""

    pattern: str  # without its "+:" / "-:" prefix
    exclude: bool  # "-:": matching modules stay unquantized
    overrides: tuple[tuple[str, object], ...] = ()  # (key, value): bits, group_size, sym, desc_act

    def matches(self, name: str) -> bool:
        return any(re.match(self.pattern, v) for v in name_variants(name))


@dataclass(frozen=True, slots=True)
class SchemeGroup:
    """One compressed-tensors `config_groups` entry: which modules, and their weights' format."""

    name: str
    targets: tuple[str, ...]  # "Linear" (every linear), "re:<regex>", or an exact module name
    format: ModuleFormat


def _target_tier(name: str, target: str) -> int | None:
    """compressed-tensors' order of specificity: 0 exact name, 1 regex, 2 class name; None: no match."""
    names = name_variants(name)
    if target.startswith("re:"):
        return 1 if any(re.match(target[3:], n) for n in names) else None
    if target in names:
        return 0
    return 2 if target == "Linear" else None


def _not_converted(name: str, patterns: tuple[str, ...]) -> bool:
    """transformers' `should_convert_module` inverted: a pattern matches from the start up to a
    module boundary (as a regex), or as a suffix of the name; a module inside a listed module
    (`layers.1.mlp` lists model.layers.1.mlp.up_proj) is not converted either."""
    if not patterns:
        return False
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    names = [n for v in name_variants(name) for n in _ancestors(v)]
    return any(re.match(rf"(?:{p}){boundary}", n) or n.endswith(p) for p in patterns for n in names)


def _ancestors(name: str) -> list[str]:
    """model.layers.1.mlp -> [model.layers.1.mlp, model.layers.1, model.layers, model]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


@dataclass(frozen=True, slots=True)
class QuantConfig:
    """`quantization_config` of a quantized checkpoint (GPTQ, AWQ, FP8 or compressed-tensors)."""

    method: str  # one of METHODS
    bits: int = 4  # gptq / awq
    group_size: int = 128  # gptq / awq
    desc_act: bool = False  # gptq: g_idx is a permutation-derived group per row
    sym: bool = True  # gptq
    checkpoint_format: str = "gptq"  # gptq: "gptq" (v1, zeros stored minus one) or "gptq_v2"
    weight_block_size: tuple[int, int] | None = FP8_BLOCK  # fp8: None = one scale per tensor
    modules_to_not_convert: tuple[str, ...] = ()  # awq, fp8 (and gptq when present)
    dynamic: tuple[DynamicRule, ...] = ()  # gptq
    groups: tuple[SchemeGroup, ...] = ()  # compressed-tensors config_groups
    ignore: tuple[str, ...] = ()  # compressed-tensors

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"quantization_config.quant_method {self.method!r} is not supported "
                              f"({', '.join(METHODS)})")
        if self.method in ("gptq", "awq"):
            if self.bits != 4:
                raise ConfigError(f"quantization_config.bits = {self.bits} is not supported (only 4)")
            _check_group(self.group_size, "quantization_config.group_size")
            if self.checkpoint_format not in ("gptq", "gptq_v2"):
                raise ConfigError(f"quantization_config.checkpoint_format {self.checkpoint_format!r} is not supported")
        if self.weight_block_size is not None and (len(self.weight_block_size) != 2
                                                   or min(self.weight_block_size) <= 0):
            raise ConfigError(f"quantization_config.weight_block_size {list(self.weight_block_size)} must be two "
                              "positive sizes [rows, cols]")

    def base(self) -> ModuleFormat:
        """The format of a module no rule mentions (gptq / awq / fp8)."""
        if self.method == "fp8":
            return ModuleFormat(Kind.FP8, "fp8", block=self.weight_block_size or (0, 0))
        return ModuleFormat(Kind.INT4, self.method, self.group_size, self.sym, self.desc_act, self.checkpoint_format)

    def module(self, name: str) -> ModuleFormat:
        """The format the config gives linear layer `name` (e.g. model.layers.0.self_attn.q_proj).

        Raises ConfigError naming the module when a rule asks for something pprt cannot run
        (a GPTQ `dynamic` rule with bits other than 4).
        """
        if self.method == "compressed-tensors":
            if any(_target_tier(name, t) is not None for t in self.ignore):
                return FLOAT
            best = None
            for group in self.groups:
                tiers = [t for t in (_target_tier(name, x) for x in group.targets) if t is not None]
                if tiers and (best is None or min(tiers) < best[0]):
                    best = (min(tiers), group.format)
            return best[1] if best else FLOAT
        if _not_converted(name, self.modules_to_not_convert):
            return FLOAT
        fmt = self.base()
        for rule in self.dynamic:
            if not rule.matches(name):
                continue
            if rule.exclude:
                return FLOAT
            return _override(fmt, dict(rule.overrides), name, rule.pattern)
        return fmt

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> QuantConfig:
        """Parse `quantization_config` of config.json (file `where`); raises ConfigError naming the field."""
        return cls.from_fields(Fields(d, where, "quantization_config."))

    @classmethod
    def from_fields(cls, q: Fields) -> QuantConfig:
        """Parse `quantization_config` read through `q`: every field typed, errors naming file and field."""
        method = q.string("quant_method").lower()
        not_convert = q.strings("modules_to_not_convert")
        with q.naming_file():
            if method == "awq":
                version = q.string("version", "gemm").lower()
                if version != "gemm":
                    raise q.error("version", f"{version!r} is not supported for awq (only gemm)")
                if not q.flag("zero_point", True):
                    raise q.error("zero_point", "= false is not supported for awq")
                return cls(method="awq", bits=q.integer("bits", q.integer("w_bit", 4)),
                           group_size=q.integer("group_size", q.integer("q_group_size", 128)), sym=False,
                           modules_to_not_convert=not_convert)
            if method == "fp8":
                return _parse_fp8(q, not_convert)
            if method == "compressed-tensors":
                return _parse_compressed_tensors(q)
            return cls(
                method=method,
                bits=q.integer("bits", 4),
                group_size=q.integer("group_size", 128),
                desc_act=q.flag("desc_act", False),
                sym=q.flag("sym", True),
                checkpoint_format=q.string("checkpoint_format", "gptq"),
                modules_to_not_convert=not_convert,
                dynamic=_parse_dynamic(q),
            )


def _check_group(g: int, where: str) -> None:
    if g <= 0 or g % 8:
        raise ConfigError(f"{where} = {g} is not supported (a positive multiple of 8; per-channel -1 "
                          "only in compressed-tensors files)")


_DYNAMIC_KEYS = ("bits", "group_size", "sym", "desc_act")


def _parse_dynamic(q: Fields) -> tuple[DynamicRule, ...]:
    """GPTQModel's `dynamic`: {"-:regex": {}, "+:regex": {"group_size": 64}, "regex": {...}}."""
    dynamic = q.section("dynamic")
    if dynamic is None:
        return ()
    rules = []
    for key in dynamic.data:
        exclude = key.startswith("-:")
        pattern = key[2:] if key.startswith(("-:", "+:")) else key
        _compile(pattern, f"dynamic rule {key!r}")
        overrides = dynamic.section(key) or Fields({}, q.where)
        kept = tuple((k, overrides.flag(k) if k in ("sym", "desc_act") else overrides.integer(k))
                     for k in _DYNAMIC_KEYS if overrides.has(k))
        rules.append(DynamicRule(pattern, exclude, kept))
    return tuple(rules)


def _override(fmt: ModuleFormat, overrides: dict, name: str, pattern: str) -> ModuleFormat:
    bits = overrides.get("bits", 4)
    if bits != 4:
        raise ConfigError(f"quantization_config.dynamic rule {pattern!r} quantizes {name} with bits = {bits}: "
                          "only 4 is supported")
    group = overrides.get("group_size", fmt.group_size)
    _check_group(group, f"quantization_config.dynamic rule {pattern!r} group_size")
    return ModuleFormat(Kind.INT4, fmt.method, group, overrides.get("sym", fmt.sym),
                        overrides.get("desc_act", fmt.desc_act), fmt.checkpoint_format)


def _parse_fp8(q: Fields, not_convert: tuple[str, ...]) -> QuantConfig:
    fmt = q.string("fmt", "e4m3").lower()
    if fmt != "e4m3":
        raise q.error("fmt", f"{fmt!r} is not supported for fp8 (only e4m3)")
    scheme = q.string("activation_scheme", "dynamic").lower()
    if scheme != "dynamic":
        log.info("fp8 checkpoint: activation_scheme %r is ignored (pprt runs W8A16: activations stay in the "
                 "model dtype)", scheme)
    block = q.integers("weight_block_size", None, at_least=1)
    if block is not None and len(block) != 2:
        raise q.error("weight_block_size", f"must be [rows, cols], got {list(block)}")
    return QuantConfig(method="fp8", weight_block_size=block, modules_to_not_convert=not_convert)


# ---- compressed-tensors (llm-compressor exports) ---------------------------------------------

_CT_INT_FORMATS = ("pack-quantized",)
_CT_FLOAT_FORMATS = ("float-quantized", "naive-quantized")


def _parse_compressed_tensors(q: Fields) -> QuantConfig:
    """`config_groups` {name: {targets, weights, input_activations, format}}, `ignore`, `format`.

    Weights supported: int 4 bits, group or channel, symmetric or not (`pack-quantized`), and
    float 8 bits (e4m3), channel, tensor or block, symmetric (`float-quantized`). Activation
    schemes are ignored with a log line: pprt runs weight-only.
    """
    groups_in = q.section("config_groups")
    if groups_in is None or not groups_in.data:
        raise q.error("config_groups", "of a compressed-tensors checkpoint must be a non-empty object")
    global_format = q.string("format", None)
    groups = []
    for name in groups_in.data:
        group = groups_in.section(name)
        where = f"quantization_config.config_groups.{name}"
        targets = group.strings("targets") if group is not None else ()
        if group is None or not targets:
            raise groups_in.error(name, "must be an object with a non-empty list of targets")
        for t in targets:
            if t.startswith("re:"):
                _compile(t[3:], f"config_groups.{name}.targets")
        for act in ("input_activations", "output_activations"):
            if group.data.get(act):
                log.info("compressed-tensors group %r: %s %s are ignored (pprt runs weight-only: W4A16 / W8A16)",
                         name, act, _describe_args(group.data[act]))
        weights = group.section("weights")
        if weights is None:
            raise group.error("weights", "is missing: weight-only quantization is what pprt runs")
        fmt = group.string("format", None) or global_format
        if fmt == "mixed-precision" or fmt is None:
            fmt = "pack-quantized" if weights.string("type", "int") == "int" else "float-quantized"
        groups.append(SchemeGroup(name, targets, _ct_weights(weights, fmt, where)))
    ignore = q.strings("ignore")
    for t in ignore:
        if t.startswith("re:"):
            _compile(t[3:], "ignore")
    if q.data.get("kv_cache_scheme"):
        log.info("compressed-tensors: kv_cache_scheme is ignored (pprt's KV dtype is chosen with kv_dtype)")
    return QuantConfig(method="compressed-tensors", groups=tuple(groups), ignore=ignore)


def _describe_args(args) -> str:
    if not isinstance(args, dict):
        return repr(args)
    return f"({args.get('type', '?')}{args.get('num_bits', '?')}, {args.get('strategy', '?')})"


def _ct_weights(w: Fields, fmt: str, where: str) -> ModuleFormat:
    kind, bits = w.string("type", "int"), w.integer("num_bits", 0)
    strategy, sym = w.string("strategy", "tensor"), w.flag("symmetric", True)
    described = f"{where}.weights ({kind}{bits}, {strategy}{'' if sym else ', asymmetric'}, format {fmt!r})"
    if w.data.get("dynamic") not in (None, False):  # true or "local": scales computed at run time
        raise ConfigError(f"{described}: dynamic weight scales are not supported")
    if kind == "int" and bits == 4 and fmt in _CT_INT_FORMATS:
        if strategy == "channel":
            group = 0
        elif strategy == "group":
            group = w.integer("group_size", 0)
            _check_group(group, f"{where}.weights.group_size")
        else:
            raise ConfigError(f"{described}: int4 strategy {strategy!r} is not supported (group, channel)")
        actorder = w.data.get("actorder")  # compressed-tensors: true means "group"
        if actorder is not None and not isinstance(actorder, (bool, str)):
            raise w.error("actorder", f"must be a string or a boolean, got {actorder!r}")
        return ModuleFormat(Kind.INT4, "compressed-tensors", group, sym, desc_act=actorder in (True, "group"))
    if kind == "float" and bits == 8 and fmt in _CT_FLOAT_FORMATS:
        if not sym:
            raise ConfigError(f"{described}: asymmetric fp8 is not supported")
        if strategy == "channel":
            block = (1, 0)
        elif strategy == "tensor":
            block = (0, 0)
        elif strategy == "block":
            block = _block_structure(w.data.get("block_structure"), where)
        else:
            raise ConfigError(f"{described}: fp8 strategy {strategy!r} is not supported (channel, tensor, block)")
        return ModuleFormat(Kind.FP8, "compressed-tensors", block=block)
    raise ConfigError(f"{described} is not supported: pprt reads int4 'pack-quantized' (group, channel) and "
                      "fp8 'float-quantized' (channel, tensor, block)")


def _block_structure(value, where: str) -> tuple[int, int]:
    """[rows, cols], or the older "RxC" string."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]+x[0-9]+", value):
        value = [int(v) for v in value.split("x")]
    if not isinstance(value, list) or len(value) != 2 or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ConfigError(f"{where}.weights.block_structure must be [rows, cols], got {value!r}")
    return value[0], value[1]
