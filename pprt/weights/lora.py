"""PEFT LoRA adapters: read and check one against a model's config, then read a stage's share of it.

An adapter is a directory (or hub repository: only `adapter_config.json` and
`adapter_model.safetensors` are fetched) written by PEFT's `save_pretrained`
(PEFT docs, "LoRA"; peft/tuners/lora/config.py for the fields):
- tensors `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight`
  [out, r] for each targeted nn.Linear `<module>`, in transformers' module names
  (`model.layers.3.self_attn.q_proj`; a multimodal Qwen3.5 puts the text model under
  `model.language_model.`, read here as `model.`; vision-tower tensors are skipped);
- `r`, `lora_alpha`, `use_rslora` give the scale: alpha / r, or alpha / sqrt(r)
  (rsLoRA), with per-module `rank_pattern` / `alpha_pattern` overrides;
- `target_modules` (a list: a module name equal to or ending in `.<entry>`; a string:
  a regex the whole name must match; "all-linear"), `exclude_modules`, and
  `layers_to_transform` say which modules carry an adapter;
- `fan_in_fan_out` only concerns transposed (Conv1D) base weights: PEFT itself turns it
  off for nn.Linear, as every Qwen projection is, so it is read and ignored.
What pprt cannot serve is refused naming the field or the tensor: `modules_to_save`
(whole replacement modules, e.g. an lm_head, which would change the base for every
request), DoRA, LoRA biases, `target_parameters` (fused expert parameters), routed
experts, pickled `adapter_model.bin`. Every tensor's name and shape is checked against
the modules the config builds, and every module the config targets must have both
tensors, before anything is read: `read_adapter` reads headers only.

`LoraAdapter` is small and picklable: the driver checks it once and hands it to each
stage, which reads only the tensors of its own layers (`stage_tensors`). Knows nothing
of how the adapter is applied (pprt.models.lora) or scheduled.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError
from .source import ModelSource

log = logging.getLogger("pprt")

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Config fields of PEFT features pprt does not serve: refused when set (truthy).
_REFUSED = {"modules_to_save": "whole modules saved beside the adapter replace base weights for every request",
            "use_dora": "DoRA (weight-decomposed LoRA) is not supported",
            "lora_bias": "LoRA biases are not supported",
            "target_parameters": "LoRA on fused parameters (MoE experts) is not supported yet",
            "trainable_token_indices": "trained embedding rows are not supported",
            "layer_replication": "layer replication is not supported",
            "use_qalora": "QA-LoRA is not supported",
            "alora_invocation_tokens": "activated LoRA is not supported",
            "use_bdlora": "BD-LoRA is not supported"}
_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


@dataclass(frozen=True, slots=True)
class LoraTarget:
    """One adapted linear layer."""

    module: str  # pprt's module name, e.g. "model.layers.3.self_attn.q_proj"
    layer: int
    a_key: str  # the tensor names in the file: A [rank, in_features]
    b_key: str  # B [out_features, rank]
    rank: int
    scale: float  # alpha / rank (alpha / sqrt(rank) with rsLoRA)
    in_features: int
    out_features: int


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """A checked adapter: where its tensors are and what they adapt (picklable)."""

    name: str
    weights: str  # local path of adapter_model.safetensors
    targets: tuple[LoraTarget, ...]

    @property
    def max_rank(self) -> int:
        return max(t.rank for t in self.targets)

    def stage_tensors(self, layers: tuple[int, int], device: torch.device | str,
                      dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (A [r, in], scale * B [out, r])} of the targets in layers [lo, hi), in `dtype`
        on `device`; the tensors of other layers are not read."""
        lo, hi = layers
        out = {}
        with safe_open(self.weights, framework="pt") as f:
            for t in self.targets:
                if lo <= t.layer < hi:
                    a = f.get_tensor(t.a_key).to(device=device, dtype=torch.float32)
                    b = f.get_tensor(t.b_key).to(device=device, dtype=torch.float32) * t.scale
                    out[t.module] = (a.to(dtype), b.to(dtype))
        return out


