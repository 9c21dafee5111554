"""pprt.weights.experts: per-expert tensors into the stacked layout the fused MoE kernels read.

Float experts stack into [E, N, K] (gate rows, then up); Int4 and FP8 experts
(from a quantized file's reader or quantized at load) join gate and up along N
with their scales, and the fused kernel's reference on the stack equals the
per-expert Int4Linear / Fp8Linear layers. Experts whose layouts differ are
refused by name.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import pprt_kernels.fused_moe as fm
from pprt.weights.experts import Fp8StackedLinear, Int4StackedLinear, concat_out, load_projection
from pprt.weights.fp8 import Fp8Linear, quantize_fp8
from pprt.weights.int4 import Int4Linear, quantize_rtn

E, H, I = 3, 64, 32
PREFIX = "model.layers.1.mlp.experts"


def per_expert_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for e in range(E):
        for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            out[f"{PREFIX}.{e}.{name}.weight"] = torch.randn(*shape, generator=gen)
    return out


def target(n: int, k: int):
    """A stand-in for the model's meta StackedLinear."""
    return SimpleNamespace(num_experts=E, in_features=k, out_features=n, weight=None)


def reader(tensors, reads):
    def read(name, shape):
        reads.append(name)
        t = tensors[name]
        assert tuple(t.shape) == shape
        return t
    return read


def test_float_experts_stack_gate_rows_then_up():
    tensors, reads = per_expert_tensors(), []
    gu = load_projection(target(2 * I, H), PREFIX, ("gate_proj", "up_proj"), reader(tensors, reads), None, None,
                         torch.device("cpu"), torch.float32)
    down = load_projection(target(H, I), PREFIX, ("down_proj",), reader(tensors, reads), None, None,
                           torch.device("cpu"), torch.float32)
    assert sorted(reads) == sorted(tensors)  # every tensor read once
    for e in range(E):
        assert torch.equal(gu.weight[e, :I], tensors[f"{PREFIX}.{e}.gate_proj.weight"])
        assert torch.equal(gu.weight[e, I:], tensors[f"{PREFIX}.{e}.up_proj.weight"])
        assert torch.equal(down.weight[e], tensors[f"{PREFIX}.{e}.down_proj.weight"])


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_quantize_at_load_equals_per_expert_layers(fmt):
    tensors, reads = per_expert_tensors(1), []
    quantize = (lambda w: quantize_rtn(w, 32)) if fmt == "int4" else (lambda w: quantize_fp8(w, (16, 32)))
    gu = load_projection(target(2 * I, H), PREFIX, ("gate_proj", "up_proj"), reader(tensors, reads), None,
                         quantize, torch.device("cpu"), torch.float32)
    down = load_projection(target(H, I), PREFIX, ("down_proj",), reader(tensors, reads), None, quantize,
                           torch.device("cpu"), torch.float32)
    assert isinstance(gu, Int4StackedLinear if fmt == "int4" else Fp8StackedLinear)
    x = torch.randn(5, H)
    logits = torch.randn(5, E)
    got = fm.fused_moe_ref(x, logits, gu.expert_weights(), down.expert_weights(), 2, True)
    # the same experts as per-expert Int4Linear / Fp8Linear layers, run one by one
    layer = (lambda w: Int4Linear(quantize(w))) if fmt == "int4" else (lambda w: Fp8Linear(quantize(w)))
    layers = {n: layer(t) for n, t in tensors.items()}
    w, ids = torch.softmax(logits, -1).topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    want = torch.zeros_like(x)
    for t in range(5):
        for j in range(2):
            p = f"{PREFIX}.{int(ids[t, j])}"
            h = F.silu(layers[f"{p}.gate_proj.weight"](x[t:t + 1])) * layers[f"{p}.up_proj.weight"](x[t:t + 1])
            want[t] += w[t, j] * layers[f"{p}.down_proj.weight"](h)[0]
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_int4_reader_and_layout_mismatch_is_named():
    tensors = per_expert_tensors(2)
    quant = {n.removesuffix(".weight"): quantize_rtn(t, 32) for n, t in tensors.items()}
    gu = load_projection(target(2 * I, H), PREFIX, ("gate_proj", "up_proj"), None,
                         lambda name: quant[name], None, torch.device("cpu"), torch.float32)
    assert torch.equal(gu.qweight[1], torch.cat([quant[f"{PREFIX}.1.gate_proj"].qweight,
                                                 quant[f"{PREFIX}.1.up_proj"].qweight], 1))
    quant[f"{PREFIX}.2.up_proj"] = quantize_rtn(tensors[f"{PREFIX}.2.up_proj.weight"], 64)
    with pytest.raises(ValueError, match=rf"{PREFIX}\.2\.gate_proj\+up_proj"):
        load_projection(target(2 * I, H), PREFIX, ("gate_proj", "up_proj"), None,
                        lambda name: quant[name], None, torch.device("cpu"), torch.float32)
    a, b = quant[f"{PREFIX}.0.gate_proj"], quant[f"{PREFIX}.0.up_proj"]
    a.perm, b.perm = torch.randperm(H), torch.randperm(H)
    with pytest.raises(ValueError, match="desc_act"):
        concat_out([a, b], "here")
