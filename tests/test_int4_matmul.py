"""int4_matmul: reference vs the published formula, Triton vs reference, CPU path, dispatch, bench.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set by conftest before
the kernels are decorated), so shapes stay small; activations are fp16/fp32
(the interpreter computes bf16 dots wrongly). N = 72 is not a multiple of any
block, so masked columns are exercised; M = 1, 3, 16 take the split-K decode
path and M = 33 the tiled prefill path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import pprt_kernels.int4_matmul as im

from int4_packers import gptq_dequantize_formula, pack_along_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def make_weight(k: int, n: int, g: int, dtype: torch.dtype, seed: int = 0):
    """Random integers packed by the test packer; returns the kernel operands and W [N, K] in fp32."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (k // g, n), generator=gen)
    scales = (torch.rand(k // g, n, generator=gen) * 0.02 + 0.005).to(dtype)
    w = gptq_dequantize_formula(q, zeros, scales, torch.arange(k) // g)  # [N, K]
    ops = (pack_along_rows(q).to(DEVICE), scales.to(DEVICE), zeros.to(torch.uint8).to(DEVICE))
    return ops, w


def test_reference_matches_formula():
    (qw, s, z), w = make_weight(96, 40, 32, torch.float32, seed=1)
    x = torch.randn(5, 96, device=DEVICE)
    bias = torch.randn(40, device=DEVICE)
    out = im.int4_matmul_ref(x, qw, s, z, 32, bias)
    assert rel_err(out, x.double().cpu() @ w.double().t() + bias.double().cpu()) < 1e-6


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_triton_matches_reference_fp16(m, g):
    k, n = 256, 72
    (qw, s, z), _ = make_weight(k, n, g, torch.float16, seed=m + g)
    x = torch.randn(m, k, device=DEVICE).half()
    bias = torch.randn(n, device=DEVICE).half() if m % 2 else None  # odd M carries a bias
    out = im.int4_matmul_triton(x, qw, s, z, g, bias)
    ref = im.int4_matmul_ref(x, qw, s, z, g, bias)
    assert out.shape == (m, n) and out.dtype == torch.float16
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize(
    "m,split_k", [(2, 1), (2, 3), (40, 1), (70, None)], ids=["M2-split1", "M2-split3", "M40-split1", "M70-auto"]
)
def test_triton_split_k_and_fp32(m, split_k):
    """Both output paths (direct store, fp32 atomics) and every tile shape, in fp32."""
    k, n, g = 192, 40, 32
    (qw, s, z), w = make_weight(k, n, g, torch.float32, seed=5)
    x = torch.randn(m, k, device=DEVICE)
    bias = torch.randn(n, device=DEVICE)
    out = im.int4_matmul_triton(x, qw, s, z, g, bias, split_k=split_k)
    assert rel_err(out, im.int4_matmul_ref(x, qw, s, z, g, bias)) < 1e-5


def test_triton_dequant_path_and_strided_weight():
    """The large-M path (dequantize + matmul) on a column slice of a wider weight."""
    k, n, g = 128, 96, 64
    (qw, s, z), _ = make_weight(k, n, g, torch.float16, seed=6)
    qw, s, z = qw[:, 8:80], s[:, 8:80], z[:, 8:80]  # non-contiguous columns
    w_t = im.int4_dequantize_triton(qw, s, z, g)
    assert torch.equal(w_t, im.int4_dequantize_ref(qw, s, z, g))  # bitwise: one rounding each
    x = torch.randn(20, k, device=DEVICE).half()
    out = im.int4_matmul_triton(x.float(), qw, s.float(), z, g, path="dequant")  # fp32: CPU matmul in fp16 is slow
    assert rel_err(out, im.int4_matmul_ref(x.float(), qw, s.float(), z, g)) < 1e-5


def test_launcher_checks():
    (qw, s, z), _ = make_weight(64, 16, 32, torch.float16)
    x = torch.randn(2, 64, device=DEVICE).half()
    with pytest.raises(ValueError, match="scales"):
        im.int4_matmul_triton(x, qw, s.float(), z, 32)
    with pytest.raises(ValueError, match="qweight"):
        im.int4_matmul_triton(torch.randn(2, 72, device=DEVICE).half(), qw, s, z, 32)
    with pytest.raises(ValueError, match="zeros"):
        im.int4_matmul_triton(x, qw, s, z.int(), 32)
    (qw8, s8, z8), _ = make_weight(64, 16, 8, torch.float16)
    with pytest.raises(ValueError, match="multiple of 16"):
        im.int4_matmul_triton(x, qw8, s8, z8, 8)


@pytest.mark.parametrize(
    "dtype,m,tol", [(torch.bfloat16, 9, 1e-2), (torch.float32, 1, 1e-5), (torch.float16, 1, 2e-3)],
    ids=["bf16-M9", "fp32-M1", "fp16-M1"],
)
def test_cpu_int4_op_path(dtype, m, tol):
    """torch's CPU int4 op, fed the layout built once by pack_for_cpu, agrees with the reference."""
    k, n, g = 256, 48, 64
    (qw, s, z), _ = make_weight(k, n, g, dtype, seed=7)
    qw, s, z = qw.cpu(), s.cpu(), z.cpu()
    pack = im.pack_for_cpu(qw, s, z, g)
    assert pack is not None and im.pack_for_cpu(qw[:, :40], s[:, :40], z[:, :40], g) is None  # N % 16
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    out = im._cpu_int4_matmul(x, pack, bias)
    assert rel_err(out, im.int4_matmul_ref(x, qw, s, z, g, bias)) < tol


def test_dispatch_follows_pprt_kernels(monkeypatch):
    (qw, s, z), _ = make_weight(64, 24, 32, torch.float32, seed=8)
    x = torch.randn(3, 64, device=DEVICE)
    calls = []
    monkeypatch.setattr(im, "int4_matmul_triton", lambda *a, **kw: calls.append("triton") or im.int4_matmul_ref(*a))
    monkeypatch.setenv("PPRT_KERNELS", "triton")
    im.int4_matmul(x, qw, s, z, 32)
    monkeypatch.setenv("PPRT_KERNELS", "ref")
    out = im.int4_matmul(x, qw, s, z, 32)
    assert calls == ["triton"]
    assert rel_err(out, im.int4_matmul_ref(x, qw, s, z, 32)) < 1e-6


def test_bench_runs_tiny(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import int4_matmul as bench

    rows = bench.main(["--tiny", "--results-dir", str(tmp_path)])
    assert rows and all(r["max_rel_err"] < 1e-2 for r in rows)
    saved = [json.loads(line) for line in (tmp_path / "int4_matmul.jsonl").read_text().splitlines()]
    assert len(saved) == len(rows) and "device" in saved[0]
    if DEVICE == "cpu":
        assert saved[0]["triton_ms"] == "not measured"
