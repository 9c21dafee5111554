"""Int4 end to end: GPTQ / AWQ checkpoints, quantize-at-load, the Triton kernel in a generation.

1. Tiny float checkpoints are quantized by the test-side packers (tests/int4_packers.py)
   into real GPTQ (v1 sym g128, v1 asym g32 desc_act, v2) and AWQ (g64) checkpoints:
   sharded safetensors with `<prefix>.qweight/.qzeros/.scales(/.g_idx)`, everything else
   (bias included) in fp16, config.json in the old spelling with a quantization_config.
   The same integers are dequantized by the published formulas into a float32
   checkpoint; pprt on the Int4 file must give transformers' greedy tokens on the
   dequantized one, with the chosen tokens' logprobs within LOGPROB_ATOL.
2. `quant="int4"` (RTN, g128) on a float checkpoint: exactly transformers on the
   dequantized RTN weights, logprobs within a measured bound of the float model's, and
   stage weight memory 0.282x of bf16 (exactly the bytes the format promises).
3. A generation under `PPRT_KERNELS=triton TRITON_INTERPRET=1` in a subprocess runs
   every Int4 matmul through the Triton kernel and matches the reference path.
4. Unsupported quantization settings fail at LLM construction, naming the setting.
qwen3_moe experts are Int4 per expert in 1 and 2 (the routers stay float).
"""

import json
import os
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from ckpt_files import is_quantized_linear, read_tensors, write_sharded
from int4_packers import awq_quantize, gptq_quantize
from models import make_checkpoint, reference_greedy, reference_logprobs, reference_model
from pprt import LLM, SamplingParams
from pprt.weights.int4 import Int4Linear, dequantize
from pprt.weights.merge import linear_modules

# fp32 activations on both sides and the same dequantized weights: only summation order
# differs. Measured max |dlogprob| <= 4e-6 over these cases.
LOGPROB_ATOL = 1e-4
# RTN g128 asym against the float model, over the generated tokens (fp32). Random tiny
# models are far more sensitive than trained ones (g128 RTN leaves ||W - Wq|| / ||W|| ~ 0.10
# on Gaussian weights, and their next-token distributions are nearly flat): measured mean 0.26 / max 1.53 (qwen2), mean 0.46 / max 1.34
# (qwen3_moe). The exact check is against transformers on the dequantized RTN weights.
RTN_MEAN_ATOL, RTN_MAX_ATOL = 0.75, 3.0

# Every K (hidden, heads * head_dim, intermediate, moe_intermediate) is a multiple of 128.
FAMILIES = {
    "qwen2": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64),
    "qwen3_moe": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=1,
                      head_dim=32, moe_intermediate_size=128),
}
# Extra keys real files carry (AutoGPTQ / AutoAWQ) are ignored by pprt.
GPTQ = dict(bits=4, quant_method="gptq", damp_percent=0.01, static_groups=False, true_sequential=True,
            model_name_or_path=None, model_file_base_name="model")
CASES = {
    "qwen2-gptq-v1-asym-g32-desc_act-bias": ("qwen2", dict(GPTQ, group_size=32, sym=False, desc_act=True)),
    # Qwen's published recipe, with its padded MLP (intermediate 256 -> 384 in config and file)
    "qwen3-gptq-v1-sym-g128-padded-mlp": ("qwen3", dict(GPTQ, group_size=128, sym=True, desc_act=False)),
    "qwen3_moe-gptq-v2-asym-g64": ("qwen3_moe", dict(GPTQ, group_size=64, sym=False, desc_act=False,
                                                     checkpoint_format="gptq_v2")),
    "qwen3_moe-awq-g64": ("qwen3_moe", dict(quant_method="awq", bits=4, group_size=64, version="gemm",
                                            zero_point=True, modules_to_not_convert=None)),
    "qwen2-awq-g64-bias": ("qwen2", dict(quant_method="awq", bits=4, group_size=64, version="gemm",
                                         zero_point=True)),
}
PROMPTS = [[5, 17, 40, 33, 100, 7], list(range(30, 100, 3))]
N_TOKENS = 16


