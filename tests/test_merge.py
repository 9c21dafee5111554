"""pprt.weights.merge: q/k/v and gate/up joined along N into one layer of the same format.

The joined layer's output must equal the parts' outputs side by side (float with
biases, Int4 with one group size and order, FP8 with whole scale blocks), `split`
must give the parts back, and parts that cannot join (different formats, Int4
orders, FP8 parts ending inside a scale block) must stay apart.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pprt.weights.fp8 import Fp8Linear, quantize_fp8
from pprt.weights.int4 import Int4Linear, quantize_rtn
from pprt.weights.merge import join, merge_if_complete, split

K = 64
SIZES = [48, 16, 16]  # q, k, v of a GQA layer


def float_parts(bias: bool, seed: int = 0) -> list[nn.Linear]:
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for n in SIZES:
        lin = nn.Linear(K, n, bias=bias)
        lin.weight.data = torch.randn(n, K, generator=gen) / K**0.5
        if bias:
            lin.bias.data = torch.randn(n, generator=gen)
        parts.append(lin)
    return parts


def int4_parts(perms: list[torch.Tensor | None]) -> list[Int4Linear]:
    out = []
    for lin, perm in zip(float_parts(False, seed=1), perms):
        w = quantize_rtn(lin.weight.data, group_size=32)
        w.perm = perm
        out.append(Int4Linear(w))
    return out


def fp8_parts(block) -> list[Fp8Linear]:
    return [Fp8Linear(quantize_fp8(lin.weight.data, block)) for lin in float_parts(False, seed=2)]


@pytest.mark.parametrize("kind", ["float", "float-bias", "int4", "int4-desc-act", "fp8-b16"])
def test_joined_output_is_the_parts_side_by_side(kind):
    if kind.startswith("float"):
        parts = float_parts(bias=kind.endswith("bias"))
    elif kind == "int4":
        parts = int4_parts([None] * 3)
    elif kind == "int4-desc-act":
        perm = torch.randperm(K, generator=torch.Generator().manual_seed(3))
        parts = int4_parts([perm] * 3)
    else:
        parts = fp8_parts((16, 32))
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(4))
    joined = join(parts)
    assert type(joined) is type(parts[0])
    expected = torch.cat([p(x) for p in parts], dim=-1)
    torch.testing.assert_close(joined(x), expected, rtol=1e-5, atol=1e-5)
    for part, back in zip(parts, split(joined, SIZES)):
        torch.testing.assert_close(back(x), part(x), rtol=0, atol=0)


def test_parts_that_cannot_join_stay_apart():
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(5))
    assert join(int4_parts([perm, None, perm])) is None  # one order for all parts, or none
    assert join(fp8_parts((32, 32))) is None  # k and v (16 rows) end inside a 32-row scale block
    mixed = [float_parts(False)[0], *int4_parts([None] * 3)[1:]]
    assert join(mixed) is None  # a per-module rule left q in float
    assert join([*float_parts(True)[:2], float_parts(False)[2]]) is None  # bias on some parts only


def test_merge_waits_for_every_part():
    from pprt.models.layers import MLP

    with torch.device("meta"):
        mlp = MLP(K, 32)
    gate, up = nn.Linear(K, 32, bias=False), nn.Linear(K, 32, bias=False)
    mlp.gate_proj = gate
    assert not merge_if_complete(mlp) and mlp.gate_up_proj is None  # up is still on the meta device
    mlp.up_proj = up
    mlp.down_proj = nn.Linear(32, K, bias=False)
    assert merge_if_complete(mlp)
    assert mlp.gate_proj is None and mlp.up_proj is None
    x = torch.randn(3, K)
    expected = mlp.down_proj(torch.nn.functional.silu(gate(x)) * up(x))
    torch.testing.assert_close(mlp(x), expected, rtol=1e-6, atol=1e-6)
