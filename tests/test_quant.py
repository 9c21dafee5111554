"""pprt.quant: packing, GPTQ / AWQ import, RTN, Int4Linear, the loader hooks.

Checkpoint tensors are written by tests/int4_packers.py (independent bit
loops) from integers the test chose, and the imported weight is compared
with the published dequantization formulas, exactly (same fp16 rounding).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from int4_packers import (
    awq_dequantize_formula, awq_pack, awq_quantize, gptq_dequantize_formula, gptq_pack, gptq_quantize,
    pack_along_cols, pack_along_rows,
)
from pprt.config import QuantConfig
from pprt.weights.int4 import (
    AWQ_ORDER, Int4Linear, Int4Weight, dequantize, from_awq, from_gptq, load_quantized_linear, pack,
    quantize_linear, quantize_rtn, unpack,
)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hand_ints(k: int, n: int, g: int, seed: int, sym: bool):
    """q [K, N] and zeros [K/g, N] covering 0 and 15, fp16 scales of mixed sign-free magnitude."""
    q = torch.randint(0, 16, (k, n), generator=gen(seed))
    q[0, :2], q[1, :2] = 0, 15  # both ends of the range
    zeros = torch.full((k // g, n), 8) if sym else torch.randint(0, 16, (k // g, n), generator=gen(seed + 1))
    if not sym:
        zeros[0, :3] = torch.tensor([0, 15, 1])  # v1 stores 0 as 15 (= -1 & 0xF)
    scales = (torch.rand(k // g, n, generator=gen(seed + 2)) * 0.05 + 1e-3).half()
    return q, zeros, scales


# ---------------------------------------------------------------- packing


def test_pack_nibble_order_literals():
    rows = torch.arange(1, 9)[:, None]  # q[j, 0] = j + 1
    assert pack(rows, dim=0).item() & 0xFFFFFFFF == 0x87654321
    assert pack_along_rows(rows).item() & 0xFFFFFFFF == 0x87654321
    cols = torch.arange(1, 9)[None, :]
    # AWQ: nibble i holds column AWQ_ORDER[i] -> values 1,3,5,7,2,4,6,8 from the low nibble up
    awq_word = pack(cols, dim=1, order=AWQ_ORDER).item() & 0xFFFFFFFF
    assert awq_word == 0x86427531
    assert pack_along_cols(cols, [0, 2, 4, 6, 1, 3, 5, 7]).item() & 0xFFFFFFFF == 0x86427531


@pytest.mark.parametrize("dim,order", [(0, None), (1, None), (1, AWQ_ORDER)], ids=["rows", "cols", "cols-awq"])
def test_pack_unpack_round_trip(dim, order):
    q = torch.randint(0, 16, (40, 24), generator=gen(1))
    packed = pack(q, dim=dim, order=order)
    assert packed.dtype == torch.int32 and packed.shape[dim] == q.shape[dim] // 8
    assert torch.equal(unpack(packed, dim=dim, order=order), q.to(torch.uint8))
    independent = pack_along_rows(q) if dim == 0 else pack_along_cols(q, list(order) if order else None)
    assert torch.equal(packed, independent)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(12, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="0..15"):
        pack(torch.full((8, 8), 16))


def test_int4weight_validation_names_field():
    good = quantize_rtn(torch.randn(16, 64, generator=gen(2)), 32)
    with pytest.raises(ValueError, match="scales"):
        Int4Weight(good.qweight, good.scales[:1], good.zeros, 32)
    with pytest.raises(ValueError, match="zeros"):
        Int4Weight(good.qweight, good.scales, good.zeros.int(), 32)
    with pytest.raises(ValueError, match="group_size"):
        Int4Weight(good.qweight, good.scales, good.zeros, 48)
    assert good.nbytes == 64 * 16 // 2 + (64 // 32) * 16 * (4 + 1)  # fp32 scales here


# ---------------------------------------------------------------- GPTQ / AWQ import


@pytest.mark.parametrize(
    "fmt,sym,g,desc_act",
    [("gptq", True, 128, False), ("gptq", False, 32, True), ("gptq_v2", False, 64, False), ("gptq_v2", True, 32, True)],
    ids=["v1-sym-g128", "v1-asym-g32-desc_act", "v2-asym-g64", "v2-sym-g32-desc_act"],
)
def test_gptq_dequantizes_to_published_formula(fmt, sym, g, desc_act):
    k, n = 256, 40  # N a multiple of 8, not of 16
    q, zeros, scales = hand_ints(k, n, g, seed=3, sym=sym)
    if desc_act:
        perm = torch.randperm(k, generator=gen(4))
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[perm] = torch.arange(k) // g
    else:
        g_idx = torch.arange(k) // g
    stored = gptq_pack(q, zeros, scales, g_idx, fmt)
    qcfg = QuantConfig(method="gptq", group_size=g, desc_act=desc_act, sym=sym, checkpoint_format=fmt)
    w = from_gptq(stored["qweight"], stored["qzeros"], stored["scales"], stored["g_idx"], qcfg)
    assert (w.perm is not None) == desc_act
    # W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n]), written out per element for a sample
    expected = gptq_dequantize_formula(q, zeros, scales, g_idx).half()
    got = dequantize(w)
    assert got.dtype == torch.float16 and torch.equal(got, expected)
    for kk, nn in [(0, 0), (1, 1), (k - 1, n - 1), (77, 13)]:
        gi = int(g_idx[kk])
        assert float(got[nn, kk]) == float((scales[gi, nn].float() * (int(q[kk, nn]) - int(zeros[gi, nn]))).half())


def test_gptq_v1_zero_offset_matters():
    """Reading a v1 file as v2 must give a different weight (the +1 is applied)."""
    q, zeros, scales = hand_ints(64, 16, 32, seed=5, sym=False)
    stored = gptq_pack(q, zeros, scales, torch.arange(64) // 32, "gptq")
    v1 = from_gptq(stored["qweight"], stored["qzeros"], stored["scales"], None, QuantConfig("gptq", group_size=32))
    as_v2 = from_gptq(stored["qweight"], stored["qzeros"], stored["scales"], None,
                      QuantConfig("gptq", group_size=32, checkpoint_format="gptq_v2"))
    assert torch.equal(v1.zeros, zeros.to(torch.uint8))
    assert not torch.equal(as_v2.zeros, v1.zeros)


def test_gptq_rejects_uneven_g_idx():
    k, g = 64, 32
    g_idx = torch.zeros(k, dtype=torch.int32)
    g_idx[40:] = 1  # 40 rows in group 0, 24 in group 1
    q, zeros, scales = hand_ints(k, 8, g, seed=6, sym=True)
    stored = gptq_pack(q, zeros, scales, g_idx)
    with pytest.raises(ValueError, match="g_idx"):
        from_gptq(stored["qweight"], stored["qzeros"], stored["scales"], stored["g_idx"],
                  QuantConfig("gptq", group_size=g, desc_act=True))


def test_awq_dequantizes_to_published_formula():
    k, n, g = 192, 48, 64
    q, zeros, scales = hand_ints(k, n, g, seed=7, sym=False)
    stored = awq_pack(q, zeros, scales)
    assert stored["qweight"].shape == (k, n // 8)
    w = from_awq(stored["qweight"], stored["qzeros"], stored["scales"], g)
    expected = awq_dequantize_formula(q, zeros, scales, g).half()
    assert torch.equal(dequantize(w), expected)
    assert torch.equal(w.zeros, zeros.to(torch.uint8))  # no zero offset in AWQ


@pytest.mark.parametrize("method", ["gptq-desc_act", "awq"])
def test_packers_quantize_then_import_round_trip(method):
    """The float -> checkpoint packers (reused by end-to-end tests) agree with the importer."""
    weight = torch.randn(48, 128, generator=gen(8))
    if method == "awq":
        stored, deq = awq_quantize(weight, 64)
        w = from_awq(stored["qweight"], stored["qzeros"], stored["scales"], 64)
    else:
        stored, deq = gptq_quantize(weight, 32, sym=False, desc_act=True)
        w = from_gptq(stored["qweight"], stored["qzeros"], stored["scales"], stored["g_idx"],
                      QuantConfig("gptq", group_size=32, desc_act=True, sym=False))
    assert torch.equal(dequantize(w), deq.half())
    assert rel_err(deq, weight) < 0.15  # it is a quantization of the weight, not noise


# ---------------------------------------------------------------- RTN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_rtn_error_bound(g, sym, dtype):
    n, k = 40, 384
    weight = (torch.randn(n, k, generator=gen(9)) * torch.linspace(0.01, 2, k)).to(dtype)
    weight[3, :g] = 0.7  # a constant group
    w = quantize_rtn(weight, g, sym=sym)
    assert w.scales.dtype == dtype and w.zeros.max() <= 15
    if sym:
        assert bool((w.zeros == 8).all())
    err = (dequantize(w).float() - weight.float()).abs()  # [N, K]
    step = w.scales.float().t().repeat_interleave(g, 1)  # [N, K]
    slack = 0.5 + (0.05 if dtype == torch.bfloat16 else 1e-4)  # bf16 output rounding and clamping
    assert bool((err <= slack * step + 1e-6).all()), float((err / step).max())
    if not sym:  # asymmetric: a constant group is the top of its range, so nearly exact
        assert float(err[3, :g].max()) <= 0.7 * 0.01


def test_rtn_rejects_bad_group():
    with pytest.raises(ValueError, match="group_size"):
        quantize_rtn(torch.randn(8, 96), 64)


# ---------------------------------------------------------------- Int4Linear


@pytest.mark.parametrize(
    "dtype,lead,n,desc_act",
    [(torch.float32, (1,), 48, False), (torch.float32, (2, 7), 48, True), (torch.bfloat16, (5,), 48, False),
     (torch.bfloat16, (2, 1), 40, True), (torch.float16, (1,), 48, False), (torch.float16, (3,), 48, True)],
    ids=["fp32-M1-cpuop", "fp32-2x7-desc_act", "bf16-M5-cpuop", "bf16-N40-ref-desc_act", "fp16-M1-cpuop",
         "fp16-M3-desc_act"],
)
def test_int4_linear_matches_dequantized_float_linear(dtype, lead, n, desc_act):
    k, g = 128, 32
    stored, _ = gptq_quantize(torch.randn(n, k, generator=gen(10)), g, sym=False, desc_act=desc_act)
    w = from_gptq(stored["qweight"], stored["qzeros"], stored["scales"], stored["g_idx"],
                  QuantConfig("gptq", group_size=g, desc_act=desc_act, sym=False), dtype=dtype)
    bias = torch.randn(n, generator=gen(11)).to(dtype)
    layer = Int4Linear(w, bias)
    x = torch.randn(*lead, k, generator=gen(12)).to(dtype)  # leading dims are kept
    y = layer(x)
    assert y.shape == (*lead, n) and y.dtype == dtype
    ref = F.linear(x.double(), dequantize(w).double(), bias.double())
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert rel_err(y, ref) < tol


def test_quantize_linear_keeps_dtype_bias_and_size():
    weight = torch.randn(64, 256, generator=gen(13)).bfloat16()
    bias = torch.randn(64, generator=gen(14))
    layer = quantize_linear(weight, bias, group_size=128)
    assert layer.scales.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.weight.nbytes == 256 * 64 // 2 + 2 * 64 * 3  # K*N/2 + (K/g)*N*(2+1)
    x = torch.randn(3, 256, generator=gen(15)).bfloat16()
    assert rel_err(layer(x), F.linear(x.float(), weight.float(), bias.float())) < 0.1


# ---------------------------------------------------------------- loader hook


def reader(tensors: dict):
    def read(name: str) -> torch.Tensor:
        if name not in tensors:
            raise KeyError(f"tensor {name} is not in the checkpoint")
        return tensors[name]
    return read


def test_load_quantized_linear_gptq_desc_act_with_bias():
    k, n, g = 160, 24, 32
    stored, deq = gptq_quantize(torch.randn(n, k, generator=gen(16)), g, sym=False, desc_act=True,
                                checkpoint_format="gptq")
    tensors = {f"l.{key}": v for key, v in stored.items()}
    tensors["l.bias"] = torch.randn(n, generator=gen(17)).half()
    qcfg = QuantConfig("gptq", group_size=g, desc_act=True, sym=False)
    layer = load_quantized_linear(reader(tensors), "l", k, n, True, qcfg, torch.float32, torch.device("cpu"))
    assert layer.scales.dtype == torch.float32 and layer.bias.dtype == torch.float32
    x = torch.randn(4, k, generator=gen(18))
    assert rel_err(layer(x), F.linear(x, deq, tensors["l.bias"].float())) < 1e-5


def test_load_quantized_linear_awq_padded_size():
    k, n, g = 128, 56, 64  # n stands in for a padded MLP size the config declares
    stored, deq = awq_quantize(torch.randn(n, k, generator=gen(19)), g)
    tensors = {f"p.{key}": v for key, v in stored.items()}
    layer = load_quantized_linear(reader(tensors), "p", k, n, False, QuantConfig("awq", group_size=g, sym=False),
                                  torch.float32, torch.device("cpu"))
    x = torch.randn(3, k, generator=gen(20))
    assert rel_err(layer(x), x @ deq.t()) < 1e-5


def test_load_quantized_linear_errors_name_the_tensor():
    k, n, g = 128, 16, 64
    stored, _ = gptq_quantize(torch.randn(n, k, generator=gen(21)), g, sym=True)
    tensors = {f"m.{key}": v for key, v in stored.items()}
    qcfg = QuantConfig("gptq", group_size=g)
    with pytest.raises(ValueError, match=r"m\.qweight has shape"):
        load_quantized_linear(reader(tensors), "m", k, n + 8, False, qcfg, torch.float16, torch.device("cpu"))
    with pytest.raises(KeyError, match=r"m\.bias"):
        load_quantized_linear(reader(tensors), "m", k, n, True, qcfg, torch.float16, torch.device("cpu"))
    with pytest.raises(ValueError, match="group_size"):
        load_quantized_linear(reader(tensors), "m", 96, n, False, qcfg, torch.float16, torch.device("cpu"))
