"""Shared benchmark harness: timing, ceilings, environment facts, JSON rows, plots.

Timing uses CUDA events on GPU (warm-up, then the median of repeats) and the
wall clock on CPU. `time_fn(..., inputs=...)` rotates through several copies of
a benchmark's inputs, so a kernel does not find its operands still in L2 from
the previous repeat (`rotating_inputs` makes enough copies to exceed twice the
cache). The ceilings a benchmark compares against are measured in the same run:
`copy_bandwidth` (device memory, read + write counted) and `matmul_rate`.

Every benchmark prints a table and appends JSON rows to
bench/results/<name>.jsonl, each carrying the device name, torch and triton
versions, the git commit and the date, so results stay comparable.
`plot_bandwidth` draws achieved bandwidth against the ceiling (matplotlib is
an optional dependency: `pip install matplotlib`, or the `plot` extra).

    python -m bench.harness            # the ceilings of this machine -> results/ceilings.jsonl
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CPU_CACHE_BYTES = 64 << 20  # assumed last-level cache of a CPU (rotation target)
MAX_COPIES = 64  # rotation never makes more copies than this


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device | str) -> dict:
    """Facts every JSON row carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ---- timing ----------------------------------------------------------------------------

def wall_time(fn: Callable[[], object], warmup: int = 1, repeats: int = 3) -> float:
    """Median wall-clock seconds of one call of `fn` (for work that returns to the host)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_fn(fn: Callable[..., object], device: torch.device | str, warmup: int = 3, repeats: int = 10,
            inputs: Sequence[tuple] | None = None) -> float:
    """Median seconds of one call of `fn` (CUDA events on GPU, wall clock on CPU).

    inputs: argument tuples; call i runs fn(*inputs[i % len(inputs)]), so consecutive
    calls touch different memory. Without inputs, fn takes no arguments.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if inputs is not None and not inputs:
        raise ValueError("inputs must hold at least one argument tuple")
    device = torch.device(device)
    calls = iter(range(1 << 62))

    def call():
        if inputs is None:
            return fn()
        return fn(*inputs[next(calls) % len(inputs)])

    for _ in range(warmup):
        call()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cache_bytes(device: torch.device | str) -> int:
    """The last-level cache a rotation must defeat: L2 on a GPU, an assumed 64 MiB on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or 50 << 20
    return CPU_CACHE_BYTES


def rotating_inputs(make: Callable[[], tuple], device: torch.device | str, min_bytes: int | None = None,
                    max_copies: int = MAX_COPIES) -> list[tuple]:
    """Fresh argument tuples from `make()` until their tensors exceed `min_bytes`
    (default: twice the device's last-level cache); at least 2, at most `max_copies`."""
    target = 2 * cache_bytes(device) if min_bytes is None else min_bytes
    copies, total = [], 0
    while len(copies) < max_copies and (len(copies) < 2 or total < target):
        args = make()
        copies.append(args)
        total += sum(a.nbytes for a in args if isinstance(a, torch.Tensor))
    return copies


# ---- ceilings --------------------------------------------------------------------------

def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Measured device-memory copy bandwidth in bytes/s (read + write counted)."""
    device = torch.device(device)
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    return 2 * src.numel() / t


def matmul_rate(device: torch.device | str, n: int = 8192, dtype: torch.dtype = torch.bfloat16,
                repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n x n matmul in `dtype` on random inputs (rotated)."""
    device = torch.device(device)
    inputs = rotating_inputs(lambda: (torch.randn(n, n, device=device).to(dtype),
                                      torch.randn(n, n, device=device).to(dtype)), device, max_copies=4)
    t = time_fn(torch.matmul, device, warmup=3, repeats=repeats, inputs=inputs)
    return 2 * n**3 / t


# ---- output ----------------------------------------------------------------------------

def print_table(rows: list[dict], columns: list[str]) -> None:
    """A fixed-width table of `columns` from `rows` (floats to 3 significant digits)."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def append_results(name: str, rows: list[dict], env: dict, results_dir: Path | None = None) -> Path:
    """Append rows (each merged with `env`) to <results_dir>/<name>.jsonl."""
    out_dir = Path(results_dir) if results_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({**env, **row}) + "\n")
    return path


def read_results(path: Path, latest: bool = True) -> list[dict]:
    """Rows of a results .jsonl file; with `latest`, only those of its last run (last date and device)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if latest and rows:
        last = rows[-1]
        rows = [r for r in rows if r.get("date") == last.get("date") and r.get("device") == last.get("device")]
    return rows


def plot_bandwidth(rows: list[dict], path: Path, x: str, y: str = "GBps", group_by: Sequence[str] = (),
                   ceiling_GBps: float | None = None, title: str | None = None) -> Path:
    """Line plot of achieved `y` (GB/s) against `x`, one line per `group_by` value, with the
    measured ceiling as a dashed line; written to `path` (png, svg or pdf). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plot_bandwidth needs matplotlib (an optional dependency): "
                           "pip install matplotlib, or pip install -e '.[plot]'") from e
    points = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    if not points:
        raise ValueError(f"no row has both {x!r} and {y!r}")
    groups: dict[tuple, list[dict]] = {}
    for r in points:
        groups.setdefault(tuple(r.get(g) for g in group_by), []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, members in groups.items():
        members.sort(key=lambda r: r[x])
        label = ", ".join(f"{g}={v}" for g, v in zip(group_by, key)) or y
        ax.plot([r[x] for r in members], [r[y] for r in members], marker="o", label=label)
    if ceiling_GBps is not None:
        ax.axhline(ceiling_GBps, linestyle="--", color="black", label=f"copy ceiling {ceiling_GBps:.0f} GB/s")
    if all(isinstance(r[x], (int, float)) and r[x] > 0 for r in points):
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(f"{y} (GB/s)")
    ax.set_title(title or f"{y} against {x}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure this machine's ceilings: copy bandwidth and the bf16 (fp32 on CPU) matmul rate."""
    parser = argparse.ArgumentParser(description="device ceilings: copy bandwidth and matmul rate")
    parser.add_argument("--tiny", action="store_true", help="small sizes on CPU, for tests")
    parser.add_argument("--results-dir", type=Path, default=None, help="where ceilings.jsonl goes")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32  # CPU bf16 matmuls are not a ceiling anyone uses
    n = 8192 if on_gpu else (256 if args.tiny else 2048)
    bw = copy_bandwidth(device, nbytes=1 << 30 if on_gpu else 1 << 24)
    flops = matmul_rate(device, n=n, dtype=dtype, repeats=10 if on_gpu else 3)
    rows = [dict(kind="copy", bytes=1 << 30 if on_gpu else 1 << 24, GBps=bw / 1e9),
            dict(kind="matmul", n=n, dtype=str(dtype).removeprefix("torch."), TFLOPs=flops / 1e12)]
    print_table(rows, ["kind", "bytes", "n", "dtype", "GBps", "TFLOPs"])
    path = append_results("ceilings", rows, environment(device), args.results_dir)
    print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
