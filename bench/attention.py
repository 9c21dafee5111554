"""Attention benchmark: paged decode and prefill against the memory ceiling and torch SDPA.

Decode (one query token per sequence, Qwen2.5-72B heads: 64 query, 8 KV,
head_dim 128) at contexts 4k..128k, batch 1 and 8, with a bf16 and an fp8
(per-slot scales) cache; prefill of one 4k / 16k prompt. Each row reports:
  - kernel_s / sdpa_s: median seconds of `paged_attention` (whatever
    PPRT_KERNELS selects: Triton on CUDA) and of torch SDPA over a contiguous
    cache holding the same keys (decode: the G query heads of a KV head are
    SDPA's query rows, so no KV copy per head; prefill: K/V repeated per head
    beforehand, causal);
  - GBps: KV bytes read (K, V and fp8 scales) per second, and frac_copy, that
    over the copy bandwidth measured in the same run (read + write counted);
  - vs_sdpa = sdpa_s / kernel_s, and rel_err of the output vs SDPA.
Goals on a GPU: decode frac_copy >= 0.8 at contexts >= 32k; prefill
vs_sdpa >= 0.8. `--tiny` runs small shapes on CPU in seconds (tests).

    python -m bench.attention            # GPU
    python -m bench.attention --tiny     # CPU smoke run
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.harness import append_results, copy_bandwidth, environment, print_table, time_fn
from pprt_kernels import use_triton
from pprt_kernels.kv_cache import FP8, new_kv_scales, write_kv
from pprt_kernels.paged_attention import paged_attention


@dataclass(frozen=True, slots=True)
class Shape:
    """Heads, cache geometry and the sweep of one run."""

    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    prefill_lens: tuple[int, ...]

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if any(c % self.block_size for c in (*self.contexts, *self.prefill_lens)):
            raise ValueError(f"contexts and prefill lengths must be multiples of block_size {self.block_size}")


FULL = Shape(64, 8, 128, 16, torch.bfloat16, (4096, 8192, 16384, 32768, 65536, 131072), (1, 8), (4096, 16384))
TINY = Shape(8, 2, 32, 16, torch.float32, (64, 208), (1, 2), (48,))


def paged_copy(keys: torch.Tensor, values: torch.Tensor, cache_dtype: torch.dtype, block_size: int):
    """Contiguous [B, S, m, h] keys/values written into a cache behind shuffled block tables."""
    B, S, m, h = keys.shape
    per_seq = S // block_size
    tables = torch.randperm(B * per_seq, device=keys.device).view(B, per_seq).int()
    k_cache = torch.empty(B * per_seq, block_size, m, h, dtype=cache_dtype, device=keys.device)
    v_cache = torch.empty_like(k_cache)
    k_scale = v_scale = None
    if cache_dtype == FP8:
        k_scale, v_scale = new_kv_scales(k_cache), new_kv_scales(v_cache)
    slots = (tables.long()[:, :, None] * block_size + torch.arange(block_size, device=keys.device)).view(B * S)
    for i in range(0, B * S, 1 << 20):  # chunks bound the temporaries of fp8 quantization
        part = slice(i, i + (1 << 20))
        write_kv(keys.view(B * S, m, h)[part], values.view(B * S, m, h)[part], k_cache, v_cache, slots[part],
                 k_scale=k_scale, v_scale=v_scale)
    return k_cache, v_cache, tables, k_scale, v_scale


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def bench_decode(shape: Shape, batch: int, context: int, cache_dtype: torch.dtype, device, reps: dict) -> dict:
    n, m, h = shape.heads, shape.kv_heads, shape.head_dim
    scale = 1 / math.sqrt(h)
    keys = torch.randn(batch, context, m, h, dtype=shape.dtype, device=device)
    values = torch.randn_like(keys)
    q = torch.randn(batch, n, h, dtype=shape.dtype, device=device)
    k_cache, v_cache, tables, k_scale, v_scale = paged_copy(keys, values, cache_dtype, shape.block_size)
    starts = torch.arange(batch + 1, dtype=torch.int32, device=device)
    ctx = torch.full((batch,), context, dtype=torch.int32, device=device)

    def kernel():
        return paged_attention(q, k_cache, v_cache, tables, starts, ctx, scale, k_scale=k_scale, v_scale=v_scale,
                               max_query_len=1, max_context_len=context)

    k_sdpa, v_sdpa = keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous()  # [B, m, S, h]
    q_sdpa = q.view(batch, m, n // m, h)  # a KV head's query heads as query rows

    def sdpa():
        return F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa, scale=scale)

    err = rel_err(kernel(), sdpa().reshape(batch, n, h))
    kernel_s, sdpa_s = time_fn(kernel, device, **reps), time_fn(sdpa, device, **reps)
    kv_bytes = 2 * k_cache[:1].nbytes * tables.numel() + (2 * k_scale.nbytes if k_scale is not None else 0)
    sdpa_bytes = k_sdpa.nbytes + v_sdpa.nbytes
    return dict(kind="decode", batch=batch, context=context, q_len=1, cache=_name(cache_dtype), kernel_s=kernel_s,
                sdpa_s=sdpa_s, GBps=kv_bytes / kernel_s / 1e9, sdpa_GBps=sdpa_bytes / sdpa_s / 1e9,
                vs_sdpa=sdpa_s / kernel_s, rel_err=err)


def bench_prefill(shape: Shape, length: int, device, reps: dict) -> dict:
    n, m, h = shape.heads, shape.kv_heads, shape.head_dim
    scale = 1 / math.sqrt(h)
    keys = torch.randn(1, length, m, h, dtype=shape.dtype, device=device)
    values = torch.randn_like(keys)
    q = torch.randn(length, n, h, dtype=shape.dtype, device=device)
    k_cache, v_cache, tables, _, _ = paged_copy(keys, values, shape.dtype, shape.block_size)
    starts = torch.tensor([0, length], dtype=torch.int32, device=device)
    ctx = torch.tensor([length], dtype=torch.int32, device=device)

    def kernel():
        return paged_attention(q, k_cache, v_cache, tables, starts, ctx, scale, max_query_len=length,
                               max_context_len=length)

    expand = lambda x: x[0].repeat_interleave(n // m, 1).transpose(0, 1)[None].contiguous()  # noqa: E731  [1, n, S, h]
    k_sdpa, v_sdpa, q_sdpa = expand(keys), expand(values), q.transpose(0, 1)[None].contiguous()

    def sdpa():
        return F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa, is_causal=True, scale=scale)

    err = rel_err(kernel(), sdpa()[0].transpose(0, 1))
    kernel_s, sdpa_s = time_fn(kernel, device, **reps), time_fn(sdpa, device, **reps)
    flops = 2 * n * h * length * length  # causal: half of 4 * n * h * L^2
    return dict(kind="prefill", batch=1, context=length, q_len=length, cache=_name(shape.dtype), kernel_s=kernel_s,
                sdpa_s=sdpa_s, TFLOPs=flops / kernel_s / 1e12, sdpa_TFLOPs=flops / sdpa_s / 1e12,
                vs_sdpa=sdpa_s / kernel_s, rel_err=err)


def _name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", FP8: "fp8"}[dtype]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes on CPU, for tests")
    parser.add_argument("--results-dir", type=Path, default=None, help="where attention.jsonl goes")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shape = TINY if args.tiny else FULL
    reps = dict(warmup=1, repeats=3) if args.tiny else dict(warmup=3, repeats=10)
    copy_bw = copy_bandwidth(device, nbytes=1 << 24 if args.tiny else 1 << 30)
    impl = "triton" if use_triton(device) else "ref"

    rows = []
    for cache_dtype in (shape.dtype, FP8):
        for batch in shape.batches:
            for context in shape.contexts:
                rows.append(bench_decode(shape, batch, context, cache_dtype, device, reps))
                rows[-1]["frac_copy"] = rows[-1]["GBps"] * 1e9 / copy_bw
                rows[-1]["goal_met"] = rows[-1]["frac_copy"] >= 0.8 if context >= 32768 else None
    for length in shape.prefill_lens:
        rows.append(bench_prefill(shape, length, device, reps))
        rows[-1]["goal_met"] = rows[-1]["vs_sdpa"] >= 0.8
    for row in rows:
        row.update(impl=impl, copy_GBps=copy_bw / 1e9, heads=shape.heads, kv_heads=shape.kv_heads,
                   head_dim=shape.head_dim, block_size=shape.block_size)

    print(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write), attention by {impl} on {device}")
    print_table(rows, ["kind", "cache", "batch", "context", "kernel_s", "sdpa_s", "GBps", "frac_copy", "TFLOPs",
                       "vs_sdpa", "rel_err", "goal_met"])
    path = append_results("attention", rows, environment(device), args.results_dir)
    print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
