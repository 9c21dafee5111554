"""What crosses the driver/stage boundary each step: small typed objects.

The driver's scheduler builds a `StepPlan` for one micro-batch; every stage
receives it (stage 0 needs the token ids, every stage the positions and
block tables); the last stage answers with a `StepResult`. A stage program
started by the driver answers pings with a `Heartbeat` and reports a failure
as a `StageError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..params import SamplingParams
from ..weights.lora import LoraAdapter


@dataclass(slots=True)
class SeqChunk:
    """The tokens of one sequence computed in this step."""

    seq_id: int
    token_ids: list[int]  # tokens whose KV this step computes
    start: int  # position of token_ids[0]
    # The block table travels as a change: every stage keeps each sequence's table, cuts it
    # to `blocks_from` entries and appends `new_blocks` (a long context's table is not
    # re-sent every step). The result covers positions [0, start + len(token_ids)). A sequence's
    # first chunk starts past 0 when its table begins with blocks from the driver's prefix cache:
    # every stage then reads those blocks' KV, computed earlier for another sequence.
    blocks_from: int
    new_blocks: list[int]
    sample: bool  # the last token's logits give the sequence its next token
    # hybrid models: the sequence's slot in every stage's state pool (-1: the model keeps no state).
    # A chunk with start == 0 finds its slot zeroed.
    state_slot: int = -1
    # hybrid models with prefix caching (prefix-cache snapshots: slots of the same pool, ids past
    # the running ones): restore_from: before the step, the state slot is set to this snapshot (the
    # state after `start` tokens); save_to: after the step, the state (after `end` tokens; never on
    # a chunk with drafts) is copied there. Every stage restores before and saves after running a
    # step, so a snapshot overwritten by a step is still read as it was by that step's restores.
    restore_from: int = -1
    save_to: int = -1
    lora_slot: int = -1  # the sequence's LoRA adapter slot on every stage (-1: none)
    # Speculative decoding: the last `num_drafts` tokens are drafts to verify (pprt.engine.drafts);
    # the last stage returns the accepted ones and one more token. The KV of every token is written;
    # the driver drops rejected positions by planning its next chunk over them.
    num_drafts: int = 0
    # Hybrid models under speculation: before the step a stage with DeltaNet layers copies the
    # sequence's state to `snapshot_slot` (when num_drafts > 0), after first copying the snapshot
    # back (restore_state: the previous step's drafts were rejected and this chunk starts where
    # that snapshot was taken).
    snapshot_slot: int = -1
    restore_state: bool = False
    # MTP drafting (pprt.distributed.mtp_drafts): next_token, on a chunk that does not sample, is the
    # token after its last one (the MTP head's input at that position); propose, on a sampling
    # chunk, is how many drafts the last stage's MTP head makes after the step (0: none). Drafted
    # positions past the chunk's end write the head's KV into blocks the table already holds.
    next_token: int = -1
    propose: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError(f"sequence {self.seq_id}: a chunk needs at least one token")
        if not 0 <= self.num_drafts < len(self.token_ids) or (self.num_drafts and not self.sample):
            raise ValueError(f"sequence {self.seq_id}: num_drafts must be in [0, {len(self.token_ids)}) "
                             f"on a sampling chunk, got {self.num_drafts}")
        if (self.num_drafts or self.restore_state) and self.state_slot >= 0 and self.snapshot_slot < 0:
            raise ValueError(f"sequence {self.seq_id}: drafts of a model with state need a snapshot slot")
        if self.blocks_from < 0:
            raise ValueError(f"sequence {self.seq_id}: blocks_from must be >= 0, got {self.blocks_from}")
        if (self.restore_from >= 0 or self.save_to >= 0) and self.state_slot < 0:
            raise ValueError(f"sequence {self.seq_id}: a state snapshot needs a state slot")
        if self.restore_from >= 0 and self.start == 0:
            raise ValueError(f"sequence {self.seq_id}: a chunk at position 0 starts from zero state, not a snapshot")
        if self.save_to >= 0 and self.num_drafts:
            raise ValueError(f"sequence {self.seq_id}: a chunk with drafts leaves no state to save")
        if self.propose < 0 or (self.propose and not self.sample) or (self.next_token >= 0 and self.sample):
            raise ValueError(f"sequence {self.seq_id}: propose ({self.propose}) is for a sampling chunk and "
                             f"next_token ({self.next_token}) for one that does not sample")

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(slots=True)
class NewSequence:
    """Registers a sequence with the sampler of the last stage (sent once)."""

    seq_id: int
    params: SamplingParams  # resolved
    prompt_ids: list[int]


@dataclass(frozen=True, slots=True)
class LoraChange:
    """Load `adapter` into LoRA slot `slot` of every stage (each reads its own layers' tensors), or
    empty the slot when `adapter` is None. Applied before the step's tokens run."""

    slot: int
    adapter: LoraAdapter | None


@dataclass(slots=True)
class StepPlan:
    step: int
    chunks: list[SeqChunk]
    added: list[NewSequence] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)  # finished or cancelled: drop tables and sampler state
    loras: list[LoraChange] = field(default_factory=list)  # adapter slots to fill or empty first

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass(slots=True)
class StepResult:
    """Sampled tokens of the chunks that asked for one, in plan order.

    With drafts (SeqChunk.num_drafts), sequence i receives accepted[i] (its accepted drafts, in
    order) and then token_ids[i]; `accepted` is None when no chunk of the step had drafts.
    With MTP drafting, drafts[i] are the tokens the MTP head proposes after token_ids[i] (at most
    the chunk's `propose`; [] for a chunk that asked for none); None when no chunk asked.
    """

    step: int
    seq_ids: list[int]
    token_ids: list[int]
    logprobs: list[dict[int, float] | None] | None = None
    compute_seconds: float = 0.0  # time the last stage spent computing this step
    accepted: list[list[int]] | None = None
    drafts: list[list[int]] | None = None