def adapter_files(path: str) -> tuple[Path, Path]:
    """Local paths of adapter_config.json and adapter_model.safetensors of a directory or hub id."""
    source = ModelSource(path)
    config, weights = source.get(CONFIG_FILE), source.get(WEIGHTS_FILE)
    if config is None:
        raise CheckpointError(f"LoRA adapter {path!r}: no {CONFIG_FILE} (not a PEFT adapter)")
    if weights is None:
        has_bin = source.local is not None and (source.local / "adapter_model.bin").is_file()
        raise CheckpointError(f"LoRA adapter {path!r}: no {WEIGHTS_FILE}"
                              + (" (adapter_model.bin is a pickle, which pprt does not load: re-save it with "
                                 "safe_serialization=True)" if has_bin else ""))
    return config, weights


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """{module: (in_features, out_features)} of every decoder-layer nn.Linear the config builds."""
    from ..models.stage import Stage  # a meta-device model: no memory

    stage = Stage(config)
    return {name: (m.in_features, m.out_features) for name, m in stage.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("model.layers.")}


def read_adapter(name: str, path: str, config: ModelConfig,
                 shapes: dict[str, tuple[int, int]] | None = None) -> LoraAdapter:
    """Check the adapter at `path` (directory or hub id) against `config`; reads headers only.

    Raises CheckpointError naming the field or tensor for anything pprt cannot serve exactly.
    """
    config_path, weights_path = adapter_files(path)
    where = f"LoRA adapter {name!r} ({path})"
    try:
        peft = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: {CONFIG_FILE} is not valid JSON ({e})") from e
    if peft.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{where}: peft_type is {peft.get('peft_type')!r}, only LORA adapters are served")
    for field, why in _REFUSED.items():
        if peft.get(field):
            raise CheckpointError(f"{where}: {CONFIG_FILE} sets {field}={peft[field]!r}: {why}")
    if peft.get("bias", "none") != "none":
        raise CheckpointError(f"{where}: {CONFIG_FILE} sets bias={peft['bias']!r}: trained biases are not supported")
    rank, alpha = peft.get("r", 8), peft.get("lora_alpha", 8)
    rslora = bool(peft.get("use_rslora", False))
    layers = peft.get("layers_to_transform")
    layers = None if layers is None else {layers} if isinstance(layers, int) else set(layers)
    shapes = shapes if shapes is not None else linear_shapes(config)

    def targeted(module: str) -> bool:
        names = (module, "model.language_model." + module[len("model."):])  # causal-LM and multimodal spellings
        if layers is not None and int(_LAYER.match(module).group(1)) not in layers:
            return False
        if any(_matches(peft.get("exclude_modules"), n) for n in names):
            return False
        return any(_matches(peft.get("target_modules"), n) for n in names)

    found: dict[str, dict[str, tuple[str, list[int], str]]] = {}
    with safe_open(str(weights_path), framework="pt") as f:
        keys = list(f.keys())
        for key in keys:
            module, part = _parse_key(where, key)
            if module is None:
                continue
            sl = f.get_slice(key)
            found.setdefault(module, {})[part] = (key, list(sl.get_shape()), sl.get_dtype())
    targets = []
    for module, parts in sorted(found.items()):
        some_key = next(iter(parts.values()))[0]
        if module not in shapes:
            raise CheckpointError(f"{where}: tensor {some_key!r} adapts {module!r}, which is not a linear layer of "
                                  f"this model ({config.model_type}, {config.num_layers} layers)")
        if ".mlp.experts." in module:
            raise CheckpointError(f"{where}: tensor {some_key!r} adapts a routed expert: LoRA on experts is not "
                                  "supported yet")
        if not targeted(module):
            raise CheckpointError(f"{where}: tensor {some_key!r} adapts {module!r}, which target_modules / "
                                  "layers_to_transform do not select")
        for part in "AB":
            if part not in parts:
                raise CheckpointError(f"{where}: tensor {_file_key(module, part)!r} is missing "
                                      f"(the file has its lora_{'B' if part == 'A' else 'A'})")
        (a_key, a_shape, a_dtype), (b_key, b_shape, b_dtype) = parts["A"], parts["B"]
        in_f, out_f = shapes[module]
        r = _pattern(peft.get("rank_pattern"), module, rank)
        for key, shape, want, dtype in ((a_key, a_shape, [r, in_f], a_dtype), (b_key, b_shape, [out_f, r], b_dtype)):
            if shape != want:
                raise CheckpointError(f"{where}: tensor {key!r} has shape {shape}, the model and r={r} expect {want}")
            if dtype not in _FLOATS:
                raise CheckpointError(f"{where}: tensor {key!r} is stored as {dtype}, not a float type")
        a = _pattern(peft.get("alpha_pattern"), module, alpha)
        scale = a / math.sqrt(r) if rslora else a / r
        targets.append(LoraTarget(module, int(_LAYER.match(module).group(1)), a_key, b_key, r, float(scale),
                                  in_f, out_f))
    expected = [m for m in shapes if ".mlp.experts." not in m and targeted(m)]
    if not expected:
        raise CheckpointError(f"{where}: target_modules {peft.get('target_modules')!r} select no linear layer of "
                              f"this model ({config.model_type})")
    for module in expected:
        if module not in found:
            raise CheckpointError(f"{where}: tensor {_file_key(module, 'A')!r} is missing (target_modules select "
                                  f"{module!r})")
    if peft.get("fan_in_fan_out"):
        log.info("%s: fan_in_fan_out is set; Qwen's projections are nn.Linear, for which PEFT ignores it too", where)
    return LoraAdapter(name, str(weights_path), tuple(targets))


