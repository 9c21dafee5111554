"""Every Triton launcher is a pure function of its arguments' contents.

A launcher must not keep its arguments alive after it returns (a cache keyed by
tensors holds every call's inputs and outputs: GPU memory grows per token), and
must not return an earlier result for a tensor changed in place since (CUDA-graph
static buffers are changed in place between replays). Checked for every launcher
in LAUNCHERS (kernels added later join the table) under the interpreter on CPU, or
compiled on a GPU.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import pprt_kernels.causal_conv1d as cc
import pprt_kernels.gated_delta as gd
import pprt_kernels.gated_delta_triton as gt
import pprt_kernels.fp8_matmul as fm
import pprt_kernels.int4_matmul as im
import pprt_kernels.paged_attention as pa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _int4_args(gen: torch.Generator) -> tuple[list[torch.Tensor], dict]:
    k, n, g = 64, 40, 32
    x = torch.randn(3, k, generator=gen, dtype=torch.float32)
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), generator=gen, dtype=torch.int32)
    scales = torch.rand(k // g, n, generator=gen) * 0.02 + 0.005
    zeros = torch.randint(0, 16, (k // g, n), generator=gen).to(torch.uint8)
    return [t.to(DEVICE) for t in (x, qweight, scales, zeros)], {"group_size": g}


def _int4_matmul(args, kw):
    return im.int4_matmul_triton(*args, kw["group_size"])


def _int4_matmul_ref(args, kw):
    return im.int4_matmul_ref(*args, kw["group_size"])


def _int4_dequant(args, kw):
    return im.int4_dequantize_triton(*args[1:], kw["group_size"])


def _int4_dequant_ref(args, kw):
    return im.int4_dequantize_ref(*args[1:], kw["group_size"])


def _fp8_args(gen: torch.Generator) -> tuple[list[torch.Tensor], dict]:
    n, k, block = 40, 72, (32, 32)  # partial last blocks both ways
    x = torch.randn(3, k, generator=gen, dtype=torch.float32)
    codes = torch.randint(0, 126, (n, k), generator=gen).to(torch.uint8)  # finite e4m3, positive
    weight = codes.view(torch.float8_e4m3fn)
    scale = torch.rand(-(-n // 32), -(-k // 32), generator=gen) * 0.02 + 0.005
    return [t.to(DEVICE) for t in (x, weight, scale)], {"block": block}


def _fp8_matmul(args, kw):
    return fm.fp8_matmul_triton(*args, kw["block"])


def _fp8_matmul_ref(args, kw):
    return fm.fp8_matmul_ref(*args, kw["block"])


def _fp8_dequant(args, kw):
    return fm.fp8_dequantize_triton(*args[1:], kw["block"], torch.float32)


def _fp8_dequant_ref(args, kw):
    return fm.fp8_dequantize_ref(*args[1:], kw["block"], torch.float32)


def _attention_args(gen: torch.Generator) -> tuple[list[torch.Tensor], dict]:
    blocks, bs, m, h, n = 6, 4, 2, 16, 4
    q = torch.randn(2, n, h, generator=gen)
    k_cache = torch.randn(blocks, bs, m, h, generator=gen)
    v_cache = torch.randn(blocks, bs, m, h, generator=gen)
    tables = torch.tensor([[0, 2, 4], [1, 3, 5]], dtype=torch.int32)
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)
    ctx = torch.tensor([9, 11], dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, k_cache, v_cache, tables, qsl, ctx)], {"scale": h**-0.5}


def _attention(args, kw):
    return pa.paged_attention_triton(*args, kw["scale"], max_query_len=1, max_context_len=11)


def _attention_ref(args, kw):
    return pa.paged_attention_ref(*args, kw["scale"], max_query_len=1, max_context_len=11)


def _delta_args(gen: torch.Generator, lens=(1, 1)) -> tuple[list[torch.Tensor], dict]:
    t, h, dk, dv = sum(lens), 2, 8, 8
    q, k = torch.randn(t, h, dk, generator=gen), torch.randn(t, h, dk, generator=gen)
    v = torch.randn(t, h, dv, generator=gen)
    g, beta = -torch.rand(t, h, generator=gen), torch.rand(t, h, generator=gen)
    state = torch.randn(4, h, dk, dv, generator=gen)
    idx = torch.tensor([2, 0], dtype=torch.int32)
    qsl = torch.tensor([0, lens[0], t], dtype=torch.int32)
    return [x.to(DEVICE) for x in (q, k, v, g, beta, state, idx, qsl)], {"scale": dk**-0.5, "max_query_len": max(lens)}


def _delta_prefill_args(gen: torch.Generator) -> tuple[list[torch.Tensor], dict]:
    return _delta_args(gen, lens=(3, 2))


def _with_state_copy(fn, state_arg):
    """Run a launcher on a copy of its state pool (the caller's stays as built) and return
    its output and the final states, so a stale state shows as a wrong result."""

    def call(args, kw):
        args = list(args)
        args[state_arg] = args[state_arg].clone()
        out = fn(*args, **kw)
        return torch.cat([out.flatten(), args[state_arg].flatten().to(out.dtype)])

    return call


def _conv_args(gen: torch.Generator) -> tuple[list[torch.Tensor], dict]:
    x = torch.randn(4, 12, generator=gen)
    weight, bias = torch.randn(12, 4, generator=gen), torch.randn(12, generator=gen)
    state = torch.randn(3, 12, 3, generator=gen)
    idx, qsl = torch.tensor([1, 2], dtype=torch.int32), torch.tensor([0, 1, 4], dtype=torch.int32)
    return [t.to(DEVICE) for t in (x, weight, bias, state, idx, qsl)], {}


# name -> (build arguments, launcher, reference, index of the argument changed in place)
LAUNCHERS = {
    "int4_matmul": (_int4_args, _int4_matmul, _int4_matmul_ref, 0),
    "int4_dequantize": (_int4_args, _int4_dequant, _int4_dequant_ref, 1),
    "fp8_matmul": (_fp8_args, _fp8_matmul, _fp8_matmul_ref, 0),
    "fp8_dequantize": (_fp8_args, _fp8_dequant, _fp8_dequant_ref, 1),
    "paged_attention_decode": (_attention_args, _attention, _attention_ref, 0),
    "gated_delta_decode": (
        _delta_args, _with_state_copy(gt.gated_delta_rule_triton, 5), _with_state_copy(gd.gated_delta_rule_ref, 5), 5,
    ),
    "gated_delta_prefill": (
        _delta_prefill_args, _with_state_copy(gt.gated_delta_rule_triton, 5),
        _with_state_copy(gd.gated_delta_rule_ref, 5), 0,
    ),
    "causal_conv1d": (
        _conv_args, _with_state_copy(cc.causal_conv1d_triton, 3), _with_state_copy(cc.causal_conv1d_ref, 3), 3,
    ),
}


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_launcher_keeps_no_argument_alive(name):
    build, launch, _, _ = LAUNCHERS[name]
    args, kw = build(torch.Generator().manual_seed(0))
    refs = [weakref.ref(t) for t in args]
    out = launch(args, kw)
    out_ref = weakref.ref(out)
    del args, out
    gc.collect()
    alive = [i for i, r in enumerate(refs) if r() is not None]
    assert not alive, f"{name}: arguments {alive} are still alive after the call"
    assert out_ref() is None, f"{name}: its output is still alive after the caller dropped it"


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_launcher_sees_in_place_changes(name):
    build, launch, reference, changed_arg = LAUNCHERS[name]
    args, kw = build(torch.Generator().manual_seed(1))
    first = launch(args, kw).clone()
    changed, _ = build(torch.Generator().manual_seed(2))
    args[changed_arg].copy_(changed[changed_arg])  # the same tensor object, new contents
    again = launch(args, kw)
    want = reference(args, kw)
    assert not torch.allclose(first, want), "the in-place change must change the result"
    assert torch.allclose(again.float(), want.float(), rtol=1e-3, atol=1e-3), f"{name}: stale result"
