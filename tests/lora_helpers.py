"""Random PEFT LoRA adapters for the tests, and the same adapters in other layouts PEFT writes.

`make_adapter(base, out, seed, **LoraConfig fields)` saves a random adapter made by the
peft library (init_lora_weights=False, B scaled up so every adapted layer changes the
output) and returns the peft model: transformers + peft, the oracle.

`per_expert_adapter(fused, out)` rewrites an adapter whose routed experts are adapted
through `target_parameters` (transformers 5's fused `mlp.experts.gate_up_proj` [E, 2I, H]
and `mlp.experts.down_proj` [E, H, I]; PEFT's ParamWrapper layout: lora_A [r*E, in]
expert-major, lora_B [out, r*E] rank-major, nested wrappers `experts.base_layer.lora_*`
for the first parameter of the module) into the layout PEFT wrote for transformers 4's
per-expert nn.Linear modules (`mlp.experts.{e}.gate_proj|up_proj|down_proj`, each with its
own lora_A [r, in] and lora_B [out, r]). Both describe the same weights, so the peft model
of the fused adapter is the oracle of the per-expert file too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models import reference_model


def make_adapter(base_path, out, seed: int, **lora):
    """Save a random peft LoRA adapter of the checkpoint at base_path into `out`; returns the peft model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(reference_model(base_path), LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():  # B's default init is small: make each adapter's effect visible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(5.0)
    model.save_pretrained(out)
    return model.eval()


_EXPERTS = re.compile(r"^(?P<moe>.*\.mlp\.experts)\.(?P<nest>(base_layer\.)*)lora_(?P<part>[AB])\.weight$")


def per_expert_adapter(fused: Path, out: Path, num_experts: int, intermediate: int) -> None:
    """Write `fused` (experts adapted through target_parameters gate_up_proj and down_proj, both)
    as per-expert module targets into `out`."""
    config = json.loads((Path(fused) / "adapter_config.json").read_text())
    assert {"mlp.experts.down_proj", "mlp.experts.gate_up_proj"} <= set(config["target_parameters"])
    for field in ("rank_pattern", "alpha_pattern"):  # gate_up_proj's pattern goes to both of its parts
        patterns = config.get(field) or {}
        for key in [k for k in patterns if "gate_up_proj" in k]:
            patterns[r"mlp\.experts\.\d+\.(gate_proj|up_proj)"] = patterns.pop(key)
        config[field] = patterns
    tensors = load_file(Path(fused) / "adapter_model.safetensors")
    rewritten, E, I = {}, num_experts, intermediate
    for key, t in tensors.items():
        m = _EXPERTS.match(key)
        if m is None:
            rewritten[key] = t
            continue
        # the module's first parameter (gate_up_proj) is the inner wrapper: experts.base_layer.lora_*
        proj = "gate_up_proj" if m["nest"] else "down_proj"
        if m["part"] == "A":  # [r*E, in], expert-major
            per = t.reshape(E, -1, t.shape[1])  # [E, r, in]
        else:  # [out, r*E], rank-major: column j*E + e
            per = t.reshape(t.shape[0], -1, E).permute(2, 0, 1)  # [E, out, r]
        for e in range(E):
            base = f"{m['moe']}.{e}"
            if proj == "down_proj":
                rewritten[f"{base}.down_proj.lora_{m['part']}.weight"] = per[e].contiguous()
            elif m["part"] == "A":  # gate and up share the fused projection's A
                rewritten[f"{base}.gate_proj.lora_A.weight"] = per[e].contiguous()
                rewritten[f"{base}.up_proj.lora_A.weight"] = per[e].clone()
            else:
                rewritten[f"{base}.gate_proj.lora_B.weight"] = per[e][:I].contiguous()
                rewritten[f"{base}.up_proj.lora_B.weight"] = per[e][I:].contiguous()
    config["target_parameters"] = None
    names = config["target_modules"] or []
    assert isinstance(names, list), "a regex target_modules is not rewritten"
    # PEFT's list rule (a name or its last components) as one regex, with the experts added
    config["target_modules"] = r".*\.(mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)" + \
        "".join("|" + re.escape(n) for n in sorted(names)) + ")"
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "adapter_config.json").write_text(json.dumps(config))
    save_file(rewritten, Path(out) / "adapter_model.safetensors", metadata={"format": "pt"})


def random_per_expert_adapter(base: Path, out: Path, seed: int, r: int, alpha: int) -> None:
    """A random adapter of every routed expert's gate_proj / up_proj / down_proj in transformers 4's
    per-expert layout, target_modules ["gate_proj", "up_proj", "down_proj"], as PEFT saved them for
    models with no dense or shared-expert MLP (every layer routed). PEFT on transformers 5 loads it by
    converting it to the fused parameters (peft/utils/transformers_weight_conversion.py): the oracle."""
    cfg = json.loads((Path(base) / "config.json").read_text())
    E, H, I = cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for e in range(E):
            for proj, (k, n) in {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}.items():
                key = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{proj}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, k, generator=gen) / k**0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(n, r, generator=gen) * 0.5
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(tensors, Path(out) / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "bias": "none", "task_type": None,
              "target_modules": ["gate_proj", "up_proj", "down_proj"], "base_model_name_or_path": str(base)}
    (Path(out) / "adapter_config.json").write_text(json.dumps(config))
