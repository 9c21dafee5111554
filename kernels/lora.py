"""Batched LoRA: each token of a packed batch gets the low-rank update of its own adapter.

For a linear layer with base output y = x W^T, LoRA adapter l adds
    delta[t] = (x[t] @ A[l]^T) @ B[l]^T           (Hu et al. 2021, "LoRA"; PEFT's lora.Linear)
with the adapter's scale (lora_alpha / r, or / sqrt(r) with rsLoRA) already folded into B.
Tokens of several adapters and of none are interleaved in one batch:
    x [T, K]        activations (fp16 / bf16 / fp32)
    a [L, R, K]     the L adapter slots' A ("lora_A"), zero-padded to the largest rank R
    b [L, N, R]     their B ("lora_B") times the scale, zero-padded likewise
    indices [T]     int32/int64 slot of each token's adapter; -1: no adapter (delta 0)
    -> delta [T, N] in x.dtype (accumulated in fp32)
Zero padding makes a rank-8 adapter in a rank-64 stack exact: the padded rows of A
give zeros that meet the padded (zero) columns of B.

The Triton kernel gathers each token's adapter and runs two passes: shrink
(s[t] = A[l] x[t], one program per token, [T, R] fp32) then expand
(delta[t, n-block] = B[l][n-block] s[t], one program per token and N-block).
It computes matrix-vector products with tl.sum rather than tl.dot (no 16-row
minimum, and the interpreter's bf16 tl.dot is wrong); grouping the tokens of one
adapter into tiles (SGMV, as Punica and vLLM do) is not done. `lora_delta_ref`
is the plain torch version of the same signature: the CPU path and the oracle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import use_triton


def _check(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor) -> tuple[int, int, int, int]:
    if x.dim() != 2 or a.dim() != 3 or b.dim() != 3 or indices.dim() != 1:
        raise ValueError(f"lora_delta wants x [T, K], a [L, R, K], b [L, N, R], indices [T]; got "
                         f"{tuple(x.shape)}, {tuple(a.shape)}, {tuple(b.shape)}, {tuple(indices.shape)}")
    T, K = x.shape
    L, R, Ka = a.shape
    Lb, N, Rb = b.shape
    if Ka != K or Lb != L or Rb != R or indices.shape[0] != T:
        raise ValueError(f"lora_delta shapes disagree: x {tuple(x.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}, "
                         f"indices {tuple(indices.shape)}")
    if a.dtype != x.dtype or b.dtype != x.dtype:
        raise ValueError(f"lora_delta wants a and b in x's dtype {x.dtype}, got {a.dtype} and {b.dtype}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lora_delta indices must be int32 or int64, got {indices.dtype}")
    return T, K, N, R


def lora_delta_ref(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """delta [T, N] in x.dtype (see the module docstring); plain torch, one matmul pair per adapter present."""
    T, _, N, _ = _check(x, a, b, indices)
    out = torch.zeros(T, N, dtype=torch.float32, device=x.device)
    for slot in indices.unique().tolist():
        if slot < 0:
            continue
        rows = (indices == slot).nonzero(as_tuple=True)[0]
        out[rows] = (x[rows].float() @ a[slot].float().t()) @ b[slot].float().t()  # [t, R] then [t, N]
    return out.to(x.dtype)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, idx_ptr, s_ptr, K, R, stride_x, stride_al, stride_ar, stride_s,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(idx_ptr + t).to(tl.int64)
    if slot >= 0:
        r = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + t * stride_x + k, mask=k < K, other=0.0).to(tl.float32)  # [BK]
            ak = tl.load(a_ptr + slot * stride_al + r[:, None] * stride_ar + k[None, :],
                         mask=(r[:, None] < R) & (k[None, :] < K), other=0.0).to(tl.float32)  # [BR, BK]
            acc += tl.sum(ak * xk[None, :], axis=1)
        tl.store(s_ptr + t * stride_s + r, acc, mask=r < R)


@triton.jit
def _expand_kernel(s_ptr, b_ptr, idx_ptr, out_ptr, N, R, stride_s, stride_bl, stride_bn, stride_o,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(idx_ptr + t).to(tl.int64)
    if slot >= 0:
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        sv = tl.load(s_ptr + t * stride_s + r, mask=r < R, other=0.0)  # [BR] fp32
        bk = tl.load(b_ptr + slot * stride_bl + n[:, None] * stride_bn + r[None, :],
                     mask=(n[:, None] < N) & (r[None, :] < R), other=0.0).to(tl.float32)  # [BN, BR]
        acc = tl.sum(bk * sv[None, :], axis=1)
        tl.store(out_ptr + t * stride_o + n, acc.to(out_ptr.dtype.element_ty), mask=n < N)


def lora_delta_triton(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The Triton kernel (see the module docstring); same signature and result as lora_delta_ref."""
    T, K, N, R = _check(x, a, b, indices)
    x, a, b, indices = x.contiguous(), a.contiguous(), b.contiguous(), indices.contiguous()
    out = torch.zeros(T, N, dtype=x.dtype, device=x.device)
    if T == 0 or N == 0 or R == 0:
        return out
    shrunk = torch.empty(T, R, dtype=torch.float32, device=x.device)
    block_r = triton.next_power_of_2(R)
    block_k = max(16, min(128, 4096 // block_r, triton.next_power_of_2(K)))
    block_n = max(16, min(64, 4096 // block_r, triton.next_power_of_2(N)))
    _shrink_kernel[(T,)](x, a, indices, shrunk, K, R, x.stride(0), a.stride(0), a.stride(1), shrunk.stride(0),
                         BLOCK_R=block_r, BLOCK_K=block_k)
    _expand_kernel[(T, triton.cdiv(N, block_n))](shrunk, b, indices, out, N, R, shrunk.stride(0), b.stride(0),
                                                 b.stride(1), out.stride(0), BLOCK_R=block_r, BLOCK_N=block_n)
    return out


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The one entry point: Triton where `use_triton`, else the reference."""
    if use_triton(x.device):
        return lora_delta_triton(x, a, b, indices)
    return lora_delta_ref(x, a, b, indices)
