"""pprt.weights.experts: loaded per-expert linears into the stacks the fused MoE kernels read.

Float experts stack into [E, N, K] (gate rows, then up); Int4 and FP8 experts
join gate and up along N with their scales (FP8 scale rows part by part), and
the fused kernel's reference on the stacks equals the per-expert Int4Linear /
Fp8Linear layers run one by one. Experts arrive in any order; each is dropped
once stacked; experts whose format or layout differs are refused by name.
Fused FP8 expert tensors (scales over the joined gate/up rows, a block possibly
spanning both) split into per-expert layers that dequantize to exactly the fused
rows, stack, and run in the fused kernels (Triton under the interpreter = reference).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pprt_kernels.fused_moe as fm
from fp8_packers import fp8_block_quantize_fused
from pprt.quantization import Kind, ModuleFormat
from pprt.weights import fp8, int4
from pprt.weights.experts import expert_linear, stack_expert, unstack

E, H, I = 3, 64, 32
PREFIX = "model.layers.1.mlp"


class Holder(nn.Module):
    """What stack_expert needs of the model's MoE module."""

    def __init__(self, num_experts: int = E):
        super().__init__()
        self.num_experts = num_experts
        self.experts = nn.ModuleList(nn.Module() for _ in range(num_experts))
        self.stacked = nn.Module()
        self.stacked.gate_up = self.stacked.down = None


def float_layers(seed: int = 0) -> dict[tuple[int, str], nn.Linear]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for e in range(E):
        for name, (n, k) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            lin = nn.Linear(k, n, bias=False)
            lin.weight.data = torch.randn(n, k, generator=gen) / k**0.5
            out[(e, name)] = lin
    return out


def stack_all(layers: dict, order_seed: int | None = 0) -> Holder:
    holder = Holder(1 + max(e for e, _ in layers))
    for e, name in layers:
        setattr(holder.experts[e], name, layers[(e, name)])
    keys = list(layers)
    if order_seed is not None:
        random.Random(order_seed).shuffle(keys)  # the loader's order is its business
    for e, name in keys:
        stack_expert(holder, e, name, layers[(e, name)], f"{PREFIX}.experts.{e}.{name}")
    return holder


def test_expert_linear_names():
    assert expert_linear(f"{PREFIX}.experts.12.up_proj") == (PREFIX, 12, "up_proj")
    assert expert_linear(f"{PREFIX}.shared_expert.up_proj") is None
    assert expert_linear(f"{PREFIX}.gate") is None


def test_float_experts_stack_gate_rows_then_up_and_are_dropped():
    layers = float_layers()
    holder = stack_all(layers)
    gu, down = holder.stacked.gate_up.expert_weights(), holder.stacked.down.expert_weights()
    for e in range(E):
        assert torch.equal(gu.weight[e, :I], layers[(e, "gate_proj")].weight)
        assert torch.equal(gu.weight[e, I:], layers[(e, "up_proj")].weight)
        assert torch.equal(down.weight[e], layers[(e, "down_proj")].weight)
    assert len(holder.experts) == 0  # every expert is in the stacks: the per-expert modules are gone
    assert all(torch.equal(w, layers[key].weight) for key, w in unstack(holder).items())
    assert sum(t.numel() for t in holder.state_dict().values()) == sum(m.weight.numel() for m in layers.values())


@pytest.mark.parametrize("fmt", ["int4", "fp8-b16x32", "fp8-b128"])
def test_quantized_stacks_equal_the_per_expert_layers(fmt):
    block = (16, 32) if fmt == "fp8-b16x32" else (128, 128)
    convert = (lambda lin: int4.quantize_linear(lin.weight.data, None, 32)) if fmt == "int4" else \
        (lambda lin: fp8.quantize_linear(lin.weight.data, None, block))
    layers = {key: convert(lin) for key, lin in float_layers(1).items()}
    holder = stack_all(layers, order_seed=1)
    x, logits = torch.randn(5, H), torch.randn(5, E)
    got = fm.fused_moe_ref(x, logits, holder.stacked.gate_up.expert_weights(), holder.stacked.down.expert_weights(),
                           2, True)
    w, ids = torch.softmax(logits, -1).topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    want = torch.zeros_like(x)
    for t in range(5):
        for j in range(2):
            e = int(ids[t, j])
            h = F.silu(layers[(e, "gate_proj")](x[t:t + 1])) * layers[(e, "up_proj")](x[t:t + 1])
            want[t] += w[t, j] * layers[(e, "down_proj")](h)[0]
    assert float((got - want).norm() / want.norm()) < 1e-5
    for (e, name), w in unstack(holder).items():  # and each expert's weight comes back as it went in
        placed = layers[(e, name)]
        back = int4.dequantize(w) if fmt == "int4" else fp8.dequantize(w)
        assert torch.equal(back, int4.dequantize(placed.weight) if fmt == "int4" else fp8.dequantize(placed.fp8_weight))


