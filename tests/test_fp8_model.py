"""FP8 end to end: official block-wise FP8 checkpoints, quant="fp8" at load, the planner's bytes.

1. Tiny float checkpoints with sizes that are not multiples of 128 (every last block is
   partial) are quantized block by block by the test-side quantizer (tests/fp8_packers.py)
   into official FP8 checkpoints (float8_e4m3fn `weight` + float32 `weight_scale_inv`,
   the rest in bf16, `quantization_config` as Qwen writes it), for qwen2, qwen3 and
   qwen3_moe (per-expert). The same values dequantized by the published formula make a
   float checkpoint: pprt on the FP8 file must give transformers' greedy tokens on it,
   with logprobs within LOGPROB_ATOL. A module listed in `modules_to_not_convert` (and
   kept in bf16 by the file) loads as a float nn.Linear.
2. quant="fp8" on a float checkpoint: exactly transformers on the dequantized FP8 weights,
   drift from the float model measured and bounded, weights about half of bf16, and the
   planner's bytes equal to what was loaded.
3. A generation through the Triton W8A16 kernel under the interpreter matches the reference.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from ckpt_files import is_quantized_linear, read_tensors, write_sharded
from fp8_packers import fp8_block_quantize
from models import make_checkpoint, reference_greedy, reference_logprobs, reference_model
from pprt import LLM, SamplingParams
from pprt.plan import DeviceBudget, plan
from pprt.weights.fp8 import Fp8Linear, dequantize
from pprt.weights.merge import linear_modules

# fp32 activations and the same dequantized weights on both sides: only summation order
# differs (measured max |dlogprob| ~1e-5). The bound is 1e-3.
LOGPROB_ATOL = 1e-3
# quant="fp8" (block 128, e4m3) against the float model over the generated tokens: e4m3 keeps
# 3 mantissa bits (relative error up to 1/16 per weight). Measured on these random models:
# mean 0.01-0.02 nats; the issue asks for a mean below 0.1.
FP8_MEAN_ATOL = 0.1

# No size is a multiple of 128: hidden 160, q rows 160-192, intermediate 200, experts 72.
FAMILIES = {
    "qwen2": dict(hidden_size=160, intermediate_size=200, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(hidden_size=160, intermediate_size=200, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=48),
    "qwen3_moe": dict(hidden_size=160, intermediate_size=200, num_attention_heads=4, num_key_value_heads=1,
                      head_dim=40, moe_intermediate_size=72),
}
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
NOT_CONVERTED = "model.layers.1.self_attn.o_proj"  # listed in modules_to_not_convert, bf16 in the file
PROMPTS = [[5, 17, 40, 33, 100, 7], list(range(30, 100, 3))]
N_TOKENS = 12


def greedy(n: int = N_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)


def chosen(out) -> list[float]:
    return [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]


def linears(llm: LLM) -> dict[str, nn.Module]:
    stage = llm.executor.worker.stage
    return linear_modules(stage)  # merged and stacked ones under their own names


def write_fp8_and_dequantized(src, fp8_dir, deq_dir, not_converted: tuple[str, ...] = ()) -> int:
    """An official FP8 checkpoint of src and the float checkpoint of its dequantized values."""
    config = json.loads((src / "config.json").read_text())
    fp8, deq = {}, {}
    for name, t in read_tensors(src).items():
        prefix = name.removesuffix(".weight")
        if not is_quantized_linear(name, t) or prefix in not_converted:
            fp8[name] = t.bfloat16()  # official files keep the rest in bf16
            deq[name] = t.bfloat16().float()
            continue
        stored, w = fp8_block_quantize(t)
        fp8.update({f"{prefix}.{k}": v for k, v in stored.items()})
        deq[name] = w
    qcfg = dict(FP8_CONFIG, modules_to_not_convert=["lm_head", *not_converted])
    write_sharded(fp8_dir, fp8, dict(config, torch_dtype="bfloat16", quantization_config=qcfg))
    write_sharded(deq_dir, deq, config)
    return sum(1 for n in fp8 if n.endswith(".weight_scale_inv"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def float_checkpoints(tmp_path_factory):
    return {f: make_checkpoint(tmp_path_factory.mktemp(f), f, tokenizer=False, max_shard_size="300KB", **kw)
            for f, kw in FAMILIES.items()}


# ---------------------------------------------------------------- 1. official FP8 files


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(family, float_checkpoints, tmp_path):
    n_fp8 = write_fp8_and_dequantized(float_checkpoints[family], tmp_path / "fp8", tmp_path / "deq", (NOT_CONVERTED,))
    with LLM(str(tmp_path / "fp8"), devices=["cpu"], dtype="float32", kv_cache_memory=1 << 20) as llm:
        assert llm.config.quant.method == "fp8"
        kinds = linears(llm)
        for prefix, m in kinds.items():
            float_expected = prefix in ("lm_head", NOT_CONVERTED) or prefix.endswith(".mlp.gate")
            assert isinstance(m, nn.Linear if float_expected else Fp8Linear), prefix
        assert sum(isinstance(m, Fp8Linear) for m in kinds.values()) == n_fp8
        assert any(".experts." in p for p in kinds) == (family == "qwen3_moe")
        loaded = llm.executor.weight_bytes[0]
        planned = plan(llm.config, [DeviceBudget("cpu", 1 << 30)], dtype_bytes=4, max_context=256)
        batch = llm.generate(PROMPTS, greedy())
    assert planned.quant == "fp8" and planned.stages[0].weight_bytes == loaded  # the planner's bytes are true
    ref = reference_model(tmp_path / "deq")
    worst = 0.0
    for prompt, out in zip(PROMPTS, batch):
        tokens, logprobs = reference_greedy(ref, prompt, N_TOKENS)
        assert out.token_ids == tokens, family
        worst = max(worst, (torch.tensor(chosen(out)) - torch.tensor(logprobs)).abs().max().item())
    print(f"{family} fp8: max |dlogprob| vs transformers on dequantized weights = {worst:.2e}")
    assert worst <= LOGPROB_ATOL


def test_fp8_weight_of_wrong_shape_or_scale_fails_naming_the_tensor(float_checkpoints, tmp_path):
    write_fp8_and_dequantized(float_checkpoints["qwen2"], tmp_path / "fp8", tmp_path / "deq")
    tensors = read_tensors(tmp_path / "fp8")
    name = "model.layers.0.mlp.up_proj.weight_scale_inv"
    tensors[name] = tensors[name][:, :1].contiguous()  # [2, 2] -> [2, 1]
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    write_sharded(tmp_path / "bad", tensors, config)
    with pytest.raises(Exception, match=r"model\.layers\.0\.mlp\.up_proj\.weight_scale_inv has shape \[2, 1\]"):
        LLM(str(tmp_path / "bad"), devices=["cpu"])


# ---------------------------------------------------------------- 2. quant="fp8" at load


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe"])
def test_quantize_at_load_fp8_is_exact_on_its_weights_and_close_to_float(family, float_checkpoints, tmp_path):
    path = float_checkpoints[family]
    with LLM(str(path), devices=["cpu"], dtype="float32", quant="fp8", kv_cache_memory=1 << 20) as llm:
        kinds = linears(llm)
        assert all(isinstance(m, nn.Linear) == (p == "lm_head" or p.endswith(".mlp.gate")) for p, m in kinds.items())
        assert {m.block for m in kinds.values() if isinstance(m, Fp8Linear)} == {(128, 128)}
        assert llm.executor.worker.quant_seconds > 0
        outs = llm.generate(PROMPTS, greedy())
        deq = {f"{p}.weight": dequantize(m.fp8_weight) for p, m in kinds.items() if isinstance(m, Fp8Linear)}
    tensors = read_tensors(path)
    write_sharded(tmp_path / "deq", {**tensors, **deq}, json.loads((path / "config.json").read_text()))
    ref_deq = reference_model(tmp_path / "deq")
    for prompt, out in zip(PROMPTS, outs):
        tokens, logprobs = reference_greedy(ref_deq, prompt, N_TOKENS)
        assert out.token_ids == tokens
        assert torch.allclose(torch.tensor(chosen(out)), torch.tensor(logprobs), atol=LOGPROB_ATOL, rtol=0)
    ref = reference_model(path)
    deltas = torch.cat([torch.tensor(chosen(o)) - torch.tensor(reference_logprobs(ref, p, o.token_ids))
                        for p, o in zip(PROMPTS, outs)]).abs()
    print(f"{family} quant='fp8' vs float: |dlogprob| mean {deltas.mean():.4f} max {deltas.max():.4f}")
    assert 0 < deltas.mean() < FP8_MEAN_ATOL


def test_quantize_at_load_fp8_weights_are_half_of_bf16_and_planned_exactly(tmp_path):
    dims = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, head_dim=64)
    path = make_checkpoint(tmp_path, "qwen3", tokenizer=False, max_shard_size="20MB", **dims)
    opts = dict(devices=["cpu"], dtype="bfloat16", kv_cache_memory=1 << 20)
    with LLM(str(path), **opts) as llm:
        bf16_bytes = llm.executor.weight_bytes[0]
    with LLM(str(path), quant="fp8", **opts) as llm:
        fp8_bytes = llm.executor.weight_bytes[0]
        config = llm.config
        assert len(llm.generate([[3, 1, 4, 1, 5]], greedy(4))[0].token_ids) == 4  # bf16 activations run
    budget = [DeviceBudget("cpu", 1 << 32)]
    assert plan(config, budget, quant="fp8", max_context=256).stages[0].weight_bytes == fp8_bytes
    assert plan(config, budget, quant="none", max_context=256).stages[0].weight_bytes == bf16_bytes
    ratio = fp8_bytes / bf16_bytes
    print(f"fp8 / bf16 stage weight bytes = {fp8_bytes} / {bf16_bytes} = {ratio:.3f}")
    assert 0.49 <= ratio <= 0.52


# ---------------------------------------------------------------- 3. Triton kernel in a generation

TRITON_RUN = textwrap.dedent("""
    import json, sys
    import pprt_kernels.fp8_matmul as k
    from pprt import LLM, SamplingParams

    calls = {"triton_rows": [], "ref": 0}
    triton_fn, ref_fn = k.fp8_matmul_triton, k.fp8_matmul_ref

    def triton_counted(x, *args, **kwargs):
        calls["triton_rows"].append(x.shape[0])
        return triton_fn(x, *args, **kwargs)

    def ref_counted(*args, **kwargs):
        calls["ref"] += 1
        return ref_fn(*args, **kwargs)

    k.fp8_matmul_triton, k.fp8_matmul_ref = triton_counted, ref_counted
    path, prompts, n = json.loads(sys.argv[1])
    with LLM(path, devices=["cpu"], dtype="float32", kv_cache_memory=1 << 20) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0))
    print(json.dumps({"calls": calls, "tokens": [o.token_ids for o in outs],
                      "logprobs": [[lp[t] for lp, t in zip(o.logprobs, o.token_ids)] for o in outs]}))
""")


def test_generation_through_triton_fp8_kernel_under_interpreter(float_checkpoints, tmp_path, monkeypatch):
    n_layers = write_fp8_and_dequantized(float_checkpoints["qwen2"], tmp_path / "fp8", tmp_path / "deq")
    prompts, n = PROMPTS, 2
    env = dict(os.environ, PPRT_KERNELS="triton", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", TRITON_RUN, json.dumps([str(tmp_path / "fp8"), prompts, n])],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = got["calls"]["triton_rows"]
    assert got["calls"]["ref"] == 0 and len(rows) == n_layers * n  # every FP8 layer, every step
    monkeypatch.setenv("PPRT_KERNELS", "ref")
    with LLM(str(tmp_path / "fp8"), devices=["cpu"], dtype="float32", kv_cache_memory=1 << 20) as llm:
        want = llm.generate(prompts, greedy(n))
    assert got["tokens"] == [o.token_ids for o in want]
    for lp, o in zip(got["logprobs"], want):
        assert torch.allclose(torch.tensor(lp), torch.tensor(chosen(o)), atol=1e-4, rtol=0)