def greedy(n: int = N_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)


def chosen(out) -> list[float]:
    return [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]


def pad_dense_mlp(tensors: dict[str, torch.Tensor], config: dict, pad: int) -> None:
    """Grow the dense MLPs' intermediate size by `pad` zero channels, as Qwen's 72B Int4 files do
    (29568 -> 29696): gate/up get zero rows, down zero columns; the function is unchanged."""
    for name in list(tensors):
        if ".mlp.experts." in name:
            continue
        if name.endswith((".mlp.gate_proj.weight", ".mlp.up_proj.weight")):
            t = tensors[name]
            tensors[name] = torch.cat([t, t.new_zeros(pad, t.shape[1])])
        elif name.endswith(".mlp.down_proj.weight"):
            t = tensors[name]
            tensors[name] = torch.cat([t, t.new_zeros(t.shape[0], pad)], dim=1)
    config["intermediate_size"] += pad


def write_int4_and_dequantized(src: Path, int4_dir: Path, deq_dir: Path, qcfg: dict, pad_mlp: int = 0) -> int:
    """Quantize src's linear weights into a GPTQ/AWQ checkpoint, and the same integers back to float.

    Returns the number of quantized layers.
    """
    config = json.loads((src / "config.json").read_text())
    tensors = read_tensors(src)
    if pad_mlp:
        pad_dense_mlp(tensors, config, pad_mlp)
    int4, deq = {}, {}
    for name, t in tensors.items():
        if not is_quantized_linear(name, t):
            int4[name] = t.half()  # Int4 files keep the rest in fp16
            deq[name] = t.half().float()
            continue
        prefix = name.removesuffix(".weight")
        if qcfg["quant_method"] == "gptq":
            stored, w = gptq_quantize(t, qcfg["group_size"], qcfg["sym"], qcfg["desc_act"],
                                      qcfg.get("checkpoint_format", "gptq"), seed=zlib.crc32(prefix.encode()))
        else:
            stored, w = awq_quantize(t, qcfg["group_size"])
        int4.update({f"{prefix}.{k}": v for k, v in stored.items()})
        deq[name] = w  # [N, K] fp32, from the published formula
    write_sharded(int4_dir, int4, dict(config, torch_dtype="float16", quantization_config=qcfg))
    write_sharded(deq_dir, deq, config)
    return sum(1 for n in int4 if n.endswith(".qweight"))


def layer_kinds(llm: LLM) -> dict[str, nn.Module]:
    stage = llm.executor.worker.stage
    return linear_modules(stage)  # merged and stacked ones under their own names


def assert_int4_except_head_and_routers(llm: LLM, group_size: int) -> int:
    kinds = layer_kinds(llm)
    for prefix, m in kinds.items():
        if prefix == "lm_head" or prefix.endswith(".mlp.gate"):
            assert isinstance(m, nn.Linear) and m.weight.dtype == llm.dtype, prefix
        else:
            assert isinstance(m, Int4Linear) and m.group_size == group_size, prefix
    assert any(".experts." in p for p in kinds) == (llm.config.num_experts > 0)
    return sum(isinstance(m, Int4Linear) for m in kinds.values())


# ---------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def float_checkpoints(tmp_path_factory) -> dict[str, Path]:
    return {f: make_checkpoint(tmp_path_factory.mktemp(f), f, tokenizer=False, max_shard_size="200KB", **kw)
            for f, kw in FAMILIES.items()}


@pytest.fixture(scope="module", params=sorted(CASES))
def int4_case(request, float_checkpoints, tmp_path_factory):
    family, qcfg = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    pad = 128 if "padded-mlp" in request.param else 0
    n = write_int4_and_dequantized(float_checkpoints[family], root / "int4", root / "deq", qcfg, pad_mlp=pad)
    return request.param, qcfg, root / "int4", root / "deq", n


# ---------------------------------------------------------------- 1. GPTQ / AWQ files


