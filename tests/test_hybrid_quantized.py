"""Quantized files of the hybrid families (qwen3_5, qwen3_5_moe, qwen3_next) against transformers.

1. Official block-wise FP8 files written by the tests' quantizer (tests/fp8_packers.py): every
   linear in float8_e4m3fn with float32 scales per 128 x 128 block, except what Qwen's FP8
   releases keep in bf16 (routers, shared-expert gates, the DeltaNet a/b projections, the
   embedding, the head, vision and mtp). Hidden 160 and experts of 96 rows, so last blocks
   are partial. qwen3_5_moe in both expert layouts: per expert (`experts.{e}.gate_proj.weight`
   + `weight_scale_inv`: the official Qwen3.5/3.6 MoE FP8 releases) and fused (`gate_up_proj`
   [E, 2I, H] + `gate_up_proj_scale_inv` [E, ceil(2I/128), ceil(H/128)]: transformers'
   FP8Experts layout; with I = 96 one block holds gate's last 32 rows and up's first 32).
2. GPTQ Int4 files written by the tests' GPTQ packer (tests/int4_packers.py) as Qwen's
   official Qwen3.5 GPTQ-Int4 ones: `dynamic` rule "-:.*attn.*" (self_attn and linear_attn
   stay float), experts quantized per expert (GPTQ quantizes Linear modules), routers and
   shared-expert gates float.
   For 1 and 2: pprt on 1 and 2 stages gives transformers' greedy tokens on the dequantized
   weights, logprobs within LOGPROB_ATOL.
3. quant="int4" / quant="fp8" at load on a hybrid MoE model: exactly transformers on the
   dequantized weights, drift from the float model measured and bounded (as the dense tests).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from ckpt_files import is_quantized_linear, read_tensors, write_sharded
from fp8_packers import fp8_block_quantize, fp8_block_quantize_fused
from int4_packers import gptq_quantize
from models import make_checkpoint, reference_greedy, reference_logprobs, reference_model
from pprt import LLM, SamplingParams
from pprt.plan import DeviceBudget, plan
from pprt.weights import fp8, int4
from pprt.weights.merge import linear_modules

# fp32 activations on both sides, the same dequantized weights: only summation order differs.
LOGPROB_ATOL = 1e-3
# drift from the float model over the generated tokens (fp32), as tests/test_fp8_model.py and
# tests/test_int4_model.py bound it on the dense families
FP8_MEAN_ATOL = 0.1
RTN_MEAN_ATOL, RTN_MAX_ATOL = 0.75, 3.0
# hidden 160, q rows 320, dense MLP 192, experts 96, shared expert 64: no size but the DeltaNet
# qkv (128) is a multiple of 128, and every K is a multiple of the GPTQ group (32)
DIMS = dict(hidden_size=160, head_dim=40, intermediate_size=192, moe_intermediate_size=96,
            shared_expert_intermediate_size=64)
KEEP_BF16 = (".mlp.gate.weight", "shared_expert_gate.weight", "embed_tokens.weight", "in_proj_a.weight",
             "in_proj_b.weight", "in_proj_ba.weight")
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
              "modules_to_not_convert": ["lm_head", "mlp.gate", "shared_expert_gate", "linear_attn.in_proj_a",
                                         "linear_attn.in_proj_b", "linear_attn.in_proj_ba", "model.visual", "mtp"]}
GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False,
               "dynamic": {"-:.*attn.*": {}}}
PROMPTS = [[5, 17, 40, 33, 100, 7], list(range(30, 100, 3))]
N_TOKENS = 10
SLOW = pytest.mark.slow
GREEDY = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True, logprobs=0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def family_dims(family: str) -> dict:
    """DIMS without the fields the family's config does not take."""
    if family == "qwen3_5":  # dense
        return {k: v for k, v in DIMS.items() if "expert" not in k}
    if family == "qwen3_5_moe":  # every layer MoE
        return {k: v for k, v in DIMS.items() if k != "intermediate_size"}
    return dict(DIMS)


def chosen(out) -> list[float]:
    return [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]


