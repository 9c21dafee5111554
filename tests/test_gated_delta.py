"""Gated delta rule: reference vs transformers' torch functions, chunked prefill, slots, checks.

transformers' `torch_recurrent_gated_delta_rule` and `torch_chunk_gated_delta_rule`
(models/qwen3_next) are the outside oracle; they take one dense batch with key heads
not yet repeated, so each sequence is run alone with its slot's state as initial state.
Every slot of the pool starts random (nonzero), so a wrong slot read or write shows.
Lengths are odd and cross transformers' 64-token chunk.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_next import modeling_qwen3_next as hf

import pprt_kernels.gated_delta as gd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the plain torch functions, even where transformers routes the names to an installed fla
HF_RECURRENT = inspect.unwrap(hf.torch_recurrent_gated_delta_rule)
HF_CHUNK = inspect.unwrap(hf.torch_chunk_gated_delta_rule)


# every torch path; the chunked one with 16-row chunks, so 66 rows span 5 chunks
IMPLS = {
    "ref": gd.gated_delta_rule_ref,
    "chunked": functools.partial(gd.gated_delta_rule_chunked, chunk=16),
    "dispatch": gd.gated_delta_rule,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def make_case(lens, hk=2, group=3, dk=20, dv=12, num_slots=7, slots=None, dtype=torch.float32, seed=0):
    """Packed rows of len(lens) sequences as the layer builds them (key heads not yet repeated)."""
    gen = torch.Generator().manual_seed(seed)
    t, hv = sum(lens), hk * group
    q = torch.randn(t, hk, dk, generator=gen)
    k = torch.randn(t, hk, dk, generator=gen)
    v = torch.randn(t, hv, dv, generator=gen)
    a_log = torch.log(torch.rand(hv, generator=gen) * 8 + 0.5)
    dt_bias = torch.randn(hv, generator=gen)
    g = -a_log.exp() * F.softplus(torch.randn(t, hv, generator=gen) + dt_bias)  # [T, Hv] fp32, <= 0
    beta = torch.rand(t, hv, generator=gen)
    state = torch.randn(num_slots, hv, dk, dv, generator=gen) * 0.5
    slots = slots if slots is not None else torch.randperm(num_slots, generator=gen)[: len(lens)].tolist()
    qsl = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    case = dict(q=q, k=k, v=v, g=g, beta=beta, state=state, idx=torch.tensor(slots, dtype=torch.int32), qsl=qsl)
    return {
        name: (x.to(dtype) if name in ("q", "k", "v", "beta") else x).to(DEVICE) for name, x in case.items()
    } | {"group": group, "scale": dk**-0.5}


def run(fn, c, state=None, **kw):
    """Call a gated_delta_rule implementation on a case (repeating key heads); returns o."""
    q, k = (c[n].repeat_interleave(c["group"], dim=1) for n in ("q", "k"))
    return fn(
        q, k, c["v"], c["g"], c["beta"], c["state"] if state is None else state, c["idx"], c["qsl"],
        scale=c["scale"], **kw,
    )


@pytest.mark.parametrize("impl", ["ref", "chunked"])
@pytest.mark.parametrize("hf_fn", [HF_RECURRENT, HF_CHUNK], ids=["recurrent", "chunk"])
@pytest.mark.parametrize("l2norm", [True, False], ids=["l2norm", "raw-qk"])
def test_torch_paths_match_transformers(impl, hf_fn, l2norm):
    lens = [1, 7, 66, 13, 16]  # short ones go token by token on the chunked path too
    c = make_case(lens, seed=1)
    if not l2norm:  # keep the unnormalised recurrence bounded: |k|^2 * beta < 2
        c["q"], c["k"] = c["q"] * 0.2, c["k"] * 0.2
    before = c["state"].clone()
    o = run(IMPLS[impl], c, use_qk_l2norm=l2norm)
    assert o.shape == c["v"].shape and o.dtype == torch.float32
    qsl, slots = c["qsl"].tolist(), c["idx"].tolist()
    for b, slot in enumerate(slots):
        rows = slice(qsl[b], qsl[b + 1])
        want, final = hf_fn(
            c["q"][None, rows], c["k"][None, rows], c["v"][None, rows], c["g"][None, rows], c["beta"][None, rows],
            initial_state=before[slot][None], output_final_state=True, use_qk_l2norm_in_kernel=l2norm,
        )
        assert rel_err(o[rows], want[0]) < 1e-5, f"sequence {b}"
        assert rel_err(c["state"][slot], final[0]) < 1e-5, f"sequence {b}'s final state in slot {slot}"
    others = [s for s in range(before.shape[0]) if s not in slots]
    assert torch.equal(c["state"][others], before[others]), "slots of no sequence changed"


def split_rows(lens, steps):
    """Per step, the (sequence, rows) it carries: `steps` lists per-sequence chunk lengths per step."""
    done = [0] * len(lens)
    plan = []
    for step in steps:
        parts = []
        for b, n in enumerate(step):
            if n:
                parts.append((b, done[b], done[b] + n))
                done[b] += n
        plan.append(parts)
    assert done == list(lens), "the steps must cover every row once"
    return plan


# chunks of 1, 2 and 3 rows, decode rows beside prefill chunks, a sequence absent from a step
STEPS = [[3, 1, 2], [1, 1, 0], [2, 1, 5], [0, 1, 1], [4, 1, 9]]
LENS = [sum(s[b] for s in STEPS) for b in range(3)]


def run_in_steps(fn, c, lens, steps, **kw):
    """Feed a case to `fn` step by step (as chunked prefill would); returns o in the case's row order."""
    qsl = c["qsl"].tolist()
    o = torch.empty_like(c["v"])
    q, k = (c[n].repeat_interleave(c["group"], dim=1) for n in ("q", "k"))
    for parts in split_rows(lens, steps):
        rows = torch.cat([torch.arange(qsl[b] + s, qsl[b] + e) for b, s, e in parts]).to(DEVICE)
        step_qsl = torch.tensor([0, *torch.tensor([e - s for _, s, e in parts]).cumsum(0).tolist()], dtype=torch.int32)
        step_idx = c["idx"][[b for b, _, _ in parts]]
        o[rows] = fn(
            q[rows], k[rows], c["v"][rows], c["g"][rows], c["beta"][rows], c["state"], step_idx,
            step_qsl.to(DEVICE), scale=c["scale"], max_query_len=max(e - s for _, s, e in parts), **kw,
        )
    return o


