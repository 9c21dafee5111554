"""Batched LoRA kernel: Triton (under TRITON_INTERPRET=1 without a GPU) against its torch reference,
and the reference against the per-token definition (x A^T B^T of each token's own adapter).

Adapters of ranks 8, 16 and 64 share one zero-padded stack; tokens of three adapters and of
none are interleaved; K and N are not multiples of any block size. fp16 / fp32 only under
the interpreter (its bf16 arithmetic is not the GPU's).
"""

from __future__ import annotations

import pytest
import torch

from pprt_kernels.lora import lora_delta, lora_delta_ref, lora_delta_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_stack(ranks, k, n, dtype, gen):
    """a [L, R, K], b [L, N, R]: each slot's real rank filled, the rest zero (as pprt stacks adapters)."""
    R = max(ranks)
    a = torch.zeros(len(ranks), R, k)
    b = torch.zeros(len(ranks), n, R)
    for i, r in enumerate(ranks):
        a[i, :r] = torch.randn(r, k, generator=gen) / k**0.5
        b[i, :, :r] = torch.randn(n, r, generator=gen) / r**0.5
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype)


def per_token(x, a, b, indices):
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64)
    for t, slot in enumerate(indices.tolist()):
        if slot >= 0:
            out[t] = b[slot].double().cpu() @ (a[slot].double().cpu() @ x[t].double().cpu())
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("k,n,tokens", [(72, 100, 13), pytest.param(33, 17, 1, marks=pytest.mark.slow),
                                        pytest.param(130, 48, 29, marks=pytest.mark.slow)])
def test_triton_matches_reference_interleaved(dtype, tol, k, n, tokens):
    gen = torch.Generator().manual_seed(k * n + tokens)
    a, b = make_stack([8, 16, 64], k, n, dtype, gen)  # slots 0..2
    # tokens of adapters 0, 1, 2 and none (-1) interleaved
    pattern = [2] if tokens == 1 else [(t % 4) - 1 for t in range(tokens)]  # one token: the rank-64 adapter
    indices = torch.tensor(pattern, dtype=torch.int32)[torch.randperm(tokens, generator=gen)]
    x = torch.randn(tokens, k, generator=gen).to(DEVICE, dtype)
    indices = indices.to(DEVICE)
    ref = lora_delta_ref(x, a, b, indices)
    out = lora_delta_triton(x, a, b, indices)
    assert out.dtype == dtype and out.shape == (tokens, n)
    assert rel_err(ref, per_token(x, a, b, indices)) < tol
    assert rel_err(out, ref) < tol
    none = (indices == -1).cpu()
    assert (out.cpu()[none] == 0).all() and none.any() == (tokens > 1)  # tokens without an adapter get exactly nothing


def test_dispatch_and_checks(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    a, b = make_stack([16], 24, 40, torch.float32, gen)
    x = torch.randn(5, 24, generator=gen).to(DEVICE)
    idx = torch.tensor([0, -1, 0, 0, -1], device=DEVICE)
    monkeypatch.setenv("PPRT_KERNELS", "triton")
    via_triton = lora_delta(x, a, b, idx)
    monkeypatch.setenv("PPRT_KERNELS", "ref")
    torch.testing.assert_close(via_triton, lora_delta(x, a, b, idx), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shapes disagree"):
        lora_delta_ref(x[:, :20], a, b, idx)
    with pytest.raises(ValueError, match="dtype"):
        lora_delta_ref(x.half(), a, b, idx)
    with pytest.raises(ValueError, match="int32 or int64"):
        lora_delta_ref(x, a, b, idx.float())