def write_fp8(src: Path, fp8_dir: Path, deq_dir: Path) -> None:
    """An official FP8 file of `src` (fused expert tensors with fused scales) and its dequantized twin."""
    config = json.loads((src / "config.json").read_text())
    stored, deq = {}, {}
    for name, t in read_tensors(src).items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            q, w = fp8_block_quantize_fused(t)
            stored[name], stored[f"{name}_scale_inv"], deq[name] = q["weight"], q["scale_inv"], w
        elif t.dim() != 2 or name.endswith(KEEP_BF16) or name.startswith(("lm_head", "model.visual.", "mtp.")):
            stored[name], deq[name] = t.bfloat16(), t.bfloat16().float()
        else:
            q, deq[name] = fp8_block_quantize(t)
            stored.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in q.items()})
    write_sharded(fp8_dir, stored, dict(config, quantization_config=FP8_CONFIG))
    write_sharded(deq_dir, deq, config)


def write_gptq(src: Path, gptq_dir: Path, deq_dir: Path) -> int:
    """A GPTQ file of `src` with Qwen's Qwen3.5 rule (no attention quantized); returns the Int4 layers."""
    config = json.loads((src / "config.json").read_text())
    stored, deq = {}, {}
    for name, t in read_tensors(src).items():
        prefix = name.removesuffix(".weight")
        if not is_quantized_linear(name, t) or "attn" in name or name.endswith("shared_expert_gate.weight") \
                or name.startswith(("model.visual.", "mtp.")):
            stored[name], deq[name] = t.half(), t.half().float()
            continue
        q, deq[name] = gptq_quantize(t, GPTQ_CONFIG["group_size"], sym=True, seed=zlib.crc32(prefix.encode()))
        stored.update({f"{prefix}.{k}": v for k, v in q.items()})
    write_sharded(gptq_dir, stored, dict(config, quantization_config=GPTQ_CONFIG))
    write_sharded(deq_dir, deq, config)
    return sum(1 for n in stored if n.endswith(".qweight"))


def run(path: Path, split: list[int] | None, quant: str | None = None):
    """(outputs, linear modules by name when one stage) of pprt on `path` over len(split) stages."""
    devices = ["cpu"] * (len(split) if split else 1)
    with LLM(str(path), devices=devices, split=split, dtype="float32", quant=quant) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
        kinds = linear_modules(llm.executor.worker.stage) if split is None else None
    return outs, kinds


def assert_matches(outs, ref) -> float:
    """Greedy tokens equal transformers'; returns the largest |d logprob| (asserted <= LOGPROB_ATOL)."""
    worst = 0.0
    for prompt, out in zip(PROMPTS, outs):
        tokens, logprobs = reference_greedy(ref, prompt, N_TOKENS)
        assert out.token_ids == tokens
        worst = max(worst, (torch.tensor(chosen(out)) - torch.tensor(logprobs)).abs().max().item())
    assert worst <= LOGPROB_ATOL
    return worst


# ---------------------------------------------------------------- 1. official FP8 files

FP8_CASES = [
    ("qwen3_5", "per_expert", None),
    ("qwen3_5", "per_expert", [3, 5]),
    ("qwen3_5_moe", "per_expert", None),
    pytest.param("qwen3_5_moe", "per_expert", [3, 5], marks=SLOW),
    ("qwen3_5_moe", "fused", None),
    ("qwen3_5_moe", "fused", [5, 3]),
    ("qwen3_next", "per_expert", None),
    pytest.param("qwen3_next", "per_expert", [3, 5], marks=SLOW),
]


@pytest.fixture(scope="module")
def fp8_files(tmp_path_factory):
    made = {}

    def get(family: str, layout: str) -> tuple[Path, Path]:
        if (family, layout) not in made:
            root = tmp_path_factory.mktemp(f"{family}-{layout}")
            src = make_checkpoint(root / "float", family, tokenizer=False, max_shard_size="300KB",
                                  expert_layout=layout if family != "qwen3_5" else None, **family_dims(family))
            write_fp8(src, root / "fp8", root / "deq")
            made[(family, layout)] = root / "fp8", root / "deq"
        return made[(family, layout)]
    return get


@pytest.mark.parametrize("family, layout, split", FP8_CASES,
                         ids=lambda v: "-".join(map(str, v)) if isinstance(v, list) else str(v))
