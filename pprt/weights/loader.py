"""Materialize a Stage's parameters from a checkpoint, one tensor at a time.

Split from checkpoint.py (which finds and reads tensors) because this is the
one place that turns checkpoint tensors into model parameters (layout.py says
where each lives: prefix, fused experts): float weights, GPTQ/AWQ Int4 layers
(`<prefix>.qweight` present in the file) and quantize-at-load (`quant="int4"`:
RTN with group 128; a layer whose in_features is off the group stays in the
model dtype, logged, and only a stage where no layer fits is refused).
Every tensor's shape is checked against
the config before any data is read, so a wrong checkpoint fails before device
memory is spent; an error while reading puts everything already loaded back on
the meta device, so a failed load leaves no half-loaded stage behind.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm import tqdm

from ..errors import CheckpointError
from ..models.stage import Stage
from .checkpoint import CheckpointReader
from .layout import CheckpointLayout

log = logging.getLogger("pprt")
QUANT_MODES = (None, "int4")


def _never_quantized(prefix: str) -> bool:
    """The head, MoE routers and shared-expert gates stay in the model dtype (QWEN.md section 4)."""
    return prefix == "lm_head" or prefix.endswith((".mlp.gate", ".mlp.shared_expert_gate"))


def load_stage(stage: Stage, reader: CheckpointReader, device: torch.device, dtype: torch.dtype,
               quant: str | None = None, progress: bool | None = None) -> float:
    """Fill `stage` in place on `device`; returns the seconds spent quantizing at load."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant={quant!r} is not supported (None or 'int4')")
    layout = CheckpointLayout(stage.config, reader.weight_map)
    linears = {p: m for p, m in stage.named_modules() if isinstance(m, nn.Linear)}
    gptq_awq = {p for p in linears if f"{layout.name(p)}.qweight" in reader}
    if gptq_awq and stage.config.quant is None:
        raise CheckpointError(f"model {reader.source.name!r}: {layout.name(next(iter(gptq_awq)))}.qweight found "
                              "but config.json has no quantization_config")
    to_quantize = _rtn_layers(stage, linears, gptq_awq, reader.source.name) if quant == "int4" else set()

    # Plain tensors: everything except the weights of Int4 layers.
    plain = {}
    for name, param in stage.named_parameters():
        prefix = name.rpartition(".")[0]
        if prefix in gptq_awq:
            continue
        plain[name] = (layout.source(stage.checkpoint_name(name)), tuple(param.shape))
    for part, shape in plain.values():  # validate every header and shape first
        path, _, got, _, _ = reader.locate(part)
        layout.check_fused_shape(part, reader.info(part.name)[1].shape)
        if got != shape:
            raise CheckpointError(f"{path}: tensor {str(part)!r} has shape {list(got)}, "
                                  f"the config expects {list(shape)}")

    def int4_tensors(prefix: str) -> list[str]:
        names = (f"{layout.name(prefix)}.{t}" for t in ("qweight", "qzeros", "scales"))
        return [n for n in names if n in reader]

    total = sum(reader.nbytes(c) for c, _ in plain.values())
    total += sum(reader.nbytes(n) for p in gptq_awq for n in int4_tensors(p))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"layers {stage.lo}-{stage.hi - 1}",
               disable=None if progress is None else not progress, leave=False)
    quant_seconds = 0.0
    modules = dict(stage.named_modules())
    try:
        for name, (ckpt_name, shape) in plain.items():
            prefix, _, pname = name.rpartition(".")
            module = modules[prefix]
            tensor = reader.read(ckpt_name, device, dtype, shape)
            bar.update(reader.nbytes(ckpt_name))
            module._parameters[pname] = nn.Parameter(tensor, requires_grad=False)
            if prefix in to_quantize and all(p.device.type != "meta" for p in module.parameters()):
                t0 = time.perf_counter()
                _replace(stage, prefix, _quantize(module))
                quant_seconds += time.perf_counter() - t0
        for prefix in gptq_awq:
            _replace(stage, prefix, _load_int4(reader, layout.name(prefix), linears[prefix], stage, dtype, device))
            bar.update(sum(reader.nbytes(n) for n in int4_tensors(prefix)))
        leftover = [n for n, p in stage.named_parameters() if p.device.type == "meta"]
        if leftover:
            raise CheckpointError(f"model {reader.source.name!r}: tensors not loaded: {leftover[:5]}")
    except BaseException:
        _release(stage)  # nothing half-loaded stays reachable from the stage
        raise
    finally:
        bar.close()
    stage.rotary.to(device)
    return quant_seconds


def _rtn_layers(stage: Stage, linears: dict[str, nn.Linear], gptq_awq: set[str], model: str) -> set[str]:
    """The linears quantize-at-load turns into Int4 (checked before any read: RTN groups run along
    in_features). One off the group stays in the model dtype with a log line; a stage where no
    layer fits is refused."""
    from .int4 import RTN_GROUP_SIZE

    candidates = [p for p in linears if p not in gptq_awq and not _never_quantized(p)]
    fit = {p for p in candidates if linears[p].in_features % RTN_GROUP_SIZE == 0}
    off = [p for p in candidates if p not in fit]
    if candidates and not fit:
        raise CheckpointError(f"model {model!r} cannot be quantized with quant='int4': layer {off[0]} has "
                              f"in_features {linears[off[0]].in_features}, not a multiple of the quantization "
                              f"group size {RTN_GROUP_SIZE} (nor has any other layer of layers "
                              f"{stage.lo}-{stage.hi - 1})")
    if off:
        log.info("quant int4: %d of %d layers of layers %d-%d stay in the model dtype (in_features not a multiple "
                 "of %d), e.g. %s (in_features %d)", len(off), len(candidates), stage.lo, stage.hi - 1,
                 RTN_GROUP_SIZE, off[0], linears[off[0]].in_features)
    return fit


def _release(stage: Stage) -> None:
    """Put every loaded parameter and buffer back on the meta device (the rotary tables are not loaded)."""
    for module in stage.modules():
        if module is stage.rotary:
            continue
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is not None and t.device.type != "meta":
                    meta = torch.empty_like(t, device="meta")
                    is_param = isinstance(t, nn.Parameter)
                    table[key] = nn.Parameter(meta, requires_grad=False) if is_param else meta


def _replace(stage: Stage, prefix: str, module: nn.Module) -> None:
    parent, _, child = prefix.rpartition(".")
    setattr(stage.get_submodule(parent) if parent else stage, child, module)


def _quantize(linear: nn.Linear) -> nn.Module:
    from .int4 import quantize_linear

    return quantize_linear(linear.weight, linear.bias)


def _load_int4(reader: CheckpointReader, prefix: str, linear: nn.Linear, stage: Stage,
               dtype: torch.dtype, device: torch.device) -> nn.Module:
    from .int4 import load_quantized_linear

    def read(name: str) -> torch.Tensor:
        return reader.read(name, device)  # stored dtype; quant.py converts

    try:
        return load_quantized_linear(read, prefix, linear.in_features, linear.out_features,
                                     linear.bias is not None, stage.config.quant, dtype, device)
    except ValueError as e:  # a tensor of the file does not fit the config: a broken checkpoint
        raise CheckpointError(f"model {reader.source.name!r}: {e}") from e
