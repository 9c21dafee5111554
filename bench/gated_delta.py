"""Gated DeltaNet kernels: the gated delta rule and the causal conv1d against the memory ceiling.

One Qwen3.5-27B DeltaNet layer (48 value heads, 16 key heads, dk = dv = 128, conv over
10240 channels, kernel 4; fp32 recurrent state, bf16 activations and conv state), the
state pool holding one slot more than the batch, slots shuffled:
  - decode: B sequences of one row (B = 1, 8, 32, 128). A decode step must move each
    state once in and once out; GBps counts exactly those bytes (plus the rows' q, k,
    v, o or x, y) per second, frac_copy that over the copy bandwidth measured in the same
    run. Goal on a GPU: frac_copy >= 0.5 for B >= 32 (the state dominates there).
  - prefill: one prompt (512, 4096, 16384 rows) and a mixed step (a 2048-row prompt
    chunk beside 32 decode rows). tok_s = rows per second. On a GPU, the gated delta rule
    is timed as dispatched (fla's chunked kernel for long rows, state gathered and
    scattered: gather_scatter_s times that copy alone) and with our recurrent kernel for
    every row (recurrent_s); vs_recurrent = recurrent_s / kernel_s says whether fla pays,
    rel_err compares the two.
On CPU it times the CPU dispatch (chunked torch path; the reference conv) and, for the
gated delta rule, the token-by-token reference (recurrent_s; rel_err against it); the GPU
columns say "not measured". `--tiny` runs small shapes in seconds (tests).

    python -m bench.gated_delta            # GPU (or CPU at the real layer shape: slow)
    python -m bench.gated_delta --tiny     # CPU smoke run
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.harness import append_results, copy_bandwidth, environment, print_table, time_fn
from pprt_kernels import use_triton
from pprt_kernels.causal_conv1d import causal_conv1d, causal_conv1d_ref
from pprt_kernels.gated_delta import gated_delta_rule, gated_delta_rule_ref

NOT_MEASURED = "not measured"
DECODE_GOAL = 0.5  # fraction of copy bandwidth for decode at batch >= GOAL_BATCH
GOAL_BATCH = 32


@dataclass(frozen=True, slots=True)
class Shape:
    """One DeltaNet layer's geometry and the sweep of one run."""

    heads: int  # value heads Hv
    key_heads: int
    head_dim: int  # dk = dv
    conv_kernel: int
    dtype: torch.dtype  # activations and conv state; the recurrent state is fp32
    decode_batches: tuple[int, ...]
    prefill_lens: tuple[int, ...]
    mixed: tuple[int, int]  # (prompt rows, decode rows) of the mixed step

    @property
    def conv_dim(self) -> int:
        return (2 * self.key_heads + self.heads) * self.head_dim


FULL = Shape(48, 16, 128, 4, torch.bfloat16, (1, 8, 32, 128), (512, 4096, 16384), (2048, 32))
TINY = Shape(4, 2, 16, 4, torch.float32, (1, 3), (40,), (24, 2))


def make_inputs(shape: Shape, lens: list[int], device: torch.device) -> dict:
    """Packed rows of len(lens) sequences, their slots shuffled in a pool of B + 1."""
    t, b, h, d = sum(lens), len(lens), shape.heads, shape.head_dim
    rand = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    qsl = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return dict(
        q=rand(t, h, d).to(shape.dtype), k=rand(t, h, d).to(shape.dtype), v=rand(t, h, d).to(shape.dtype),
        g=-torch.rand(t, h, device=device) * 0.5, beta=torch.rand(t, h, device=device).to(shape.dtype),
        state=rand(b + 1, h, d, d) * 0.1, idx=torch.randperm(b + 1, device=device)[:b].int(), qsl=qsl,
        x=rand(t, shape.conv_dim).to(shape.dtype), weight=rand(shape.conv_dim, shape.conv_kernel).to(shape.dtype),
        conv_state=rand(b + 1, shape.conv_dim, shape.conv_kernel - 1).to(shape.dtype), max_len=max(lens),
    )


