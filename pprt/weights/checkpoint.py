"""Locating a Qwen checkpoint and reading exactly the tensors a stage needs.

A model is a local directory or a Hugging Face hub id (source.py finds its
files). config.json and generation_config.json become a ModelConfig; the
shard index (or the single model.safetensors) says which file holds which
tensor; every header is validated (header.py) before any data is trusted.

Tensors are read straight from the safetensors files with plain file reads:
one tensor at a time is read into a host buffer, converted to the target
dtype and moved to the target device, so the whole state dict never exists
in host memory (peak extra host memory is about one tensor; no mmap, whose
pages would count as this process's memory). Every error names the file and
tensor. Knows nothing about model math.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..fields import read_json
from .header import MAX_HEADER_BYTES, ST_DTYPES, TensorInfo, read_header  # noqa: F401 (re-exported)
from .source import OPTIONAL_FILES, ModelSource  # noqa: F401 (re-exported)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
# A decoder layer's tensors: text models, and the language model of a multimodal one
# (not mtp.* heads, not vision blocks).
_DECODER_LAYER = re.compile(r"model\.(?:language_model\.)?layers\.([0-9]+)\.")


def _is_plain_filename(name: str) -> bool:
    """A relative path that stays inside the model directory (the index is untrusted input)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def load_config(source: ModelSource) -> ModelConfig:
    """ModelConfig from config.json and (when present) generation_config.json.

    Raises CheckpointError naming the file when one is not strict JSON, and ConfigError naming
    the file and the field when a field is wrong (generation_config.json's defaults included).
    """
    path = source.require("config.json")
    gen_path = source.get("generation_config.json")
    return ModelConfig.from_dict(read_json(path), read_json(gen_path) if gen_path else None,
                                 path=str(path), generation_path=str(gen_path or "generation_config.json"))


def read_tensor(path: Path, name: str, info: TensorInfo) -> torch.Tensor:
    """Tensor `name` of file `path` (its header entry `info`) on the CPU, in its stored dtype.

    A plain read, not mmap: file pages never count as this process's memory.
    """
    buf = torch.empty(info.end - info.begin, dtype=torch.uint8)
    try:
        with path.open("rb") as f:
            f.seek(info.begin)
            got = f.readinto(memoryview(buf.numpy())) if buf.numel() else 0
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from e
    if got != buf.numel():
        raise CheckpointError(f"{path}: truncated file while reading tensor {name!r} "
                              f"({got} of {buf.numel()} bytes)")
    return buf.view(info.dtype).reshape(info.shape)


class CheckpointReader:
    """Reads named tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, source: ModelSource):
        self.source = source
        self._headers: dict[str, tuple[Path, dict[str, TensorInfo]]] = {}  # shard -> (path, header)
        index_path = source.get(INDEX_FILE)
        self.listing = index_path  # the file that lists the tensors (named in errors about the whole list)
        if index_path is not None:
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no weight_map (tensor -> shard file)")
            for name, shard in weight_map.items():
                if not isinstance(shard, str) or not _is_plain_filename(shard):
                    raise CheckpointError(f"{index_path}: tensor {name!r} maps to {shard!r}, not a file name "
                                          "inside the model directory")
            self.weight_map: dict[str, str] = weight_map
        elif (single := source.get(SINGLE_FILE)) is not None:
            header = read_header(single)
            if not header:
                raise CheckpointError(f"{single}: holds no tensors")
            self._headers[SINGLE_FILE] = (single, header)
            self.weight_map = dict.fromkeys(header, SINGLE_FILE)
            self.listing = single
        else:
            raise CheckpointError(f"model {source.name!r}: no weights (neither {INDEX_FILE} "
                                  f"nor {SINGLE_FILE})")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def layer_beyond(self, num_layers: int) -> str | None:
        """A tensor of a decoder layer numbered num_layers or higher (model.layers.N or
        model.language_model.layers.N; not mtp.* or vision blocks), or None."""
        for name in self.weight_map:
            m = _DECODER_LAYER.match(name)
            if m and (len(m.group(1)) > 9 or int(m.group(1)) >= num_layers):
                return name
        return None

    def shards_for(self, names: list[str]) -> list[str]:
        """The shard files holding `names`, in first-use order."""
        return list(dict.fromkeys(self.weight_map[n] for n in names if n in self.weight_map))

    def info(self, name: str) -> tuple[Path, TensorInfo]:
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"model {self.source.name!r}: tensor {name!r} is not in the checkpoint "
                                  "index")
        if shard not in self._headers:
            try:
                path = self.source.get(shard)
            except CheckpointError as e:
                raise CheckpointError(f"{e} (shard file {shard} holds tensor {name!r})") from e
            if path is None:
                raise CheckpointError(f"model {self.source.name!r}: shard file {shard} (holding {name!r}) "
                                      "is missing")
            self._headers[shard] = (path, read_header(path))
        path, header = self._headers[shard]
        if name not in header:
            raise CheckpointError(f"{path}: tensor {name!r} is listed in the index but absent from the shard")
        return path, header[name]

    def read(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
             shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor `name` on `device` (cast to `dtype` if given), checked against `shape` if given."""
        path, info = self.info(name)
        if shape is not None and tuple(shape) != info.shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(info.shape)}, the config expects {list(shape)}"
            )
        t = read_tensor(path, name, info)
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype  # ints stay ints
        return t.to(device=device, dtype=target)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (its first dimension), on the CPU in the stored dtype."""
        path, info = self.info(name)
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise ValueError(f"{path}: rows [{start}, {stop}) are not within tensor {name!r} of shape "
                             f"{list(info.shape)}")
        row_bytes = (info.end - info.begin) // info.shape[0]
        buf = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        try:
            with path.open("rb") as f:
                f.seek(info.begin + start * row_bytes)
                got = f.readinto(memoryview(buf.numpy())) if buf.numel() else 0
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from e
        if got != buf.numel():
            raise CheckpointError(f"{path}: truncated file while reading tensor {name!r}")
        return buf.view(info.dtype).reshape(stop - start, *info.shape[1:])

    def nbytes(self, name: str) -> int:
        _, info = self.info(name)
        return info.end - info.begin
