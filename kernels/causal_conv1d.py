"""Depthwise causal conv1d over packed sequences, with a conv state per sequence in a slot pool.

The short convolution of the Gated DeltaNet layer (Qwen3-Next, Qwen3.5; kernel K = 4),
as transformers' `causal_conv1d_fn` / `causal_conv1d_update` compute it
(models/qwen3_next/modeling_qwen3_next.py), for a batch of sequences at once:
    x [T, C]: the rows of B sequences, packed (see pprt_kernels.varlen);
    weight [C, K] (depthwise: channel c convolves its own inputs), bias [C] or None;
    conv_state [num_slots, C, K-1] in x.dtype: slot state_indices[b] holds the K-1
        inputs of sequence b that precede its first row (zeros at position 0: the
        caller zeroes a slot when a sequence starts), and is overwritten IN PLACE with
        the last K-1 inputs seen, old state included when the chunk is shorter than K-1;
    y[t, c] = act(bias[c] + sum_j weight[c, j] * x_ext[t - (K-1) + j, c]), x_ext being
        the sequence's inputs preceded by its state; act is SiLU or none.
Accumulation is in fp32, rounded once to x.dtype.

`causal_conv1d_ref` is plain torch (the CPU path and the test oracle);
`causal_conv1d_triton` one Triton kernel for decode and prefill alike: a program per
(sequence, block of channels) walks the sequence's rows in tiles, reading the inputs that
precede its first row from the slot, and finally writes the slot's new K-1 inputs in place
(no host sync: the row tile size comes from T / B, known on the host);
`causal_conv1d` dispatches with `pprt_kernels.use_triton`.
This module knows nothing of which channels are q, k or v.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import use_triton
from .varlen import check_layout, check_layout_values

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the reference
    triton = None

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACTIVATIONS = ("silu", None)


def _check(x, weight, bias, conv_state, state_indices, query_start_loc, activation) -> tuple[int, int, int]:
    """Shapes, dtypes, devices (no device sync); returns (T, C, K). Raises ValueError."""
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"causal_conv1d: x must be fp16/bf16/fp32 [T, C], got {x.dtype} {tuple(x.shape)}")
    t, c = x.shape
    if weight.dim() != 2 or weight.shape[0] != c or weight.shape[1] < 2 or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"causal_conv1d: weight must be [C={c}, K >= 2], got {weight.dtype} {tuple(weight.shape)}")
    k = weight.shape[1]
    if bias is not None and (tuple(bias.shape) != (c,) or bias.dtype not in _FLOAT_DTYPES):
        raise ValueError(f"causal_conv1d: bias must be [C={c}], got {bias.dtype} {tuple(bias.shape)}")
    if conv_state.dim() != 3 or tuple(conv_state.shape[1:]) != (c, k - 1) or conv_state.dtype != x.dtype:
        raise ValueError(
            f"causal_conv1d: conv_state must be {x.dtype} [num_slots, C={c}, K-1={k - 1}], "
            f"got {conv_state.dtype} {tuple(conv_state.shape)}"
        )
    if activation not in _ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation {activation!r} is not 'silu' or None")
    for name, tensor in (("weight", weight), ("bias", bias), ("conv_state", conv_state)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"causal_conv1d: {name} is on {tensor.device}, x on {x.device}")
    check_layout("causal_conv1d", t, query_start_loc, state_indices, x.device)
    return t, c, k


def causal_conv1d_ref(
    x: torch.Tensor,  # [T, C]
    weight: torch.Tensor,  # [C, K]
    bias: torch.Tensor | None,  # [C]
    conv_state: torch.Tensor,  # [num_slots, C, K-1], x.dtype; updated in place
    state_indices: torch.Tensor,  # int32 [B]
    query_start_loc: torch.Tensor,  # int32 [B + 1]
    *,
    activation: str | None = "silu",
) -> torch.Tensor:  # [T, C] in x.dtype
    """Plain torch: each sequence's state rows, then its tokens, in one buffer; K shifted sums.

    Raises ValueError for bad shapes, dtypes, a layout that does not cover x, or a slot
    out of range or named twice.
    """
    t, c, k = _check(x, weight, bias, conv_state, state_indices, query_start_loc, activation)
    qsl, slots = check_layout_values("causal_conv1d", t, conv_state.shape[0], query_start_loc, state_indices)
    w = weight.float()
    y = torch.empty(t, c, dtype=x.dtype, device=x.device)
    for b, slot in enumerate(slots):
        s, e = qsl[b], qsl[b + 1]
        ext = torch.cat([conv_state[slot].float().t(), x[s:e].float()])  # [K-1 + L, C]
        out = sum(w[:, j] * ext[j : j + e - s] for j in range(k))  # [L, C]: row i sees ext[i .. i + K-1]
        if bias is not None:
            out = out + bias.float()
        y[s:e] = (F.silu(out) if activation == "silu" else out).to(x.dtype)
        conv_state[slot] = ext[e - s :].t().to(conv_state.dtype)  # the last K-1 inputs
    return y


# ---------------------------------------------------------------- Triton path

if triton is not None:

    @triton.jit
    def _conv_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, s_ptr, idx_ptr, qsl_ptr, C,
        stride_xt, stride_xc, stride_wc, stride_wk, stride_yt, stride_yc, stride_ss, stride_sc, stride_sk,
        K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
        HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    ):
        # grid (sequences, channel blocks); rows of the sequence in tiles of BT (BT >= K-1)
        b, pid_c = tl.program_id(0), tl.program_id(1)
        bos = tl.load(qsl_ptr + b).to(tl.int64)
        length = tl.load(qsl_ptr + b + 1).to(tl.int64) - bos
        slot = tl.load(idx_ptr + b).to(tl.int64)
        offs_c = pid_c * BC + tl.arange(0, BC)
        mask_c = offs_c < C
        s_base = s_ptr + slot * stride_ss + offs_c * stride_sc  # [BC] this slot's channels
        for t0 in range(0, length, BT):
            offs_t = t0 + tl.arange(0, BT)  # positions in the sequence
            mask_t = offs_t < length
            acc = tl.full((BT, BC), 0.0, dtype=tl.float32)
            for j in tl.static_range(K):
                p = offs_t - (K - 1) + j  # the input this tap reads: x row p, or slot column p + K-1
                in_x = (mask_t & (p >= 0))[:, None] & mask_c[None, :]
                in_s = (mask_t & (p < 0))[:, None] & mask_c[None, :]
                xv = tl.load(x_ptr + (bos + p)[:, None] * stride_xt + offs_c[None, :] * stride_xc, mask=in_x, other=0.0)
                sv = tl.load(s_base[None, :] + (p + K - 1)[:, None] * stride_sk, mask=in_s, other=0.0)
                w = tl.load(w_ptr + offs_c * stride_wc + j * stride_wk, mask=mask_c, other=0.0).to(tl.float32)
                acc += (xv.to(tl.float32) + sv.to(tl.float32)) * w[None, :]
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
            if SILU:
                acc = acc * tl.sigmoid(acc)
            y_ptrs = y_ptr + (bos + offs_t)[:, None] * stride_yt + offs_c[None, :] * stride_yc
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_c[None, :])
        # the new state: column i holds input length - (K-1) + i (from x, or the old state if before row 0)
        offs_i = tl.arange(0, KP)
        p = length - (K - 1) + offs_i
        in_x = mask_c[:, None] & ((offs_i < K - 1) & (p >= 0))[None, :]
        in_s = mask_c[:, None] & ((offs_i < K - 1) & (p < 0))[None, :]
        xv = tl.load(x_ptr + (bos + p)[None, :] * stride_xt + offs_c[:, None] * stride_xc, mask=in_x, other=0.0)
        sv = tl.load(s_base[:, None] + (p + K - 1)[None, :] * stride_sk, mask=in_s, other=0.0)
        tl.debug_barrier()  # every read of the old state is done before it is overwritten
        new_mask = mask_c[:, None] & (offs_i < K - 1)[None, :]
        tl.store(s_base[:, None] + offs_i[None, :] * stride_sk, (xv + sv).to(s_ptr.dtype.element_ty), mask=new_mask)


def causal_conv1d_triton(
    x: torch.Tensor,  # [T, C]
    weight: torch.Tensor,  # [C, K]
    bias: torch.Tensor | None,  # [C]
    conv_state: torch.Tensor,  # [num_slots, C, K-1], x.dtype; updated in place
    state_indices: torch.Tensor,  # int32 [B]
    query_start_loc: torch.Tensor,  # int32 [B + 1]
    *,
    activation: str | None = "silu",
) -> torch.Tensor:  # [T, C] in x.dtype
    """Launcher: checks, allocates y, one launch for decode and prefill; no host sync.

    Slots must be distinct (not checked: that would need a sync). Any strides. Raises
    ValueError as the reference does. Never cached: the result depends on the tensors' contents.
    """
    t, c, k = _check(x, weight, bias, conv_state, state_indices, query_start_loc, activation)
    if triton is None:
        raise RuntimeError("causal_conv1d: triton is not installed")
    b = state_indices.shape[0]
    y = torch.empty((t, c), dtype=x.dtype, device=x.device)
    if b == 0:
        return y
    kp = max(2, triton.next_power_of_2(k - 1))
    block_t = min(64, max(kp, triton.next_power_of_2(max(1, -(-t // b)))))  # ~ the mean rows per sequence
    block_c = 128 if block_t <= 16 else 64
    _conv_kernel[(b, triton.cdiv(c, block_c))](
        x, weight, bias if bias is not None else weight, y, conv_state, state_indices, query_start_loc, c,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        K=k, KP=kp, BT=block_t, BC=block_c, HAS_BIAS=bias is not None, SILU=activation == "silu",
        num_warps=4,
    )
    return y


# ---------------------------------------------------------------- dispatch


def causal_conv1d(
    x: torch.Tensor,  # [T, C]
    weight: torch.Tensor,  # [C, K]
    bias: torch.Tensor | None,  # [C]
    conv_state: torch.Tensor,  # [num_slots, C, K-1], x.dtype; updated in place
    state_indices: torch.Tensor,  # int32 [B]
    query_start_loc: torch.Tensor,  # int32 [B + 1]
    *,
    activation: str | None = "silu",
) -> torch.Tensor:  # [T, C] in x.dtype
    """The one entry point: Triton where `use_triton`, else the reference."""
    if use_triton(x.device):
        return causal_conv1d_triton(x, weight, bias, conv_state, state_indices, query_start_loc, activation=activation)
    return causal_conv1d_ref(x, weight, bias, conv_state, state_indices, query_start_loc, activation=activation)
