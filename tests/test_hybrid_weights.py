"""Hybrid checkpoints on disk: what a stage reads, layout detection, Int4 quantize-at-load.

1. Bytes read by each stage (file reads counted below pprt, mapped back to tensors through
   the safetensors headers) equal the bytes of its own parameters: no vision tower, no
   mtp.* tensor, and of a fused expert tensor only the stage's own experts' parts.
2. A fused expert tensor in the transposed (Qwen3-VL-MoE) layout is refused by name.
3. quant="int4" on hybrid models: every linear whose in_features fits the group (DeltaNet
   projections included) is Int4, the others stay in the model dtype with a log line; the
   outputs equal transformers on the dequantized RTN weights, and the planner counts the
   stage bytes exactly.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from models import make_checkpoint, reference_greedy, reference_model
from pprt import LLM, SamplingParams
from pprt.config import ModelConfig
from pprt.errors import CheckpointError
from pprt.models.stage import Stage
from pprt.plan import DeviceBudget, plan
from pprt.weights.checkpoint import CheckpointReader, ModelSource, load_config
from pprt.weights.int4 import Int4Linear, dequantize
from pprt.weights.loader import load_stage
from pprt.weights.merge import linear_modules


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def tensor_ranges(path: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """(shard, tensor) -> absolute [begin, end) of its bytes, from the safetensors headers."""
    out = {}
    for shard in path.glob("*.safetensors"):
        raw = shard.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        for name, entry in json.loads(raw[8:8 + n]).items():
            if name != "__metadata__":
                lo, hi = entry["data_offsets"]
                out[(shard.name, name)] = (8 + n + lo, 8 + n + hi)
    return out


class _CountedFile:
    """A binary file whose readinto() calls are recorded as (file, begin, end)."""

    def __init__(self, f, name: str, reads: list):
        self._f, self._name, self._reads = f, name, reads

    def readinto(self, buf) -> int:
        start = self._f.tell()
        got = self._f.readinto(buf)
        self._reads.append((self._name, start, start + got))
        return got

    def __getattr__(self, attr):
        return getattr(self._f, attr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class ReadSpy:
    """Records every readinto() on safetensors files opened through pathlib (the reader's data reads)."""

    def __init__(self, monkeypatch):
        self.reads: list[tuple[str, int, int]] = []
        real_open = Path.open

        def open_(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            if "b" not in mode or not path.name.endswith(".safetensors"):
                return f
            return _CountedFile(f, path.name, self.reads)

        monkeypatch.setattr(Path, "open", open_)

    def tensors(self, ranges) -> dict[str, int]:
        """Tensor name -> bytes read of it; every read lies inside one tensor."""
        out: dict[str, int] = {}
        for shard, lo, hi in self.reads:
            owners = [name for (s, name), (a, b) in ranges.items() if s == shard and a <= lo and hi <= b]
            assert len(owners) == 1, (shard, lo, hi)
            out[owners[0]] = out.get(owners[0], 0) + hi - lo
        return out


@pytest.mark.parametrize("family, kwargs, split", [
    ("qwen3_5", dict(tie_word_embeddings=True), [5, 3]),
    ("qwen3_5_moe", {}, [1, 6, 1]),
    ("qwen3_next", dict(expert_layout="fused"), [3, 5]),
], ids=["qwen3_5-multimodal-tied", "qwen3_5_moe-fused", "qwen3_next-fused"])
def test_each_stage_reads_exactly_its_own_bytes(tmp_path, monkeypatch, family, kwargs, split):
    path = make_checkpoint(tmp_path / family, family, tokenizer=False, **kwargs)
    ranges = tensor_ranges(path)
    assert any(n.startswith("mtp.") for _, n in ranges) == (family != "qwen3_next")
    config = load_config(ModelSource(path))
    lo = 0
    seen: dict[str, int] = {}
    for size in split:
        stage = Stage(config, (lo, lo + size))
        spy = ReadSpy(monkeypatch)
        load_stage(stage, CheckpointReader(ModelSource(path)), torch.device("cpu"), torch.float32, progress=False)
        monkeypatch.undo()
        read = spy.tensors(ranges)
        assert not [n for n in read if n.startswith(("model.visual.", "mtp."))]
        assert sum(read.values()) == sum(p.numel() * 4 for p in stage.parameters()), (lo, size)
        layers = {int(m[1]) for n in read if (m := re.search(r"\.layers\.(\d+)\.", n))}
        assert layers == set(range(lo, lo + size))
        for n, b in read.items():
            seen[n] = seen.get(n, 0) + b
        lo += size
    # over the whole pipeline, every text tensor was read once (the tied head: twice, on two stages)
    text = {n: b - a for (_, n), (a, b) in ranges.items() if not n.startswith(("model.visual.", "mtp."))}
    tied = "model.language_model.embed_tokens.weight" if config.tie_word_embeddings else None
    assert {n: b for n, b in seen.items()} == {n: b * (2 if n == tied else 1) for n, b in text.items()}


def test_transposed_fused_experts_are_refused_by_name(tmp_path):
    path = make_checkpoint(tmp_path / "m", "qwen3_5_moe", tokenizer=False, moe_intermediate_size=16)
    from safetensors.torch import load_file, save_file

    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    shard = index["weight_map"][name]
    tensors = load_file(path / shard)
    tensors[name] = tensors[name].transpose(1, 2).contiguous()  # [E, H, 2I], as Qwen3-VL-MoE stores it
    save_file(tensors, path / shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name}.*\[8, 64, 32\].*expected \[8, 32, 64\]"):
        LLM(str(path), devices=["cpu"])


# ---- Int4 quantize-at-load (pprt.quantization: group 128, 64 or 32, else float) ---------------------

# hidden and expert widths fit group 128; DeltaNet's value width (4 x 12 = 48) and the shared
# expert's (48) fit no group of 128, 64, 32: out_proj and shared_expert.down_proj stay float
INT4 = dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=128, shared_expert_intermediate_size=48,
            num_attention_heads=4, head_dim=32, linear_value_head_dim=12)
PROMPTS = [[5, 17, 40, 33, 100, 7], list(range(30, 100, 3))]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)


