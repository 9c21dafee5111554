"""fp8_matmul: the e4m3 decoder, reference vs the formula, Triton vs reference, dispatch.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set by conftest), so
shapes stay small and activations are fp16 / fp32. K and N are not multiples of 128
(the last scale blocks are partial and tiles are masked); M = 1, 3, 16 take the
split-K decode tiles, M = 200 the 128-row prefill tiles, and path="dequant" the
dequantize + matmul path that serves M >= 256. Both e4m3 decoders run: Triton's own
type (sm89+) and the integer decoding of older cards.
"""

from __future__ import annotations

import pytest
import torch

import pprt_kernels.fp8_matmul as fm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def make_weight(n: int, k: int, block: tuple[int, int], seed: int = 0):
    """Random e4m3 codes over the whole finite range (no NaN), positive block scales."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k), generator=gen).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E  # 0x7F / 0xFF are NaN
    bn, bk = block
    scale = torch.rand(-(-n // bn), -(-k // bk), generator=gen) * 0.01 + 1e-3
    return codes.view(torch.float8_e4m3fn).to(DEVICE), scale.to(DEVICE)


def formula(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W [N, K] in float64 by explicit loops over blocks: W = fp8 value * scale of its block."""
    n, k = weight.shape
    w = weight.cpu().double()
    out = torch.empty(n, k, dtype=torch.float64)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = w[rows, cols] * float(scale[i, j])
    return out


def test_integer_e4m3_decoder_equals_torch_for_every_code():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    want = codes.view(torch.float8_e4m3fn).float()
    got = fm.e4m3_to_float_ref(codes)
    finite = ~want.isnan()
    assert torch.equal(got[finite], want[finite])  # subnormals, zeros of both signs, 448
    assert got[0x7E] == 448 and got[0x01] == 2.0**-9 and got[0x80] == 0 and torch.signbit(got[0x80])


@pytest.mark.parametrize("block", [(128, 128), (1, 200), (136, 200), (32, 64)], ids=["b128", "channel", "tensor", "b32x64"])
def test_reference_matches_formula(block):
    n, k = 136, 200
    w, s = make_weight(n, k, block, seed=1)
    x = torch.randn(5, k, device=DEVICE, dtype=torch.float64).float()
    bias = torch.randn(n, device=DEVICE)
    out = fm.fp8_matmul_ref(x, w, s, block, bias)
    want = x.double().cpu() @ formula(w, s, block).t() + bias.double().cpu()
    assert rel_err(out, want) < 1e-6
    # the integer decoder gives the same reference from the raw bits
    assert torch.equal(fm.fp8_matmul_ref(x, w.view(torch.uint8), s, block, bias), out)


SHAPES = [(136, 200, (128, 128)), (72, 320, (128, 128)), (200, 130, (1, 130)), (40, 96, (40, 96))]


@pytest.mark.parametrize("native", [True, False], ids=["e4m3-type", "int-decode"])
@pytest.mark.parametrize("m", [1, 3, 16, 200])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-K{k}-b{b[0]}x{b[1]}" for n, k, b in SHAPES])
def test_triton_matches_reference_fp32(shape, m, native):
    n, k, block = shape
    w, s = make_weight(n, k, block, seed=m + n)
    x = torch.randn(m, k, device=DEVICE)
    bias = torch.randn(n, device=DEVICE) if m % 2 else None  # odd M carries a bias
    out = fm.fp8_matmul_triton(x, w, s, block, bias, native=native)
    ref = fm.fp8_matmul_ref(x, w, s, block, bias)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("native", [True, False], ids=["e4m3-type", "int-decode"])
@pytest.mark.parametrize("m", [1, 16, 33])
def test_triton_fp16_and_paths(m, native):
    n, k, block = 136, 200, (128, 128)
    w, s = make_weight(n, k, block, seed=7)
    x = (torch.randn(m, k, device=DEVICE) * 0.1).half()
    bias = torch.randn(n, device=DEVICE).half()
    ref = fm.fp8_matmul_ref(x, w, s, block, bias)
    for path in ("fused", "dequant"):
        out = fm.fp8_matmul_triton(x, w, s, block, bias, path=path, native=native)
        assert out.dtype == torch.float16 and rel_err(out, ref) < 2e-3, path
    for split in (1, 2):  # split-K partial sums meet by atomics; one slice stores directly
        assert rel_err(fm.fp8_matmul_triton(x, w, s, block, bias, split_k=split, native=native), ref) < 2e-3


def test_dequantize_triton_equals_reference():
    w, s = make_weight(136, 200, (128, 128), seed=3)
    for native in (True, False):
        got = fm.fp8_dequantize_triton(w, s, (128, 128), torch.float32, native=native)
        assert torch.equal(got, fm.fp8_dequantize_ref(w, s, (128, 128), torch.float32))


def test_dispatch_uses_reference_off_cuda(monkeypatch):
    w, s = make_weight(40, 96, (40, 96), seed=4)
    x = torch.randn(2, 96, device=DEVICE)
    calls = []
    monkeypatch.setattr(fm, "fp8_matmul_triton", lambda *a, **k: calls.append(1) or fm.fp8_matmul_ref(*a))
    monkeypatch.setenv("PPRT_KERNELS", "ref")
    fm.fp8_matmul(x, w, s, (40, 96))
    assert calls == []
    monkeypatch.setenv("PPRT_KERNELS", "triton")
    fm.fp8_matmul(x, w, s, (40, 96))
    assert calls == [1]


def test_capability_choice():
    assert fm.native_fp8(torch.device("cpu"))  # the interpreter has the e4m3 type
    if torch.cuda.is_available():
        assert fm.native_fp8(torch.device("cuda")) == (torch.cuda.get_device_capability() >= (8, 9))


@pytest.mark.parametrize("change, message", [
    (dict(scale=torch.ones(1, 1, dtype=torch.float16)), "scale must be float32"),
    (dict(scale=torch.ones(2, 1)), "scale must be float32 \\(1, 1\\)"),
    (dict(weight=torch.zeros(40, 96, dtype=torch.float16)), "weight must be float8_e4m3fn"),
    (dict(bias=torch.zeros(41)), "bias must be"),
    (dict(x=torch.zeros(2, 95)), r"K=95"),
])
def test_launcher_rejects_bad_operands(change, message):
    w, s = make_weight(40, 96, (40, 96))
    args = dict(x=torch.zeros(2, 96), weight=w.cpu(), scale=s.cpu(), bias=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        fm.fp8_matmul_ref(args["x"], args["weight"], args["scale"], (40, 96), args["bias"])


def test_bench_runs_tiny(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import fp8_matmul as bench

    rows = bench.main(["--tiny", "--results-dir", str(tmp_path)])
    assert rows and all(r["max_rel_err"] < 1e-2 for r in rows)
    saved = [json.loads(line) for line in (tmp_path / "fp8_matmul.jsonl").read_text().splitlines()]
    assert len(saved) == len(rows) and "device" in saved[0]
    if DEVICE == "cpu":
        assert saved[0]["triton_ms"] == "not measured"