@dataclass(frozen=True, slots=True)
class PoolSizes:
    """What every stage allocates: KV blocks and state slots (ids are global, so the same number on
    every stage; a stage without full-attention or DeltaNet layers holds 0 bytes of that kind)."""

    blocks: int
    slots: int = 0  # 0: the model keeps no per-sequence state
    snapshots: int = 0  # more state slots, for the prefix cache's snapshots (ids slots .. slots + snapshots - 1)

    def __post_init__(self) -> None:
        if self.blocks <= 0 or self.slots < 0 or self.snapshots < 0 or (self.snapshots and not self.slots):
            raise ValueError(f"PoolSizes needs blocks > 0, slots >= 0 and snapshots >= 0 (only beside slots), got "
                             f"{self.blocks}, {self.slots}, {self.snapshots}")


@dataclass(slots=True)
class StageReady:
    """A stage process has loaded its weights."""

    stage: int
    num_blocks: int  # KV blocks its memory budget allows
    weight_bytes: int
    load_seconds: float
    load_rss_bytes: int  # host memory the load took at its peak
    quant_seconds: float = 0.0  # of load_seconds, spent quantizing (quant="int4" or "fp8")
    num_slots: int = 0  # state slots its memory budget allows (of those asked; 0: no state)
    num_snapshots: int = 0  # snapshot slots its memory allows beside them (of those asked)


@dataclass(slots=True)
class StageCounters:
    """A stage's counters, sent when the driver asks (the STATS control message)."""

    stage: int
    busy_seconds: float  # computing steps
    wait_seconds: float  # blocked receiving activations
    steps: int
    peak_rss_bytes: int  # the stage process's peak resident memory
    peak_device_bytes: int | None = None  # peak GPU memory allocated by the stage (None on CPU)


@dataclass(slots=True)
class StageError:
    """A stage process failed; `message` carries its exception and traceback."""

    stage: int
    message: str
    # The error came from sending to or receiving from a neighbouring stage: most likely
    # that stage failed first (the driver then names the stage that did).
    peer: bool = False


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A stage program is alive: sent once when it starts and in answer to every ping."""


def take_load_report(executor, readies: list[StageReady]) -> None:
    """Set what every executor tells about its loaded stages; each pool is the smallest stage's."""
    executor.pools = PoolSizes(min(r.num_blocks for r in readies), min(r.num_slots for r in readies),
                               min(r.num_snapshots for r in readies))
    executor.num_blocks, executor.num_slots = executor.pools.blocks, executor.pools.slots
    executor.num_snapshots = executor.pools.snapshots
    executor.weight_bytes = [r.weight_bytes for r in readies]
    executor.load_seconds = max(r.load_seconds for r in readies)
    executor.load_rss_bytes = [r.load_rss_bytes for r in readies]
    executor.quant_seconds = max(r.quant_seconds for r in readies)


def take_pool_bytes(executor, sizes: list[tuple[int, int]]) -> None:
    """Set each stage's (KV pool, state pool) bytes as allocated."""
    executor.kv_bytes = [kv for kv, _ in sizes]
    executor.state_bytes = [state for _, state in sizes]
