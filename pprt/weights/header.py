"""The safetensors header: parsed and validated as strictly as the `safetensors` library.

A safetensors file is an 8-byte little-endian header length n, n bytes of
UTF-8 JSON, then the tensors' bytes. The rules below are those of the
library's Rust reader (safetensors/src/tensor.rs: `read_metadata` and
`Metadata::validate`, checked against safetensors 0.8 by tests/test_header_fuzz.py):

- n <= 100,000,000 and 8 + n <= file size; the header is UTF-8 JSON as
  serde_json reads it (pprt.fields.parse_json), an object;
- `__metadata__` is absent, null, or an object of string values;
- every other key is a tensor: {"dtype": a known name, "shape": [unsigned
  integers], "data_offsets": [begin, end]} (further fields are ignored);
- sorted by offsets, the tensors tile the data exactly: the first begins at
  0, each begins where the previous ends (no gap, no overlap, no alias), and
  end - begin = numel x itemsize (no overflow);
- the last tensor ends at the end of the file (nothing after it, nothing cut).

pprt is stricter in three places, each a file the library reads in a way
a user would not expect: a tensor name (or any key) given twice (the library
keeps the last silently), a tensor entry written as a list rather than an
object, and dtypes pprt does not read (complex, unsigned 16-64 bit, sub-byte
and exponent-only float formats).

Knows nothing about which tensor a model needs: see checkpoint.py and loader.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..fields import parse_json

MAX_HEADER_BYTES = 100_000_000  # the library's MAX_HEADER_SIZE
_USIZE = 2**64  # the library's offsets and sizes are u64 (usize on 64-bit hosts)

# The dtypes pprt reads, by their safetensors name.
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate the header of safetensors file `path`; reads only the header bytes.

    Returns tensor name -> TensorInfo (absolute byte range). Raises CheckpointError naming the
    file (and the tensor, where one is at fault) for anything the safetensors library would
    refuse, and for the stricter cases of the module docstring.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(f"{path}: corrupt safetensors header (header length {n} for a "
                                      f"{size}-byte file; at most {MAX_HEADER_BYTES} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    try:
        header = parse_json(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    _check_metadata(path, header.get("__metadata__"))
    entries = {name: _entry(path, name, e) for name, e in header.items() if name != "__metadata__"}
    data_start = 8 + n
    end = _check_tiling(path, entries)
    if data_start + end != size:
        last = max(entries, key=lambda k: entries[k][2][1]) if entries else None
        what = f"tensor {last!r} ends at byte {data_start + end}" if last else f"the header ends at byte {data_start}"
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated file: {what} but the file has {size} bytes")
        raise CheckpointError(f"{path}: corrupt safetensors file: {what} but the file has {size} bytes "
                              "(bytes no tensor covers)")
    return {name: TensorInfo(dtype, shape, data_start + lo, data_start + hi)
            for name, (dtype, shape, (lo, hi)) in entries.items()}


def _check_metadata(path: Path, meta: object) -> None:
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings, "
                              f"got {str(meta)[:200]})")


def _is_usize(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _USIZE


def _entry(path: Path, name: str, entry: object) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, (begin, end) relative to the data) of one header entry, its types checked."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {why} "
                               f"({str(entry)[:200]})")

    if not isinstance(entry, dict):
        raise corrupt("not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise corrupt(f"no {', '.join(missing)}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(_is_usize(d) for d in shape)):
        raise corrupt("shape must be a list of unsigned integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_usize(o) for o in offsets)):
        raise corrupt("data_offsets must be two unsigned integers")
    dtype = ST_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {code!r} "
                              f"(supported: {', '.join(ST_DTYPES)})")
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _check_tiling(path: Path, entries: dict) -> int:
    """Sorted by offsets, the tensors must cover [0, end) exactly; returns end."""
    expected = 0
    previous = None
    for name, (dtype, shape, (lo, hi)) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        if lo != expected or hi < lo:
            if hi < lo:
                why = "ends before it begins"
            elif previous is None:
                why = f"is the first tensor of the data but begins at byte {lo}, not 0"
            elif lo < expected:
                why = f"overlaps tensor {previous!r} (which ends at {expected})"
            else:
                why = f"leaves a gap of {lo - expected} bytes after tensor {previous!r} (which ends at {expected})"
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} has data_offsets "
                                  f"[{lo}, {hi}], which {why}")
        numel = 1
        for d in shape:  # the library's checked product: an overflow at any step is refused
            numel *= d
            if numel >= _USIZE:
                break
        nbytes = numel * dtype.itemsize
        if numel >= _USIZE or nbytes * 8 >= _USIZE:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} has shape "
                                  f"{list(shape)}, whose size overflows 64 bits")
        if hi - lo != nbytes:
            code = next(k for k, v in ST_DTYPES.items() if v == dtype)
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} has data_offsets "
                                  f"[{lo}, {hi}] ({hi - lo} bytes), but {code} {list(shape)} needs {nbytes} bytes")
        expected, previous = hi, name
    return expected
