"""LoRA on routed experts inside the fused MoE paths, against a per-(token, expert) loop with merged weights.

The oracle adds each token's adapter to the weights of each expert it chose
(W_e + B[l, e] A[l, e], PEFT's ParamWrapper) and runs that expert's MLP on the token alone;
tokens without an adapter (-1) use the base weights. The reference path, the Triton
kernels (interpreter on CPU, fp32) and torch's grouped GEMM path (fp32 runs on CPU) must
equal it, with tokens of three adapter slots and none interleaved, ranks that are not
powers of two, gate_up only, down only, and top-k 1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pprt_kernels.fused_moe as fm
from pprt_kernels.moe_lora import ExpertLora, pair_index

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py
FLOAT = fm.ExpertFormat.FLOAT


def loop_oracle(x, logits, gate_up, down, top_k, renormalize, slots, lora_gu, lora_dn):
    """One token and one expert at a time, in fp64, the adapter merged into the weights."""
    probs = torch.softmax(logits.double(), dim=-1)
    weights, chosen = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros(x.shape, dtype=torch.float64)
    i = down.shape[2]
    for t in range(x.shape[0]):
        for j in range(top_k):
            e, s = int(chosen[t, j]), int(slots[t])
            wgu, wdn = gate_up[e].double(), down[e].double()
            if s >= 0 and lora_gu is not None:
                wgu = wgu + lora_gu[1][s, e].double() @ lora_gu[0][s, e].double()
            if s >= 0 and lora_dn is not None:
                wdn = wdn + lora_dn[1][s, e].double() @ lora_dn[0][s, e].double()
            gu = x[t].double() @ wgu.t()
            h = F.silu(gu[:i]) * gu[i:]
            out[t] += weights[t, j] * (h @ wdn.t())
    return out


def make(t, h, i, e, slots_n, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen)
    logits = torch.randn(t, e, generator=gen)
    gate_up = torch.randn(e, 2 * i, h, generator=gen) / h**0.5
    down = torch.randn(e, h, i, generator=gen) / i**0.5
    lora_gu = (torch.randn(slots_n, e, rank, h, generator=gen) / h**0.5,
               torch.randn(slots_n, e, 2 * i, rank, generator=gen) / rank**0.5)
    lora_dn = (torch.randn(slots_n, e, rank + 2, i, generator=gen) / i**0.5,
               torch.randn(slots_n, e, h, rank + 2, generator=gen) / rank**0.5)
    slots = torch.tensor([(k % (slots_n + 1)) - 1 for k in range(t)], dtype=torch.int32)  # -1, 0, 1, 2, -1, ...
    return x, logits, gate_up, down, lora_gu, lora_dn, slots


# (T, H, I, E, top_k, renormalize, which adapted)
CASES = {
    "T7-H40-I24-E6-k3-both": (7, 40, 24, 6, 3, True, "both"),
    "T9-H48-I20-E5-k1-gate_up": (9, 48, 20, 5, 1, False, "gate_up"),
    "T5-H32-I40-E8-k2-down": (5, 32, 40, 8, 2, True, "down"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("impl", ["ref", "triton", "grouped_mm"])
def test_expert_lora_equals_the_merged_weight_loop(case, impl):
    t, h, i, e, k, renorm, which = CASES[case]
    x, logits, gate_up, down, lora_gu, lora_dn, slots = make(t, h, i, e, 3, 5, seed=len(case))
    lora_gu = lora_gu if which in ("both", "gate_up") else None
    lora_dn = lora_dn if which in ("both", "down") else None
    lora = ExpertLora(slots, lora_gu, lora_dn)
    fn = {"ref": fm.fused_moe_ref, "triton": fm.fused_moe_triton, "grouped_mm": fm.fused_moe_grouped_mm}[impl]
    got = fn(x, logits, fm.ExpertWeights(FLOAT, gate_up), fm.ExpertWeights(FLOAT, down), k, renorm, lora)
    want = loop_oracle(x, logits, gate_up, down, k, renorm, slots, lora_gu, lora_dn)
    plain = loop_oracle(x, logits, gate_up, down, k, renorm, torch.full_like(slots, -1), None, None)
    assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-4), (got.double() - want).abs().max()
    # tokens with an adapter changed, tokens without did not
    with_adapter = slots >= 0
    assert (want[with_adapter] - plain[with_adapter]).abs().amax(dim=1).min() > 1e-3
    assert torch.allclose(got[~with_adapter].double(), plain[~with_adapter], atol=2e-5, rtol=1e-4)


def test_pair_index_flattens_slot_and_expert():
    ids = torch.tensor([[3, 1], [0, 2], [4, 4]], dtype=torch.int32)
    lora = ExpertLora(torch.tensor([1, -1, 0], dtype=torch.int32),
                      (torch.zeros(2, 5, 3, 8), torch.zeros(2, 5, 6, 3)), None)
    assert pair_index(lora, ids).tolist() == [8, 6, -1, -1, 4, 4]


def test_bad_stacks_are_refused():
    with pytest.raises(ValueError, match="neither"):
        ExpertLora(torch.zeros(3, dtype=torch.int32), None, None)
    with pytest.raises(ValueError, match=r"a \[L, E, R, K\]"):
        ExpertLora(torch.zeros(3, dtype=torch.int32), (torch.zeros(2, 5, 3, 8), torch.zeros(2, 5, 6, 4)), None)


@pytest.mark.gpu
def test_gpu_dispatch_with_expert_lora_runs_without_sync():
    """On the GPU, the dispatched path (grouped_mm or Triton) with expert adapters: bf16, no host sync."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, logits, gate_up, down, lora_gu, lora_dn, slots = make(40, 128, 64, 16, 3, 16, seed=9)

    def bf(t):
        return t.cuda().bfloat16()

    lora = ExpertLora(slots.cuda(), tuple(map(bf, lora_gu)), tuple(map(bf, lora_dn)))
    x, logits = bf(x), logits.cuda()
    gu, dn = fm.ExpertWeights(FLOAT, bf(gate_up)), fm.ExpertWeights(FLOAT, bf(down))
    want = fm.fused_moe_ref(x, logits, gu, dn, 4, True, lora)
    fm.fused_moe(x, logits, gu, dn, 4, True, lora)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = fm.fused_moe(x, logits, gu, dn, 4, True, lora)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 2e-2
