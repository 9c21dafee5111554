"""Fused MoE benchmark: one MoE layer (router + routed experts) at Qwen3-30B-A3B and Qwen3.5-35B-A3B shapes.

For tokens T = 1, 8, 32 and every path (`ref`: the per-expert reference, one host
read per layer; `triton`: pprt's grouped-GEMM kernels, bf16, Int4 g128 and
FP8 block 128;
`grouped_mm`: torch's grouped GEMM, where it serves) it reports:

- launches and syncs per layer, counted on any device by bench/counting.py
  (aten kernels + Triton kernels; ops that make the host wait for the device).
  They do not depend on H and I, so on CPU they are counted with the real E, k
  and T but H, I cut down (`--count-hidden`), which keeps the Triton
  interpreter quick; before the fused path the layer issued 95 / 601 / 1173
  launches and 10 / 56 / 108 syncs at 1 / 8 / 32 tokens (issue 18).
- on a GPU: the median time of the layer, the bytes of the experts the tokens
  chose (plus the router) and the achieved GB/s against the copy bandwidth
  measured in the same run. Inputs rotate, so each call routes to other
  experts and does not find them in L2. On CPU the GPU columns say "not measured".

    python -m bench.fused_moe            # GPU: times and counts; CPU: counts
    python -m bench.fused_moe --tiny     # small shapes, seconds, any device
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # count the Triton path on CPU: set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.counting import count_ops
from bench.harness import append_results, copy_bandwidth, environment, print_table, time_fn

NOT_MEASURED = "not measured"
GROUP = 128


@dataclass(frozen=True)
class Shape:
    model: str
    hidden: int  # H
    inter: int  # I (per expert)
    experts: int  # E
    top_k: int
    renormalize: bool


SHAPES = [Shape("Qwen3-30B-A3B", 2048, 768, 128, 8, True), Shape("Qwen3.5-35B-A3B", 2048, 512, 256, 8, True)]
TINY = [Shape("tiny", 64, 32, 16, 4, True)]
TOKENS = [1, 8, 32]
WEIGHTS = ["bf16", "int4", "fp8"]
TINY_TOKENS = [1, 8]


def make_layer(shape: Shape, dtype: torch.dtype, device: torch.device, weights: str, seed: int = 0):
    """Random router [E, H] and experts (gate_up, down) as ExpertWeights: float, Int4 (RTN, group 128 where
    it divides K, else 32) or FP8 (block 128), stacked expert by expert as the loader stacks them."""
    from torch import nn

    from pprt.weights import fp8, int4
    from pprt.weights.experts import stack_expert

    gen = torch.Generator(device=device).manual_seed(seed)
    h, i, e = shape.hidden, shape.inter, shape.experts
    rand = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=dtype) * 0.02  # noqa: E731
    moe = nn.Module()
    moe.num_experts, moe.experts, moe.stacked = e, nn.ModuleList(nn.Module() for _ in range(e)), nn.Module()
    moe.stacked.gate_up = moe.stacked.down = None
    for expert in range(e):
        for proj, (n, k) in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            w = rand(n, k)
            layer = {"int4": lambda: int4.quantize_linear(w, None, GROUP if k % GROUP == 0 else 32),
                     "fp8": lambda: fp8.quantize_linear(w, None)}.get(weights, lambda: nn.Linear(k, n, False, "meta"))()
            if isinstance(layer, nn.Linear):
                layer.weight = nn.Parameter(w, requires_grad=False)
            stack_expert(moe, expert, proj, layer, f"expert {expert} {proj}")
    return rand(e, h), moe.stacked.gate_up.expert_weights(), moe.stacked.down.expert_weights()


def expert_bytes(w) -> int:
    """Bytes of one expert of one projection."""
    ts = [w.weight] + [t for t in (w.scales, w.zeros, w.perm) if t is not None]
    return sum(t[0].numel() * t.element_size() for t in ts)


def paths(device: torch.device, x: torch.Tensor, gate_up, down) -> dict:
    """name -> fused_moe-signature function, for the paths that run here."""
    import pprt_kernels.fused_moe as fm

    out = {"ref": fm.fused_moe_ref}
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        out["triton"] = fm.fused_moe_triton
    if fm.grouped_mm_serves(x, gate_up, down):
        out["grouped_mm"] = fm.fused_moe_grouped_mm
    return out


def count_layer(shape: Shape, fn, router, gate_up, down, x) -> tuple[int, int]:
    """(launches, syncs) of one layer: the router matmul and the experts."""
    with count_ops() as counts:
        fn(x, F.linear(x, router), gate_up, down, shape.top_k, shape.renormalize)
    return counts.launches, counts.syncs


def bench(shape: Shape, device: torch.device, count_hidden: int, repeats: int, copy_bw: float | None,
          tokens: list[int]) -> list[dict]:
    """Rows for one model shape: per weight format, token count and path."""
    import pprt_kernels.fused_moe as fm

    rows = []
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float16  # the interpreter's bf16 dot is wrong
    counted_shape = shape if gpu else Shape(shape.model, count_hidden, count_hidden // 2, shape.experts,
                                            shape.top_k, shape.renormalize)
    for weights in WEIGHTS:
        layer = make_layer(counted_shape, dtype, device, weights)
        for t in tokens:
            x = torch.randn(t, counted_shape.hidden, device=device, dtype=dtype)
            for name, fn in paths(device, x, *layer[1:]).items():
                launches, syncs = count_layer(counted_shape, fn, *layer, x)
                row = {"model": shape.model, "weights": weights if gpu or weights != "bf16" else "fp16",
                       "path": name, "tokens": t, "E": shape.experts, "top_k": shape.top_k, "H": shape.hidden,
                       "I": shape.inter, "launches": launches, "syncs": syncs, "counted_with_H": counted_shape.hidden,
                       "ms": NOT_MEASURED, "GBps": NOT_MEASURED, "frac_copy_bw": NOT_MEASURED,
                       "rel_err": NOT_MEASURED}
                if gpu:
                    row.update(time_layer(shape, t, fn, layer, device, repeats, copy_bw))
                rows.append(row)
            if not gpu and weights == "bf16":  # torch's grouped GEMM path, counted in fp32 (what runs on CPU)
                fp32 = [w if isinstance(w, torch.Tensor) else type(w)(w.format, w.weight.float()) for w in layer]
                fp32[0] = fp32[0].float()
                launches, syncs = count_layer(counted_shape, fm.fused_moe_grouped_mm, *fp32, x.float())
                rows.append(dict(rows[-1], weights="fp32", path="grouped_mm", launches=launches, syncs=syncs))
        del layer
        if gpu:
            torch.cuda.empty_cache()
    return rows


def time_layer(shape: Shape, t: int, fn, layer, device, repeats: int, copy_bw: float) -> dict:
    """GPU: median time over rotating inputs; bytes = the chosen experts' weights + the router."""
    import pprt_kernels.fused_moe as fm

    router, gate_up, down = layer
    run = lambda x: fn(x, F.linear(x, router), gate_up, down, shape.top_k, shape.renormalize)  # noqa: E731
    inputs = [(torch.randn(t, shape.hidden, device=device, dtype=torch.bfloat16),) for _ in range(8)]
    seconds = time_fn(run, device, repeats=repeats, inputs=inputs)  # each call routes to other experts
    chosen = [F.linear(x, router).float().topk(shape.top_k, dim=-1).indices.unique().numel() for (x,) in inputs]
    nbytes = sum(chosen) / len(chosen) * (expert_bytes(gate_up) + expert_bytes(down))
    nbytes += router.numel() * router.element_size()
    x = inputs[0][0]
    want = fm.fused_moe_ref(x, F.linear(x, router), gate_up, down, shape.top_k, shape.renormalize).float()
    err = float((run(x).float() - want).norm() / want.norm())
    return {"ms": seconds * 1e3, "GBps": nbytes / seconds / 1e9, "frac_copy_bw": nbytes / seconds / copy_bw,
            "rel_err": err, "copy_GBps": copy_bw / 1e9}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="one small shape (seconds, any device)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--count-hidden", type=int, default=64, help="H used for counting on CPU (I = H / 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per median (20; 3 with --tiny)")
    p.add_argument("--results-dir", type=Path, default=None, help="where fused_moe.jsonl goes (bench/results)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.tiny else 20)
    copy_bw = copy_bandwidth(device) if device.type == "cuda" else None
    count_hidden = args.count_hidden if device.type == "cpu" else None
    rows = []
    for shape in TINY if args.tiny else SHAPES:
        rows += bench(shape, device, count_hidden or shape.hidden, repeats, copy_bw, TINY_TOKENS if args.tiny else TOKENS)
    print_table(rows, ["model", "weights", "path", "tokens", "launches", "syncs", "ms", "GBps", "frac_copy_bw",
                       "rel_err"])
    env = environment(device)
    env["tiny"] = args.tiny
    path = append_results("fused_moe", rows, env, args.results_dir)
    print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
