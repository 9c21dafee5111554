"""Locating a Qwen checkpoint and reading exactly the tensors a stage needs.

A model is a local directory or a Hugging Face hub id. For a hub id, config,
tokenizer files and the shard index are fetched first (huggingface_hub, which
honours HF_HUB_CACHE / HF_HUB_OFFLINE), then only the shards that hold the
tensors a stage asks for.

Tensors are read straight from the safetensors files with plain file reads:
one tensor at a time is read into a host buffer, converted to the target
dtype and moved to the target device, so the whole state dict never exists
in host memory (peak extra host memory is about one tensor). A `TensorPart`
names a contiguous part of a stored tensor (an expert of a fused
[E, 2I, H] tensor, or its gate rows): only that part's bytes are read. Every
header is validated before any data is trusted; every error names the file and
tensor. Knows nothing about model math.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors itself refuses larger headers
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class ModelSource:
    """A model directory, or a hub repository fetched file by file on demand."""

    def __init__(self, model: str | os.PathLike, revision: str | None = None):
        self.name = str(model)
        self.revision = revision
        path = Path(model).expanduser()
        if path.is_dir():
            self.local: Path | None = path
        elif _looks_like_hub_id(self.name):
            self.local = None
        else:
            raise CheckpointError(f"model {self.name!r}: no such directory, and not a hub id (org/name)")

    def get(self, filename: str) -> Path | None:
        """Local path of `filename`, fetching it from the hub if needed; None if the model has no such file."""
        if self.local is not None:
            p = self.local / filename
            return p if p.is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            return Path(hf_hub_download(self.name, filename, revision=self.revision))
        except EntryNotFoundError:
            return None
        except RepositoryNotFoundError as e:
            raise CheckpointError(f"model {self.name!r}: hub repository not found") from e
        except LocalEntryNotFoundError as e:
            if filename in TOKENIZER_FILES or filename in (INDEX_FILE, SINGLE_FILE):
                return None  # optional file absent from an offline cache
            raise CheckpointError(f"model {self.name!r}: {filename} is not in the local cache and the hub is unreachable") from e

    def require(self, filename: str) -> Path:
        p = self.get(filename)
        if p is None:
            raise CheckpointError(f"model {self.name!r}: {filename} not found")
        return p


def _is_plain_filename(name: str) -> bool:
    """A relative path that stays inside the model directory (the index is untrusted input)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_config(source: ModelSource) -> ModelConfig:
    """ModelConfig from config.json and (when present) generation_config.json."""
    path = source.require("config.json")
    cfg = _read_json(path)
    gen_path = source.get("generation_config.json")
    try:
        return ModelConfig.from_dict(cfg, _read_json(gen_path) if gen_path else None)
    except ConfigError as e:  # name the file as well as the field
        raise ConfigError(f"{path}: {e}") from e


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


@dataclass(frozen=True, slots=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


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

    def locate(self, info: TensorInfo) -> tuple[tuple[int, ...], int, int]:
        """(shape, begin, end) of the part in the file; ValueError when it is out of the tensor."""
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
        return rest, info.begin + offset * size, info.begin + (offset + numel) * size


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header (8-byte LE length, JSON, raw data).

    Checks, for every tensor, that its dtype is known, that its byte range
    matches dtype x shape and that it lies inside the file, so a truncated or
    corrupt file fails here, before any tensor data is read.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: corrupt safetensors header (header length {n} for a "
                                      f"{size}-byte file)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            lo, hi = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r} "
                                  f"({str(entry)[:200]})") from e
        dtype = _ST_DTYPES.get(code) if isinstance(code, str) else None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {code!r} "
                                  f"(supported: {', '.join(_ST_DTYPES)})")
        if any(d < 0 for d in shape):
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} has shape "
                                  f"{list(shape)}")
        numel = 1
        for d in shape:
            numel *= d
        if lo < 0 or hi - lo != numel * dtype.itemsize:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} has data_offsets "
                                  f"[{lo}, {hi}] ({hi - lo} bytes), but {code} {list(shape)} needs "
                                  f"{numel * dtype.itemsize} bytes")
        if data_start + hi > size:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {data_start + hi} "
                                  f"but the file has {size} bytes")
        infos[name] = TensorInfo(dtype, shape, data_start + lo, data_start + hi)
    return infos


class CheckpointReader:
    """Reads named tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, source: ModelSource):
        self.source = source
        self._headers: dict[str, tuple[Path, dict[str, TensorInfo]]] = {}  # shard -> (path, header)
        index_path = source.get(INDEX_FILE)
        if index_path is not None:
            weight_map = _read_json(index_path).get("weight_map")
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
        else:
            raise CheckpointError(f"model {source.name!r}: no weights (neither {INDEX_FILE} "
                                  f"nor {SINGLE_FILE})")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

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

    def locate(self, part: str | TensorPart) -> tuple[Path, torch.dtype, tuple[int, ...], int, int]:
        """(file, dtype, shape, begin, end) of a tensor or of a part of one."""
        part = TensorPart(part) if isinstance(part, str) else part
        path, info = self.info(part.name)
        try:
            shape, begin, end = part.locate(info)
        except ValueError as e:
            raise CheckpointError(f"{path}: tensor {part.name!r} has shape {list(info.shape)}: {e}") from None
        return path, info.dtype, shape, begin, end

    def read(self, name: str | TensorPart, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
             shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor (or tensor part) `name` on `device` (cast to `dtype` if given), checked against
        `shape` if given. Reads exactly its bytes."""
        path, stored, got_shape, begin, end = self.locate(name)
        if shape is not None and tuple(shape) != got_shape:
            raise CheckpointError(
                f"{path}: tensor {str(name)!r} has shape {list(got_shape)}, the config expects {list(shape)}"
            )
        buf = torch.empty(end - begin, dtype=torch.uint8)
        try:  # a plain read, not mmap: file pages never count as this process's memory
            with path.open("rb") as f:
                f.seek(begin)
                got = f.readinto(memoryview(buf.numpy())) if buf.numel() else 0
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read tensor {str(name)!r} ({e})") from e
        if got != buf.numel():
            raise CheckpointError(f"{path}: truncated file while reading tensor {str(name)!r} "
                                  f"({got} of {buf.numel()} bytes)")
        t = buf.view(stored).reshape(got_shape)
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
        _, _, _, begin, end = self.locate(name)
        return end - begin