def test_official_fp8_hybrid_matches_transformers_on_dequantized_weights(fp8_files, family, layout, split):
    path, deq = fp8_files(family, layout)
    outs, kinds = run(path, split)
    worst = assert_matches(outs, reference_model(deq))
    print(f"{family} fp8 ({layout}, split {split}): max |dlogprob| vs transformers = {worst:.2e}")
    if kinds is None:
        return
    assert isinstance(kinds["model.layers.0.linear_attn.out_proj"], fp8.Fp8Linear)
    assert isinstance(kinds["model.layers.3.self_attn.q_proj"], fp8.Fp8Linear)
    assert isinstance(kinds["lm_head"], nn.Linear)
    ab = ("in_proj_ba",) if family == "qwen3_next" else ("in_proj_a", "in_proj_b")
    assert all(isinstance(kinds[f"model.layers.0.linear_attn.{p}"], nn.Linear) for p in ab)  # bf16 in the file
    if family == "qwen3_5":
        return
    assert isinstance(kinds["model.layers.1.mlp.gate"], nn.Linear)
    assert isinstance(kinds["model.layers.1.mlp.shared_expert.down_proj"], fp8.Fp8Linear)
    gate, up, down = (kinds[f"model.layers.1.mlp.experts.7.{p}"] for p in ("gate_proj", "up_proj", "down_proj"))
    assert all(isinstance(m, fp8.Fp8Linear) for m in (gate, up, down))
    # fused: gate and up re-expressed in 32-row blocks (gcd(128, 96)); per expert: the file's blocks
    assert gate.block == up.block == ((32, 128) if layout == "fused" else (128, 128)) and down.block == (128, 128)


@SLOW  # ~40 s of interpreted kernels; tests/test_expert_stacking.py runs the same split experts through them
def test_fused_fp8_experts_run_in_the_triton_fused_moe(fp8_files, monkeypatch):
    """The GPU path on the fused-layout FP8 file (PPRT_KERNELS=triton, interpreted): every MoE layer's
    FP8 experts (gate and up in 32-row scale blocks) go through the fused grouped-GEMM kernel, every
    other FP8 linear through the W8A16 kernel; tokens and logprobs as transformers on the dequantized
    weights."""
    import pprt_kernels.fused_moe as fm

    path, deq = fp8_files("qwen3_5_moe", "fused")
    calls = []
    triton = fm.fused_moe_triton
    monkeypatch.setattr(fm, "fused_moe_triton", lambda *a, **k: calls.append(1) or triton(*a, **k))
    monkeypatch.setenv("PPRT_KERNELS", "triton")
    n = 3
    with LLM(str(path), devices=["cpu"], dtype="float32") as llm:
        outs = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0))
        layers = llm.config.num_layers
    assert len(calls) == layers * n  # every layer is MoE, every step
    tokens, logprobs = reference_greedy(reference_model(deq), PROMPTS[0], n)
    assert outs[0].token_ids == tokens
    assert chosen(outs[0]) == pytest.approx(logprobs, abs=LOGPROB_ATOL)


@pytest.mark.parametrize("layout, inter", [("per_expert", 96), ("fused", 128), ("fused", 96)])
def test_planner_bytes_of_fp8_experts_in_either_layout(layout, inter, tmp_path):
    """The planner counts FP8 experts per expert from config.json; a stage holds exactly that for
    per-expert files and for fused ones whose I is a multiple of the 128-row block. When it is not
    (I = 96), gate's and up's scales are held in 32-row blocks: 3 rows each instead of 1, over
    ceil(160/128) = 2 column blocks, so 2 * 2 * 2 * 4 = 32 more bytes per expert."""
    dims = dict(family_dims("qwen3_5_moe"), moe_intermediate_size=inter)
    src = make_checkpoint(tmp_path / "float", "qwen3_5_moe", tokenizer=False, max_shard_size="300KB",
                          expert_layout=layout, **dims)
    write_fp8(src, tmp_path / "fp8", tmp_path / "deq")
    with LLM(str(tmp_path / "fp8"), devices=["cpu"], dtype="bfloat16") as llm:
        held = llm.executor.weight_bytes[0]
        config = llm.config
    planned = plan(config, [DeviceBudget("cpu", 1 << 34)], dtype_bytes=2, max_context=64).stages[0].weight_bytes
    extra = 32 * config.num_experts * config.num_layers if (layout, inter) == ("fused", 96) else 0
    assert held == planned + extra


