"""Paged attention: reference vs a naive dense attention, Triton vs reference, fp8 caches.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set by conftest before
the kernels are decorated), so shapes stay small. Every cache is filled with
random values everywhere, so a wrong block-table read shows up in the output.
"""

from __future__ import annotations

import math

import pytest
import torch

import pprt_kernels.kv_cache as kvc
import pprt_kernels.paged_attention as pa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def make_case(q_lens, ctx_lens, n, m, h, bs, dtype, seed=0, cache_dtype=None):
    """Packed queries and a random cache behind shuffled, over-wide block tables."""
    g = torch.Generator().manual_seed(seed)
    B = len(q_lens)
    width = max(-(-c // bs) for c in ctx_lens) + 2  # extra columns point at junk blocks
    num_blocks = B * width + 5
    tables = torch.randperm(num_blocks, generator=g)[: B * width].view(B, width).int()
    k_cache = torch.randn(num_blocks, bs, m, h, generator=g).to(cache_dtype or dtype)
    v_cache = torch.randn(num_blocks, bs, m, h, generator=g).to(cache_dtype or dtype)
    q = torch.randn(sum(q_lens), n, h, generator=g).to(dtype)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return tuple(map(to, (q, k_cache, v_cache, tables, starts, ctx)))


def dense_attention(q, k_cache, v_cache, tables, starts, ctx, scale):
    """Per sequence: gather its keys token by token, causal softmax over positions."""
    bs, m = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // m
    outs = []
    for b in range(tables.shape[0]):
        L, S = int(starts[b + 1] - starts[b]), int(ctx[b])
        slots = [(int(tables[b, t // bs]), t % bs) for t in range(S)]
        keys = torch.stack([k_cache[blk, off] for blk, off in slots]).float()  # [S, m, h]
        vals = torch.stack([v_cache[blk, off] for blk, off in slots]).float()
        keys, vals = keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1)  # [S, n, h]
        qb = q[int(starts[b]) : int(starts[b + 1])].float()  # [L, n, h]
        scores = torch.einsum("lnh,snh->nls", qb, keys) * scale
        pos = torch.arange(S - L, S)[:, None]  # query positions
        scores = scores.masked_fill(torch.arange(S)[None, :] > pos, float("-inf"))
        outs.append(torch.einsum("nls,snh->lnh", scores.softmax(-1), vals))
    return torch.cat(outs)


@pytest.mark.parametrize("bs", [4, 16])
def test_reference_matches_dense_attention(bs):
    # mixed batch: decode rows, a chunk starting mid-block, a whole prompt; GQA 3
    case = make_case([1, 7, 1, 13], [29, 18, 5, 13], n=6, m=2, h=20, bs=bs, dtype=torch.float32, cache_dtype=None)
    case = tuple(t.cpu() for t in case)
    out = pa.paged_attention_ref(*case, scale=0.3)
    assert out.shape == case[0].shape
    assert rel_err(out, dense_attention(*case, scale=0.3)) < 1e-5


def test_write_kv_ref_places_tokens_at_slots():
    k_cache, v_cache = torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([21, 2, 9])
    kvc.write_kv_ref(k, v, k_cache, v_cache, slots)
    for i, s in enumerate(slots.tolist()):
        assert torch.equal(k_cache[s // 4, s % 4], k[i]) and torch.equal(v_cache[s // 4, s % 4], v[i])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 3  # nothing else touched


TOL = {torch.float32: 1e-5, torch.float16: 3e-3}

# (group, head_dim, block_size, context lengths, partition or None for the default)
DECODE_CASES = [
    pytest.param(1, 64, 16, [37, 5, 70], None, id="g1-h64-bs16-one-partition"),
    pytest.param(4, 40, 16, [200, 33], 64, id="g4-h40-bs16-4-partitions"),
    pytest.param(8, 64, 8, [150, 1, 91], 32, id="g8-h64-bs8-5-partitions"),
    pytest.param(5, 24, 32, [77, 130], 32, id="g5-h24-bs32-partition-smaller-than-block"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("group,h,bs,ctx,part", DECODE_CASES)
def test_decode_matches_reference(group, h, bs, ctx, part, dtype):
    m = 2
    case = make_case([1] * len(ctx), ctx, n=m * group, m=m, h=h, bs=bs, dtype=dtype, seed=group)
    out = pa.paged_attention_triton(*case, scale=1 / math.sqrt(h), partition_size=part, block_n=16 if part else None)
    ref = pa.paged_attention_ref(*case, scale=1 / math.sqrt(h))
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


# (group, head_dim, block_size, query lengths, context lengths): chunks start mid-block,
# decode rows are mixed in, a prompt with no cached prefix.
PREFILL_CASES = [
    pytest.param(1, 32, 16, [9, 1, 20], [30, 44, 20], id="g1-h32-bs16-mixed"),
    pytest.param(4, 48, 8, [13, 1, 6], [50, 19, 11], id="g4-h48-bs8-mid-block"),
    pytest.param(8, 64, 16, [1, 11], [23, 37], id="g8-h64-bs16-mid-block"),
    pytest.param(5, 16, 4, [17, 2], [17, 9], id="g5-h16-bs4-whole-prompt"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("group,h,bs,q_lens,ctx", PREFILL_CASES)
def test_prefill_matches_reference(group, h, bs, q_lens, ctx, dtype):
    m = 2
    case = make_case(q_lens, ctx, n=m * group, m=m, h=h, bs=bs, dtype=dtype, seed=group + 10)
    tiles = {} if group == 1 else dict(block_m=16 if group < 8 else 32, block_n=16)  # g1: the GPU defaults
    out = pa.paged_attention_triton(*case, scale=1 / math.sqrt(h), **tiles)
    ref = pa.paged_attention_ref(*case, scale=1 / math.sqrt(h))
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("q_lens,ctx", [([1, 1], [40, 77]), ([5, 1], [40, 77])], ids=["decode", "prefill"])
def test_bf16(q_lens, ctx):
    """bf16 models (the interpreter runs these dots in fp32; a GPU in bf16)."""
    case = make_case(q_lens, ctx, n=8, m=2, h=32, bs=16, dtype=torch.bfloat16)
    out = pa.paged_attention_triton(*case, scale=0.2)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, pa.paged_attention_ref(*case, scale=0.2)) < 1e-2


def fp8_case(scales: str, seed=3):
    """True K/V (fp32) for a mixed batch with kv heads of very different ranges, written to an
    fp32 cache and to an fp8 cache under the given scale granularity."""
    g = torch.Generator().manual_seed(seed)
    q_lens, ctx, m, group, h, bs = [1, 6, 1], [45, 21, 9], 2, 4, 32, 8
    q, k32, v32, tables, starts, ctx_t = make_case(q_lens, ctx, m * group, m, h, bs, torch.float32, seed)
    head_range = torch.tensor([0.002, 3.0], device=DEVICE)[:, None]  # per kv head magnitude
    n_slots = k32.shape[0] * bs
    k, v = (torch.randn(n_slots, m, h, generator=g).to(DEVICE) * head_range for _ in range(2))
    slots = torch.arange(n_slots, device=DEVICE)
    kvc.write_kv_ref(k, v, k32, v32, slots)
    k8, v8 = torch.empty_like(k32, dtype=kvc.FP8), torch.empty_like(v32, dtype=kvc.FP8)
    if scales == "slot":
        ks, vs = kvc.new_kv_scales(k8), kvc.new_kv_scales(v8)
    elif scales == "tensor":
        ks, vs = k.abs().amax() / kvc.FP8_MAX, v.abs().amax() / kvc.FP8_MAX  # calibrated on this data
    else:
        ks = vs = None
    kvc.write_kv(k, v, k8, v8, slots, k_scale=ks, v_scale=vs)
    return (q, tables, starts, ctx_t), (k32, v32), (k8, v8, ks, vs)


FP8_TOL = 0.06  # fp8 vs fp32 cache, worst kv head; e4m3 rounding (3 mantissa bits) gives 0.02-0.05


@pytest.mark.parametrize("scales", ["slot", "tensor", "none"])
def test_fp8_cache_triton_matches_reference(scales):
    (q, tables, starts, ctx), _, (k8, v8, ks, vs) = fp8_case(scales)
    args = (q, k8, v8, tables, starts, ctx, 0.2)
    ref = pa.paged_attention_ref(*args, k_scale=ks, v_scale=vs)
    out = pa.paged_attention_triton(*args, k_scale=ks, v_scale=vs, block_m=16, block_n=16)
    assert rel_err(out, ref) < 1e-5  # same dequantized values, fp32 math
    # the first sequence (a decode row, 45 tokens) alone: the decode kernel, 3 partitions
    dargs = (q[:1], k8, v8, tables[:1], starts[:2], ctx[:1], 0.2)
    out = pa.paged_attention_triton(*dargs, k_scale=ks, v_scale=vs, partition_size=16, block_n=16)
    assert rel_err(out, pa.paged_attention_ref(*dargs, k_scale=ks, v_scale=vs)) < 1e-5


def test_fp8_cache_error_vs_fp32_cache():
    errs = {}
    for scales in ("slot", "tensor", "none"):
        (q, tables, starts, ctx), (k32, v32), (k8, v8, ks, vs) = fp8_case(scales)
        exact = pa.paged_attention_ref(q, k32, v32, tables, starts, ctx, 0.2)
        approx = pa.paged_attention_ref(q, k8, v8, tables, starts, ctx, 0.2, k_scale=ks, v_scale=vs)
        # worst kv head (query heads 0-3 read the small-range head, 4-7 the large one)
        errs[scales] = max(rel_err(approx[:, :4], exact[:, :4]), rel_err(approx[:, 4:], exact[:, 4:]))
    assert errs["slot"] < FP8_TOL and errs["tensor"] < FP8_TOL, errs
    # without scales the small-range head falls into e4m3's subnormals
    assert errs["none"] > 3 * errs["slot"], errs


def test_fp8_write_sets_per_slot_scales_and_saturates():
    k_cache = torch.empty(3, 4, 2, 8, dtype=kvc.FP8)
    v_cache = torch.empty_like(k_cache)
    ks, vs = kvc.new_kv_scales(k_cache), kvc.new_kv_scales(v_cache)
    k = torch.randn(2, 2, 8) * torch.tensor([1e-3, 1e3])[:, None]
    kvc.write_kv_ref(k, k, k_cache, v_cache, torch.tensor([5, 10]), k_scale=ks, v_scale=vs)
    assert torch.allclose(ks[1, 1], k[0].abs().amax(-1) / kvc.FP8_MAX)
    back = k_cache.view(12, 2, 8)[[5, 10]].float() * ks.view(12, 2, 1)[[5, 10]]
    assert rel_err(back, k) < 0.05
    plain = torch.zeros(3, 4, 2, 8).to(kvc.FP8)  # no scales: saturating cast, never NaN
    kvc.write_kv_ref(k, k, plain, plain.clone(), torch.tensor([0, 1]))
    written = plain[0, :2].float()  # [2, 2, 8]
    assert not written.isnan().any() and float(written.abs().max()) == kvc.FP8_MAX


def test_scale_validation_names_the_argument():
    k_cache = torch.empty(3, 4, 2, 8, dtype=kvc.FP8)
    with pytest.raises(ValueError, match="k_scale"):
        kvc.write_kv_ref(torch.randn(1, 2, 8), torch.randn(1, 2, 8), k_cache, k_cache.clone(), torch.tensor([0]),
                        k_scale=torch.ones(3, 4))
    with pytest.raises(ValueError, match="v_scale"):
        kvc.write_kv_ref(torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.empty(3, 4, 2, 8),
                        torch.empty(3, 4, 2, 8), torch.tensor([0]), v_scale=torch.ones(()))


@pytest.mark.parametrize("choice", ["ref", "triton"])
def test_dispatch_follows_pprt_kernels(monkeypatch, choice):
    calls = []
    for name in ("paged_attention_ref", "paged_attention_triton"):
        real = getattr(pa, name)
        monkeypatch.setattr(pa, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    monkeypatch.setenv("PPRT_KERNELS", choice)
    case = make_case([1, 1], [19, 40], n=4, m=2, h=16, bs=16, dtype=torch.float32)
    out = pa.paged_attention(*case, scale=0.25, max_query_len=1, max_context_len=40)
    assert calls == [f"paged_attention_{choice}"]
    assert rel_err(out, dense_attention(*(t.cpu() for t in case), scale=0.25)) < 1e-5


def test_bench_tiny_runs(tmp_path):
    from bench import attention

    rows = attention.main(["--tiny", "--results-dir", str(tmp_path)])
    assert {r["kind"] for r in rows} == {"decode", "prefill"}
    assert {r["cache"] for r in rows} == {"fp32", "fp8"}
    for r in rows:  # the benchmark's own check of the kernel against SDPA
        assert r["kernel_s"] > 0 and r["sdpa_s"] > 0, r
        assert r["rel_err"] < (FP8_TOL if r["cache"] == "fp8" else 1e-5), r
    assert (tmp_path / "attention.jsonl").read_text().count("\n") == len(rows)