def test_int4_checkpoint_matches_transformers_on_dequantized_weights(int4_case):
    name, qcfg, int4_dir, deq_dir, n_quantized = int4_case
    with LLM(str(int4_dir), devices=["cpu"], dtype="float32") as llm:
        assert llm.config.quant is not None and llm.config.quant.method == qcfg["quant_method"]
        assert assert_int4_except_head_and_routers(llm, qcfg["group_size"]) == n_quantized
        if "padded-mlp" in name:  # the padded size, as config and file say
            assert llm.config.intermediate_size == FAMILIES["qwen3"]["intermediate_size"] + 128
        batch = llm.generate(PROMPTS, greedy())
        alone = llm.generate(PROMPTS[0], greedy())[0]  # decode at M = 1 (torch's CPU int4 op)
    ref = reference_model(deq_dir)
    worst = 0.0
    for prompt, out in zip(PROMPTS, batch):
        tokens, logprobs = reference_greedy(ref, prompt, N_TOKENS)
        assert out.token_ids == tokens, name
        worst = max(worst, (torch.tensor(chosen(out)) - torch.tensor(logprobs)).abs().max().item())
    assert alone.token_ids == batch[0].token_ids
    worst = max(worst, max(abs(a - b) for a, b in zip(chosen(alone), chosen(batch[0]))))
    print(f"{name}: max |dlogprob| vs transformers on dequantized weights = {worst:.2e}")
    assert worst <= LOGPROB_ATOL, name


# ---------------------------------------------------------------- 2. quantize at load


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe"])
def test_quantize_at_load_is_rtn_and_close_to_float_model(family, float_checkpoints, tmp_path):
    """pprt with quant="int4" is exactly transformers on the dequantized RTN weights (so the only
    change is the quantization error), and that error moves the logprobs by a bounded amount."""
    path = float_checkpoints[family]
    with LLM(str(path), devices=["cpu"], dtype="float32", quant="int4") as llm:
        assert assert_int4_except_head_and_routers(llm, 128) > 0
        assert llm.executor.worker.quant_seconds > 0
        outs = llm.generate(PROMPTS, greedy())
        rtn = {f"{p}.weight": dequantize(m.weight) for p, m in layer_kinds(llm).items() if isinstance(m, Int4Linear)}
    tensors = read_tensors(path)
    assert set(rtn) <= set(tensors)
    write_sharded(tmp_path / "rtn", {**tensors, **rtn}, json.loads((path / "config.json").read_text()))
    ref_rtn = reference_model(tmp_path / "rtn")
    for prompt, out in zip(PROMPTS, outs):
        tokens, logprobs = reference_greedy(ref_rtn, prompt, N_TOKENS)
        assert out.token_ids == tokens
        assert torch.allclose(torch.tensor(chosen(out)), torch.tensor(logprobs), atol=LOGPROB_ATOL, rtol=0)
    ref = reference_model(path)
    deltas = torch.cat([torch.tensor(chosen(o)) - torch.tensor(reference_logprobs(ref, p, o.token_ids))
                        for p, o in zip(PROMPTS, outs)]).abs()
    print(f"{family} RTN int4 g128 vs float: |dlogprob| mean {deltas.mean():.4f} max {deltas.max():.4f}")
    assert deltas.mean() <= RTN_MEAN_ATOL and deltas.max() <= RTN_MAX_ATOL
    assert deltas.max() > 1e-3  # the weights really changed


def int4_bytes(k: int, n: int, group: int, scale_bytes: int) -> int:
    return k * n // 2 + (k // group) * n * (scale_bytes + 1)  # qweight + scales + uint8 zeros


