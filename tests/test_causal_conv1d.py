"""Causal conv1d with slot states: reference vs transformers, chunks shorter than the window, checks.

transformers' `causal_conv1d_update` (decode with a state of K-1 inputs, any number of
new rows) and `causal_conv1d_fn` (prefill from nothing) are the outside oracle. Every
slot of the pool starts random, so a wrong slot read or write shows.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers.models.qwen3_next import modeling_qwen3_next as hf

import pprt_kernels.causal_conv1d as cc

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HF_UPDATE = inspect.unwrap(hf.causal_conv1d_update)
HF_FN = inspect.unwrap(hf.causal_conv1d_fn)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def make_case(lens, c=37, k=4, num_slots=6, bias=True, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lens)
    case = dict(
        x=torch.randn(t, c, generator=gen).to(dtype),
        weight=(torch.randn(c, k, generator=gen) * 0.5).to(dtype),
        bias=(torch.randn(c, generator=gen) * 0.1).to(dtype) if bias else None,
        state=torch.randn(num_slots, c, k - 1, generator=gen).to(dtype),
        idx=torch.randperm(num_slots, generator=gen)[: len(lens)].int(),
        qsl=torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32),
    )
    return {n: (x.to(DEVICE) if x is not None else None) for n, x in case.items()}


def run(fn, c, **kw):
    return fn(c["x"], c["weight"], c["bias"], c["state"], c["idx"], c["qsl"], **kw)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", ["silu", None], ids=["silu", "linear"])
def test_reference_matches_transformers_update(bias, activation):
    """From a nonzero state, with 1, 2 (shorter than K-1), 5 and 17 new rows."""
    lens = [1, 2, 5, 17]
    c = make_case(lens, bias=bias, seed=1)
    before = c["state"].clone()
    y = run(cc.causal_conv1d_ref, c, activation=activation)
    qsl, slots = c["qsl"].tolist(), c["idx"].tolist()
    for b, slot in enumerate(slots):
        hf_state = before[slot][None].clone()  # [1, C, K-1], updated in place by transformers
        want = HF_UPDATE(c["x"][qsl[b] : qsl[b + 1]].t()[None], hf_state, c["weight"], c["bias"], activation)
        assert rel_err(y[qsl[b] : qsl[b + 1]], want[0].t()) < 1e-6, f"sequence {b}"
        assert torch.equal(c["state"][slot], hf_state[0]), f"sequence {b}'s state in slot {slot}"
    others = [s for s in range(before.shape[0]) if s not in slots]
    assert torch.equal(c["state"][others], before[others]), "slots of no sequence changed"


def test_reference_matches_transformers_prefill_from_zero():
    lens = [9, 1, 30]
    c = make_case(lens, seed=2)
    c["state"].zero_()
    y = run(cc.causal_conv1d_ref, c)
    qsl = c["qsl"].tolist()
    for b in range(len(lens)):
        want = HF_FN(c["x"][qsl[b] : qsl[b + 1]].t()[None], c["weight"], c["bias"], activation="silu")
        assert rel_err(y[qsl[b] : qsl[b + 1]], want[0].t()) < 1e-6


# per step, rows of each of 3 sequences: chunks of 1, 2, 3 rows (shorter than K-1 = 3 included)
STEPS = [[1, 2, 3], [1, 1, 0], [2, 1, 7], [0, 1, 1], [5, 1, 2]]
LENS = [sum(s[b] for s in STEPS) for b in range(3)]


@pytest.mark.parametrize("fn", [cc.causal_conv1d_ref, cc.causal_conv1d], ids=["ref", "dispatch"])
def test_chunks_equal_one_call(fn):
    whole, parts = make_case(LENS, seed=3), make_case(LENS, seed=3)
    y_whole = run(fn, whole)
    qsl = parts["qsl"].tolist()
    done = [0, 0, 0]
    y_parts = torch.empty_like(parts["x"])
    for step in STEPS:
        seqs = [b for b in range(3) if step[b]]
        rows = torch.cat([torch.arange(qsl[b] + done[b], qsl[b] + done[b] + step[b]) for b in seqs]).to(DEVICE)
        step_qsl = torch.tensor([0, *torch.tensor([step[b] for b in seqs]).cumsum(0).tolist()], dtype=torch.int32)
        y_parts[rows] = fn(
            parts["x"][rows], parts["weight"], parts["bias"], parts["state"], parts["idx"][seqs], step_qsl.to(DEVICE)
        )
        for b in seqs:
            done[b] += step[b]
    assert rel_err(y_parts, y_whole) < 1e-6
    assert torch.equal(parts["state"], whole["state"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reference_low_precision(dtype):
    c = make_case([4, 3], dtype=dtype, seed=4)
    c32 = {n: (x.float() if x is not None else None) for n, x in c.items()}
    c32["idx"], c32["qsl"] = c["idx"], c["qsl"]
    y, y32 = run(cc.causal_conv1d_ref, c), run(cc.causal_conv1d_ref, c32)
    assert y.dtype == dtype and c["state"].dtype == dtype
    assert rel_err(y, y32) < 1e-2
    assert torch.equal(c["state"].float(), c32["state"])  # the state holds inputs: copied, not rounded


def test_checks_name_the_argument():
    c = make_case([2, 2], seed=5)

    def call(**over):
        a = dict(c) | over
        return cc.causal_conv1d_ref(a["x"], a["weight"], a["bias"], a["state"], a["idx"], a["qsl"], **a.get("kw", {}))

    with pytest.raises(ValueError, match="weight"):
        call(weight=c["weight"][:-1])
    with pytest.raises(ValueError, match="conv_state"):
        call(state=c["state"].float().half())
    with pytest.raises(ValueError, match="conv_state"):
        call(state=c["state"][:, :, :2])
    with pytest.raises(ValueError, match="bias"):
        call(bias=c["bias"][:3])
    with pytest.raises(ValueError, match="activation"):
        call(kw={"activation": "gelu"})
    with pytest.raises(ValueError, match="rise from 0 to T"):
        call(qsl=torch.tensor([0, 1, 3], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="one slot twice"):
        call(idx=torch.tensor([1, 1], dtype=torch.int32, device=DEVICE))


# ---------------------------------------------------------------- Triton (under TRITON_INTERPRET=1 on CPU)


@pytest.mark.parametrize(
    "lens,k,c,dtype,bias,activation,tol",
    [
        ([1, 1, 1], 4, 37, torch.float32, True, "silu", 1e-6),
        ([1, 2, 5, 17, 0], 4, 37, torch.float32, False, "silu", 1e-6),
        ([3, 1, 40], 4, 130, torch.float16, True, None, 2e-3),
        ([2, 6], 4, 20, torch.bfloat16, True, "silu", 1e-2),
        ([1, 3, 9], 2, 20, torch.float32, True, "silu", 1e-6),
        ([1, 3, 9], 6, 20, torch.float32, True, "silu", 1e-6),
    ],
    ids=["decode-K4", "mixed-K4-nobias", "fp16-linear-C130", "bf16", "K2", "K6"],
)
def test_triton_matches_reference(lens, k, c, dtype, bias, activation, tol):
    case, case_ref = (make_case(lens, c=c, k=k, bias=bias, dtype=dtype, seed=6) for _ in range(2))
    before = case["state"].clone()
    y = run(cc.causal_conv1d_triton, case, activation=activation)
    want = run(cc.causal_conv1d_ref, case_ref, activation=activation)
    assert y.dtype == dtype and rel_err(y, want) < tol
    assert torch.equal(case["state"], case_ref["state"])  # copies of inputs: exact
    others = [s for s in range(before.shape[0]) if s not in case["idx"].tolist()]
    assert torch.equal(case["state"][others], before[others])


def test_triton_strided_operands():
    """x a column slice of the packed projection, the pool one layer of a [slots, layers, C, K-1] buffer."""
    lens = [4, 1]
    case, case_ref = make_case(lens, seed=7), make_case(lens, seed=7)
    wide = torch.randn(5, 50, device=DEVICE)
    wide[:, 5:42] = case["x"]
    case["x"] = wide[:, 5:42]
    pool = torch.randn(6, 2, 37, 3, device=DEVICE)
    pool[:, 1] = case["state"]
    case["state"] = pool[:, 1]
    y = run(cc.causal_conv1d_triton, case)
    assert rel_err(y, run(cc.causal_conv1d_ref, case_ref)) < 1e-6
    assert torch.equal(pool[:, 1], case_ref["state"])


def test_triton_chunks_equal_one_call(monkeypatch):
    monkeypatch.setenv("PPRT_KERNELS", "triton")
    test_chunks_equal_one_call(cc.causal_conv1d)


def test_dispatch_follows_pprt_kernels(monkeypatch):
    case = make_case([2, 1], seed=8)
    calls = []
    fake = lambda *a, **kw: calls.append("triton") or cc.causal_conv1d_ref(*a, **kw)  # noqa: E731
    monkeypatch.setattr(cc, "causal_conv1d_triton", fake)
    monkeypatch.setenv("PPRT_KERNELS", "triton")
    run(cc.causal_conv1d, case)
    monkeypatch.setenv("PPRT_KERNELS", "ref")
    run(cc.causal_conv1d, case)
    assert calls == ["triton"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_on_gpu_qwen_width_and_no_sync():
    """Qwen3.5-27B's conv width (10240 channels), bf16, prompts beside decode rows; decode never syncs."""
    lens = [1, 300, 2, 1]
    case, case_ref = (make_case(lens, c=10240, num_slots=6, dtype=torch.bfloat16, seed=9) for _ in range(2))
    y = run(cc.causal_conv1d_triton, case)
    case_ref = {n: (x.cpu() if x is not None else None) for n, x in case_ref.items()}
    assert rel_err(y.cpu(), run(cc.causal_conv1d_ref, case_ref)) < 1e-2
    assert torch.equal(case["state"].cpu(), case_ref["state"])
    d = make_case([1] * 4, c=10240, dtype=torch.bfloat16, seed=10)
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(cc.causal_conv1d_triton, d)
    finally:
        torch.cuda.set_sync_debug_mode("default")