def test_mixed_or_mismatched_experts_are_named():
    layers = {key: int4.quantize_linear(lin.weight.data, None, 32) for key, lin in float_layers(2).items()}
    layers[(2, "up_proj")] = float_layers(2)[(2, "up_proj")]  # one float layer among Int4 ones
    with pytest.raises(ValueError, match=r"experts\.2\.up_proj: a float layer"):
        stack_all(layers, order_seed=None)
    layers[(2, "up_proj")] = int4.quantize_linear(float_layers(2)[(2, "up_proj")].weight.data, None, 64)
    with pytest.raises(ValueError, match=r"experts\.2\.up_proj.*int4', 64"):
        stack_all(layers, order_seed=None)
    perm = [torch.randperm(H), torch.randperm(H)]
    for p, name in zip(perm, ("gate_proj", "up_proj")):
        w = int4.quantize_rtn(float_layers(3)[(0, name)].weight.data, 32)
        w.perm = p
        layers[(0, name)] = int4.Int4Linear(w)
    with pytest.raises(ValueError, match="desc_act"):
        stack_all({k: v for k, v in layers.items() if k[0] == 0 and k[1] != "down_proj"}, order_seed=None)


@pytest.mark.parametrize("block,e,h,i,g", [((16, 32), 5, 64, 24, 8), ((128, 128), 4, 160, 96, 32),
                                           ((0, 0), 3, 40, 24, 24)], ids=["b16x32-I24", "b128-I96", "per-tensor"])
def test_fused_fp8_experts_split_exactly_and_run_fused(block, e, h, i, g):
    """A fused FP8 file's gate_up [E, 2I, H] with scales over the joined rows (I not a multiple of the
    block's rows, so a block spans gate's last rows and up's first): each part comes back in blocks of
    g = gcd(bn, I) rows, dequantizing to exactly the fused rows; stacked, the reference equals the loop on
    the dequantized fused weights and the Triton kernel (interpreted) equals the reference."""
    gen = torch.Generator().manual_seed(i)
    fmt = ModuleFormat(Kind.FP8, "fp8", block=block)
    layers, dense = {}, {}
    for name, (n, k) in (("gate_up", (2 * i, h)), ("down", (h, i))):
        stored, deq = fp8_block_quantize_fused(torch.randn(e, n, k, generator=gen) / k**0.5, fmt.fp8_block(n, k))
        parts = {"gate_up": (("gate_proj", 0), ("up_proj", i)), "down": (("down_proj", 0),)}[name]
        for x in range(e):
            for proj, row0 in parts:
                rows = slice(row0, row0 + (i if name == "gate_up" else h))
                lin = fp8.load_fp8_rows(stored["weight"][x, rows], stored["scale_inv"][x], row0, n, fmt, (proj, "s"))
                assert lin.block == ((g if name == "gate_up" else fmt.fp8_block(n, k)[0]), fmt.fp8_block(n, k)[1])
                assert torch.equal(fp8.dequantize(lin.fp8_weight), deq[x, rows])  # exactly the fused values
                layers[(x, proj)] = lin
        dense[name] = deq
    holder = stack_all(layers)
    gu, dn = holder.stacked.gate_up.expert_weights(), holder.stacked.down.expert_weights()
    x, logits = torch.randn(6, h, generator=gen), torch.randn(6, e, generator=gen)
    ref = fm.fused_moe_ref(x, logits, gu, dn, 2, True)
    w, ids = torch.softmax(logits, -1).topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    want = torch.zeros_like(x)
    for t in range(6):
        for j in range(2):
            ex = int(ids[t, j])
            gate_up = x[t] @ dense["gate_up"][ex].t()
            want[t] += w[t, j] * ((F.silu(gate_up[:i]) * gate_up[i:]) @ dense["down"][ex].t())
    assert float((ref - want).norm() / want.norm()) < 1e-5
    got = fm.fused_moe_triton(x, logits, gu, dn, 2, True)  # TRITON_INTERPRET=1 (conftest)
    assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_fused_fp8_rows_refuse_a_wrong_scale_naming_it():
    stored, _ = fp8_block_quantize_fused(torch.randn(2, 48, 64), (16, 32))
    fmt = ModuleFormat(Kind.FP8, "fp8", block=(16, 32))
    with pytest.raises(ValueError, match=r"gate_up_proj_scale_inv\[1\] has shape \[2, 2\], expected \[3, 2\]"):
        fp8.load_fp8_rows(stored["weight"][1, :24], stored["scale_inv"][1, :2], 0, 48, fmt,
                          ("gate_up_proj[1, 0:24]", "gate_up_proj_scale_inv[1]"))
    with pytest.raises(ValueError, match=r"gate_up_proj\[1, 40:64\] is torch.float8_e4m3fn rows \[40, 64\) of 48"):
        fp8.load_fp8_rows(stored["weight"][1, :24], stored["scale_inv"][1], 40, 48, fmt,
                          ("gate_up_proj[1, 40:64]", "gate_up_proj_scale_inv[1]"))