# ---------------------------------------------------------------- 2. GPTQ Int4 files


@pytest.mark.parametrize("family, split", [("qwen3_5_moe", None), ("qwen3_5_moe", [3, 5]), ("qwen3_next", None),
                                           pytest.param("qwen3_next", [5, 3], marks=SLOW)],
                         ids=lambda v: "-".join(map(str, v)) if isinstance(v, list) else str(v))
def test_gptq_hybrid_quantizes_mlp_only_and_matches_transformers(family, split, tmp_path):
    src = make_checkpoint(tmp_path / "float", family, tokenizer=False, max_shard_size="300KB",
                          expert_layout="per_expert", **family_dims(family))
    n_int4 = write_gptq(src, tmp_path / "gptq", tmp_path / "deq")
    outs, kinds = run(tmp_path / "gptq", split)
    worst = assert_matches(outs, reference_model(tmp_path / "deq"))
    print(f"{family} gptq (split {split}): max |dlogprob| vs transformers = {worst:.2e}")
    if kinds is None:
        return
    for prefix, m in kinds.items():
        mlp = ".mlp." in prefix and not prefix.endswith((".mlp.gate", "shared_expert_gate"))
        assert isinstance(m, int4.Int4Linear) == mlp, prefix
        assert not mlp or m.group_size == 32
    assert sum(isinstance(m, int4.Int4Linear) for m in kinds.values()) == n_int4


# ---------------------------------------------------------------- 3. quantize at load


@pytest.mark.parametrize("quant", ["fp8", "int4"])
def test_quantize_at_load_on_a_hybrid_moe_is_exact_on_its_weights_and_close_to_float(quant, tmp_path):
    """The model is initialized as Qwen's configs say (initializer_range 0.02): at the other tests'
    0.08, with their perturbed norms, a random hybrid MoE is chaotic (measured: 1% multiplicative
    noise on the DeltaNet a/b projections alone moves the logprobs by 0.22 nats on average, as
    routing choices flip), so a drift bound would measure the random model, not the format."""
    src = make_checkpoint(tmp_path / "float", "qwen3_5_moe", tokenizer=False, max_shard_size="300KB",
                          expert_layout="per_expert", initializer_range=0.02, **family_dims("qwen3_5_moe"))
    outs, kinds = run(src, None, quant)
    cls = fp8.Fp8Linear if quant == "fp8" else int4.Int4Linear
    assert isinstance(kinds["model.layers.0.linear_attn.in_proj_qkv"], cls)
    assert isinstance(kinds["model.layers.2.mlp.experts.3.down_proj"], cls)
    assert isinstance(kinds["model.layers.2.mlp.gate"], nn.Linear)
    deq = {f"model.language_model.{p.removeprefix('model.')}.weight":
           fp8.dequantize(m.fp8_weight) if quant == "fp8" else int4.dequantize(m.weight)
           for p, m in kinds.items() if isinstance(m, cls)}
    tensors = read_tensors(src)
    assert set(deq) <= set(tensors)
    write_sharded(tmp_path / "deq", {**tensors, **deq}, json.loads((src / "config.json").read_text()))
    assert_matches(outs, reference_model(tmp_path / "deq"))
    ref = reference_model(src)
    deltas = torch.cat([torch.tensor(chosen(o)) - torch.tensor(reference_logprobs(ref, p, o.token_ids))
                        for p, o in zip(PROMPTS, outs)]).abs()
    print(f"qwen3_5_moe quant={quant!r} vs float: |dlogprob| mean {deltas.mean():.4f} max {deltas.max():.4f}")
    if quant == "fp8":
        assert 0 < deltas.mean() < FP8_MEAN_ATOL
    else:
        assert deltas.mean() <= RTN_MEAN_ATOL and 1e-3 < deltas.max() <= RTN_MAX_ATOL