@pytest.mark.parametrize("impl", list(IMPLS))
def test_prefill_in_chunks_equals_one_call(impl):
    fn = IMPLS[impl]
    whole = make_case(LENS, seed=2)
    parts = make_case(LENS, seed=2)
    o_whole = run(fn, whole, max_query_len=max(LENS))
    o_parts = run_in_steps(fn, parts, LENS, STEPS)
    assert rel_err(o_parts, o_whole) < 1e-5
    assert rel_err(parts["state"], whole["state"]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reference_low_precision_inputs(dtype):
    """Model-dtype q/k/v/beta with an fp32 state: o comes back in v.dtype, the math stays fp32."""
    c = make_case([5, 12], seed=3, dtype=dtype)
    c32 = {n: (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in c.items()}
    c32["state"] = c["state"].clone()
    o = run(gd.gated_delta_rule_ref, c)
    o32 = run(gd.gated_delta_rule_ref, c32)
    assert o.dtype == dtype and c["state"].dtype == torch.float32
    assert rel_err(o, o32) < 1e-2  # one rounding of o
    assert torch.equal(c["state"], c32["state"])  # the same fp32 math on the same (rounded) inputs


def test_empty_sequence_and_untouched_state():
    """A sequence with no rows this step keeps its state (its slot is read and written back unchanged)."""
    c = make_case([4, 0, 3], seed=4)
    before = c["state"].clone()
    run(gd.gated_delta_rule_ref, c)
    idle = int(c["idx"][1])
    assert torch.equal(c["state"][idle], before[idle])
    assert not torch.equal(c["state"][int(c["idx"][0])], before[int(c["idx"][0])])


@pytest.mark.parametrize("length", [8, 64, 65, 200])
def test_chunked_path_lengths(length):
    """Whole chunks, one row past a chunk, and the shortest length the chunked path takes."""
    c, c_ref = make_case([length, 3], seed=6), make_case([length, 3], seed=6)
    o = run(gd.gated_delta_rule_chunked, c)
    assert rel_err(o, run(gd.gated_delta_rule_ref, c_ref)) < 1e-5
    assert rel_err(c["state"], c_ref["state"]) < 1e-5


def test_checks_name_the_argument():
    c = make_case([3, 2], seed=5)
    q, k = (c[n].repeat_interleave(c["group"], dim=1) for n in ("q", "k"))
    args = [q, k, c["v"], c["g"], c["beta"], c["state"], c["idx"], c["qsl"]]

    def call(i=None, x=None, **kw):
        a = list(args)
        if i is not None:
            a[i] = x
        return gd.gated_delta_rule_ref(*a, scale=0.5, **kw)

    with pytest.raises(ValueError, match="q and k"):
        call(1, k[:, :, :-1])
    with pytest.raises(ValueError, match="g must be float32"):
        call(3, c["g"].half())
    with pytest.raises(ValueError, match="state must be"):
        call(5, c["state"][:, :, :, :-1])
    with pytest.raises(ValueError, match="query_start_loc"):
        call(7, c["qsl"][:-1])
    with pytest.raises(ValueError, match="rise from 0 to T"):
        call(7, torch.tensor([0, 3, 4], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="one slot twice"):
        call(6, torch.tensor([2, 2], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="out of range"):
        call(6, torch.tensor([0, 7], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="max_query_len"):
        call(max_query_len=torch.tensor(3))


def test_bench_tiny_runs(tmp_path):
    from bench import gated_delta as bench

    rows = bench.main(["--tiny", "--results-dir", str(tmp_path)])
    assert {(r["op"], r["kind"]) for r in rows} == {
        (op, kind) for op in ("gated_delta", "conv1d") for kind in ("decode", "prefill", "mixed")
    }
    for r in rows:  # the benchmark's own check of the dispatched path against the reference
        assert r["kernel_s"] > 0 and r["GBps"] > 0 and r["rel_err"] < 1e-5, r
    saved = (tmp_path / "gated_delta.jsonl").read_text().splitlines()
    assert len(saved) == len(rows)
    if DEVICE == "cpu":
        assert all(r["triton_s"] == "not measured" and r.get("goal_met") is None for r in rows)
