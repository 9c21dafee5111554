"""W4A16 matmul benchmark: Qwen layer shapes, decode and prefill row counts.

On a GPU, for every (layer, M) it times pprt's Triton kernel (the dispatched
path, and for M >= 64 both the fused and the dequantize + cuBLAS paths), torch
bf16 matmul (cuBLAS) and torch's own int4 matmul (`_weight_int4pack_mm`) where
it exists, and reports achieved GB/s (weight + activation + output bytes over
time) against a device copy bandwidth measured in the same run. Goals: M <= 16
at >= 85% of copy bandwidth; M >= 256 within 1.25x of bf16 cuBLAS.

On CPU it times the paths the CPU dispatch chooses between (reference
dequantize + matmul, torch's CPU int4 op) per activation dtype; the GPU
columns say "not measured". `--tiny` runs one small shape so a test can call it.

    python -m bench.int4_matmul            # GPU: Qwen2.5-72B and Qwen3-32B shapes
    python -m bench.int4_matmul --tiny     # seconds, any device
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import pprt_kernels.int4_matmul as im
from bench.harness import append_results, copy_bandwidth, environment, print_table, time_fn
from pprt.weights.int4 import quantize_rtn

NOT_MEASURED = "not measured"
# (model, layer, N = out, K = in); Qwen2.5-72B's Int4 files pad the MLP to 29696
SHAPES = [
    ("Qwen2.5-72B", "q_proj/o_proj", 8192, 8192),
    ("Qwen2.5-72B", "k_proj/v_proj", 1024, 8192),
    ("Qwen2.5-72B", "gate/up_proj", 29696, 8192),
    ("Qwen2.5-72B", "down_proj", 8192, 29696),
    ("Qwen3-32B", "q_proj", 8192, 5120),
    ("Qwen3-32B", "k_proj/v_proj", 1024, 5120),
    ("Qwen3-32B", "o_proj", 5120, 8192),
    ("Qwen3-32B", "gate/up_proj", 25600, 5120),
    ("Qwen3-32B", "down_proj", 5120, 25600),
]
CPU_SHAPES = [("cpu-medium", "square", 2048, 2048), ("cpu-medium", "mlp-like", 5632, 2048)]
TINY_SHAPES = [("tiny", "mlp-like", 192, 256)]
MS = [1, 2, 4, 8, 16, 64, 256, 2048]
TINY_MS = [1, 16]
CPU_MS = [1, 4, 16, 64]  # where the CPU dispatch decides; larger M only repeats the M = 64 verdict


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def make_layer(n: int, k: int, g: int, dtype: torch.dtype, device: torch.device):
    """An RTN-quantized random layer: (Int4Weight, its dequantized bf16/fp16 weight [N, K])."""
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(n, k, device=device, dtype=dtype, generator=gen) * 0.02
    q = quantize_rtn(w, g)
    return q, im.int4_dequantize_ref(q.qweight, q.scales, q.zeros, g).t().contiguous()


def torch_int4_cuda(q, g: int):
    """torch's CUDA int4 mm (tinygemm layout, bf16 only), or a reason it is unavailable."""
    try:
        k, n = q.in_features, q.out_features
        shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.qweight.device)
        nib = ((q.qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(k, n).t().contiguous()  # [N, K]
        u8 = (nib[:, ::2] << 4 | nib[:, 1::2]).to(torch.uint8)  # [N, K/2], even k in the high nibble
        packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
        zf = q.scales.float() * (8.0 - q.zeros.float())
        sz = torch.stack([q.scales.float(), zf], -1).to(torch.bfloat16).contiguous()  # [K/g, N, 2]
        return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, g, sz)
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        return f"unavailable: {str(e).splitlines()[0][:80]}"


def bench_gpu(shapes, ms, g: int, device: torch.device, repeats: int) -> list[dict]:
    bw = copy_bandwidth(device)
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")
    rows = []
    for model, layer, n, k in shapes:
        q, w_bf16 = make_layer(n, k, g, torch.bfloat16, device)
        int4_op = torch_int4_cuda(q, g)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref = im.int4_matmul_ref(x, q.qweight, q.scales, q.zeros, g)
            run = lambda path=None: im.int4_matmul_triton(x, q.qweight, q.scales, q.zeros, g, path=path)  # noqa: E731
            t = time_fn(run, device, repeats=repeats)
            t_bf16 = time_fn(lambda: x @ w_bf16.t(), device, repeats=repeats)
            nbytes = q.nbytes + m * k * 2 + m * n * 2
            row = {
                "model": model, "layer": layer, "N": n, "K": k, "M": m, "group_size": g,
                "triton_ms": t * 1e3, "triton_GBps": nbytes / t / 1e9, "frac_copy_bw": nbytes / t / bw,
                "bf16_ms": t_bf16 * 1e3, "speedup_vs_bf16": t_bf16 / t,
                "copy_GBps": bw / 1e9, "max_rel_err": rel_err(run(), ref),
            }
            if m >= 64:  # both prefill paths, to place LARGE_M
                row["fused_ms"] = time_fn(lambda: run("fused"), device, repeats=repeats) * 1e3
                row["dequant_ms"] = time_fn(lambda: run("dequant"), device, repeats=repeats) * 1e3
            row["torch_int4_ms"] = int4_op
            if callable(int4_op):
                try:
                    row["torch_int4_rel_err"] = rel_err(int4_op(x), ref)
                    row["torch_int4_ms"] = time_fn(lambda: int4_op(x), device, repeats=repeats) * 1e3
                except RuntimeError as e:
                    row["torch_int4_ms"] = f"failed: {str(e).splitlines()[0][:80]}"
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


def bench_cpu(shapes, ms, g: int, repeats: int) -> list[dict]:
    """The CPU dispatch's candidates per dtype; GPU columns are not measured."""
    rows = []
    for model, layer, n, k in shapes:
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            q, _ = make_layer(n, k, g, dtype, torch.device("cpu"))
            pack = im.pack_for_cpu(q.qweight, q.scales, q.zeros, g)
            for m in ms:
                x = torch.randn(m, k, dtype=dtype)
                ref = im.int4_matmul_ref(x, q.qweight, q.scales, q.zeros, g)
                dispatch = lambda: im.int4_matmul(x, q.qweight, q.scales, q.zeros, g, cpu_pack=pack)  # noqa: E731
                ref_fn = lambda: im.int4_matmul_ref(x, q.qweight, q.scales, q.zeros, g)  # noqa: E731
                op_fn = lambda: im._cpu_int4_matmul(x, pack, None)  # noqa: E731
                row = {
                    "model": model, "layer": layer, "N": n, "K": k, "M": m, "group_size": g, "dtype": str(dtype)[6:],
                    "ref_ms": time_fn(ref_fn, "cpu", warmup=1, repeats=repeats) * 1e3,
                    "cpu_int4_ms": time_fn(op_fn, "cpu", warmup=1, repeats=repeats) * 1e3,
                    "dispatch_ms": time_fn(dispatch, "cpu", warmup=1, repeats=repeats) * 1e3,
                    "max_rel_err": max(rel_err(dispatch(), ref), rel_err(op_fn(), ref)),
                    "triton_ms": NOT_MEASURED, "bf16_ms": NOT_MEASURED, "torch_int4_ms": NOT_MEASURED,
                    "frac_copy_bw": NOT_MEASURED, "goal_met": NOT_MEASURED,
                }
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="one small shape and few row counts (seconds)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--ms", type=int, nargs="*", help="row counts (default: 1 2 4 8 16 64 256 2048)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (a loaded machine times 1 best)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per median (10; 3 with --tiny)")
    p.add_argument("--results-dir", type=Path, default=None, help="where int4_matmul.jsonl goes (bench/results)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ms = args.ms or (TINY_MS if args.tiny else MS)
    repeats = args.repeats or (3 if args.tiny else 10)
    if device.type == "cuda":
        rows = bench_gpu(TINY_SHAPES if args.tiny else SHAPES, ms, args.group_size, device, repeats=repeats)
        columns = ["model", "layer", "N", "K", "M", "triton_ms", "triton_GBps", "frac_copy_bw", "bf16_ms",
                   "speedup_vs_bf16", "fused_ms", "dequant_ms", "torch_int4_ms", "goal_met", "max_rel_err"]
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        if not args.ms and not args.tiny:
            ms = CPU_MS
        rows = bench_cpu(TINY_SHAPES if args.tiny else CPU_SHAPES, ms, args.group_size, repeats)
        columns = ["model", "N", "K", "dtype", "M", "ref_ms", "cpu_int4_ms", "dispatch_ms", "max_rel_err", "triton_ms"]
    print_table(rows, columns)
    env = environment(device)
    env["tiny"] = args.tiny
    path = append_results("int4_matmul", rows, env, args.results_dir)
    print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