def test_quantize_at_load_weight_memory_is_028x_of_bf16(tmp_path):
    """A model whose linear weights dominate (as in real ones): Int4 stage bytes / bf16 stage bytes."""
    dims = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, head_dim=64)
    path = make_checkpoint(tmp_path, "qwen3", tokenizer=False, max_shard_size="20MB", **dims)
    opts = dict(devices=["cpu"], dtype="bfloat16", kv_cache_memory=1 << 20)
    with LLM(str(path), **opts) as llm:
        bf16_bytes = llm.executor.weight_bytes[0]
        assert llm.executor.worker.quant_seconds == 0
    t0 = time.perf_counter()
    with LLM(str(path), quant="int4", **opts) as llm:
        load_seconds = time.perf_counter() - t0
        int4_bytes_seen = llm.executor.weight_bytes[0]
        quant_seconds = llm.executor.worker.quant_seconds
        linears = [m for m in layer_kinds(llm).values() if isinstance(m, Int4Linear)]
        out = llm.generate([[3, 1, 4, 1, 5]], greedy(4))[0]  # bf16 Int4 runs
    assert len(out.token_ids) == 4
    # Exactly the format's bytes: Int4 linears + everything else in bf16.
    linear_bf16 = sum(m.in_features * m.out_features * 2 for m in linears)
    expected = bf16_bytes - linear_bf16 + sum(int4_bytes(m.in_features, m.out_features, 128, 2) for m in linears)
    assert int4_bytes_seen == expected
    ratio = int4_bytes_seen / bf16_bytes
    print(f"int4 / bf16 stage weight bytes = {int4_bytes_seen} / {bf16_bytes} = {ratio:.3f}; "
          f"quantize-at-load {quant_seconds:.2f} s of {load_seconds:.2f} s construction")
    assert 0.27 <= ratio <= 0.29
    assert 0 < quant_seconds < load_seconds


# ---------------------------------------------------------------- 3. Triton kernel in a generation

TRITON_RUN = textwrap.dedent("""
    import json, sys
    import pprt_kernels.int4_matmul as k
    from pprt import LLM, SamplingParams

    calls = {"triton_rows": [], "ref": 0, "cpu_op": 0}
    triton_fn, ref_fn, cpu_fn = k.int4_matmul_triton, k.int4_matmul_ref, k._cpu_int4_matmul

    def triton_counted(x, *args, **kwargs):
        calls["triton_rows"].append(x.shape[0])
        return triton_fn(x, *args, **kwargs)

    def ref_counted(*args, **kwargs):
        calls["ref"] += 1
        return ref_fn(*args, **kwargs)

    def cpu_counted(*args, **kwargs):
        calls["cpu_op"] += 1
        return cpu_fn(*args, **kwargs)

    k.int4_matmul_triton, k.int4_matmul_ref, k._cpu_int4_matmul = triton_counted, ref_counted, cpu_counted
    path, prompts, n = json.loads(sys.argv[1])
    with LLM(path, devices=["cpu"], dtype="float32") as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0))
    print(json.dumps({"calls": calls, "tokens": [o.token_ids for o in outs],
                      "logprobs": [[lp[t] for lp, t in zip(o.logprobs, o.token_ids)] for o in outs]}))
""")


