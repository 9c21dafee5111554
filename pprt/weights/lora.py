"""PEFT LoRA adapters: read and check one against a model's config, then read a stage's share of it.

An adapter is a directory (or hub repository: only `adapter_config.json` and
`adapter_model.safetensors` are fetched) written by PEFT's `save_pretrained`
(PEFT docs, "LoRA"; peft/tuners/lora/config.py for the fields):
- tensors `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight`
  [out, r] for each targeted nn.Linear `<module>`, in transformers' module names
  (`model.layers.3.self_attn.q_proj`; a multimodal Qwen3.5 puts the text model under
  `model.language_model.`, read here as `model.`; vision-tower tensors are skipped).
  Routed experts come two ways: per-expert modules `mlp.experts.{e}.gate_proj|up_proj|
  down_proj` (transformers 4's layout of qwen2_moe / qwen3_moe / Qwen3-Next), or PEFT's
  `target_parameters` on transformers 5's fused parameters `mlp.experts.gate_up_proj`
  [E, 2I, H] and `mlp.experts.down_proj` [E, H, I] (Qwen3.5-MoE's file layout; lora_experts.py
  reads PEFT's ParamWrapper layout);
- `r`, `lora_alpha`, `use_rslora` give the scale: alpha / r, or alpha / sqrt(r)
  (rsLoRA), with per-module `rank_pattern` / `alpha_pattern` overrides;
- `target_modules` (a list: a module name equal to or ending in `.<entry>`; a string:
  a regex the whole name must match; "all-linear"), `exclude_modules`, and
  `layers_to_transform` say which modules carry an adapter (per-expert modules are
  expected only when the file has some: an adapter of transformers 5's fused experts
  adapts them through `target_parameters`, which PEFT matches by name alone);
- `fan_in_fan_out` only concerns transposed (Conv1D) base weights: PEFT itself turns it
  off for nn.Linear, as every Qwen projection is, so it is read and ignored.
What pprt cannot serve is refused naming the field or the tensor: `modules_to_save`
(whole replacement modules, e.g. an lm_head, which would change the base for every
request), DoRA, LoRA biases, `target_parameters` other than the fused experts and linear
weights (`mlp.gate.weight`: the router, as PEFT's "all-linear" reaches it on transformers 5), pickled
`adapter_model.bin`. Every tensor's name and shape is checked against the modules the
config builds, and every module the config targets must have both tensors, before
anything is read: `read_adapter` reads headers only.

`LoraAdapter` is small and picklable: the driver checks it once and hands it to each
stage, which reads only the tensors of its own layers (`stage_tensors`). Each target also
names where pprt adds its delta once q/k/v and gate/up are merged (`site`), for the
planner's count of slot bytes. Knows nothing of how the adapter is applied (pprt.models.lora)
or scheduled.
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
from ..models.layers import MERGED_LAYERS
from .experts import expert_linear
from .lora_experts import fused_params, fused_tensors, param_of, per_expert_stack, selected_params
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
            "trainable_token_indices": "trained embedding rows are not supported",
            "layer_replication": "layer replication is not supported",
            "use_qalora": "QA-LoRA is not supported",
            "alora_invocation_tokens": "activated LoRA is not supported",
            "use_bdlora": "BD-LoRA is not supported"}
_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


@dataclass(frozen=True, slots=True)
class LoraTarget:
    """One adapted layer: a linear, one routed expert's linear, or a fused expert parameter."""

    module: str  # e.g. "model.layers.3.self_attn.q_proj", "...mlp.experts.5.up_proj", "...mlp.experts.down_proj"
    layer: int
    a_key: str  # the tensor names in the file: A [rank, in_features] ([rank * E, in] for a fused parameter)
    b_key: str  # B [out_features, rank] ([out, rank * E], rank-major, for a fused parameter)
    rank: int
    scale: float  # alpha / rank (alpha / sqrt(rank) with rsLoRA)
    in_features: int
    out_features: int
    experts: int = 0  # a fused expert parameter's E (target_parameters); 0 otherwise
    # Where pprt adds the delta: the layer once q/k/v and gate/up are merged ("...self_attn.qkv_proj",
    # "...mlp.experts.gate_up_proj"), its part of that layer (the module, expert index dropped), and
    # the elements one rank of one slot takes there (E x (in + the site's out)): for the planner.
    site: str = ""
    part: str = ""
    site_elements: int = 0


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """A checked adapter: where its tensors are and what they adapt (picklable)."""

    name: str
    weights: str  # local path of adapter_model.safetensors
    targets: tuple[LoraTarget, ...]
    num_experts: int = 0  # routed experts per MoE layer of the model

    @property
    def max_rank(self) -> int:
        return max(t.rank for t in self.targets)

    def stage_tensors(self, layers: tuple[int, int], device: torch.device | str,
                      dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The targets in layers [lo, hi) as {name: (A, scale * B)} in `dtype` on `device`; the tensors of
        other layers are not read. A linear `<module>`: A [r, in], B [out, r]. Routed experts, per MoE
        layer and projection `<moe>.experts.<proj>` (proj: gate_proj, up_proj, down_proj from per-expert
        modules; gate_up_proj, down_proj from fused parameters): A [E, r, in], B [E, out, r], zeros
        for experts the adapter leaves alone."""
        lo, hi = layers
        out, per_expert = {}, {}
        with safe_open(self.weights, framework="pt") as f:
            for t in self.targets:
                if not lo <= t.layer < hi:
                    continue
                a = f.get_tensor(t.a_key).to(device=device, dtype=torch.float32)
                b = f.get_tensor(t.b_key).to(device=device, dtype=torch.float32) * t.scale
                expert = expert_linear(t.module)
                if t.experts:
                    out[t.module] = fused_tensors(a, b, t.experts, t.rank)
                elif expert is not None:
                    moe, e, proj = expert
                    per_expert.setdefault(f"{moe}.experts.{proj}", {})[e] = (a, b)
                else:
                    out[t.module] = (a, b)
        for name, parts in per_expert.items():
            out[name] = per_expert_stack(parts, self.num_experts)
        return {name: (a.to(dtype).contiguous(), b.to(dtype).contiguous()) for name, (a, b) in out.items()}


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
    """{module: (in_features, out_features)} of every decoder-layer nn.Linear the config builds
    (routed experts one module each, as checkpoints name them)."""
    from ..models.stage import Stage  # a meta-device model: no memory

    stage = Stage(config)
    return {name: (m.in_features, m.out_features) for name, m in stage.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("model.layers.")}


def _spellings(module: str) -> tuple[str, str]:
    """The causal-LM and multimodal (`model.language_model.`) names of a decoder module."""
    return module, "model.language_model." + module[len("model."):]


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
    params = fused_params(config, shapes)
    chosen = selected_params(where, peft.get("target_parameters"), set(params) | {f"{m}.weight" for m in shapes},
                             _spellings)
    chosen_params = chosen & set(params)
    # a linear's 2-D weight through target_parameters (PEFT 0.21 turns "all-linear" on transformers 5's
    # qwen3_moe / Qwen3-Next into one for the router, `mlp.gate.weight`): the same A [r, in], B [out, r]
    weight_targets = {n[: -len(".weight")] for n in chosen - chosen_params}

    def targeted(module: str) -> bool:
        if module in weight_targets:  # PEFT matches target_parameters by name alone
            return True
        if layers is not None and int(_LAYER.match(module).group(1)) not in layers:
            return False
        if any(_matches(peft.get("exclude_modules"), n) for n in _spellings(module)):
            return False
        return any(_matches(peft.get("target_modules"), n) for n in _spellings(module))

    found: dict[str, dict[str, tuple[str, list[int], str]]] = {}
    with safe_open(str(weights_path), framework="pt") as f:
        for key in f.keys():
            module, part = _parse_key(where, key)
            if module is None:
                continue
            module = param_of(where, key, module, chosen_params) or module
            sl = f.get_slice(key)
            found.setdefault(module, {})[part] = (key, list(sl.get_shape()), sl.get_dtype())
    targets = []
    for module, parts in sorted(found.items()):
        some_key = next(iter(parts.values()))[0]
        if module not in shapes and module not in params:
            raise CheckpointError(f"{where}: tensor {some_key!r} adapts {module!r}, which is not a linear layer of "
                                  f"this model ({config.model_type}, {config.num_layers} layers)")
        if module in shapes and not targeted(module):
            raise CheckpointError(f"{where}: tensor {some_key!r} adapts {module!r}, which target_modules / "
                                  "layers_to_transform do not select")
        for part in "AB":
            if part not in parts:
                missing = re.sub(r"lora_[AB]\.weight$", f"lora_{part}.weight", some_key)
                raise CheckpointError(f"{where}: tensor {missing!r} is missing "
                                      f"(the file has its lora_{'B' if part == 'A' else 'A'})")
        (a_key, a_shape, a_dtype), (b_key, b_shape, b_dtype) = parts["A"], parts["B"]
        experts = config.num_experts if module in params else 0
        in_f, out_f = params[module] if experts else shapes[module]
        key_name = f"{module}.weight" if module in weight_targets else module  # what PEFT matches patterns with
        r = _pattern(peft.get("rank_pattern"), key_name, rank)
        want_a, want_b = ([r * experts, in_f], [out_f, r * experts]) if experts else ([r, in_f], [out_f, r])
        for key, shape, want, dtype in ((a_key, a_shape, want_a, a_dtype), (b_key, b_shape, want_b, b_dtype)):
            if shape != want:
                raise CheckpointError(f"{where}: tensor {key!r} has shape {shape}, the model and r={r} expect {want}"
                                      + (f" ({experts} experts)" if experts else ""))
            if dtype not in _FLOATS:
                raise CheckpointError(f"{where}: tensor {key!r} is stored as {dtype}, not a float type")
        a = _pattern(peft.get("alpha_pattern"), key_name, alpha)
        scale = a / math.sqrt(r) if rslora else a / r
        targets.append(LoraTarget(module, int(_LAYER.match(module).group(1)), a_key, b_key, r, float(scale),
                                  in_f, out_f, experts, *_site(module, shapes, params, config.num_experts)))
    # per-expert modules are expected when the file adapts some (else its experts are fused parameters)
    per_expert = any(expert_linear(m) for m in found)
    expected = [m for m in shapes if targeted(m) and (per_expert or expert_linear(m) is None)]
    expected += sorted(chosen_params)
    if not expected:
        raise CheckpointError(f"{where}: target_modules {peft.get('target_modules')!r} select no linear layer of "
                              f"this model ({config.model_type})")
    for module in expected:
        if module not in found and module in params:
            raise CheckpointError(f"{where}: the lora_A / lora_B of the fused expert parameter {module!r} are "
                                  "missing (target_parameters select it)")
        if module not in found:
            raise CheckpointError(f"{where}: tensor {_file_key(module, 'A')!r} is missing (target_modules "
                                  f"select {module!r})")
    if peft.get("fan_in_fan_out"):
        log.info("%s: fan_in_fan_out is set; Qwen's projections are nn.Linear, for which PEFT ignores it too", where)
    return LoraAdapter(name, str(weights_path), tuple(targets), config.num_experts)


def _site(module: str, shapes: dict[str, tuple[int, int]], params: dict[str, tuple[int, int]],
          num_experts: int) -> tuple[str, str, int]:
    """(site, part, site_elements) of a target (see LoraTarget), assuming q/k/v and gate/up merge."""
    expert = expert_linear(module)
    if expert is not None or module in params:  # routed experts: the MoE layer's two stacked projections
        experts, _, proj = module.rpartition(".")
        if expert is not None:
            moe, _, proj = expert
            experts = f"{moe}.experts"
        site = f"{experts}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
        k, n = params[site]
        return site, f"{experts}.{proj}", num_experts * (k + n)
    parent, _, leaf = module.rpartition(".")
    for merged, parts in MERGED_LAYERS.items():
        names = [f"{parent}.{p}" for p in parts]
        if leaf in parts and all(n in shapes for n in names):
            return f"{parent}.{merged}", module, shapes[module][0] + sum(shapes[n][1] for n in names)
    return module, module, sum(shapes[module])


def slot_bytes(adapters: list[LoraAdapter], max_loras: int, num_layers: int, dtype_bytes: int) -> list[int]:
    """Bytes per decoder layer of the slot stacks pprt.models.lora.LoraBank holds for `adapters`:
    every site (a merged or plain linear, an MoE layer's gate_up or down experts) stacks
    max_loras x (the sum over its parts of each part's largest rank) x its site_elements."""
    ranks: dict[str, dict[str, int]] = {}  # site -> part -> largest rank
    info: dict[str, tuple[int, int]] = {}  # site -> (layer, elements per rank)
    for t in (t for a in adapters for t in a.targets):
        parts = ranks.setdefault(t.site, {})
        parts[t.part] = max(parts.get(t.part, 0), t.rank)
        info[t.site] = (t.layer, t.site_elements)
    out = [0] * num_layers
    for site, parts in ranks.items():
        layer, elements = info[site]
        out[layer] += max_loras * sum(parts.values()) * elements * dtype_bytes
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
        if any(re.match(rf"(.*\.)?({key})$", n) for n in _spellings(module)):
            return value
    return default
