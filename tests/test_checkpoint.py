"""Checkpoint streaming (pprt.checkpoint, pprt.loader) on CPU.

Tiny qwen2 checkpoints written by transformers, broken on purpose: every load
error names its file and/or tensor and leaves nothing half-loaded. Single-file
and sharded checkpoints generate the same tokens; a stage opens only the
shards holding its tensors; a hub id resolves through a local stand-in for the
hub cache (offline); peak RSS while loading grows by the weights kept, not by
a second copy.
"""

import dataclasses
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pprt import LLM, SamplingParams
from pprt.weights.checkpoint import (INDEX_FILE, SINGLE_FILE, CheckpointError, CheckpointReader, ModelSource,
                             load_config)
from pprt.config import ConfigError
from pprt.weights.loader import load_stage
from pprt.models.stage import Stage

from models import make_checkpoint

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 17, 260, 42, 9, 101, 77], [300, 3, 3, 18]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROBE = "model.layers.1.mlp.down_proj.weight"  # the tensor the error tests break


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """qwen2, 3 layers, ~10 shards of <= 60 KB."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "sharded", "qwen2", seed=3)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The same weights (same seed) as one model.safetensors."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "single", "qwen2", seed=3, max_shard_size="1GB")


@pytest.fixture()
def broken(sharded, tmp_path) -> Path:
    """A private copy of `sharded` to break."""
    return Path(shutil.copytree(sharded, tmp_path / "model"))


def weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / INDEX_FILE).read_text())["weight_map"]


def generate(model: str) -> list[list[int]]:
    with LLM(model, devices=["cpu"]) as llm:
        return [c.token_ids for c in llm.generate(PROMPTS, GREEDY)]


def stage_tensors(stage: Stage) -> list[str]:
    return [stage.checkpoint_name(n) for n, _ in stage.named_parameters()]


def load_error(path: Path) -> str:
    """Construct an LLM on `path`; it must raise CheckpointError. Returns the message."""
    llm = None
    with pytest.raises(CheckpointError) as err:
        llm = LLM(str(path), devices=["cpu"])
    assert llm is None  # nothing escapes a failed construction
    return str(err.value)


def named_tensors(msg: str) -> list[str]:
    return re.findall(r"'((?:model|lm_head)\.[\w.]+)'", msg)


def rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file with edit(header) applied; the data bytes stay as they were."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


# ---- errors: each names the file and/or tensor ---------------------------------------------


def test_missing_shard_file(broken):
    shard = weight_map(broken)[PROBE]
    (broken / shard).unlink()
    msg = load_error(broken)
    assert shard in msg and "missing" in msg
    held = [t for t in named_tensors(msg) if weight_map(broken)[t] == shard]
    assert held, f"message names no tensor of {shard}: {msg}"


def test_tensor_absent_from_index(broken):
    index = json.loads((broken / INDEX_FILE).read_text())
    del index["weight_map"][PROBE]
    (broken / INDEX_FILE).write_text(json.dumps(index))
    msg = load_error(broken)
    assert f"'{PROBE}'" in msg and "index" in msg


def test_tensor_listed_but_absent_from_shard(broken):
    index = json.loads((broken / INDEX_FILE).read_text())
    wm = index["weight_map"]
    other = next(s for s in sorted(set(wm.values())) if s != wm[PROBE])
    wm[PROBE] = other
    (broken / INDEX_FILE).write_text(json.dumps(index))
    msg = load_error(broken)
    assert f"'{PROBE}'" in msg and other in msg and "absent from the shard" in msg


def test_wrong_shape_for_config(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] += 5  # 101: the checkpoint holds 96
    (broken / "config.json").write_text(json.dumps(cfg))
    msg = load_error(broken)
    (name,) = named_tensors(msg)
    assert re.fullmatch(r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight", name), msg
    assert weight_map(broken)[name] in msg  # the file
    assert "[96, 64]" in msg or "[64, 96]" in msg  # found
    assert "[101, 64]" in msg or "[64, 101]" in msg  # expected


def test_truncated_file(broken):
    shard = weight_map(broken)[PROBE]
    data = (broken / shard).read_bytes()
    (broken / shard).write_bytes(data[:-100])  # cut the tail of the last tensor's data
    msg = load_error(broken)
    assert shard in msg and "truncated" in msg
    (name,) = named_tensors(msg)
    assert weight_map(broken)[name] == shard


def _garbage_length(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", 2**40)
    path.write_bytes(bytes(raw))


def _invalid_json(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8:8 + n] = b"{\"model.layers" + b"\x00" * (n - 14)
    path.write_bytes(bytes(raw))


def _bad_offsets(path: Path) -> None:
    def edit(header):
        entry = header[PROBE]
        entry["data_offsets"][1] -= 4  # one float short of its shape
    rewrite_header(path, edit)


def _bad_dtype(path: Path) -> None:
    rewrite_header(path, lambda header: header[PROBE].update(dtype="C64"))


@pytest.mark.parametrize("corrupt, words, names_tensor", [
    (_garbage_length, "corrupt safetensors header (header length", False),
    (_invalid_json, "corrupt safetensors header (not valid JSON", False),
    (_bad_offsets, "data_offsets", True),
    (_bad_dtype, "unsupported dtype 'C64'", True),
], ids=["garbage-length", "invalid-json", "offsets-vs-shape", "unknown-dtype"])
def test_corrupt_header(broken, corrupt, words, names_tensor):
    shard = weight_map(broken)[PROBE]
    corrupt(broken / shard)
    msg = load_error(broken)
    assert shard in msg and words in msg
    if names_tensor:
        assert f"'{PROBE}'" in msg


def test_index_entry_outside_the_model_directory(broken):
    index = json.loads((broken / INDEX_FILE).read_text())
    index["weight_map"][PROBE] = "../elsewhere.safetensors"
    (broken / INDEX_FILE).write_text(json.dumps(index))
    msg = load_error(broken)
    assert INDEX_FILE in msg and f"'{PROBE}'" in msg and "../elsewhere.safetensors" in msg


def test_no_weights(broken):
    for f in [*broken.glob("*.safetensors"), broken / INDEX_FILE]:
        f.unlink()
    msg = load_error(broken)
    assert "no weights" in msg and str(broken) in msg and INDEX_FILE in msg and SINGLE_FILE in msg


def test_single_file_corrupt_header_named(single, tmp_path):
    model = Path(shutil.copytree(single, tmp_path / "model"))
    _invalid_json(model / SINGLE_FILE)
    msg = load_error(model)
    assert SINGLE_FILE in msg and "not valid JSON" in msg


@pytest.mark.parametrize("edit, field", [
    ({"model_type": "llama"}, "model_type 'llama'"),
    # layer_types (transformers writes it) would keep every layer on full attention
    ({"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1, "layer_types": None},
     "use_sliding_window"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope type 'longrope'"),
], ids=["model_type", "sliding-window", "rope-type"])
def test_unsupported_config(broken, edit, field):
    cfg = json.loads((broken / "config.json").read_text())
    cfg.update(edit)
    (broken / "config.json").write_text(json.dumps(cfg))
    llm = None
    with pytest.raises(ConfigError) as err:
        llm = LLM(str(broken), devices=["cpu"])
    assert llm is None
    assert field in str(err.value) and "config.json" in str(err.value)


def test_failed_load_leaves_nothing_loaded(sharded, monkeypatch):
    """Shape errors fail before any data is read; a read error puts loaded tensors back on meta."""
    source = ModelSource(sharded)
    config = load_config(source)
    reads = []
    real_read = CheckpointReader.read

    def read(self, name, *args, **kwargs):
        reads.append(name)
        if len(reads) == 6:
            raise CheckpointError(f"injected failure reading {name!r}")
        return real_read(self, name, *args, **kwargs)

    monkeypatch.setattr(CheckpointReader, "read", read)
    stage = Stage(config)
    with pytest.raises(CheckpointError, match="injected"):
        load_stage(stage, CheckpointReader(source), CPU, torch.float32, progress=False)
    assert len(reads) == 6
    assert all(p.device.type == "meta" for p in stage.parameters())

    bad = Stage(dataclasses.replace(config, intermediate_size=97))
    reads.clear()
    with pytest.raises(CheckpointError, match="the config expects"):
        load_stage(bad, CheckpointReader(source), CPU, torch.float32, progress=False)
    assert reads == [] and all(p.device.type == "meta" for p in bad.parameters())


# ---- layouts ---------------------------------------------------------------------------------


def test_single_file_and_sharded_generate_the_same(sharded, single):
    assert len(set(weight_map(sharded).values())) > 3 and not (sharded / SINGLE_FILE).exists()
    assert (single / SINGLE_FILE).is_file() and not (single / INDEX_FILE).exists()
    assert set(CheckpointReader(ModelSource(single)).weight_map.values()) == {SINGLE_FILE}
    a, b = generate(str(sharded)), generate(str(single))
    assert a == b and all(len(t) == GREEDY.max_tokens for t in a)


def opened_safetensors(monkeypatch) -> list[str]:
    """Record the name of every .safetensors file opened through open()/Path.open()."""
    opened = []
    real_open = io.open

    def spy(file, *args, **kwargs):
        if str(file).endswith(".safetensors"):
            opened.append(Path(file).name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", spy)
    monkeypatch.setattr("builtins.open", spy)
    return opened


def test_stage_opens_only_its_shards(sharded, monkeypatch):
    source = ModelSource(sharded)
    stage = Stage(load_config(source), (1, 2))
    wm = weight_map(sharded)
    expected = {wm[n] for n in wm if n.startswith("model.layers.1.")}
    assert expected < set(wm.values())  # some shards hold nothing of layer 1
    opened = opened_safetensors(monkeypatch)
    reader = CheckpointReader(source)
    names = stage_tensors(stage)  # before loading joins q/k/v and gate/up
    load_stage(stage, reader, CPU, torch.float32, progress=False)
    monkeypatch.undo()
    assert set(opened) == expected == set(reader.shards_for(names))
    from safetensors import safe_open

    from pprt.weights.merge import named_weights
    with safe_open(sharded / wm[PROBE], "pt") as f:
        torch.testing.assert_close(named_weights(stage)[PROBE], f.get_tensor(PROBE), rtol=0, atol=0)


def test_progress_bar_over_bytes(sharded, capsys, monkeypatch):
    import pprt.weights.loader
    seen = {}

    class Bar(pprt.weights.loader.tqdm):
        def close(self):
            if not self.disable:
                seen.update(total=self.total, n=self.n, unit=self.unit)
            super().close()

    monkeypatch.setattr(pprt.weights.loader, "tqdm", Bar)
    source = ModelSource(sharded)
    reader = CheckpointReader(source)
    stage = Stage(load_config(source))
    load_stage(stage, reader, CPU, torch.float32, progress=True)
    weights = sum(p.nbytes for p in stage.parameters())
    assert seen == {"total": weights, "n": weights, "unit": "B"}
    err = capsys.readouterr().err
    assert "layers 0-2" in err and "B/s" in err
    load_stage(Stage(load_config(source)), reader, CPU, torch.float32, progress=False)
    assert capsys.readouterr().err == ""


# ---- hub ids ---------------------------------------------------------------------------------


@pytest.fixture()
def hub(sharded, tmp_path, monkeypatch):
    """HF_HUB_CACHE=<tmp> holding org/tiny as huggingface_hub lays it out; offline. Returns the fetch log."""
    import huggingface_hub
    from huggingface_hub import constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(sharded, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name, value in (("HF_HUB_CACHE", str(tmp_path / "hub")), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    # huggingface_hub reads these once, at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "org/tiny" is no local directory
    fetched = []
    real = huggingface_hub.hf_hub_download

    def download(repo_id, filename, **kwargs):
        assert repo_id == "org/tiny"
        fetched.append(filename)
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return fetched


def test_hub_id_generates_like_the_directory(sharded, hub):
    assert generate("org/tiny") == generate(str(sharded))
    shards = set(weight_map(sharded).values())
    first_shard = next(i for i, f in enumerate(hub) if f in shards)
    head, tail = hub[:first_shard], hub[first_shard:]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", INDEX_FILE} <= set(head)
    assert set(tail) == shards  # then shards only, every one (the whole model is one stage)


def test_hub_stage_fetches_only_its_shards(sharded, hub):
    source = ModelSource("org/tiny")
    assert source.local is None
    stage = Stage(load_config(source), (1, 2))
    del hub[:]
    reader = CheckpointReader(source)
    load_stage(stage, reader, CPU, torch.float32, progress=False)
    wm = weight_map(sharded)
    expected = {wm[n] for n in wm if n.startswith("model.layers.1.")}
    assert hub[0] == INDEX_FILE and set(hub[1:]) == expected
    assert expected < set(wm.values())


def test_hub_missing_shard_names_file_and_tensor(sharded, hub, tmp_path):
    snapshot = next((tmp_path / "hub" / "models--org--tiny" / "snapshots").iterdir())
    shard = weight_map(sharded)[PROBE]
    (snapshot / shard).unlink()
    msg = load_error("org/tiny")
    assert shard in msg and "'model." in msg


# ---- loader memory ----------------------------------------------------------------------------

BIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
           num_key_value_heads=4, vocab_size=320)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A ~360 MB float32 qwen2 checkpoint, one shard per layer, written directly with safetensors."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("big")
    H, I, V, L = BIG["hidden_size"], BIG["intermediate_size"], BIG["vocab_size"], BIG["num_hidden_layers"]
    kv = BIG["num_key_value_heads"] * H // BIG["num_attention_heads"]
    layer = {"input_layernorm.weight": [H], "post_attention_layernorm.weight": [H],
             "self_attn.q_proj.weight": [H, H], "self_attn.q_proj.bias": [H],
             "self_attn.k_proj.weight": [kv, H], "self_attn.k_proj.bias": [kv],
             "self_attn.v_proj.weight": [kv, H], "self_attn.v_proj.bias": [kv],
             "self_attn.o_proj.weight": [H, H], "mlp.gate_proj.weight": [I, H],
             "mlp.up_proj.weight": [I, H], "mlp.down_proj.weight": [H, I]}
    shards = [{"model.embed_tokens.weight": [V, H], "model.norm.weight": [H], "lm_head.weight": [V, H]}]
    shards += [{f"model.layers.{i}.{k}": s for k, s in layer.items()} for i in range(L)]
    wm = {}
    for j, shapes in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: torch.full(s, 0.01) for k, s in shapes.items()}, path / name)
        wm.update(dict.fromkeys(shapes, name))
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    cfg = dict(BIG, model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0,
               rope_scaling=None, max_position_embeddings=4096, tie_word_embeddings=False,
               use_sliding_window=False, torch_dtype="float32")
    (path / "config.json").write_text(json.dumps(cfg))
    yield path
    shutil.rmtree(path)


MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    from pprt.weights.checkpoint import CheckpointReader, ModelSource, load_config
    from pprt.weights.loader import load_stage
    from pprt.models.stage import Stage

    def status(key):  # kB
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    path, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    source = ModelSource(path)
    stage = Stage(load_config(source), (lo, hi))
    reader = CheckpointReader(source)
    before = status("VmRSS")
    load_stage(stage, reader, torch.device("cpu"), torch.float32, progress=False)
    peak = status("VmHWM")  # not ru_maxrss: after fork + exec it keeps the parent's peak
    kept = sum(p.nbytes for p in stage.parameters())
    print(json.dumps({"growth": (peak - before) * 1024, "kept": kept}))
""")


def test_loader_peak_memory_is_the_weights_kept(big):
    """Peak RSS grows by about the weights kept (no second copy), for the full model and half of it."""
    L = BIG["num_hidden_layers"]
    runs = {(lo, hi): subprocess.Popen([sys.executable, "-c", MEASURE, str(big), str(lo), str(hi)],
                                       cwd=ROOT, stdout=subprocess.PIPE, text=True)
            for lo, hi in ((0, L), (0, L // 2))}
    result = {}
    for key, proc in runs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        result[key] = json.loads(out.strip().splitlines()[-1])
    total = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    full, half = result[(0, L)], result[(0, L // 2)]
    assert full["kept"] > 0.99 * total - 2**20 and full["kept"] > 300e6
    slack = 64 * 2**20
    for r in (full, half):
        # at least the weights are resident, and not a second copy of them
        assert 0.95 * r["kept"] < r["growth"] < 1.15 * r["kept"] + slack, r
    assert half["kept"] < 0.55 * full["kept"]
    assert half["growth"] < 0.65 * full["kept"]  # a half stage never holds the whole model