def _delta(fn, a: dict, state: torch.Tensor | None = None) -> torch.Tensor:
    return fn(a["q"], a["k"], a["v"], a["g"], a["beta"], a["state"] if state is None else state, a["idx"], a["qsl"],
              scale=a["q"].shape[-1] ** -0.5, max_query_len=a["max_len"])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def bench_delta(shape: Shape, kind: str, lens: list[int], device: torch.device, reps: dict) -> dict:
    a = make_inputs(shape, lens, device)
    b, t = len(lens), sum(lens)
    kernel_s = time_fn(lambda: _delta(gated_delta_rule, a), device, **reps)
    state_bytes = 2 * b * a["state"][0].nbytes  # each state read once and written once
    row_bytes = sum(a[n].nbytes for n in ("q", "k", "v", "g", "beta")) + a["v"].nbytes  # + o
    row = dict(op="gated_delta", kind=kind, batch=b, rows=t, kernel_s=kernel_s, state_MB=state_bytes / 1e6,
               GBps=(state_bytes + row_bytes) / kernel_s / 1e9, tok_s=t / kernel_s)
    if device.type == "cuda":  # our recurrent kernel for every row, and the cost of fla's state copies
        import pprt_kernels.gated_delta_triton as gt

        def recurrent():
            return _recurrent_only(gt, a)

        row["recurrent_s"] = time_fn(recurrent, device, **reps)
        slots = a["idx"].long()
        row["gather_scatter_s"] = time_fn(
            lambda: a["state"].index_copy_(0, slots, a["state"].index_select(0, slots)), device, **reps
        ) if a["max_len"] > 1 else None
        start = a["state"].clone()
        out = _delta(gated_delta_rule, a)
        a["state"].copy_(start)
        row["rel_err"] = rel_err(out, recurrent())
    else:  # the token-by-token reference
        start = a["state"].clone()
        row["recurrent_s"] = time_fn(lambda: _delta(gated_delta_rule_ref, a, start.clone()), device, **reps)
        row["rel_err"] = rel_err(_delta(gated_delta_rule, a, start.clone()), _delta(gated_delta_rule_ref, a, start))
        row["gather_scatter_s"] = NOT_MEASURED
    row["vs_recurrent"] = row["recurrent_s"] / kernel_s
    return row


def _recurrent_only(gt, a: dict) -> torch.Tensor:
    """Our recurrent Triton kernel over every row (what runs where fla is missing)."""
    o = torch.empty_like(a["v"])
    gt._recurrent(a["q"], a["k"], a["v"], a["g"], a["beta"], o, a["state"], a["idx"], a["qsl"], None,
                  a["q"].shape[-1] ** -0.5, True)
    return o


def bench_conv(shape: Shape, kind: str, lens: list[int], device: torch.device, reps: dict) -> dict:
    a = make_inputs(shape, lens, device)
    b, t = len(lens), sum(lens)
    start = a["conv_state"].clone()

    def conv(fn=causal_conv1d, state=None):
        return fn(a["x"], a["weight"], None, a["conv_state"] if state is None else state, a["idx"], a["qsl"])

    kernel_s = time_fn(conv, device, **reps)
    state_bytes = 2 * b * a["conv_state"][0].nbytes
    row_bytes = 2 * a["x"].nbytes  # x in, y out
    err = rel_err(conv(state=start.clone()), conv(causal_conv1d_ref, start.clone()))
    return dict(op="conv1d", kind=kind, batch=b, rows=t, kernel_s=kernel_s, state_MB=state_bytes / 1e6,
                GBps=(state_bytes + row_bytes) / kernel_s / 1e9, tok_s=t / kernel_s, rel_err=err)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes on CPU, for tests")
    parser.add_argument("--results-dir", type=Path, default=None, help="where gated_delta.jsonl goes")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shape = TINY if args.tiny else FULL
    reps = dict(warmup=1, repeats=3) if args.tiny or device.type == "cpu" else dict(warmup=3, repeats=10)
    copy_bw = copy_bandwidth(device, nbytes=1 << 24 if args.tiny else 1 << 30)
    impl = "triton" if use_triton(device) else "torch"

    steps = [("decode", [1] * b) for b in shape.decode_batches]
    steps += [("prefill", [n]) for n in shape.prefill_lens]
    steps.append(("mixed", [shape.mixed[0]] + [1] * shape.mixed[1]))
    rows = []
    for kind, lens in steps:
        for bench in (bench_delta, bench_conv):
            row = bench(shape, kind, lens, device, reps)
            row["frac_copy"] = row["GBps"] * 1e9 / copy_bw
            big_decode = kind == "decode" and row["batch"] >= GOAL_BATCH and device.type == "cuda"
            row["goal_met"] = row["frac_copy"] >= DECODE_GOAL if big_decode else None
            rows.append(row)
    for row in rows:
        row.update(impl=impl, copy_GBps=copy_bw / 1e9, heads=shape.heads, key_heads=shape.key_heads,
                   head_dim=shape.head_dim, conv_dim=shape.conv_dim, dtype=str(shape.dtype).removeprefix("torch."))
        if device.type != "cuda":
            row["triton_s"] = NOT_MEASURED

    print(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write), kernels by {impl} on {device}")
    print_table(rows, ["op", "kind", "batch", "rows", "kernel_s", "state_MB", "GBps", "frac_copy", "tok_s",
                       "recurrent_s", "vs_recurrent", "gather_scatter_s", "rel_err", "goal_met"])
    path = append_results("gated_delta", rows, environment(device), args.results_dir)
    print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
