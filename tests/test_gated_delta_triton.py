"""Gated delta rule on Triton: the recurrent kernel and the fla plumbing against the reference.

Without CUDA the recurrent kernel runs under TRITON_INTERPRET=1 (set by conftest), so
shapes stay small: dk = 20 and dv = 12 are not powers of two (masked lanes; two dv
blocks of 8). fla's chunked kernels do not run under the interpreter (triton 3.9: its
loops call .to() on a Python int), so on CPU the code that feeds them (row selection,
state gather / scatter, the split between the two kernels) runs against a stand-in with
fla's contract built from transformers' torch function; fla itself is checked on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import pprt_kernels.gated_delta as gd
import pprt_kernels.gated_delta_triton as gt

from test_gated_delta import DEVICE, HF_CHUNK, make_case, rel_err, run, run_in_steps

SMALL = dict(hk=1, group=2, dk=20, dv=12, num_slots=5)  # interpreter-sized


@pytest.mark.parametrize(
    "lens,dtype,l2norm,tol",
    [
        ([1, 1, 1], torch.float32, True, 1e-5),
        ([1, 4, 0, 9], torch.float32, True, 1e-5),
        ([3, 1, 6], torch.float16, True, 2e-3),
        ([5, 2], torch.float32, False, 1e-5),
    ],
    ids=["decode-fp32", "mixed-fp32", "mixed-fp16", "raw-qk-fp32"],
)
def test_recurrent_kernel_matches_reference(lens, dtype, l2norm, tol):
    c, c_ref = make_case(lens, dtype=dtype, seed=11, **SMALL), make_case(lens, dtype=dtype, seed=11, **SMALL)
    if not l2norm:
        for case in (c, c_ref):
            case["q"], case["k"] = case["q"] * 0.2, case["k"] * 0.2
    before = c["state"].clone()
    o = run(gt.gated_delta_rule_triton, c, use_qk_l2norm=l2norm, max_query_len=max(lens))
    want = run(gd.gated_delta_rule_ref, c_ref, use_qk_l2norm=l2norm)
    assert o.dtype == dtype and o.shape == want.shape
    assert rel_err(o, want) < tol
    assert rel_err(c["state"], c_ref["state"]) < 1e-5
    others = [s for s in range(before.shape[0]) if s not in c["idx"].tolist()]
    assert torch.equal(c["state"][others], before[others]), "slots of no sequence changed"


def test_recurrent_kernel_strided_operands():
    """v a column slice of a wider projection, the state pool one layer of a [slots, layers, ...] buffer."""
    lens = [2, 3]
    c, c_ref = make_case(lens, seed=12, **SMALL), make_case(lens, seed=12, **SMALL)
    wide = torch.randn(c["v"].shape[0], 3, 2, 12, device=DEVICE)
    wide[:, 1] = c["v"]
    c["v"] = wide[:, 1]  # [T, Hv, dv], token stride 72
    pool = torch.randn(5, 3, 2, 20, 12, device=DEVICE)
    pool[:, 2] = c["state"]
    c["state"] = pool[:, 2]  # [slots, Hv, dk, dv], slot stride 3x the slot size
    assert not c["v"].is_contiguous() and not c["state"].is_contiguous()
    o = run(gt.gated_delta_rule_triton, c)
    assert rel_err(o, run(gd.gated_delta_rule_ref, c_ref)) < 1e-5
    assert rel_err(pool[:, 2], c_ref["state"]) < 1e-5


def test_triton_prefill_in_chunks_equals_one_call(monkeypatch):
    """The dispatching function with PPRT_KERNELS=triton, fed chunks of 1, 2 and 3 rows beside decode rows."""
    monkeypatch.setenv("PPRT_KERNELS", "triton")
    steps = [[3, 1, 2], [1, 1, 0], [2, 1, 3]]
    lens = [sum(s[b] for s in steps) for b in range(3)]
    whole, parts = make_case(lens, seed=13, **SMALL), make_case(lens, seed=13, **SMALL)
    o_whole = run(gd.gated_delta_rule_ref, whole)
    o_parts = run_in_steps(gd.gated_delta_rule, parts, lens, steps)
    assert rel_err(o_parts, o_whole) < 1e-5
    assert rel_err(parts["state"], whole["state"]) < 1e-5


def fake_fla_chunk(calls):
    """fla's chunk_gated_delta_rule contract (dense states, cu_seqlens) from transformers' torch function."""

    def chunk(q, k, v, g, beta, *, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
              cu_seqlens, cu_seqlens_cpu):
        assert q.shape[0] == 1 and initial_state.dtype == torch.float32 and output_final_state
        assert cu_seqlens.tolist() == cu_seqlens_cpu.tolist()
        assert scale == q.shape[-1] ** -0.5  # transformers' function fixes it
        calls.append(cu_seqlens_cpu.tolist())
        outs, finals = [], []
        cu = cu_seqlens_cpu.tolist()
        for i in range(len(cu) - 1):
            rows = slice(cu[i], cu[i + 1])
            o, s = HF_CHUNK(q[:, rows], k[:, rows], v[:, rows], g[:, rows], beta[:, rows],
                            initial_state=initial_state[i : i + 1], output_final_state=True,
                            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
            outs.append(o)
            finals.append(s)
        return torch.cat(outs, dim=1), torch.cat(finals)

    return chunk


@pytest.mark.parametrize(
    "lens,long_runs", [([1, 9, 3, 12, 0], [[0, 9, 21]]), ([9, 12, 2], [[0, 9, 21]]), ([10], [[0, 10]])],
    ids=["long-rows-apart", "long-rows-together", "one-prompt"],
)
def test_chunked_plumbing_with_stand_in(monkeypatch, lens, long_runs):
    """Sequences of CHUNKED_MIN_ROWS rows or more go to the chunked kernel with their states
    gathered and scattered back; the others take the recurrent kernel in place."""
    calls = []
    monkeypatch.setattr(gt, "CHUNKED_MIN_ROWS", 8)
    monkeypatch.setattr(gt, "_chunked_available", lambda device: True)
    monkeypatch.setattr(gt, "_fla_chunk", lambda: fake_fla_chunk(calls))
    c, c_ref = make_case(lens, seed=14, **SMALL), make_case(lens, seed=14, **SMALL)
    before = c["state"].clone()
    o = run(gt.gated_delta_rule_triton, c, max_query_len=max(lens))
    assert calls == long_runs
    assert rel_err(o, run(gd.gated_delta_rule_ref, c_ref)) < 1e-5
    assert rel_err(c["state"], c_ref["state"]) < 1e-5
    others = [s for s in range(before.shape[0]) if s not in c["idx"].tolist()]
    assert torch.equal(c["state"][others], before[others])


@pytest.mark.parametrize("lens", [[1, 1], [1, 5]], ids=["decode", "short-chunks"])
def test_short_steps_never_take_the_chunked_path(monkeypatch, lens):
    """max_query_len below CHUNKED_MIN_ROWS: the recurrent kernel alone, without reading the layout."""
    monkeypatch.setattr(gt, "_chunked_available", lambda device: pytest.fail("a short step asked for fla"))
    c, c_ref = make_case(lens, seed=15, **SMALL), make_case(lens, seed=15, **SMALL)
    o = run(gt.gated_delta_rule_triton, c, max_query_len=max(lens))
    assert rel_err(o, run(gd.gated_delta_rule_ref, c_ref)) < 1e-5


def test_dispatch_follows_pprt_kernels(monkeypatch):
    c = make_case([2, 1], seed=16, **SMALL)
    calls = []
    fake = lambda *a, **kw: calls.append("triton") or gd.gated_delta_rule_ref(*a, **kw)  # noqa: E731
    monkeypatch.setattr(gt, "gated_delta_rule_triton", fake)
    monkeypatch.setenv("PPRT_KERNELS", "triton")
    run(gd.gated_delta_rule, c)
    monkeypatch.setenv("PPRT_KERNELS", "ref")
    run(gd.gated_delta_rule, c)
    assert calls == ["triton"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's chunked kernels need a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 5e-3)], ids=["bf16", "fp32"])
def test_fla_path_on_gpu(dtype, tol):
    """Qwen3.5-shaped heads (dk = dv = 128), decode rows beside prompts that span several fla chunks."""
    pytest.importorskip("fla", reason="fla-core is not installed (pip install 'pprt[gpu]')")
    lens = [1, 200, 64, 7, 1000, 1]
    shape = dict(hk=2, group=4, dk=128, dv=128, num_slots=9)
    c, c_ref = make_case(lens, dtype=dtype, seed=17, **shape), make_case(lens, dtype=dtype, seed=17, **shape)
    o = run(gt.gated_delta_rule_triton, c, max_query_len=max(lens))
    torch.cuda.synchronize()
    c_ref = {n: (x.cpu() if isinstance(x, torch.Tensor) else x) for n, x in c_ref.items()}
    want = run(gd.gated_delta_rule_chunked, c_ref)
    assert rel_err(o.cpu(), want) < tol
    assert rel_err(c["state"].cpu(), c_ref["state"]) < tol
    # a decode step neither syncs with the host nor calls fla
    d = make_case([1] * 4, dtype=dtype, seed=18, **shape)
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(gt.gated_delta_rule_triton, d, max_query_len=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