def linears(llm: LLM) -> dict[str, nn.Module]:
    stage = llm.executor.worker.stage
    return linear_modules(stage)  # merged and stacked ones under their own names


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_text"])
def test_quantize_at_load_matches_transformers_on_rtn_weights(tmp_path, family, caplog):
    from safetensors.torch import load_file, save_file

    kw = {k: v for k, v in INT4.items() if family == "qwen3_next" or "moe" not in k and "shared" not in k}
    path = make_checkpoint(tmp_path / "float", family, tokenizer=False, max_shard_size="200KB", **kw)
    with caplog.at_level(logging.INFO, logger="pprt"), \
            LLM(str(path), devices=["cpu"], dtype="float32", quant="int4") as llm:
        kinds = linears(llm)
        outs = llm.generate(PROMPTS, GREEDY)
        rtn = {f"{p}.weight": dequantize(m.weight) for p, m in kinds.items() if isinstance(m, Int4Linear)}
    for prefix, m in kinds.items():
        fits = m.in_features % 32 == 0 and prefix != "lm_head" and not prefix.endswith(("mlp.gate", "expert_gate"))
        assert isinstance(m, Int4Linear) == fits, prefix
        assert not isinstance(m, Int4Linear) or m.group_size == 128, prefix  # every fitting width is 128 here
    in_proj = "linear_attn.in_proj_qkvz" if family == "qwen3_next" else "linear_attn.in_proj_qkv"
    assert any(name.endswith(f"{in_proj}.weight") for name in rtn)
    assert "stay in the model dtype" in caplog.text and "linear_attn.out_proj" in caplog.text
    # the same weights, dequantized, in a float checkpoint for transformers
    rtn_dir = tmp_path / "rtn"
    rtn_dir.mkdir()
    for f in path.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            save_file({k: rtn.get(k, v) for k, v in tensors.items()}, rtn_dir / f.name, metadata={"format": "pt"})
        else:
            (rtn_dir / f.name).write_bytes(f.read_bytes())
    ref = reference_model(rtn_dir)
    for prompt, out in zip(PROMPTS, outs):
        tokens, logprobs = reference_greedy(ref, prompt, 12)
        assert out.token_ids == tokens
        ours = torch.tensor([lp[t] for lp, t in zip(out.logprobs, out.token_ids)])
        assert torch.allclose(ours, torch.tensor(logprobs), atol=1e-4, rtol=0)