def slot_bytes(adapters: list[LoraAdapter], max_loras: int, num_layers: int, dtype_bytes: int) -> list[int]:
    """Bytes per decoder layer of the slot stacks pprt.models.lora.LoraBank holds for `adapters`:
    every adapted layer stacks max_loras x (its largest rank) x (in + out) elements."""
    rank: dict[str, tuple[int, int, int]] = {}  # module -> (layer, largest rank, in + out)
    for t in (t for a in adapters for t in a.targets):
        old = rank.get(t.module, (t.layer, 0, 0))[1]
        rank[t.module] = (t.layer, max(old, t.rank), t.in_features + t.out_features)
    out = [0] * num_layers
    for layer, r, width in rank.values():
        out[layer] += max_loras * r * width * dtype_bytes
    return out


def _parse_key(where: str, key: str) -> tuple[str | None, str]:
    """(pprt module name, "A" or "B") of a file's tensor name; (None, "") for a vision-tower tensor."""
    name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
    m = _KEY.match(name)
    if m is None:
        raise CheckpointError(f"{where}: tensor {key!r} is not a lora_A / lora_B weight (DoRA magnitudes, biases "
                              "and embedding adapters are not supported)")
    module = m.group("module")
    if module.startswith(("model.visual.", "visual.")):
        return None, ""  # the vision tower does not run in pprt
    if module.startswith("model.language_model."):
        module = "model." + module[len("model.language_model."):]
    return module, m.group("part")


def _file_key(module: str, part: str) -> str:
    return f"{_PEFT_PREFIX}{module}.lora_{part}.weight"


def _matches(spec, name: str) -> bool:
    """PEFT's target rule (tuners_utils.check_target_module_exists): a string is a regex the whole
    name matches; a list entry matches the name or its last dotted components."""
    if not spec:
        return False
    if isinstance(spec, str):
        if spec == "all-linear":
            return True  # every decoder linear layer (the head is not among those checked)
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _pattern(patterns: dict | None, module: str, default):
    """rank_pattern / alpha_pattern: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module) or re.match(rf"(.*\.)?({key})$", "model.language_model." + module[6:]):
            return value
    return default
