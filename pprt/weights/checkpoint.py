"""Locating a Qwen checkpoint and reading exactly the tensors a stage needs.

A model is a local directory or a Hugging Face hub id (source.py finds its
files). config.json and generation_config.json become a ModelConfig; the
shard index (or the single model.safetensors) says which file holds which
tensor; every header is validated (header.py) before any data is trusted.

Tensors are read straight from the safetensors files with plain file reads:
one tensor at a time is read into a host buffer, converted to the target
dtype and moved to the target device, so the whole state dict never exists
in host memory (peak extra host memory is about one tensor; no mmap, whose
pages would count as this process's memory). A `TensorPart` names a contiguous
part of a stored tensor (an expert of a fused [E, 2I, H] tensor, or its gate
rows): only that part's bytes are read. Every error names the file and tensor.
Knows nothing about model math.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class TensorPart:
    """Stored tensor `name`, or its contiguous part `t[index][rows[0]:rows[1]]`.

    index: leading indices (e.g. the expert); rows: then a range of the next axis (None: all).
    Every later axis is whole, so the part is one contiguous byte range of the file.
    """

    name: str
    index: tuple[int, ...] = ()
    rows: tuple[int, int] | None = None

    def __str__(self) -> str:
        if not self.index and self.rows is None:
            return self.name
        parts = [str(i) for i in self.index] + ([f"{self.rows[0]}:{self.rows[1]}"] if self.rows else [])
        return f"{self.name}[{', '.join(parts)}]"

    def locate(self, info: TensorInfo) -> TensorInfo:
        """The part's own entry (dtype, shape, byte range in the file); ValueError when it is out of
        the tensor."""
        shape, k = info.shape, len(self.index)
        if k + (self.rows is not None) > len(shape) or any(not 0 <= i < d for i, d in zip(self.index, shape)):
            raise ValueError(f"{self} is out of range for shape {list(shape)}")
        strides = [1] * len(shape)
        for axis in range(len(shape) - 2, -1, -1):
            strides[axis] = strides[axis + 1] * shape[axis + 1]
        offset = sum(i * st for i, st in zip(self.index, strides))
        rest = shape[k:]
        if self.rows is not None:
            lo, hi = self.rows
            if not 0 <= lo < hi <= shape[k]:
                raise ValueError(f"{self} is out of range for shape {list(shape)}")
            offset += lo * strides[k]
            rest = (hi - lo,) + shape[k + 1:]
        numel = 1
        for d in rest:
            numel *= d
        size = info.dtype.itemsize
        return TensorInfo(info.dtype, rest, info.begin + offset * size, info.begin + (offset + numel) * size)


class CheckpointReader:
    """Reads named tensors (or parts of them) of a (possibly sharded) safetensors checkpoint."""

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

    def locate(self, part: str | TensorPart) -> tuple[Path, TensorInfo]:
        """The file and the entry (dtype, shape, byte range) of a tensor or of a part of one."""
        part = TensorPart(part) if isinstance(part, str) else part
        path, info = self.info(part.name)
        try:
            return path, part.locate(info)
        except ValueError as e:
            raise CheckpointError(f"{path}: tensor {part.name!r} has shape {list(info.shape)}: {e}") from None

    def read(self, name: str | TensorPart, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
             shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor (or tensor part) `name` on `device` (cast to `dtype` if given), checked against
        `shape` if given. Reads exactly its bytes."""
        path, info = self.locate(name)
        if shape is not None and tuple(shape) != info.shape:
            raise CheckpointError(
                f"{path}: tensor {str(name)!r} has shape {list(info.shape)}, the config expects {list(shape)}"
            )
        t = read_tensor(path, str(name), info)
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

    def nbytes(self, name: str | TensorPart) -> int:
        _, info = self.locate(name)
        return info.end - info.begin
