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
`causal_conv1d` dispatches with `pprt_kernels.use_triton`.
This module knows nothing of which channels are q, k or v.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .varlen import check_layout, check_layout_values

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
    """The one entry point: the reference on every device until the Triton kernel lands."""
    return causal_conv1d_ref(x, weight, bias, conv_state, state_indices, query_start_loc, activation=activation)
