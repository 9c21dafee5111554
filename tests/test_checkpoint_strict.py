"""Checkpoint files that are wrong in ways pprt used to let through.

- Malformed JSON (1e999, a 5,000-digit integer, nesting 200,000 deep, NaN, a key twice) in
  every JSON file pprt reads is a CheckpointError naming that file, never an
  OverflowError, RecursionError or plain ValueError.
- Each tensor's dtype is checked by its role before any data is read: an integer dtype
  for a float weight is refused naming the file and tensor (the bytes of an I32 tensor
  fit an F32 header exactly, so the library reads such a file), so is a float `qweight`;
  a module a GPTQ file leaves in float loads as float.
- A checkpoint with more decoder layers than num_hidden_layers is refused (the extra
  layers used to be dropped silently); mtp.* and vision blocks do not count.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from int4_packers import gptq_quantize
from models import make_checkpoint
from pprt import LLM, SamplingParams
from pprt.errors import CheckpointError, ConfigError
from pprt.models.stage import Stage
from pprt.weights.checkpoint import INDEX_FILE, CheckpointReader, ModelSource, load_config
from pprt.weights.int4 import Int4Linear
from pprt.weights.loader import load_stage
from pprt.weights.merge import linear_modules

CPU = torch.device("cpu")
PROBE = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", "qwen2", seed=3)


@pytest.fixture()
def model(sharded, tmp_path) -> Path:
    return Path(shutil.copytree(sharded, tmp_path / "model"))


def weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / INDEX_FILE).read_text())["weight_map"]


def construct(path: Path, error=CheckpointError) -> str:
    llm = None
    with pytest.raises(error) as err:
        llm = LLM(str(path), devices=["cpu"])
    assert llm is None
    return str(err.value)


def rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


# ---- malformed JSON in every file ------------------------------------------------------------

BAD_JSON = {  # a value spliced into an otherwise valid file
    "1e999": "1e999",
    "5000-digit-integer": "9" * 5000,
    "deep-nesting": "[" * 200_000 + "]" * 200_000,
    "NaN": "NaN",
}


def splice(path: Path, value: str) -> None:
    """Insert `"pprt_probe": <value>` as the first key of the JSON object in `path`."""
    text = path.read_text()
    start = text.index("{")
    path.write_text(text[:start + 1] + f'"pprt_probe": {value}, ' + text[start + 1:])


@pytest.mark.parametrize("bad", sorted(BAD_JSON))
@pytest.mark.parametrize("file", ["config.json", "generation_config.json", INDEX_FILE, "tokenizer_config.json"])
def test_malformed_json_names_the_file(model, file, bad):
    if not (model / file).exists():
        (model / file).write_text("{}")
    splice(model / file, BAD_JSON[bad])
    msg = construct(model)
    assert str(model / file) in msg and "not valid JSON" in msg, msg


def test_duplicate_key_in_config_is_refused(model):
    text = (model / "config.json").read_text()
    (model / "config.json").write_text(text.replace("{", '{"tie_word_embeddings": true,', 1))
    msg = construct(model)
    assert str(model / "config.json") in msg and "'tie_word_embeddings' appears twice" in msg


def test_malformed_shard_header_names_the_shard(model):
    shard = model / weight_map(model)[PROBE]
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].decode().rstrip()
    probe = header[:-1] + ',"x":' + "9" * 5000 + "}"
    raw = struct.pack("<Q", len(probe)) + probe.encode() + raw[8 + n:]
    shard.write_bytes(raw)
    msg = construct(model)
    assert str(shard) in msg and "out of range" in msg


# ---- dtype by role ---------------------------------------------------------------------------


def test_integer_dtype_for_a_float_weight_is_refused(model):
    shard = model / weight_map(model)[PROBE]
    rewrite_header(shard, lambda h: h[PROBE].update(dtype="I32"))  # same bytes: the library reads it
    with safe_open(shard, "pt") as f:
        assert f.get_tensor(PROBE).dtype == torch.int32
    msg = construct(model)
    assert str(shard) in msg and f"'{PROBE}' is stored as I32" in msg and "float parameter" in msg


def test_float8_e5m2_weight_is_refused_by_role(model):
    """FP8 files hold float8_e4m3fn weights with their scales; an e5m2 weight is no format pprt reads."""
    with safe_open(model / weight_map(model)[PROBE], "pt") as f:
        weight = f.get_tensor(PROBE)
    save_file({PROBE: weight.to(torch.float8_e5m2)}, model / "fp8.safetensors")  # right shape, no scales
    index = json.loads((model / INDEX_FILE).read_text())
    index["weight_map"][PROBE] = "fp8.safetensors"
    (model / INDEX_FILE).write_text(json.dumps(index))
    msg = construct(model)
    assert str(model / "fp8.safetensors") in msg and f"'{PROBE}' is stored as F8_E5M2" in msg
    assert "float parameter it must be F16 or BF16 or F32 or F64" in msg


@pytest.fixture(scope="module")
def gptq(tmp_path_factory) -> Path:
    """A GPTQ (g32, sym) file of a qwen2 (H 64) that leaves layer 0's q_proj, and the head, in float."""
    src = make_checkpoint(tmp_path_factory.mktemp("f") / "m", "qwen2", seed=4, tokenizer=False)
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    out = {}
    for name, t in tensors.items():
        quantize = name.endswith("_proj.weight") and name != "model.layers.0.self_attn.q_proj.weight"
        if not quantize:
            out[name] = t.half()
            continue
        stored, _ = gptq_quantize(t, 32, sym=True)
        out.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in stored.items()})
    path = tmp_path_factory.mktemp("gptq") / "m"
    path.mkdir()
    save_file(out, path / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config.update(torch_dtype="float16", quantization_config=dict(quant_method="gptq", bits=4, group_size=32,
                                                                   sym=True, desc_act=False))
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_module_a_quantized_file_leaves_in_float_loads_as_float(gptq):
    source = ModelSource(gptq)
    stage = Stage(load_config(source))
    load_stage(stage, CheckpointReader(source), CPU, torch.float32, progress=False)
    kinds = linear_modules(stage)  # merged and stacked ones under their own names
    floats = sorted(p for p, m in kinds.items() if isinstance(m, nn.Linear))
    assert floats == ["lm_head", "model.layers.0.self_attn.q_proj"]
    assert sum(isinstance(m, Int4Linear) for m in kinds.values()) == len(kinds) - 2
    with safe_open(gptq / "model.safetensors", "pt") as f:
        torch.testing.assert_close(kinds["model.layers.0.self_attn.q_proj"].weight,
                                   f.get_tensor("model.layers.0.self_attn.q_proj.weight").float(), rtol=0, atol=0)


@pytest.mark.parametrize("tensor, dtype, words", [
    ("model.layers.1.mlp.up_proj.qweight", "F32", "is stored as F32, but as the qweight of a gptq layer it must be I32"),
    ("model.layers.1.mlp.up_proj.scales", "I16", "is stored as I16, but as the scales of a gptq layer"),
    ("model.layers.0.self_attn.q_proj.weight", "I16", "is stored as I16, but as a float parameter"),
], ids=["float-qweight", "int-scales", "int-float-module"])
def test_quantized_file_tensors_are_checked_by_role(gptq, tmp_path, tensor, dtype, words):
    path = Path(shutil.copytree(gptq, tmp_path / "m"))
    rewrite_header(path / "model.safetensors", lambda h: h[tensor].update(dtype=dtype))
    source = ModelSource(path)
    stage = Stage(load_config(source))
    reads = []
    reader = CheckpointReader(source)
    real = reader.read
    reader.read = lambda *a, **k: reads.append(a[0]) or real(*a, **k)
    with pytest.raises(CheckpointError) as err:
        load_stage(stage, reader, CPU, torch.float32, progress=False)
    assert str(path / "model.safetensors") in str(err.value) and f"'{tensor}'" in str(err.value)
    assert words in str(err.value)
    assert reads == []  # refused before any data was read


# ---- decoder layer count ---------------------------------------------------------------------


def add_tensors(model: Path, names: list[str]) -> None:
    """Add small tensors to the checkpoint in a new shard listed in the index."""
    shard = "model-extra.safetensors"
    save_file({n: torch.zeros(4) for n in names}, model / shard)
    index = json.loads((model / INDEX_FILE).read_text())
    index["weight_map"].update(dict.fromkeys(names, shard))
    (model / INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize("prefix", ["model.layers.3.", "model.language_model.layers.7."])
def test_more_decoder_layers_than_the_config_is_refused(model, prefix):
    add_tensors(model, [prefix + "input_layernorm.weight"])
    msg = construct(model)
    assert str(model / INDEX_FILE) in msg and f"'{prefix}input_layernorm.weight'" in msg
    assert "num_hidden_layers" in msg and "3" in msg


def test_mtp_and_vision_blocks_are_not_decoder_layers(model, sharded):
    add_tensors(model, ["mtp.layers.0.input_layernorm.weight", "model.visual.blocks.5.norm1.weight",
                        "visual.blocks.9.norm.weight"])
    with LLM(str(model), devices=["cpu"]) as a, LLM(str(sharded), devices=["cpu"]) as b:
        greedy = SamplingParams(max_tokens=8, temperature=0)
        assert a.generate([[5, 6, 7]], greedy)[0].token_ids == b.generate([[5, 6, 7]], greedy)[0].token_ids


def test_generation_config_default_out_of_range_is_refused_at_load(model):
    (model / "generation_config.json").write_text(json.dumps({"temperature": "0.7", "eos_token_id": 2}))
    msg = construct(model, ConfigError)
    assert str(model / "generation_config.json") in msg and "temperature" in msg and "'0.7'" in msg
