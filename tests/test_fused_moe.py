"""Fused MoE: routing, the expert-sorted layout, and the grouped-GEMM experts against the per-expert loop.

The oracle is the loop pprt's MoE layer ran before the fused kernels (and that
transformers runs): for each expert some token chose, its MLP on those tokens,
times the routing weight, added into the output. The reference must equal it;
the Triton kernels (under TRITON_INTERPRET on CPU) and torch's grouped GEMM must
equal the reference. Cases: random routing, experts no token chose, one expert
taking every token, top-k 1, 2, 8, 10, sizes that are not powers of two.
Activations are fp16/fp32 on CPU (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pprt_kernels.fused_moe as fm
import pprt_kernels.moe_routing as mr
from bench.counting import count_ops
from pprt.weights.fp8 import dequantize as fp8_dequantize
from pprt.weights.fp8 import quantize_fp8
from pprt.weights.int4 import dequantize, quantize_rtn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOAT, INT4, FP8 = fm.ExpertFormat.FLOAT, fm.ExpertFormat.INT4, fm.ExpertFormat.FP8


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def loop_moe(x, logits, gate, up, down, top_k, renormalize):
    """The per-expert loop: gate/up [E, I, H], down [E, H, I] float weights; everything in x's dtype."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, chosen = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(x.dtype)
    out = torch.zeros_like(x)
    for e in chosen.unique().tolist():
        token, slot = (chosen == e).nonzero(as_tuple=True)
        h = F.silu(F.linear(x[token], gate[e])) * F.linear(x[token], up[e])
        out.index_add_(0, token, F.linear(h, down[e]) * weights[token, slot, None])
    return out


# (T, H, I, E, top_k, routing); routing "random", "one" (every token picks expert 3 first), "few"
CASES = {
    "T1-E8-k2": (1, 64, 32, 8, 2, "random"),  # 6 experts no token chose
    "T5-H40-I24-E6-k3": (5, 40, 24, 6, 3, "random"),
    "T9-E16-k1": (9, 48, 40, 16, 1, "random"),
    "T7-E12-k8-one": (7, 56, 24, 12, 8, "one"),
    "T33-E10-k10": (33, 72, 40, 10, 10, "random"),  # k = E: every expert takes every token
    "T20-E33-k2-few": (20, 40, 24, 33, 2, "few"),  # only experts 0..3 are ever chosen
}


def make_case(t, h, i, e, top_k, routing, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen)
    logits = torch.randn(t, e, generator=gen)
    if routing == "one":
        logits[:, 3] += 20.0
    elif routing == "few":
        logits[:, 4:] -= 30.0
    gate, up = torch.randn(e, i, h, generator=gen) / h**0.5, torch.randn(e, i, h, generator=gen) / h**0.5
    down = torch.randn(e, h, i, generator=gen) / i**0.5
    weights = (fm.ExpertWeights(FLOAT, torch.cat([gate, up], 1).to(DEVICE, dtype)),
               fm.ExpertWeights(FLOAT, down.to(DEVICE, dtype)))
    return x.to(DEVICE, dtype), logits.to(DEVICE), (gate, up, down), weights


def int4_experts(e, n, k, group, seed, perm=False) -> tuple[fm.ExpertWeights, torch.Tensor]:
    """RTN-quantized random experts stacked, and their dequantized float weights [E, N, K]."""
    gen = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(k, generator=gen) if perm else torch.arange(k) for _ in range(e)])
    qs = []
    for p in perms:  # desc_act: stored input row j is input perm[j] of the layer
        qs.append(quantize_rtn((torch.randn(n, k, generator=gen) / k**0.5)[:, p], group))
        qs[-1].perm = p if perm else None
    dense = torch.stack([dequantize(q) for q in qs])  # [E, N, K] in the layer's input order
    stack = lambda name: torch.stack([getattr(q, name) for q in qs]).to(DEVICE)  # noqa: E731
    w = fm.ExpertWeights(INT4, stack("qweight"), stack("scales"), stack("zeros"), group,
                         perms.to(DEVICE) if perm else None)
    return w, dense


def fp8_experts(e, n_part, k, parts, block, seed) -> tuple[fm.ExpertWeights, torch.Tensor]:
    """Block-FP8 random experts, `parts` layers of n_part rows stacked along N (each with its own scale
    rows), and their dequantized float weights [E, parts * n_part, K]."""
    gen = torch.Generator().manual_seed(seed)
    qs = [[quantize_fp8(torch.randn(n_part, k, generator=gen) / k**0.5, block) for _ in range(parts)]
          for _ in range(e)]
    w = torch.stack([torch.cat([q.weight for q in expert]) for expert in qs]).to(DEVICE)
    s = torch.stack([torch.cat([q.scale for q in expert]) for expert in qs]).to(DEVICE)
    dense = torch.stack([torch.cat([fp8_dequantize(q) for q in expert]) for expert in qs])
    return fm.ExpertWeights(FP8, w, s, block=block, parts=parts), dense