def test_planner_counts_int4_hybrid_stage_bytes_exactly(tmp_path):
    path = make_checkpoint(tmp_path / "m", "qwen3_next", tokenizer=False, expert_layout="fused", **INT4)
    config = load_config(ModelSource(path))
    with LLM(str(path), devices=["cpu", "cpu"], split=[3, 5], dtype="bfloat16", quant="int4",
             kv_cache_memory=1 << 20) as llm:
        held = llm.executor.weight_bytes
    planned = plan(config, [DeviceBudget("cpu", 1 << 34)] * 2, quant="int4", split=[3, 5], max_context=64,
                   dtype_bytes=2)
    assert [s.weight_bytes for s in planned.stages] == held


def test_stage_parameters_equal_the_planned_bytes():
    """The Stage (meta device) of every real hybrid geometry holds what the planner counts, layer by layer."""
    from hybrid_configs import HYBRID_CONFIGS, QWEN15_MOE_A27B

    for name, raw in {**HYBRID_CONFIGS, "qwen1.5-moe": QWEN15_MOE_A27B}.items():
        config = ModelConfig.from_dict(raw)
        cut = [3, 2, config.num_layers - 5]  # [0, 3) DeltaNet only; [3, 5) one full + one DeltaNet
        result = plan(config, [DeviceBudget("x", 1 << 50)] * 3, split=cut, max_context=4096)
        st = result.stages[1]
        params = sum(p.numel() * 2 for p in Stage(config, st.layers).parameters())
        assert st.weight_bytes == params, name


# ---- FP8: official block-wise files and quant="fp8" on the hybrid layouts -----------------------

def test_fused_fp8_experts_without_scales_or_with_wrong_scales_are_refused_by_name(tmp_path):
    """Fused float8 expert tensors load with their `<name>_scale_inv` (tests/test_hybrid_quantized.py);
    without it, or with one of the wrong shape, the error names the tensor."""
    from ckpt_files import read_tensors, write_sharded

    src = make_checkpoint(tmp_path / "float", "qwen3_5_moe", tokenizer=False)  # fused experts
    tensors = read_tensors(src)
    name = "model.language_model.layers.2.mlp.experts.down_proj"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)  # [E, H, I] = [8, 64, 32]
    config = dict(json.loads((src / "config.json").read_text()),
                  quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    write_sharded(tmp_path / "bad", tensors, config)
    with pytest.raises(CheckpointError, match=rf"{name}'.*float8_e4m3fn.*no '{name}_scale_inv'"):
        LLM(str(tmp_path / "bad"), devices=["cpu"])
    tensors[f"{name}_scale_inv"] = torch.ones(8, 2, 1)  # one block of 128 rows, not 2
    write_sharded(tmp_path / "bad2", tensors, config)
    with pytest.raises(CheckpointError, match=rf"{name}_scale_inv\[0\] has shape \[2, 1\], expected \[1, 1\]"):
        LLM(str(tmp_path / "bad2"), devices=["cpu"])


def test_quantize_fp8_at_load_on_a_hybrid(tmp_path):
    from pprt.weights.fp8 import Fp8Linear

    path = make_checkpoint(tmp_path / "m", "qwen3_next", tokenizer=False, expert_layout="fused")
    with LLM(str(path), devices=["cpu"], dtype="float32", quant="fp8") as llm:
        kinds = linear_modules(llm.executor.worker.stage)
        outs = llm.generate(PROMPTS, GREEDY)
        held = llm.executor.weight_bytes[0]
        planned = plan(llm.config, [DeviceBudget("cpu", 1 << 34)], quant="fp8", dtype_bytes=4, max_context=64)
    assert isinstance(kinds["model.layers.0.linear_attn.in_proj_qkvz"], Fp8Linear)
    assert isinstance(kinds["model.layers.0.mlp.experts.3.up_proj"], Fp8Linear)
    assert isinstance(kinds["model.layers.0.mlp.shared_expert_gate"], nn.Linear)
    assert planned.stages[0].weight_bytes == held and planned.quant == "fp8"
    assert all(len(o.token_ids) == 12 for o in outs)
