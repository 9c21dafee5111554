"""W8A16 matmul benchmark: FP8 (block 128) against cuBLAS bf16 on Qwen3.5 layer shapes.

On a GPU, for every (layer, M) it times pprt's Triton kernel (the dispatched path;
for M >= 64 also the fused and the dequantize + cuBLAS paths; on sm89+ also the
integer e4m3 decoder that older cards use) and torch bf16 matmul (cuBLAS), and
reports achieved GB/s (weight + scales + activation + output bytes over time) against
a device copy bandwidth measured in the same run. Goals: M <= 16 at >= 85% of copy
bandwidth (then FP8 decode is ~2x bf16's, which reads twice the bytes); M >= 256
within 1.25x of bf16 cuBLAS.

On CPU it times what the CPU dispatch runs (the reference: dequantize + fp32 matmul)
against a bf16 / fp32 torch matmul of the same shape; the GPU columns say "not
measured". `--tiny` runs one small shape so a test can call it.

    python -m bench.fp8_matmul            # GPU: Qwen3.5-27B and Qwen3.5-122B-A10B shapes
    python -m bench.fp8_matmul --tiny     # seconds, any device
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import pprt_kernels.fp8_matmul as fm
from bench.harness import append_results, copy_bandwidth, environment, print_table, time_fn
from pprt.weights.fp8 import quantize_fp8

NOT_MEASURED = "not measured"
# (model, layer, N = out, K = in), shared/QWEN.md section 7: Qwen3.5-27B (H 5120, 24 q heads / 4 kv x 256,
# DeltaNet 16 key / 48 value heads x 128, MLP 17408) and Qwen3.5-122B-A10B (H 3072, 32 / 2 x 256,
# DeltaNet 16 / 64 x 128, 256 experts of 1024 + a shared expert of 1024)
SHAPES = [
    ("Qwen3.5-27B", "attn q_proj (gated)", 12288, 5120),
    ("Qwen3.5-27B", "attn k_proj/v_proj", 1024, 5120),
    ("Qwen3.5-27B", "attn o_proj / linear out_proj", 5120, 6144),
    ("Qwen3.5-27B", "linear in_proj_qkv", 10240, 5120),
    ("Qwen3.5-27B", "linear in_proj_z", 6144, 5120),
    ("Qwen3.5-27B", "mlp gate/up_proj", 17408, 5120),
    ("Qwen3.5-27B", "mlp down_proj", 5120, 17408),
    ("Qwen3.5-122B-A10B", "attn q_proj (gated)", 16384, 3072),
    ("Qwen3.5-122B-A10B", "attn k_proj/v_proj", 512, 3072),
    ("Qwen3.5-122B-A10B", "attn o_proj / linear out_proj", 3072, 8192),
    ("Qwen3.5-122B-A10B", "linear in_proj_qkv", 12288, 3072),
    ("Qwen3.5-122B-A10B", "linear in_proj_z", 8192, 3072),
    ("Qwen3.5-122B-A10B", "expert gate/up_proj", 1024, 3072),
    ("Qwen3.5-122B-A10B", "expert down_proj", 3072, 1024),
]
CPU_SHAPES = [("cpu-medium", "square", 2048, 2048)]
TINY_SHAPES = [("tiny", "odd", 200, 328)]
MS = [1, 2, 4, 8, 16, 64, 256, 2048]
TINY_MS = [1, 16]
CPU_MS = [1, 16, 64]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def make_layer(n: int, k: int, device: torch.device):
    """A random layer quantized to FP8 block 128 (as quant="fp8" does), and its bf16 original [N, K]."""
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
    return quantize_fp8(w), w


def bench_gpu(shapes, ms, device: torch.device, repeats: int) -> list[dict]:
    bw = copy_bandwidth(device)
    native = fm.native_fp8(device)
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s (read + write); e4m3 type in Triton: {native}")
    rows = []
    for model, layer, n, k in shapes:
        q, w_bf16 = make_layer(n, k, device)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref = fm.fp8_matmul_ref(x, q.weight, q.scale, q.block)
            run = lambda path=None, nat=None: fm.fp8_matmul_triton(x, q.weight, q.scale, q.block,  # noqa: E731
                                                                   path=path, native=nat)
            t = time_fn(run, device, repeats=repeats)
            t_bf16 = time_fn(lambda: x @ w_bf16.t(), device, repeats=repeats)
            nbytes = q.nbytes + m * k * 2 + m * n * 2
            row = {
                "model": model, "layer": layer, "N": n, "K": k, "M": m, "block": list(q.block),
                "triton_ms": t * 1e3, "triton_GBps": nbytes / t / 1e9, "frac_copy_bw": nbytes / t / bw,
                "bf16_ms": t_bf16 * 1e3, "speedup_vs_bf16": t_bf16 / t, "copy_GBps": bw / 1e9,
                "native_e4m3": native, "max_rel_err": rel_err(run(), ref),
            }
            if native:  # the sm80/sm86 decoder, measured where both exist
                row["int_decode_ms"] = time_fn(lambda: run(nat=False), device, repeats=repeats) * 1e3
            if m >= 64:  # both prefill paths, to place LARGE_M
                row["fused_ms"] = time_fn(lambda: run("fused"), device, repeats=repeats) * 1e3
                row["dequant_ms"] = time_fn(lambda: run("dequant"), device, repeats=repeats) * 1e3
            if m <= 16:
                row["goal"], row["goal_met"] = ">= 0.85 of copy bw", row["frac_copy_bw"] >= 0.85
                row["distance"] = f"{row['frac_copy_bw'] / 0.85:.2f}x of goal"
            elif m >= 256:
                row["goal"], row["goal_met"] = "<= 1.25x bf16 time", t <= 1.25 * t_bf16
                row["distance"] = f"{t / t_bf16:.2f}x bf16 (goal 1.25x)"
            rows.append(row)
        del q, w_bf16
        torch.cuda.empty_cache()
    return rows


def bench_cpu(shapes, ms, repeats: int) -> list[dict]:
    """What the CPU dispatch runs (the reference) against a plain matmul; GPU columns not measured."""
    rows = []
    for model, layer, n, k in shapes:
        q, w_bf16 = make_layer(n, k, torch.device("cpu"))
        for dtype in (torch.bfloat16, torch.float32):
            w = w_bf16.to(dtype)
            for m in ms:
                x = torch.randn(m, k, dtype=dtype)
                ref = fm.fp8_matmul_ref(x, q.weight, q.scale, q.block)
                dispatch = lambda: fm.fp8_matmul(x, q.weight, q.scale, q.block)  # noqa: E731
                rows.append({
                    "model": model, "layer": layer, "N": n, "K": k, "M": m, "dtype": str(dtype)[6:],
                    "block": list(q.block),
                    "dispatch_ms": time_fn(dispatch, "cpu", warmup=1, repeats=repeats) * 1e3,
                    "dense_ms": time_fn(lambda: x @ w.t(), "cpu", warmup=1, repeats=repeats) * 1e3,
                    "max_rel_err": rel_err(dispatch(), ref),
                    "triton_ms": NOT_MEASURED, "bf16_ms": NOT_MEASURED, "frac_copy_bw": NOT_MEASURED,
                    "goal_met": NOT_MEASURED,
                })
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="one small shape and few row counts (seconds)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ms", type=int, nargs="*", help="row counts (default: 1 2 4 8 16 64 256 2048)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per median (10; 3 with --tiny)")
    p.add_argument("--results-dir", type=Path, default=None, help="where fp8_matmul.jsonl goes (bench/results)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ms = args.ms or (TINY_MS if args.tiny else MS)
    repeats = args.repeats or (3 if args.tiny else 10)
    if device.type == "cuda":
        rows = bench_gpu(TINY_SHAPES if args.tiny else SHAPES, ms, device, repeats)
        columns = ["model", "layer", "N", "K", "M", "triton_ms", "triton_GBps", "frac_copy_bw", "bf16_ms",
                   "speedup_vs_bf16", "int_decode_ms", "fused_ms", "dequant_ms", "goal_met", "max_rel_err"]
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        if not args.ms and not args.tiny:
            ms = CPU_MS
        rows = bench_cpu(TINY_SHAPES if args.tiny else CPU_SHAPES, ms, repeats)
        columns = ["model", "N", "K", "dtype", "M", "dispatch_ms", "dense_ms", "max_rel_err", "triton_ms"]
    print_table(rows, columns)
    env = environment(device)
    env["tiny"] = args.tiny
    path = append_results("fp8_matmul", rows, env, args.results_dir)
    print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