def test_generation_through_triton_int4_kernel_under_interpreter(float_checkpoints, tmp_path, monkeypatch):
    """GPTQ asym g32 desc_act with bias (qwen2), fp32 activations (the interpreter's bf16 dot is broken)."""
    _, qcfg = CASES["qwen2-gptq-v1-asym-g32-desc_act-bias"]
    int4_dir = tmp_path / "int4"
    n_layers = write_int4_and_dequantized(float_checkpoints["qwen2"], int4_dir, tmp_path / "deq", qcfg)
    prompts, n = PROMPTS, 3
    env = dict(os.environ, PPRT_KERNELS="triton", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", TRITON_RUN, json.dumps([str(int4_dir), prompts, n])],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = got["calls"]["triton_rows"]
    # Every Int4 layer ran through Triton at every step: prefill (M = both prompts) and decode (M = 2).
    assert got["calls"]["ref"] == 0 and got["calls"]["cpu_op"] == 0
    assert rows.count(len(PROMPTS[0]) + len(PROMPTS[1])) == n_layers and rows.count(2) == n_layers * (n - 1)
    assert len(rows) == n_layers * n
    monkeypatch.setenv("PPRT_KERNELS", "ref")
    with LLM(str(int4_dir), devices=["cpu"], dtype="float32") as llm:
        want = llm.generate(prompts, greedy(n))
    assert got["tokens"] == [o.token_ids for o in want]
    for lp, o in zip(got["logprobs"], want):
        assert torch.allclose(torch.tensor(lp), torch.tensor(chosen(o)), atol=LOGPROB_ATOL, rtol=0)


# ---------------------------------------------------------------- 4. unsupported settings


def with_quant_config(src: Path, dst: Path, qcfg: dict) -> Path:
    """A copy of checkpoint `src` (shards linked) whose config.json says `qcfg`."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(config, quantization_config=qcfg)))
    return dst


@pytest.mark.parametrize("change, message", [
    (dict(quant_method="gptq", bits=8), "bits = 8"),
    (dict(quant_method="hqq"), "quant_method 'hqq'"),
    (dict(quant_method="awq", version="gemv"), "version 'gemv'"),
    (dict(quant_method="gptq", checkpoint_format="marlin"), "checkpoint_format 'marlin'"),
])
def test_unsupported_quantization_fails_at_construction_naming_it(change, message, float_checkpoints, tmp_path):
    base = dict(bits=4, group_size=64, desc_act=False, sym=True, version="gemm", zero_point=True)
    path = with_quant_config(float_checkpoints["qwen2"], tmp_path / "ckpt", dict(base, **change))
    with pytest.raises(Exception, match=message):
        LLM(str(path), devices=["cpu"])


def test_unsupported_quant_mode_fails_at_construction(float_checkpoints):
    with pytest.raises(ValueError, match="quant='int8'"):
        LLM(str(float_checkpoints["qwen2"]), devices=["cpu"], quant="int8")


def test_quantize_at_load_takes_the_largest_group_or_leaves_the_layer_float(tmp_path, caplog):
    """hidden 64: no layer is a multiple of 128. q/k/v/o, gate/up (in 64) take group 64, down_proj
    (in 200: no group of 32, 64, 128 divides it) stays float; one log line per shape names a layer;
    the planner counts exactly what was loaded; and the model is transformers on those weights."""
    path = make_checkpoint(tmp_path / "f", "qwen2", tokenizer=False, intermediate_size=200)
    with caplog.at_level("INFO", logger="pprt"), \
            LLM(str(path), devices=["cpu"], dtype="float32", quant="int4", kv_cache_memory=1 << 20) as llm:
        kinds = layer_kinds(llm)
        loaded_bytes = llm.executor.weight_bytes[0]
        out = llm.generate(PROMPTS[0], greedy(8))[0]
        rtn = {f"{p}.weight": dequantize(m.weight) for p, m in kinds.items() if isinstance(m, Int4Linear)}
        config = llm.config
    for prefix, m in kinds.items():
        if prefix.endswith("down_proj") or prefix == "lm_head":
            assert isinstance(m, nn.Linear), prefix
        else:
            assert isinstance(m, Int4Linear) and m.group_size == 64, prefix
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quant='int4'")]
    assert len(lines) == 2, lines
    assert any("in_features 64 use Int4 group 64" in x and "model.layers.0.self_attn.q_proj" in x for x in lines)
    assert any("in_features 200 stay in the model dtype" in x and "model.layers.0.mlp.down_proj" in x for x in lines)
    from pprt.plan import DeviceBudget, plan

    planned = plan(config, [DeviceBudget("cpu", 1 << 30)], quant="int4", dtype_bytes=4, max_context=256)
    assert planned.stages[0].weight_bytes == loaded_bytes and planned.quant == "int4"
    write_sharded(tmp_path / "rtn", {**read_tensors(path), **rtn}, json.loads((path / "config.json").read_text()))
    tokens, logprobs = reference_greedy(reference_model(tmp_path / "rtn"), PROMPTS[0], 8)
    assert out.token_ids == tokens
    assert torch.allclose(torch.tensor(chosen(out)), torch.tensor(logprobs), atol=LOGPROB_ATOL, rtol=0)
