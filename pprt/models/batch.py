"""StepBatch: where one step's packed tokens sit, for every kind of layer.

Tokens of B sequences are packed along one axis (T rows; sequence b owns rows
query_start_loc[b] : query_start_loc[b + 1]). Full attention reads and writes
the paged KV cache through `slot_mapping` and `block_tables`
(pprt_kernels.paged_attention); Gated DeltaNet layers read and update each
sequence's recurrent state in place through `state_indices`, the sequence's
slot in the stage's state pool (pprt.models.kv.StateCache), whose contents the
worker has already zeroed for sequences whose chunk starts at position 0. The
host ints max_query_len / max_context_len go to the kernels, so a step needs no
device sync. Knows nothing of how the driver chose blocks or slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class StepBatch:
    """One micro-batch's layout (int tensors on the stage's device)."""

    positions: torch.Tensor  # [T] absolute position of each token
    slot_mapping: torch.Tensor  # [T] KV cache slot (block * block_size + offset) of each token
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_start_loc: torch.Tensor  # [B + 1] int32, sequence b owns rows [qsl[b], qsl[b+1])
    context_lens: torch.Tensor  # [B] int32, cached tokens of b including this step's
    max_query_len: int  # longest query of the step (1 = pure decode)
    max_context_len: int  # longest context_lens entry (host int: the kernels' grid needs no sync)
    state_indices: torch.Tensor | None = None  # [B] int32 state slot of each sequence (hybrid models)

    def __post_init__(self) -> None:
        T = self.positions.shape[0]
        if self.slot_mapping.shape != (T,):
            raise ValueError(f"slot_mapping has shape {tuple(self.slot_mapping.shape)}, expected ({T},)")
        B = self.block_tables.shape[0]
        if self.query_start_loc.shape[0] != B + 1:
            raise ValueError("query_start_loc must have one more entry than block_tables has rows")
        if self.state_indices is not None and self.state_indices.shape != (B,):
            raise ValueError(f"state_indices has shape {tuple(self.state_indices.shape)}, expected ({B},)")
        if not 1 <= self.max_query_len <= self.max_context_len:
            raise ValueError(f"need 1 <= max_query_len ({self.max_query_len}) <= max_context_len "
                             f"({self.max_context_len})")
