"""Which format each linear layer of a stage is loaded in: the file and the config together.

The config (`pprt.quantization`) says what a module should be: GPTQ `dynamic`
rules, `modules_to_not_convert`, compressed-tensors groups and `ignore`. The file
says what it is: `<prefix>.qweight` (GPTQ / AWQ), `<prefix>.weight_packed`
(compressed-tensors int4), a float8 `<prefix>.weight` beside `weight_scale_inv`
(official FP8) or `weight_scale` (compressed-tensors fp8), or a float `weight`. A
routed expert stored as part of a fused tensor (layout.py: `mlp.experts.gate_up_proj`
[E, 2I, H], `down_proj` [E, H, I]) is FP8 when that tensor is float8, with its block
scales in `<tensor>_scale_inv` [E, row blocks, column blocks] (transformers'
FP8Experts layout; fp8.load_fp8_rows reads an expert's part of both).
A module stored in float loads as float whatever the global method says; a
quantized module the config does not describe, or describes as another format,
is a CheckpointError naming it.

Quantize-at-load (`quant="int4"` / `"fp8"`) applies to float checkpoints only
(a quantized checkpoint's float modules were left in float on purpose), never to
the head or the routers. Int4 takes the largest group of 128, 64, 32 dividing a
layer's in_features; a layer no group divides stays in the model dtype. Each
such choice is logged once per shape, naming a module. The planner makes the same
choices from config.json (`pprt.quantization.at_load_format`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError
from ..models.stage import Stage
from ..quantization import AT_LOAD, FLOAT, RTN_GROUP_SIZES, Kind, ModuleFormat, at_load_format, never_quantized
from .checkpoint import CheckpointReader, TensorPart
from .layout import CheckpointLayout

log = logging.getLogger("pprt")

QUANT_MODES = (None,) + AT_LOAD
# every tensor an importer may read beside the weight (the loader's progress counts them)
_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "weight", "weight_scale_inv", "weight_scale", "weight_packed",
             "weight_zero_point", "weight_shape", "weight_g_idx", "bias")


@dataclass(frozen=True, slots=True)
class LinearLoad:
    """How one linear layer of a stage is loaded."""

    prefix: str  # module name in the stage (model.layers.3.mlp.down_proj)
    ckpt: str  # its checkpoint prefix (the tied head reads model.embed_tokens)
    in_features: int
    out_features: int
    has_bias: bool
    stored: ModuleFormat  # as the file holds it; FLOAT: a plain weight the loader reads
    at_load: ModuleFormat | None = None  # a float layer quantized while loading
    part: TensorPart | None = None  # a routed expert's rows of a fused [E, N, K] tensor (layout.py)

    @property
    def from_file(self) -> bool:
        """True when an importer reads this layer's tensors (it is quantized in the file)."""
        return self.stored.kind is not Kind.FLOAT


def plan_linears(stage: Stage, reader: CheckpointReader, quant: str | None,
                 layout: CheckpointLayout | None = None) -> dict[str, LinearLoad]:
    """Every nn.Linear of `stage` with its format; raises CheckpointError on a contradiction
    between file and config, before any tensor data is read. `layout` names the checkpoint's
    tensors (default: read from the reader's tensor names)."""
    layout = layout or CheckpointLayout(stage.config, reader.weight_map)
    if quant not in QUANT_MODES:
        raise ValueError(f"quant={quant!r} is not supported (None, 'int4' or 'fp8')")
    qcfg = stage.config.quant
    if quant and qcfg is not None:
        log.info("quant=%r is not applied: the checkpoint is already quantized (%s); its float modules stay float",
                 quant, qcfg.method)
    out, float_but_configured, odd = {}, [], defaultdict(list)
    for prefix, m in stage.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        ckpt = layout.name(stage.checkpoint_name(f"{prefix}.weight")).removesuffix(".weight")
        part = layout.source(stage.checkpoint_name(f"{prefix}.weight"))
        part = part if part.index else None  # a fused expert tensor's part
        stored = _stored_format(reader, prefix, ckpt, qcfg, part)
        at_load = None
        if stored.kind is Kind.FLOAT and qcfg is not None and qcfg.module(prefix).kind is not Kind.FLOAT \
                and not never_quantized(prefix):
            float_but_configured.append(prefix)
        if stored.kind is Kind.FLOAT and quant and qcfg is None and not never_quantized(prefix):
            at_load = at_load_format(quant, m.in_features)
            if at_load.kind is Kind.INT4 and at_load.group_size != RTN_GROUP_SIZES[0] or at_load.kind is Kind.FLOAT:
                odd[(m.in_features, at_load.group_size)].append(prefix)
            at_load = at_load if at_load.kind is not Kind.FLOAT else None
        out[prefix] = LinearLoad(prefix, ckpt, m.in_features, m.out_features, m.bias is not None, stored, at_load,
                                 part if stored.kind is not Kind.FLOAT else None)
    if float_but_configured:
        log.info("%d linear layer(s) that quantization_config quantizes are stored in float and load in float "
                 "(e.g. %s)", len(float_but_configured), float_but_configured[0])
    for (k, group), names in odd.items():
        what = f"use Int4 group {group}" if group else \
            f"stay in the model dtype (no Int4 group of {', '.join(map(str, RTN_GROUP_SIZES))} divides it)"
        log.info("quant='int4': %d layer(s) with in_features %d %s: %s%s", len(names), k, what, names[0],
                 f" and {len(names) - 1} more" if len(names) > 1 else "")
    return out


