"""safetensors headers: pprt refuses every file the `safetensors` library refuses, and reads the
library's bytes from every file it accepts.

1. The cases the fuzzing of round 1 found (overlapping and aliased offsets, gaps, a duplicate
   key, a header length reaching into the padding or the data, bytes after the last tensor,
   malformed JSON: 1e999, 5,000-digit integers, deep nesting, NaN, lone surrogates), each
   named; the library's verdict is checked beside pprt's.
2. Hypothesis mutates the header of a small file (offsets, dtypes, shapes, keys, fields,
   JSON tokens, the length prefix, padding, the data length). Every outcome is either a
   clean read whose every tensor has exactly the library's bytes, or a CheckpointError that
   names the file; pprt refuses where the library reads only for the stricter rules
   pprt.weights.header documents (a key twice, a list as an entry, a dtype pprt does not read).
3. The same over a whole tiny model through load_stage: a clean load equals the library's
   tensors, else a CheckpointError naming the file (an integer dtype for a float weight is
   refused there, by role).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from models import make_checkpoint
from pprt.errors import CheckpointError
from pprt.models.stage import Stage
from pprt.weights.checkpoint import SINGLE_FILE, CheckpointReader, ModelSource, load_config, read_tensor
from pprt.weights.header import read_header
from pprt.weights.loader import load_stage

# The refusals of pprt that the library does not share (pprt.weights.header's docstring).
STRICTER = ("appears twice", "unsupported dtype", "not an object")
LIBRARY_DTYPES = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                  "F64", "I64", "U64", "C64", "F4", "F6_E2M3", "F6_E3M2", "F8_E8M0"]
# PPRT_FUZZ_EXAMPLES=5000 for a longer run than CI's (the default keeps each test under ~10 s)
EXAMPLES = int(os.environ.get("PPRT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Raw(str):
    """JSON text inserted as it is (tokens Python's json.dumps would not write)."""


def render(v) -> str:
    if isinstance(v, Raw):
        return v
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{render(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list) and not isinstance(v, Raw):
        return "[" + ",".join(render(x) for x in v) + "]"
    return json.dumps(v)


class File:
    """A safetensors file as editable parts: the length prefix, (key, entry) pairs (duplicates
    allowed), header padding, and the data bytes."""

    def __init__(self, raw: bytes):
        (n,) = struct.unpack("<Q", raw[:8])
        self.pairs = list(json.loads(raw[8:8 + n], object_pairs_hook=lambda p: p))
        self.pairs = [(k, dict(v) if isinstance(v, list) else v) for k, v in self.pairs]
        self.len_delta = 0
        self.pad = b""
        self.data = raw[8 + n:]
        self.top: str | None = None  # a whole header replaced by this text

    def bytes(self) -> bytes:
        text = self.top if self.top is not None else "{" + ",".join(f"{json.dumps(k)}:{render(v)}"
                                                               for k, v in self.pairs) + "}"
        header = text.encode("utf-8", "surrogatepass") + self.pad
        n = max(0, len(header) + self.len_delta)
        return struct.pack("<Q", n) + header + self.data

    def tensors(self) -> list[int]:
        return [i for i, (k, v) in enumerate(self.pairs) if k != "__metadata__" and isinstance(v, dict)]


DEEP = {d: Raw("[" * d + "]" * d) for d in (100, 125, 126, 2000)}
ODD_VALUES = [Raw("1e999"), Raw("-1e999"), Raw("9" * 5000), Raw("NaN"), Raw("Infinity"), Raw('"\\ud800"'),
              Raw('"\\ud83d\\ude00"'), Raw('{"k":1,"k":2}'), Raw("-0"), Raw("1.5"), Raw("1e308"), True, None,
              "x", *DEEP.values()]
ODD_INTS = [-1, 2**64 - 1, 2**64, Raw("-0"), Raw("2.0"), Raw("2e0"), True, "2", None, Raw("9" * 5000),
            Raw("1e999")]


def offsets_of(entry: dict) -> list:
    """An entry's data_offsets as a list of at least two items (earlier edits may have broken it)."""
    o = entry.get("data_offsets")
    o = list(o) if isinstance(o, list) else []
    return o + [0] * (2 - len(o))


def mutate(f: File, data: st.DataObject) -> None:
    """One random edit of `f` (see the module docstring)."""
    idx = f.tensors()
    op = data.draw(st.sampled_from(["offset", "swap", "alias", "dtype", "shape", "dup", "drop", "extra",
                                    "metadata", "length", "pad", "data", "list_entry", "top", "arity"]))
    if idx:
        i = data.draw(st.sampled_from(idx))
        j = data.draw(st.sampled_from(idx))
        name, entry = f.pairs[i]
    if op == "offset" and idx:
        bounds = sorted({o for k in idx for o in offsets_of(f.pairs[k][1]) if type(o) is int})
        base = data.draw(st.sampled_from(bounds or [0]))
        value = data.draw(st.one_of(st.integers(-8, 8).map(lambda d: max(0, base + d)), st.sampled_from(ODD_INTS)))
        offsets = offsets_of(entry)
        offsets[data.draw(st.integers(0, 1))] = value
        entry["data_offsets"] = offsets
    elif op == "swap" and idx:
        entry["data_offsets"], f.pairs[j][1]["data_offsets"] = f.pairs[j][1].get("data_offsets"), \
            entry.get("data_offsets")
    elif op == "alias" and idx:
        entry["data_offsets"] = offsets_of(f.pairs[j][1])
    elif op == "dtype" and idx:
        entry["dtype"] = data.draw(st.sampled_from(LIBRARY_DTYPES + ["f32", "", 4, None, "C128"]))
    elif op == "shape" and idx:
        shape = list(entry["shape"]) if isinstance(entry.get("shape"), list) else []
        edit = data.draw(st.sampled_from(["append", "pop", "set", "odd"]))
        if edit == "append":
            shape.append(data.draw(st.integers(0, 3)))
        elif edit == "pop" and shape:
            shape.pop()
        elif edit == "set" and shape:
            shape[data.draw(st.integers(0, len(shape) - 1))] = data.draw(st.integers(0, 8))
        elif edit == "odd":
            shape.append(data.draw(st.sampled_from(ODD_INTS)))
        entry["shape"] = shape
    elif op == "dup" and idx and i != j:
        f.pairs[i] = (f.pairs[j][0], entry)
    elif op == "drop" and idx:
        entry.pop(data.draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
    elif op == "extra" and idx:
        entry["x"] = data.draw(st.sampled_from(ODD_VALUES))
    elif op == "metadata":
        value = data.draw(st.sampled_from([None, {}, {"format": "pt"}, {"a": 1}, [], "x", {"a": Raw('"\\ud800"')},
                                           {"a": DEEP[100]}]))
        f.pairs = [(k, v) for k, v in f.pairs if k != "__metadata__"] + [("__metadata__", value)]
    elif op == "length":
        f.len_delta = data.draw(st.integers(-16, 16))
    elif op == "pad":
        f.pad += data.draw(st.sampled_from([b" ", b"    ", b"\n", b"\0", b"x", b"\xff", b"}"]))
    elif op == "data":
        k = data.draw(st.integers(1, 16))
        f.data = f.data + bytes(k) if data.draw(st.booleans()) else f.data[:-k]
    elif op == "list_entry" and idx:
        f.pairs[i] = (name, [entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")])
    elif op == "top":
        f.top = data.draw(st.sampled_from(["[]", "5", '"x"', "null", "{", "", DEEP[2000], "[" * 100000]))
    elif op == "arity" and idx:
        offsets = offsets_of(entry)
        entry["data_offsets"] = offsets[:1] if data.draw(st.booleans()) else offsets + [offsets[-1]]


def library_view(path: Path) -> dict[str, bytes] | None:
    """name -> raw bytes as the safetensors library reads them, or None when it refuses the file."""
    try:
        with safe_open(path, "pt") as f:
            return {k: raw_bytes(f.get_tensor(k)) for k in f.keys()}
    except Exception:  # SafetensorError, or a dtype torch cannot hold
        return None


def raw_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def check_against_library(path: Path) -> str:
    """Read `path` with pprt and with the library; assert the fuzz property. Returns the outcome."""
    lib = library_view(path)
    try:
        infos = read_header(path)
        reader_map = {name: read_tensor(path, name, info) for name, info in infos.items()}
    except CheckpointError as e:
        assert str(path) in str(e), f"error does not name the file: {e}"
        if lib is not None:
            assert any(w in str(e) for w in STRICTER), f"pprt refuses a file the library reads: {e}"
        return "refused"
    assert lib is not None, f"pprt read a file the safetensors library refuses: {sorted(infos)}"
    assert sorted(reader_map) == sorted(lib)
    for name, t in reader_map.items():
        assert raw_bytes(t) == lib[name], name
    return "read"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> bytes:
    """A file with every dtype pprt reads, a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(2, 3, generator=g), "b.half": torch.randn(4, generator=g).half(),
        "c.bf16": torch.randn(3, generator=g).bfloat16(), "d.i32": torch.arange(2, dtype=torch.int32),
        "e.i64": torch.tensor([7]), "f.u8": torch.arange(5, dtype=torch.uint8),
        "g.bool": torch.tensor([True, False, True]), "h.scalar": torch.tensor(3.5), "i.empty": torch.zeros(0),
        "j.f64": torch.tensor([1.25], dtype=torch.float64),
        "k.f8": torch.tensor([0.5, 1.0, -2.0, 4.0]).to(torch.float8_e4m3fn),
    }
    path = tmp_path_factory.mktemp("small") / "small.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path.read_bytes()


# ---- 1. named cases --------------------------------------------------------------------------


def _edit(field, value, name="a.weight"):
    def apply(f: File):
        dict(f.pairs)[name][field] = value
    return apply


def _offsets_of(src):
    def apply(f: File):
        entries = dict(f.pairs)
        entries["a.weight"]["data_offsets"] = list(entries[src]["data_offsets"])
    return apply


def _shift(delta):
    def apply(f: File):
        f.len_delta = delta
    return apply


def _gap_before_last(f: File):
    """The last tensor moves 8 bytes on, the file grows by 8: a gap inside the data."""
    last = max((v for k, v in f.pairs if k != "__metadata__"), key=lambda v: v["data_offsets"][1])
    last["data_offsets"] = [o + 8 for o in last["data_offsets"]]
    f.data = f.data + bytes(8)


def _dup(f: File):
    f.pairs.append(("a.weight", dict(dict(f.pairs)["a.weight"])))


def _extra(value):
    def apply(f: File):
        dict(f.pairs)["a.weight"]["x"] = value
    return apply


CASES = {  # name: (edit, words pprt's message holds, does the library read it?)
    "overlap": (lambda f: dict(f.pairs)["a.weight"]["data_offsets"].__setitem__(0, 4), "data_offsets", False),
    "alias": (_offsets_of("d.i32"), "data_offsets", False),
    "gap": (_gap_before_last, "leaves a gap of 8 bytes after tensor", False),
    "trailing-bytes": (lambda f: f.__setattr__("data", f.data + bytes(8)), "bytes no tensor covers", False),
    "duplicate-key": (_dup, "appears twice", True),
    "length-into-padding": (_shift(2), "corrupt safetensors", False),
    "length-short": (_shift(-2), "corrupt safetensors header", False),
    "offsets-one-short": (lambda f: dict(f.pairs)["a.weight"]["data_offsets"].__setitem__(1, 20), "data_offsets",
                          False),
    "float-shape": (_edit("shape", [Raw("2.0"), 3]), "shape must be a list of unsigned integers", False),
    "1e999": (_extra(Raw("1e999")), "out of range", False),
    "5000-digit-int": (_extra(Raw("9" * 5000)), "out of range", False),
    "deep-nesting": (_extra(DEEP[2000]), "nested deeper", False),
    "nan": (_extra(Raw("NaN")), "NaN is not JSON", False),
    "lone-surrogate": (_extra(Raw('"\\udc00"')), "surrogate", False),
    "metadata-not-strings": (lambda f: f.pairs.append(("__metadata__", {"n": 1})), "__metadata__", False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_named_header_cases(small, tmp_path, case):
    edit, words, library_reads = CASES[case]
    f = File(small)
    edit(f)
    path = tmp_path / "t.safetensors"
    path.write_bytes(f.bytes())
    assert (library_view(path) is not None) == library_reads
    with pytest.raises(CheckpointError) as err:
        read_header(path)
    assert str(path) in str(err.value) and words in str(err.value), str(err.value)


def test_deep_nesting_past_the_recursion_limit_is_a_checkpoint_error(small, tmp_path):
    f = File(small)
    f.top = "[" * 200000 + "]" * 200000
    path = tmp_path / "t.safetensors"
    path.write_bytes(f.bytes())
    with pytest.raises(CheckpointError, match="nested deeper"):
        read_header(path)


def test_unmodified_file_reads_the_library_bytes(small, tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(File(small).bytes())
    assert check_against_library(path) == "read"


# ---- 2. fuzz over header mutations ------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_header_fuzz_agrees_with_the_library(small, tmp_path_factory, data):
    f = File(small)
    for _ in range(data.draw(st.integers(1, 3))):
        mutate(f, data)
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(f.bytes())
    check_against_library(path)


# ---- 3. fuzz through the loader ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_single(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "m", "qwen2", seed=5, max_shard_size="1GB",
                           tokenizer=False, num_hidden_layers=2)


@settings(max_examples=EXAMPLES // 5, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_loader_fuzz_loads_the_library_tensors_or_names_the_file(tiny_single, tmp_path_factory, data):
    work = tmp_path_factory.getbasetemp() / "loader-fuzz"
    if not work.exists():
        shutil.copytree(tiny_single, work)
    original = (tiny_single / SINGLE_FILE).read_bytes()
    f = File(original)
    for _ in range(data.draw(st.integers(1, 2))):
        mutate(f, data)
    path = work / SINGLE_FILE
    path.write_bytes(f.bytes())
    source = ModelSource(work)
    stage = Stage(load_config(source))
    try:
        load_stage(stage, CheckpointReader(source), torch.device("cpu"), torch.float32, progress=False)
    except CheckpointError as e:
        assert str(path) in str(e), f"error does not name the file: {e}"
        assert all(p.device.type == "meta" for p in stage.parameters())  # nothing half-loaded
        return
    from pprt.weights.merge import named_weights

    with safe_open(path, "pt") as lib:  # it loaded: the library must read the same file, same values
        for name, p in named_weights(stage).items():  # q/k/v and gate/up joined: under their own names
            torch.testing.assert_close(p, lib.get_tensor(stage.checkpoint_name(name)).float(), rtol=0, atol=0)
