"""Sequence: the scheduler's record of one request (its tokens, what was sent into the
pipeline, its blocks' and state slots' bookkeeping fields) and SeqStatus.

A plain record: the rules that move it (admission, chunks, preemption, speculation)
are the scheduler's; the prefix-cache fields are kept by `pprt.engine.prefix`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # not holding blocks (new, or preempted)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams  # resolved
    max_len: int  # prompt + generated tokens may not exceed this
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float] | None] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_scheduled: int = 0  # tokens sent into the pipeline (KV cached once their step completes)
    in_flight: int = 0  # chunks of this sequence in the pipeline
    finish_reason: str | None = None  # "stop" or "length"
    registered: bool = False  # the stages know it (sampler state, block table)
    blocks_sent: int = 0  # entries of its block table the stages have
    released: bool = False  # finished and its blocks and sampler state given back
    restore_state: bool = False  # hybrid + speculation: its next chunk rolls the state back to the snapshot
    cache_key: bytes = b""  # what besides its tokens decides its KV (a LoRA adapter's load; b"": nothing)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache hashes of its first full blocks
    blocks_registered: int = 0  # blocks of its table in the prefix cache (registered by it, or reused)
    tail_snapshot: int = -1  # hybrid models with prefix caching: its state snapshot slot past the prompt
    tail_blocks: int = 0  # full blocks whose state the tail slot holds (0: nothing valid yet)
    admitted: int = -1  # its place in admission order (set each time it starts running)
    queued: int | None = None  # `admitted` when it waits in the scheduler's heap of sequences to schedule
    drafts: list[int] = field(default_factory=list)  # MTP drafting: the head's drafts after its tokens
    drafts_at: int = -1  # num_tokens when `drafts` came (they follow those tokens only)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, lo: int, hi: int) -> list[int]:
        """tokens[lo:hi] without building the whole list (a decode step of a long context)."""
        n = len(self.prompt_ids)
        if lo >= n:
            return self.output_ids[lo - n:hi - n]
        return self.prompt_ids[lo:hi] + (self.output_ids[:hi - n] if hi > n else [])

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def schedulable(self) -> bool:
        return self.status is not SeqStatus.FINISHED and self.num_scheduled < self.num_tokens
