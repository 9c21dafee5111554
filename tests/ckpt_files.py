"""Reading and writing checkpoints' safetensors as real ones are laid out (tests' helpers).

`read_tensors(path)` reads every tensor of a checkpoint directory; `write_sharded(path,
tensors, config)` writes them dealt round robin over shards, with the index and
config.json. The quantized-checkpoint tests build their files with these.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def write_sharded(path: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int = 3) -> None:
    """safetensors shards (names dealt round robin) + index + config.json, as real checkpoints."""
    path.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[s::shards]}
        save_file(part, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config, indent=2))


def is_quantized_linear(name: str, tensor: torch.Tensor) -> bool:
    """Linear weights except the embedding, the head and MoE routers (norms are 1-D)."""
    return (name.endswith(".weight") and tensor.dim() == 2 and "embed_tokens" not in name
            and not name.startswith("lm_head") and not name.endswith(".mlp.gate.weight"))