def _stored_format(reader: CheckpointReader, prefix: str, ckpt: str, qcfg, part: TensorPart | None) -> ModuleFormat:
    """The file's format of one layer, checked against the config's. part: the layer's rows of a
    fused expert tensor, when the file stores its experts fused."""
    name = reader.source.name
    if part is not None:
        if reader.info(part.name)[1].dtype != torch.float8_e4m3fn:
            return FLOAT  # a float fused tensor: read part by part by the loader
        scale = f"{part.name}_scale_inv"
        if scale not in reader:
            raise CheckpointError(f"model {name!r}: fused expert tensor {part.name!r} is float8_e4m3fn but the "
                                  f"file has no {scale!r} (its block scales)")
        found, methods, kind = f"{part.name} (float8_e4m3fn)", ("fp8",), Kind.FP8
    elif f"{ckpt}.qweight" in reader:
        found, methods, kind = f"{ckpt}.qweight", ("gptq", "awq"), Kind.INT4
    elif f"{ckpt}.weight_packed" in reader:
        found, methods, kind = f"{ckpt}.weight_packed", ("compressed-tensors",), Kind.INT4
    elif f"{ckpt}.weight" in reader and reader.info(f"{ckpt}.weight")[1].dtype == torch.float8_e4m3fn:
        official = f"{ckpt}.weight_scale_inv" in reader
        found, kind = f"{ckpt}.weight (float8_e4m3fn)", Kind.FP8
        methods = ("fp8",) if official else ("compressed-tensors",)
    else:
        return FLOAT
    if qcfg is None:
        raise CheckpointError(f"model {name!r}: {found} found but config.json has no quantization_config")
    want = qcfg.module(prefix)
    if want.kind is Kind.FLOAT:
        raise CheckpointError(f"model {name!r}: {found} found but quantization_config ({qcfg.method}) leaves "
                              f"{prefix} unquantized")
    if want.kind is not kind or qcfg.method not in methods:
        raise CheckpointError(f"model {name!r}: {found} is a {kind.value} tensor of a {'/'.join(methods)} file, "
                              f"but quantization_config ({qcfg.method}) makes {prefix} {want.kind.value}")
    return want


def file_tensors(reader: CheckpointReader, lin: LinearLoad) -> dict[str, str | TensorPart]:
    """The checkpoint tensors (or tensor parts) of a layer an importer reads, by role."""
    if lin.part is not None:  # an expert's rows of a fused FP8 tensor, and all of its expert's scales
        return {"weight": lin.part, "weight_scale_inv": TensorPart(f"{lin.part.name}_scale_inv", lin.part.index)}
    return {s: f"{lin.ckpt}.{s}" for s in _SUFFIXES if f"{lin.ckpt}.{s}" in reader}


def load_quantized(reader: CheckpointReader, lin: LinearLoad, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Read one layer that the file stores quantized, in pprt's Int4 or FP8 format on `device`."""
    from .compressed import load_compressed_linear
    from .fp8 import load_fp8_linear, load_fp8_rows
    from .int4 import load_quantized_linear

    def read(name: str | TensorPart) -> torch.Tensor:
        return reader.read(name, device)  # stored dtype; the importers convert

    args = (lin.ckpt, lin.in_features, lin.out_features, lin.has_bias, lin.stored, dtype, device)
    try:
        if lin.part is not None:
            tensors = file_tensors(reader, lin)
            weight = reader.read(tensors["weight"], device, shape=(lin.out_features, lin.in_features))
            fused_rows = reader.info(lin.part.name)[1].shape[1]
            scale = tensors["weight_scale_inv"]
            return load_fp8_rows(weight, read(scale), lin.part.rows[0] if lin.part.rows else 0, fused_rows,
                                 lin.stored, (str(lin.part), str(scale)))
        if lin.stored.method == "compressed-tensors":
            return load_compressed_linear(read, reader.__contains__, *args)
        if lin.stored.method == "fp8":
            return load_fp8_linear(read, *args)
        return load_quantized_linear(read, *args)
    except ValueError as e:  # a tensor of the file does not fit the config: a broken checkpoint
        raise CheckpointError(f"model {reader.source.name!r}: {e}") from e


def quantize_at_load(linear: nn.Linear, fmt: ModuleFormat) -> nn.Module:
    """A loaded float layer in `fmt` (Int4 RTN or FP8 block), on its own device."""
    if fmt.kind is Kind.FP8:
        from .fp8 import quantize_linear

        return quantize_linear(linear.weight, linear.bias, fmt.fp8_block(linear.out_features, linear.in_features))
    from .int4 import quantize_linear

    return quantize_linear(linear.weight, linear.bias, fmt.group(linear.in_features))
