"""pprt.plan: exact byte accounting against checkpoint tensor lists, verdicts, the cut, the CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pprt.weights.checkpoint import CheckpointError
from pprt.config import ModelConfig
from pprt.plan import (
    GiB,
    DeviceBudget,
    embedding_bytes,
    head_bytes,
    kv_bytes_per_token,
    layer_weight_bytes,
    plan,
)
from pprt.entrypoints.plan_cli import main, parse_gpus, read_model_config

GB = 10**9
REPO = Path(__file__).resolve().parents[1]

# config.json of the official checkpoints, in the old rope spelling they ship with
QWEN25_72B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 8192, "initializer_range": 0.02,
    "intermediate_size": 29568, "max_position_embeddings": 32768, "max_window_layers": 80,
    "model_type": "qwen2", "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
QWEN3_32B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "intermediate_size": 25600, "max_position_embeddings": 40960,
    "max_window_layers": 64, "model_type": "qwen3", "num_attention_heads": 64, "num_hidden_layers": 64,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
# with the YaRN settings Qwen documents for 128k (factor 4 over 32k)
QWEN3_235B_A22B = {
    **QWEN3_30B_A3B, "hidden_size": 4096, "intermediate_size": 12288, "max_window_layers": 94,
    "moe_intermediate_size": 1536, "num_attention_heads": 64, "num_hidden_layers": 94, "num_key_value_heads": 4,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
}
# a small tied model (Qwen2.5-0.5B's geometry)
QWEN25_05B = {
    **QWEN25_72B, "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "tie_word_embeddings": True, "vocab_size": 151936,
}
# QWEN.md section 5
KV_TABLE = {"72b": 327_680, "32b": 262_144, "30b": 98_304, "235b": 192_512}
CONFIGS = {"72b": QWEN25_72B, "32b": QWEN3_32B, "30b": QWEN3_30B_A3B, "235b": QWEN3_235B_A22B, "05b": QWEN25_05B}


def checkpoint_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes as an unquantized safetensors checkpoint of `cfg` lists them."""
    H, n, m = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    h, V, moe = cfg.get("head_dim") or H // n, cfg["vocab_size"], cfg["model_type"] == "qwen3_moe"
    out = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (V, H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (H,)
        for proj, rows in (("q", n * h), ("k", m * h), ("v", m * h)):
            out[f"{p}self_attn.{proj}_proj.weight"] = (rows, H)
            if cfg["model_type"] == "qwen2":
                out[f"{p}self_attn.{proj}_proj.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (H, n * h)
        if cfg["model_type"] != "qwen2":
            out[p + "self_attn.q_norm.weight"] = out[p + "self_attn.k_norm.weight"] = (h,)
        if moe and i not in cfg["mlp_only_layers"] and (i + 1) % cfg["decoder_sparse_step"] == 0:
            I = cfg["moe_intermediate_size"]
            out[p + "mlp.gate.weight"] = (cfg["num_experts"], H)
            mlps = [f"{p}mlp.experts.{e}." for e in range(cfg["num_experts"])]
        else:
            I, mlps = cfg["intermediate_size"], [p + "mlp."]
        for q in mlps:
            out[q + "gate_proj.weight"] = out[q + "up_proj.weight"] = (I, H)
            out[q + "down_proj.weight"] = (H, I)
    return out


QUANTIZED = re.compile(r"(q|k|v|o|gate|up|down)_proj\.weight$")  # not mlp.gate (the router)


def stage_bytes(cfg: dict, lo: int, hi: int, *, int4: bool, elem: int = 2, g: int = 128, fp8: bool = False,
                float_modules: str | None = None) -> int:
    """Bytes of the tensors stage [lo, hi) holds: int4 + 16-bit scales + uint8 zeros when int4;
    with fp8, one byte per weight + a float32 scale per 128 x 128 block (partial blocks count),
    except the linears whose name matches the regex `float_modules`."""
    L, total = cfg["num_hidden_layers"], 0
    for name, shape in checkpoint_tensors(cfg).items():
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer and not lo <= int(layer[1]) < hi:
            continue
        if name == "model.embed_tokens.weight" and lo != 0:
            continue
        if name in ("model.norm.weight", "lm_head.weight") and hi != L:
            continue
        if fp8 and QUANTIZED.search(name) and not (float_modules and re.search(float_modules, name)):
            rows, cols = shape
            total += rows * cols + math.ceil(rows / 128) * math.ceil(cols / 128) * 4
        elif int4 and QUANTIZED.search(name):
            rows, cols = shape
            assert cols % g == 0
            total += rows * cols // 2 + (cols // g) * rows * 2 + (cols // g) * rows
        else:
            total += math.prod(shape) * elem
    if cfg["tie_word_embeddings"] and hi == L and lo != 0:  # the last stage keeps its own head copy
        total += cfg["vocab_size"] * cfg["hidden_size"] * elem
    return total


def devices(*gb: float, unit: int = GB) -> list[DeviceBudget]:
    return [DeviceBudget(f"cuda:{i}", int(x * unit)) for i, x in enumerate(gb)]


def model(key: str) -> ModelConfig:
    return ModelConfig.from_dict(CONFIGS[key])


# ---- exact accounting ----------------------------------------------------------------------

@pytest.mark.parametrize("key", ["72b", "32b", "30b", "235b", "05b"])
@pytest.mark.parametrize("quant", ["none", "int4"])
def test_stage_weight_bytes_equal_checkpoint_sum(key, quant):
    cfg, config = CONFIGS[key], model(key)
    L = cfg["num_hidden_layers"]
    result = plan(config, devices(400, 400), quant=quant, max_context=4096)
    cuts = [[s.layers for s in result.stages], [(0, 1), (1, L)], [(0, L - 1), (L - 1, L)]]
    for stages in cuts:
        split = [hi - lo for lo, hi in stages]
        checked = plan(config, devices(400, 400), quant=quant, max_context=4096, split=split)
        for st, (lo, hi) in zip(checked.stages, stages):
            assert st.layers == (lo, hi)
            assert st.weight_bytes == stage_bytes(cfg, lo, hi, int4=quant == "int4"), (key, quant, lo, hi)
    whole = plan(config, devices(800), quant=quant, max_context=4096)  # one stage: a tied head is free
    assert whole.stages[0].weight_bytes == stage_bytes(cfg, 0, L, int4=quant == "int4")


TINY = {
    "tied-qwen2": {**QWEN25_05B, "num_hidden_layers": 4, "vocab_size": 1000},
    "moe-mixed": {**QWEN3_30B_A3B, "num_hidden_layers": 4, "num_experts": 6, "num_experts_per_tok": 2,
                  "mlp_only_layers": [1], "hidden_size": 256, "vocab_size": 1000, "moe_intermediate_size": 96,
                  "intermediate_size": 320},
}


@pytest.mark.parametrize("key", list(TINY))
def test_weight_bytes_equal_the_stage_model_parameters(key):
    """The runtime's own Stage (built on the meta device, nothing allocated) holds what the plan counts."""
    from pprt.models.stage import Stage

    config = ModelConfig.from_dict(TINY[key])
    result = plan(config, devices(10, 10), split=[1, 3], dtype_bytes=4, max_context=64)
    for st in result.stages:
        params = sum(p.numel() * 4 for p in Stage(config, st.layers).parameters())
        assert st.weight_bytes == params, (key, st.layers)


def test_small_functions_add_up_to_the_model():
    cfg, config = QWEN25_05B, model("05b")
    layers = sum(layer_weight_bytes(config, i, "none", 4) for i in range(24))
    assert embedding_bytes(config, 4) + layers + head_bytes(config, 4) == stage_bytes(cfg, 0, 24, int4=False, elem=4)
    split_head = head_bytes(config, 4, shares_embedding_stage=False)
    assert split_head - head_bytes(config, 4) == 151936 * 896 * 4


def test_gptq_checkpoint_is_counted_as_int4_with_its_group():
    cfg = {**QWEN25_72B, "intermediate_size": 29696,
           "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False}}
    result = plan(ModelConfig.from_dict(cfg), devices(48, 48), quant="none", max_context=8192)
    assert result.quant == "int4"
    for st in result.stages:
        assert st.weight_bytes == stage_bytes(cfg, *st.layers, int4=True, g=64)


FP8_QCFG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


@pytest.mark.parametrize("key", ["32b", "30b", "235b", "05b"])
def test_fp8_checkpoint_and_quant_fp8_counted_with_block_scales(key):
    """An official FP8 config (Qwen3-*-FP8) is counted from config.json alone: one byte per weight
    and a float32 scale per block, partial blocks too (Qwen2.5-0.5B: 896 = 7 x 128, 4864 = 38 x 128);
    quant="fp8" on the float config gives the same bytes."""
    cfg = {**CONFIGS[key], "quantization_config": FP8_QCFG}
    config = ModelConfig.from_dict(cfg)
    for quant in ("none", "int4"):  # quantize-at-load does nothing to a quantized checkpoint
        result = plan(config, devices(400, 400), quant=quant, max_context=4096)
        assert result.quant == "fp8"
        for st in result.stages:
            assert st.weight_bytes == stage_bytes(cfg, *st.layers, int4=False, fp8=True), (key, quant, st.layers)
    at_load = plan(model(key), devices(400, 400), quant="fp8", max_context=4096, split=result.split)
    assert [s.weight_bytes for s in at_load.stages] == [s.weight_bytes for s in result.stages]


def test_fp8_modules_to_not_convert_counted_in_bf16():
    cfg = {**QWEN3_30B_A3B, "quantization_config": {**FP8_QCFG, "modules_to_not_convert": ["lm_head", "self_attn"]}}
    result = plan(ModelConfig.from_dict(cfg), devices(400), max_context=4096)
    assert result.stages[0].weight_bytes == stage_bytes(cfg, 0, 48, int4=False, fp8=True, float_modules=r"self_attn")
    assert result.stages[0].weight_bytes > stage_bytes(cfg, 0, 48, int4=False, fp8=True)


def test_qwen3_235b_fp8_from_config_alone(tmp_path, capsys):
    """Qwen3-235B-A22B-FP8: about 236 GB of weights; two 96 GB cards are short, a third makes it fit."""
    (tmp_path / "config.json").write_text(json.dumps({**QWEN3_235B_A22B, "quantization_config": FP8_QCFG}))
    assert main(["--model", str(tmp_path), "--gpus", "96,96", "--max-context", "32768"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT (weights fp8" in out and "1 more device of 96.0 GiB" in out
    assert "--quant" not in out.split("would fit:")[1]  # the checkpoint is already quantized
    assert main(["--model", str(tmp_path), "--gpus", "96,96,96", "--max-context", "32768"]) == 0
    out = capsys.readouterr().out
    assert "verdict: fits (weights fp8" in out
    weights = sum(float(x) for x in re.findall(r"^\d\s+cuda:\d\s+\[\d+, \d+\)\s+([\d.]+) GiB", out, re.M))
    assert 218 < weights < 222  # GiB: 235B parameters at 1 byte, scales, bf16 embedding and head


@pytest.mark.parametrize("key", list(KV_TABLE))
def test_kv_bytes_per_token_match_qwen_table(key):
    config, L = model(key), CONFIGS[key]["num_hidden_layers"]
    assert kv_bytes_per_token(config, L, "bf16") == KV_TABLE[key]
    m = CONFIGS[key]["num_key_value_heads"]  # fp8: half, plus a float32 scale per (token, kv head) for K and V
    assert kv_bytes_per_token(config, (0, L), "fp8") == KV_TABLE[key] // 2 + 2 * L * m * 4
    result = plan(config, devices(300, 300, 300), quant="int4", max_context=8192)
    assert sum(s.kv_bytes_per_token for s in result.stages) == KV_TABLE[key]
    assert kv_bytes_per_token(config, L, "auto", dtype_bytes=4) == 2 * KV_TABLE[key]


# ---- verdicts a user would check by hand ---------------------------------------------------

def test_qwen25_72b_bf16_32k():
    config = model("72b")
    big = plan(config, devices(96, 96), max_context=32768)
    assert big.fits and big.num_sequences >= 1 and big.longest_sequence == 32768
    small = plan(config, devices(48, 48), max_context=32768)
    assert not small.fits and small.num_sequences == 0
    # says by how much, where, and only what helps: FP8 or Int4 weights do, fp8 KV or a shorter context cannot
    assert "cuda:0" in small.message and "short by" in small.message and "GiB" in small.message
    fixes = small.message.split("would fit:")[1]
    assert "--quant fp8" in fixes and "--quant int4" in fixes
    assert "--kv-dtype fp8" not in fixes and "--max-context" not in fixes
    assert plan(config, devices(48, 48), max_context=32768, quant="int4").fits
    assert plan(config, devices(48, 48), max_context=32768, quant="fp8").fits


def test_qwen3_235b_int4_128k_on_two_96gb():
    result = plan(model("235b"), devices(96, 96), quant="int4", max_context=131072)
    assert result.fits and result.context_limit == 131072 and result.split == [47, 47]
    assert not plan(model("235b"), devices(96, 96), quant="none", max_context=131072).fits


def test_uneven_devices_get_uneven_split():
    config = model("72b")
    uneven = plan(config, devices(48, 24), quant="int4", max_context=32768)
    even = plan(config, devices(48, 48), quant="int4", max_context=32768)
    assert uneven.fits and uneven.split[0] > uneven.split[1] + 10
    assert abs(even.split[0] - even.split[1]) <= 6
    for st in uneven.stages:  # each device within its memory, with one sequence's KV
        assert st.weight_bytes + st.reserve_bytes + 32768 * st.kv_bytes_per_token <= st.budget_bytes
    # an even cut does not fit the 24 GB card; the planner says so and what helps
    forced = plan(config, devices(48, 24), quant="int4", max_context=32768, split=[40, 40])
    assert not forced.fits and "cuda:1" in forced.message and "cuda:0 (" not in forced.message
    assert "no --split" in forced.message


def test_faster_device_gets_more_layers():
    config = model("32b")
    equal = plan(config, devices(200, 200), max_context=8192)
    faster = plan(config, devices(200, 200), max_context=8192, speeds=[2.0, 1.0])
    assert faster.split[0] > equal.split[0] + 10


def _brute_force(config, budgets, **kw):
    """Min over fitting cuts of the slowest stage time, and the best pool among those cuts."""
    L, S = config.num_layers, len(budgets)
    best = None
    for cut in _compositions(L, S):
        p = plan(config, budgets, split=cut, suggest=False, **kw)
        if p.fits:
            slowest = max(s.read_bytes / v for s, v in zip(p.stages, kw.get("speeds") or [1.0] * S))
            key = (slowest, -p.num_blocks)
            best = key if best is None or key < best else best
    return best


def _compositions(total, parts):
    if parts == 1:
        yield [total]
        return
    for first in range(1, total - parts + 2):
        for rest in _compositions(total - first, parts - 1):
            yield [first] + rest


@pytest.mark.parametrize("case", ["2dev-72b", "3dev-moe-tight", "3dev-moe-roomy"])
def test_cut_is_optimal_by_brute_force(case):
    if case == "2dev-72b":
        config, budgets, kw = model("72b"), devices(48, 30), dict(quant="int4", max_context=32768)
    else:
        cfg = {**QWEN3_30B_A3B, "num_hidden_layers": 14, "mlp_only_layers": [0, 5], "decoder_sparse_step": 2}
        config = ModelConfig.from_dict(cfg)
        budgets = devices(9, 4.5, 6) if case.endswith("tight") else devices(12, 5, 8)
        kw = dict(max_context=20000, speeds=[1.0, 0.7, 1.3])
    chosen = plan(config, budgets, **kw)
    speeds = kw.get("speeds") or [1.0] * len(budgets)
    assert chosen.fits
    slowest = max(s.read_bytes / v for s, v in zip(chosen.stages, speeds))
    assert (slowest, -chosen.num_blocks) == _brute_force(config, budgets, **kw)


def test_shorter_context_suggestion_is_the_longest_that_fits():
    config = model("32b")
    result = plan(config, devices(38, 38))
    assert not result.fits
    fixes = result.message.split("would fit:")[1]
    assert "--quant int4" in fixes and "--kv-dtype fp8" not in fixes  # fp8 halves KV: not enough here
    tokens = int(re.search(r"--max-context (\d+)", fixes)[1])
    assert plan(config, devices(38, 38), max_context=tokens).fits
    assert not plan(config, devices(38, 38), max_context=tokens + 16).fits
    assert "--kv-dtype fp8" in plan(config, devices(40, 40)).message


def test_bad_arguments_raise_naming_the_problem():
    config = model("32b")
    with pytest.raises(ValueError, match="sums to 63"):
        plan(config, devices(96, 96), split=[32, 31])
    with pytest.raises(ValueError, match="at least one layer"):
        plan(config, devices(96, 96), split=[64, 0])
    with pytest.raises(ValueError, match="3 stages for 2 devices"):
        plan(config, devices(96, 96), split=[30, 30, 4])
    with pytest.raises(ValueError, match="kv_dtype 'int2'"):
        plan(config, devices(96, 96), kv_dtype="int2")
    with pytest.raises(ValueError, match="quant 'int8'"):
        plan(config, devices(96, 96), quant="int8")
    with pytest.raises(ValueError, match="bytes must be positive"):
        DeviceBudget("cuda:0", 0)


def test_json_shape():
    data = plan(model("30b"), devices(40, 40), max_context=40960).to_json()
    assert data["fits"] is True and json.loads(json.dumps(data)) == data
    for stage in data["stages"]:
        assert {"device", "layers", "weight_bytes", "kv_bytes_per_token", "kv_tokens"} <= set(stage)
    assert [s["layers"] for s in data["stages"]] == [[0, data["stages"][0]["layers"][1]],
                                                     [data["stages"][0]["layers"][1], 48]]
    assert data["num_sequences"] == data["kv_tokens"] // 40960


# ---- command line --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Every subprocess run at once (each pays for importing torch)."""
    root = tmp_path_factory.mktemp("models")
    (root / "q72").mkdir()
    (root / "q72" / "config.json").write_text(json.dumps(QWEN25_72B))
    q72 = str(root / "q72")
    runs = {
        "fits": ["--model", q72, "--gpus", "96,96", "--max-context", "32768"],
        "json_no": ["--model", q72, "--gpus", "48,48", "--max-context", "32768", "--json"],
        "bad_gpus": ["--model", q72, "--gpus", "96,lots"],
        "no_model": ["--model", str(root / "missing"), "--gpus", "96"],
        "bad_quant": ["--model", q72, "--gpus", "96", "--quant", "int8"],
    }
    procs = {k: subprocess.Popen([sys.executable, "-m", "pprt.plan", *a], cwd=REPO, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, a in runs.items()}
    return {k: (p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for k, p in procs.items()}


def test_cli_table_and_exit_codes(cli_runs):
    rc, out, _ = cli_runs["fits"]
    assert rc == 0
    assert re.search(r"^0\s+cuda:0\s+\[0, \d+\)", out, re.M) and re.search(r"^1\s+cuda:1\s+\[\d+, 80\)", out, re.M)
    assert "largest context for one sequence: 32,768" in out and "verdict: fits" in out
    rc, out, _ = cli_runs["json_no"]
    data = json.loads(out)
    assert rc == 1 and data["fits"] is False and len(data["stages"]) == 2 and "--quant int4" in data["message"]
    for key, needle in (("bad_gpus", "'lots' is not a size"), ("no_model", "missing"), ("bad_quant", "invalid choice")):
        rc, _, err = cli_runs[key]
        assert rc == 2 and needle in err, (key, err)


def test_cli_in_process(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_235B_A22B))
    args = ["--model", str(tmp_path), "--gpus", "89.4,89.4", "--quant", "int4", "--max-context", "131072"]
    assert main(args) == 0 and "verdict: fits" in capsys.readouterr().out
    assert main(args[:-2] + ["--max-context", "0"]) == 2 and "max_context" in capsys.readouterr().err
    assert main(args + ["--split", "90,x"]) == 2 and "--split" in capsys.readouterr().err
    assert main(args + ["--split", "90,3"]) == 2 and "sums to 93" in capsys.readouterr().err
    recipe = '{"rope_type": "default"}'  # the user's rope scaling replaces the checkpoint's YaRN
    assert main(args[:-2] + ["--rope-scaling", recipe, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["context_limit"] == 40960
    assert main(args + ["--rope-scaling", '{"rope_type": "yarn", "factor": 2}']) == 2
    assert "original_max_position_embeddings" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{not json")
    assert main(args) == 2 and "not valid JSON" in capsys.readouterr().err


def test_parse_gpus():
    assert [b.bytes for b in parse_gpus("96,23.5")] == [96 * GiB, int(23.5 * GiB)]
    for bad in ("", "96,", "-4", "nan", "96;96"):
        with pytest.raises(ValueError, match="--gpus"):
            parse_gpus(bad)
    import torch

    if torch.cuda.is_available():
        assert len(parse_gpus("auto")) == torch.cuda.device_count()
    else:
        with pytest.raises(ValueError, match="no CUDA device"):
            parse_gpus("auto")


def test_hub_id_fetches_config_json_only(monkeypatch, tmp_path):
    import huggingface_hub

    asked = []

    def fake_download(repo_id, filename, **kw):
        asked.append((repo_id, filename))
        (tmp_path / "config.json").write_text(json.dumps(QWEN3_32B))
        return str(tmp_path / "config.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert read_model_config("Qwen/Qwen3-32B").num_layers == 64
    assert asked == [("Qwen/Qwen3-32B", "config.json")]
    with pytest.raises(CheckpointError, match="no such directory"):
        read_model_config(str(tmp_path / "nowhere" / "model"))
