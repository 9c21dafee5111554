"""Materialize a Stage's parameters from a checkpoint, one tensor at a time.

Split from checkpoint.py (which finds and reads tensors) because this is the
one place that turns checkpoint tensors into model parameters (layout.py says
where each lives: a multimodal release's prefix, fused experts read part by
part): float weights, layers the file stores quantized (GPTQ / AWQ / compressed-tensors
Int4, official or compressed-tensors FP8: formats.py decides each layer's format
from the file and the config) and quantize-at-load (`quant="int4"` or `"fp8"`,
one layer at a time as its weight arrives). Before any data is read, every
tensor's shape is checked against the config and its dtype against its role
(a float parameter is F16/BF16/F32/F64, never an integer; a packed `qweight`
is I32, its `scales` float, an FP8 `weight` float8_e4m3fn, ...), and a
checkpoint with more decoder layers than the config is refused, so a wrong
checkpoint fails before device memory is spent; an error while reading puts
everything already loaded back on the meta device, so a failed load leaves no
half-loaded stage behind.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time

import torch
from torch import nn
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import CheckpointError
from ..models.mtp import MTPHead
from ..models.stage import Stage
from .checkpoint import CheckpointReader
from .experts import expert_linear, stack_expert
from .merge import FloatMerges, merge_if_complete
from .formats import file_tensors, load_quantized, plan_linears, quantize_at_load
from .header import ST_DTYPES
from .layout import CheckpointLayout

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SCALES = FLOATS[:3]
_INDEX = (torch.int32, torch.int64)
# The dtypes the importers take for the tensors of a layer stored quantized, by role (the suffix of
# the tensor's name; shared/QWEN.md sections 4 and 8). Roles not listed are checked by the importer.
QUANTIZED_ROLES = {"qweight": (torch.int32,), "qzeros": (torch.int32,), "scales": _SCALES, "g_idx": _INDEX,
                   "weight": (torch.float8_e4m3fn,), "weight_scale_inv": _SCALES, "weight_scale": _SCALES,
                   "weight_packed": (torch.int32,), "weight_g_idx": _INDEX, "bias": _SCALES}

log = logging.getLogger("pprt")

HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


def resolve_tied_head(config: ModelConfig, reader: CheckpointReader, rows_per_read: int = 4096) -> ModelConfig:
    """The config to build stages from when config.json ties the head to the embedding
    (`tie_word_embeddings`) but the checkpoint also stores an `lm_head.weight`.

    An equal head (some exports save both) changes nothing. A different one is the head
    the model runs with, untied, as transformers 5 does (it warns "both are present in the
    checkpoints with different values, so we will NOT tie them"); vLLM would ignore the
    file's head and use the embedding. We follow transformers: the stored head is what the
    checkpoint's author saved last, and transformers is the reference pprt is tested against.
    Logs a warning naming both tensors when it unties. Reads the two tensors `rows_per_read`
    rows at a time and stops at the first difference.
    """
    embedding = CheckpointLayout(config, reader.weight_map).name(EMBEDDING)  # a Qwen3.5 release's prefix
    if not config.tie_word_embeddings or HEAD not in reader or embedding not in reader:
        return config
    (_, head), (_, emb) = reader.info(HEAD), reader.info(embedding)
    same = head.shape == emb.shape and head.dtype == emb.dtype and len(head.shape) == 2
    for start in range(0, head.shape[0] if same else 0, rows_per_read):
        stop = min(start + rows_per_read, head.shape[0])
        if not torch.equal(reader.read_rows(HEAD, start, stop), reader.read_rows(embedding, start, stop)):
            same = False
            break
    if same:
        return config
    log.warning("model %r: config.json ties the head to the embedding (tie_word_embeddings) but the checkpoint "
                "stores its own %s, different from %s: running with the stored %s, untied, as transformers "
                "does (vLLM would use the embedding)", reader.source.name, HEAD, embedding, HEAD)
    return dataclasses.replace(config, tie_word_embeddings=False)


def check_mtp_head(config: ModelConfig, reader: CheckpointReader) -> None:
    """Refuse MTP drafting (before anything loads) on a checkpoint without a complete MTP head.

    The head has as many layers as config.json declares (`mtp_num_hidden_layers`, Qwen3.5
    family; `num_nextn_predict_layers`), or, where it declares none, as the checkpoint holds
    `mtp.layers.N` tensors for: the official Qwen3-Next files carry `mtp.*` without the field
    (vLLM's qwen3_next_mtp reads it with a default of 1, SGLang sets 1). One layer is
    supported (every release has one), and every `mtp.*` tensor of pprt.models.mtp.MTPHead
    must be there (float, or any stored quantized form). Raises CheckpointError naming the
    fields or the missing tensors."""
    name = reader.source.name
    stored_layers = {m[1] for n in reader.weight_map if (m := re.match(r"mtp\.layers\.(\d+)\.", n))}
    layers = config.mtp_num_layers or len(stored_layers)
    if layers == 0:
        raise CheckpointError(f"model {name!r} has no multi-token-prediction (MTP) head: config.json declares "
                              "none (mtp_num_hidden_layers / num_nextn_predict_layers is 0 or absent) and the "
                              "checkpoint holds no mtp.layers.* tensors, so speculative method 'mtp' cannot run; "
                              "use method 'ngram'")
    if layers > 1:
        raise CheckpointError(f"model {name!r} has {layers} MTP layers: MTP drafting supports checkpoints with "
                              "one (as every Qwen3-Next and Qwen3.5 release has)")
    layout = CheckpointLayout(config, reader.weight_map)
    stored = {n.rpartition(".")[0] for n in reader.weight_map if n.startswith("mtp.")}  # modules with tensors
    with torch.device("meta"):
        params = [f"mtp.{n}" for n, _ in MTPHead(config).named_parameters()]
    missing = [p for p in params if layout.source(p).name not in reader and p.rpartition(".")[0] not in stored]
    if missing:
        raise CheckpointError(f"model {name!r}: speculative method 'mtp' needs the MTP head, but the checkpoint "
                              f"lacks {len(missing)} of its {len(params)} tensors, e.g. "
                              f"{', '.join(missing[:4])}")


def load_stage(stage: Stage, reader: CheckpointReader, device: torch.device, dtype: torch.dtype,
               quant: str | None = None, progress: bool | None = None) -> float:
    """Fill `stage` in place on `device`, q/k/v and gate/up joined into one layer each where their
    formats allow (merge.py); returns the seconds spent quantizing at load."""
    beyond = reader.layer_beyond(stage.config.num_layers)
    if beyond is not None:
        raise CheckpointError(f"{reader.listing}: tensor {beyond!r} belongs to a decoder layer past the "
                              f"{stage.config.num_layers} of config.json's num_hidden_layers (the extra layers "
                              "would be dropped)")
    layout = CheckpointLayout(stage.config, reader.weight_map)
    linears = plan_linears(stage, reader, quant, layout)  # each layer's format; contradictions fail here
    in_file = {p: lin for p, lin in linears.items() if lin.from_file}

    # Plain tensors: everything except the layers an importer reads.
    plain = {}
    for name, param in stage.named_parameters():
        prefix = name.rpartition(".")[0]
        if prefix in in_file:
            continue
        plain[name] = (layout.source(stage.checkpoint_name(name)), tuple(param.shape))
    for part, shape in plain.values():  # validate every header, shape and dtype first
        whole = reader.info(part.name)[1]
        layout.check_fused(part, whole.shape)
        path, info = reader.locate(part)
        if info.shape != shape:
            raise CheckpointError(f"{path}: tensor {str(part)!r} has shape {list(info.shape)}, "
                                  f"the config expects {list(shape)}")
        _check_dtype(path, str(part), info.dtype, FLOATS, "a float parameter")
    quantized = {p: file_tensors(reader, lin) for p, lin in in_file.items()}
    for prefix, tensors in quantized.items():
        lin = in_file[prefix]
        if lin.part is not None:  # an expert's rows of a fused tensor: the whole tensor's shape first
            layout.check_fused(lin.part, reader.info(lin.part.name)[1].shape)
        for role, src in tensors.items():
            if role in QUANTIZED_ROLES:
                path, info = reader.locate(src)
                _check_dtype(path, str(src), info.dtype, QUANTIZED_ROLES[role],
                             f"the {role} of a {lin.stored.method} layer")

    total = sum(reader.nbytes(c) for c, _ in plain.values())
    total += sum(reader.nbytes(t) for tensors in quantized.values() for t in tensors.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"layers {stage.lo}-{stage.hi - 1}",
               disable=None if progress is None else not progress, leave=False)
    quant_seconds = 0.0
    modules = dict(stage.named_modules())
    merges = FloatMerges(stage, linears)  # float q/k/v and gate/up: read into their merged layer
    try:
        for name, (ckpt_name, shape) in plain.items():
            prefix, _, pname = name.rpartition(".")
            module = modules[prefix]
            tensor = reader.read(ckpt_name, device, dtype, shape)
            bar.update(reader.nbytes(ckpt_name))
            if merges.place(prefix, pname, tensor):
                continue
            module._parameters[pname] = nn.Parameter(tensor, requires_grad=False)
            if all(p.device.type != "meta" for p in module.parameters()):  # the layer is complete
                at_load = linears[prefix].at_load if prefix in linears else None
                if at_load is not None:
                    t0 = time.perf_counter()
                    module = quantize_at_load(module, at_load)
                    _replace(stage, prefix, module)
                    quant_seconds += time.perf_counter() - t0
                _placed(stage, prefix, module)
        for prefix in quantized:
            module = load_quantized(reader, in_file[prefix], dtype, device)
            _replace(stage, prefix, module)
            _placed(stage, prefix, module)
            bar.update(sum(reader.nbytes(t) for t in quantized[prefix].values()))
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


def _check_dtype(path, name: str, dtype: torch.dtype, allowed: tuple[torch.dtype, ...], role: str) -> None:
    if dtype not in allowed:
        names = {v: k for k, v in ST_DTYPES.items()}
        raise CheckpointError(f"{path}: tensor {name!r} is stored as {names[dtype]}, but as {role} it must be "
                              f"{' or '.join(names[d] for d in allowed)}")


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


def _placed(stage: Stage, prefix: str, module: nn.Module) -> None:
    """A linear is in place: a routed expert's moves into its MoE layer's stacks (experts.py); the
    last of q/k/v or of gate/up joins its group into one layer (merge.py)."""
    found = expert_linear(prefix)
    if found is not None:
        moe, expert, proj = found
        stack_expert(stage.get_submodule(moe), expert, proj, module, prefix)
        _drop(module)  # its tensors now live in the stack
    elif prefix.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        parent = stage.get_submodule(prefix.rpartition(".")[0])
        parts = {name: getattr(parent, name) for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
                 if isinstance(getattr(parent, name, None), nn.Module)}
        if merge_if_complete(parent):
            for name, part in parts.items():
                if getattr(parent, name) is None:  # joined: its tensors now live in the merged layer
                    _drop(part)


def _drop(module: nn.Module) -> None:
    """Free a module's tensors (its modules-by-name entry in load_stage would keep them alive)."""
    for table in (module._parameters, module._buffers):
        for key, t in table.items():
            if t is not None:
                meta = torch.empty_like(t, device="meta")
                table[key] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta


def _replace(stage: Stage, prefix: str, module: nn.Module) -> None:
    parent, _, child = prefix.rpartition(".")
    setattr(stage.get_submodule(parent) if parent else stage, child, module)