# ---------------------------------------------------------------- routing


@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "plain"])
@pytest.mark.parametrize("t,e,k", [(1, 8, 2), (5, 33, 8), (17, 128, 10), (3, 10, 10), (9, 6, 1)],
                         ids=lambda v: str(v))
def test_route_triton_matches_reference(t, e, k, renorm):
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(t * e + k)).to(DEVICE)
    w_ref, ids_ref = mr.moe_route_ref(logits, k, renorm, torch.float32)
    w, ids = mr.moe_route_triton(logits, k, renorm, torch.float32)
    assert torch.equal(ids, ids_ref)
    assert torch.allclose(w, w_ref, rtol=1e-5, atol=1e-7)
    if renorm:
        assert torch.allclose(w.sum(-1), torch.ones(t, device=DEVICE), atol=1e-6)


@pytest.mark.parametrize("t,e,k,block_m", [(1, 8, 2, 16), (5, 8, 2, 4), (7, 33, 8, 16), (30, 5, 1, 16),
                                           (3, 10, 10, 1), (40, 6, 3, 8), (64, 128, 8, 32)],
                         ids=lambda v: str(v))
def test_align_triton_equals_reference_and_groups_pairs(t, e, k, block_m):
    gen = torch.Generator().manual_seed(t + e)
    ids = torch.argsort(torch.rand(t, e, generator=gen), dim=1)[:, :k].to(torch.int32)  # distinct per token
    ids[: t // 2] = torch.arange(k, dtype=torch.int32)  # a crowded expert 0..k-1 and some never chosen
    ref = mr.moe_align_ref(ids.to(DEVICE), e, block_m)
    out = mr.moe_align_triton(ids.to(DEVICE), e, block_m)
    for name in ("sorted_pairs", "block_expert", "expert_ends"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    # the layout itself, checked by plain Python: each expert's run holds exactly its pairs, in order
    s, flat = t * k, ids.reshape(-1).tolist()
    pairs, blocks, ends = out.sorted_pairs.tolist(), out.block_expert.tolist(), out.expert_ends.tolist()
    assert len(pairs) == mr.aligned_size(s, e, block_m)
    start = 0
    for expert in range(e):
        run = pairs[start:ends[expert]]
        mine = [p for p in range(s) if flat[p] == expert]
        assert run[:len(mine)] == mine and all(p == s for p in run[len(mine):])
        assert len(run) == -(-len(mine) // block_m) * block_m
        assert all(blocks[r // block_m] == expert for r in range(start, ends[expert], block_m))
        start = ends[expert]
    assert all(b == -1 for b in blocks[start // block_m:])


# ---------------------------------------------------------------- experts


@pytest.mark.parametrize("case", list(CASES))
def test_reference_equals_the_loop(case):
    t, h, i, e, k, routing = CASES[case]
    x, logits, (gate, up, down), (gu, dn) = make_case(t, h, i, e, k, routing, torch.float32)
    want = loop_moe(x, logits, gate.to(DEVICE), up.to(DEVICE), down.to(DEVICE), k, renormalize=k > 1)
    got = fm.fused_moe_ref(x, logits, gu, dn, k, renormalize=k > 1)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel_err(got, want) < 1e-6


SLOW = pytest.mark.slow
FP32, FP16 = (torch.float32, 1e-5), (torch.float16, 2e-3)
# each case once in the default run (the interpreter is slow); the other dtype with -m slow
TRITON_CASES = [pytest.param(c, *dt, id=f"{c}-{name}", marks=() if default else SLOW)
                for c in CASES for name, dt in (("fp32", FP32), ("fp16", FP16))
                for default in [(name == "fp32") == (c in ("T7-E12-k8-one", "T33-E10-k10", "T9-E16-k1"))]]


@pytest.mark.parametrize("case,dtype,tol", TRITON_CASES)
def test_triton_equals_reference(case, dtype, tol):
    t, h, i, e, k, routing = CASES[case]
    x, logits, (gate, up, down), (gu, dn) = make_case(t, h, i, e, k, routing, dtype, seed=1)
    renorm = routing != "one"
    want = fm.fused_moe_ref(x, logits, gu, dn, k, renorm)
    got = fm.fused_moe_triton(x, logits, gu, dn, k, renorm)
    assert got.dtype == dtype and rel_err(got, want) < tol
    if dtype == torch.float32:  # and the loop, once more, on the Triton path
        assert rel_err(got, loop_moe(x, logits, gate.to(DEVICE), up.to(DEVICE), down.to(DEVICE), k, renorm)) < tol


@pytest.mark.parametrize("block_m,split_k", [(16, 3), (64, 1), pytest.param(16, 1, marks=SLOW),
                                             pytest.param(32, 2, marks=SLOW)], ids=lambda v: str(v))
def test_triton_block_sizes_and_split_k(block_m, split_k):
    """Every row-block height and the down projection's K slices (fp32 atomics) give the same sum."""
    x, logits, _, (gu, dn) = make_case(11, 40, 72, 7, 3, "random", torch.float32, seed=2)
    weights, ids = mr.moe_route_ref(logits, 3, True, x.dtype)
    want = fm.moe_experts_ref(x, weights, ids, gu, dn)
    got = fm.moe_experts_triton(x, weights, ids, gu, dn, block_m=block_m, split_k=split_k)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("group,top_k,t,perm", [
    (32, 2, 7, True), (64, 8, 3, False), pytest.param(32, 1, 18, False, marks=SLOW),
    pytest.param(32, 2, 7, False, marks=SLOW), pytest.param(64, 8, 3, True, marks=SLOW),
    pytest.param(32, 1, 18, True, marks=SLOW)], ids=lambda v: str(v))
def test_int4_experts(group, top_k, t, perm):
    """Int4 experts: the reference equals the loop on the dequantized weights; Triton equals the reference."""
    e, h, i = 9, 128, 64
    gu, gu_dense = int4_experts(e, 2 * i, h, group, seed=group + top_k, perm=perm)
    dn, dn_dense = int4_experts(e, h, i, group, seed=group + top_k + 1, perm=perm)
    gen = torch.Generator().manual_seed(t)
    x, logits = torch.randn(t, h, generator=gen).to(DEVICE), torch.randn(t, e, generator=gen).to(DEVICE)
    want = loop_moe(x, logits, gu_dense[:, :i].to(DEVICE), gu_dense[:, i:].to(DEVICE), dn_dense.to(DEVICE),
                    top_k, renormalize=False)
    ref = fm.fused_moe_ref(x, logits, gu, dn, top_k, False)
    assert rel_err(ref, want) < 1e-5
    assert rel_err(fm.fused_moe_triton(x, logits, gu, dn, top_k, False), ref) < 1e-5
    half = fm.ExpertWeights(INT4, gu.weight, gu.scales.half(), gu.zeros, group, gu.perm), \
        fm.ExpertWeights(INT4, dn.weight, dn.scales.half(), dn.zeros, group, dn.perm)
    ref16 = fm.fused_moe_ref(x.half(), logits, *half, top_k, False)
    assert rel_err(fm.fused_moe_triton(x.half(), logits, *half, top_k, False), ref16) < 2e-3


@pytest.mark.parametrize("native", [True, False], ids=["e4m3", "bits"])
@pytest.mark.parametrize("block,i", [((128, 128), 32), ((16, 32), 24)], ids=["b128-I32", "b16x32-I24"])
def test_fp8_experts(block, i, native, monkeypatch):
    """FP8 experts (official block 128 with partial blocks; small blocks that do not divide I, so gate's
    and up's scale rows must stay apart): reference = loop on the dequantized weights, Triton = reference,
    with Triton's e4m3 type and with the pre-sm89 bit decoder."""
    e, h, top_k, t = 7, 64, 2, 6
    gu, gu_dense = fp8_experts(e, i, h, 2, block, seed=i)
    dn, dn_dense = fp8_experts(e, h, i, 1, block, seed=i + 1)
    gen = torch.Generator().manual_seed(i)
    x, logits = torch.randn(t, h, generator=gen).to(DEVICE), torch.randn(t, e, generator=gen).to(DEVICE)
    want = loop_moe(x, logits, gu_dense[:, :i].to(DEVICE), gu_dense[:, i:].to(DEVICE), dn_dense.to(DEVICE),
                    top_k, renormalize=True)
    ref = fm.fused_moe_ref(x, logits, gu, dn, top_k, True)
    assert rel_err(ref, want) < 1e-5
    monkeypatch.setattr(fm, "native_fp8", lambda device: native)
    assert rel_err(fm.fused_moe_triton(x, logits, gu, dn, top_k, True), ref) < 1e-5
    ref16 = fm.fused_moe_ref(x.half(), logits, gu, dn, top_k, True)
    assert rel_err(fm.fused_moe_triton(x.half(), logits, gu, dn, top_k, True), ref16) < 2e-3


def test_grouped_mm_path_equals_reference():
    """torch's grouped GEMM over the expert-sorted pairs (fp32 runs on CPU too; bf16 where it serves)."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    x, logits, _, (gu, dn) = make_case(13, 64, 48, 10, 4, "random", dtype, seed=3)
    want = fm.fused_moe_ref(x, logits, gu, dn, 4, True)
    got = fm.fused_moe_grouped_mm(x, logits, gu, dn, 4, True)
    assert rel_err(got, want) < (2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_grouped_mm_serves_only_without_a_sync():
    x, _, _, (gu, dn) = make_case(2, 64, 48, 4, 2, "random", torch.float32)
    assert not fm.grouped_mm_serves(x.cpu(), gu, dn)  # CPU: the reference
    w4, _ = int4_experts(4, 96, 64, 32, seed=0)
    assert not fm.grouped_mm_serves(x, w4, dn)
    if DEVICE == "cuda":
        major = torch.cuda.get_device_capability()[0]
        bf = fm.ExpertWeights(FLOAT, gu.weight.bfloat16()), fm.ExpertWeights(FLOAT, dn.weight.bfloat16())
        assert fm.grouped_mm_serves(x.bfloat16(), *bf) == (major in (9, 10))


# ---------------------------------------------------------------- launches and syncs


@pytest.mark.parametrize("path", ["triton", "grouped_mm"])
def test_no_host_sync_and_launches_fixed_whatever_the_routing(path):
    """The GPU paths never read the device from the host, and launch the same kernels for any routing."""
    run = fm.fused_moe_triton if path == "triton" else fm.fused_moe_grouped_mm
    counted = []
    for routing in ("random", "one", "few"):
        x, logits, _, (gu, dn) = make_case(6, 64, 32, 12, 2, routing, torch.float32, seed=4)
        with count_ops() as counts:
            run(x, logits, gu, dn, 2, True)
        assert counts.syncs == 0, f"{path} ({routing}): {dict(counts.sync_ops)}"
        counted.append(counts.ops)
    assert counted[0] == counted[1] == counted[2]
    if path == "triton":  # route, align, gate_up, down + zeros for the sum (fp32: no cast)
        assert sum(counted[0].values()) <= 6, dict(counted[0])


def test_reference_reads_counts_on_the_host():
    """The reference is the CPU path: it visits only chosen experts by reading their counts (what the GPU avoids)."""
    x, logits, _, (gu, dn) = make_case(4, 40, 24, 6, 2, "random", torch.float32)
    with count_ops() as counts:
        fm.fused_moe_ref(x, logits, gu, dn, 2, True)
    assert counts.syncs >= 1


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["float", "int4", "fp8"])
def test_gpu_dispatch_runs_without_sync(fmt):
    """On the GPU, the dispatched path (grouped_mm or Triton) runs with sync debugging set to error."""
    x, logits, _, (gu, dn) = make_case(8, 128, 64, 16, 4, "random", torch.bfloat16, seed=5)
    if fmt == "int4":
        gu, _ = int4_experts(16, 128, 128, 64, seed=6)
        dn, _ = int4_experts(16, 128, 64, 64, seed=7)
        gu.scales, dn.scales = gu.scales.bfloat16(), dn.scales.bfloat16()
    elif fmt == "fp8":
        gu, _ = fp8_experts(16, 64, 128, 2, (128, 128), seed=6)
        dn, _ = fp8_experts(16, 128, 64, 1, (128, 128), seed=7)
    want = fm.fused_moe_ref(x, logits, gu, dn, 4, True)
    fm.fused_moe(x, logits, gu, dn, 4, True)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = fm.fused_moe(x, logits, gu, dn, 4, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rel_err(got, want) < 2e-2


# ---------------------------------------------------------------- bad input


def test_bad_input_is_refused_naming_it():
    x, logits, _, (gu, dn) = make_case(3, 40, 24, 6, 2, "random", torch.float32)
    with pytest.raises(ValueError, match="top_k"):
        fm.fused_moe_ref(x, logits, gu, dn, 7, True)
    with pytest.raises(ValueError, match="gate_up"):
        fm.fused_moe_ref(x, logits, dn, dn, 2, True)
    with pytest.raises(ValueError, match="down weights"):
        fm.fused_moe_triton(x, logits, gu, fm.ExpertWeights(FLOAT, dn.weight.half()), 2, True)
    with pytest.raises(ValueError, match="int32"):
        mr.moe_align_ref(torch.zeros(3, 2, dtype=torch.int64), 6, 16)
    with pytest.raises(ValueError, match="scales"):
        fm.ExpertWeights(INT4, torch.zeros(2, 4, 8, dtype=torch.int32), torch.zeros(2, 1, 9), None, 32)
    with pytest.raises(ValueError, match="3-D"):
        fm.ExpertWeights(FLOAT, torch.zeros(4, 8))
