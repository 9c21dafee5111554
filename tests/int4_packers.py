"""Test-side writers of the official GPTQ and AWQ tensors, independent of pprt.quant.

`gptq_pack` / `awq_pack` turn integer weights, zeros and scales into the
tensors a checkpoint stores (AutoGPTQ / GPTQModel and AutoAWQ layouts, per
shared/QWEN.md section 4); `gptq_quantize` / `awq_quantize` first quantize a
float weight [N, K] the way those tools do (min/max per group, GPTQ's zero in
the range). Each returns the stored tensors and the float weight [N, K] that
the published formula gives for them, which is the oracle of the end-to-end
checks. Bit packing is written out with explicit loops over nibbles, on
purpose unlike pprt.quant.pack.
"""

from __future__ import annotations

import torch

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i <- column 8c + order[i]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> int32 with the same bits."""
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)


def pack_along_rows(q: torch.Tensor) -> torch.Tensor:
    """int [R, C] (0..15) -> int32 [R/8, C]; row 8r + j in bits 4j..4j+3."""
    q = q.long()
    words = torch.zeros(q.shape[0] // 8, q.shape[1], dtype=torch.long)
    for j in range(8):
        words |= q[j::8] << (4 * j)
    return _to_int32(words)


def pack_along_cols(q: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    """int [R, C] (0..15) -> int32 [R, C/8]; nibble i of word c <- column 8c + order[i]."""
    order = order or list(range(8))
    q = q.long()
    words = torch.zeros(q.shape[0], q.shape[1] // 8, dtype=torch.long)
    for i in range(8):
        words |= q[:, order[i]::8] << (4 * i)
    return _to_int32(words)


def gptq_dequantize_formula(q, zeros, scales, g_idx) -> torch.Tensor:
    """W [N, K] = scales[g_idx[k], n] * (q[k, n] - zeros[g_idx[k], n]), in fp32."""
    gi = g_idx.long()
    return (scales.float()[gi] * (q.float() - zeros.float()[gi])).t()


def gptq_pack(q, zeros, scales, g_idx, checkpoint_format: str = "gptq") -> dict:
    """Integers q [K, N], zeros [G, N], scales [G, N], g_idx [K] -> the stored GPTQ tensors."""
    stored_zeros = (zeros.long() - 1) & 0xF if checkpoint_format == "gptq" else zeros.long()  # v1 stores zero - 1
    return {
        "qweight": pack_along_rows(q),
        "qzeros": pack_along_cols(stored_zeros),
        "scales": scales.to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }


def _minmax_params(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of w [N, rows of one group], as GPTQ's Quantizer computes them."""
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = ((xmax - xmin) / 15).half().float()  # the file stores fp16
    zero = torch.full_like(scale, 8.0) if sym else torch.round(-xmin / scale).clamp(0, 15)
    return scale, zero


def gptq_quantize(weight: torch.Tensor, group_size: int, sym: bool, desc_act: bool = False,
                  checkpoint_format: str = "gptq", seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Float W [N, K] -> (stored GPTQ tensors, dequantized W [N, K]).

    desc_act: rows are visited in a random order (standing in for the Hessian order) and
    group i // g takes the i-th visited row, so g_idx[perm[i]] = i // g.
    """
    n, k = weight.shape
    w = weight.float()
    if desc_act:
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[perm] = torch.arange(k) // group_size
    else:
        g_idx = torch.arange(k) // group_size
    groups = k // group_size
    scales, zeros = torch.zeros(groups, n), torch.zeros(groups, n)
    for gi in range(groups):
        rows = (g_idx == gi).nonzero().flatten()
        scales[gi], zeros[gi] = _minmax_params(w[:, rows], sym)
    q = torch.clamp(torch.round(w.t() / scales[g_idx]) + zeros[g_idx], 0, 15).long()  # [K, N]
    stored = gptq_pack(q, zeros.long(), scales, g_idx, checkpoint_format)
    return stored, gptq_dequantize_formula(q, zeros, stored["scales"], g_idx)


def awq_dequantize_formula(q, zeros, scales, group_size: int) -> torch.Tensor:
    """W [N, K] = (q[k, n] - zeros[k // g, n]) * scales[k // g, n], in fp32."""
    z = zeros.float().repeat_interleave(group_size, 0)
    s = scales.float().repeat_interleave(group_size, 0)
    return ((q.float() - z) * s).t()


def awq_pack(q, zeros, scales) -> dict:
    """Integers q [K, N], zeros [K/g, N], scales [K/g, N] -> the stored AWQ gemm tensors."""
    return {
        "qweight": pack_along_cols(q, AWQ_PACK_ORDER),
        "qzeros": pack_along_cols(zeros, AWQ_PACK_ORDER),
        "scales": scales.to(torch.float16),
    }


def awq_quantize(weight: torch.Tensor, group_size: int) -> tuple[dict, torch.Tensor]:
    """Float W [N, K] -> (stored AWQ tensors, dequantized W [N, K]); AutoAWQ's min/max (no scaling search)."""
    n, k = weight.shape
    w = weight.float().t().reshape(k // group_size, group_size, n)  # [G, g, N]
    xmax, xmin = w.amax(1), w.amin(1)
    scales = ((xmax - xmin).clamp(min=1e-5) / 15).half().float()  # [G, N]
    zeros = torch.clamp(-torch.round(xmin / scales), 0, 15)
    q = torch.clamp(torch.round(w / scales[:, None]) + zeros[:, None], 0, 15).reshape(k, n).long()
    stored = awq_pack(q, zeros.long(), scales)
    return stored, awq_dequantize_formula(q, zeros, stored["scales"], group_size)
