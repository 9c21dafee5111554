"""Packed variable-length batches that own per-sequence state slots: argument checks.

The recurrent kernels (causal_conv1d, gated_delta) share one batch layout:
    tokens of B sequences packed along axis 0 (T rows in all);
    query_start_loc [B + 1] int: sequence b owns rows query_start_loc[b] : query_start_loc[b + 1];
    state_indices [B] int: the slot of each sequence in a state pool [num_slots, ...],
        read as its initial state and overwritten in place with its final state.
`check_layout` checks shapes, dtypes and devices only (no device sync, so launchers
call it per step); `check_layout_values` also reads the values to the host (the
torch references call it: they run on the host anyway). This module knows nothing
of what the state holds.
"""

from __future__ import annotations

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)


def check_layout(
    name: str, num_tokens: int, query_start_loc: torch.Tensor, state_indices: torch.Tensor, device: torch.device
) -> int:
    """Check the batch layout tensors' shapes, dtypes and device; return B. Raises ValueError."""
    if state_indices.dim() != 1 or state_indices.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"{name}: state_indices must be int32 [B], got {state_indices.dtype} {tuple(state_indices.shape)}"
        )
    b = state_indices.shape[0]
    if tuple(query_start_loc.shape) != (b + 1,) or query_start_loc.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"{name}: query_start_loc must be int32 [B + 1 = {b + 1}], "
            f"got {query_start_loc.dtype} {tuple(query_start_loc.shape)}"
        )
    for t_name, t in (("query_start_loc", query_start_loc), ("state_indices", state_indices)):
        if t.device != device:
            raise ValueError(f"{name}: {t_name} is on {t.device}, the tokens on {device}")
    return b


def check_layout_values(
    name: str, num_tokens: int, num_slots: int, query_start_loc: torch.Tensor, state_indices: torch.Tensor
) -> tuple[list[int], list[int]]:
    """The layout's values on the host, checked: (query_start_loc, state_indices) as lists.

    Raises ValueError when the rows do not start at 0, decrease, or do not end at T,
    or when a slot is out of range or shared by two sequences (their states would race).
    """
    qsl = query_start_loc.tolist()
    slots = state_indices.tolist()
    if qsl[0] != 0 or qsl[-1] != num_tokens or any(a > b for a, b in zip(qsl, qsl[1:])):
        raise ValueError(f"{name}: query_start_loc {qsl} must rise from 0 to T = {num_tokens}")
    if any(not 0 <= s < num_slots for s in slots):
        raise ValueError(f"{name}: state_indices {slots} out of range for {num_slots} slots")
    if len(set(slots)) != len(slots):
        raise ValueError(f"{name}: state_indices {slots} name one slot twice")
    return qsl, slots
