"""Stats: one typed snapshot of an LLM's counters, read by the CLI, the server's metrics and tests.

`LLM.stats()` builds it (`snapshot`, on the engine loop's thread) from the
scheduler (requests and tokens), the block and slot managers (KV blocks,
state slots) and the executor (per-stage time and memory). Fields that
a feature does not use yet stay zero. Counters are totals since the LLM was
built; gauges (running, waiting, blocks used) are the state at the call.
"""

from __future__ import annotations

from dataclasses import dataclass

from .scheduler import Scheduler


@dataclass(frozen=True, slots=True)
class StageStats:
    """One pipeline stage."""

    stage: int
    device: str
    layers: tuple[int, int]  # decoder layers [lo, hi)
    weight_bytes: int  # parameters and buffers as loaded (quantized sizes when quantized)
    kv_cache_bytes: int  # the KV pool as allocated (fp8 scales included)
    busy_seconds: float  # computing steps
    wait_seconds: float  # blocked receiving the previous stage's activations (0 on stage 0)
    steps: int  # micro-batches executed (-1 where the stage runs in the driver's process and does not count)
    peak_rss_bytes: int  # the stage process's peak resident host memory
    peak_device_bytes: int | None  # peak GPU memory allocated (None on CPU)
    state_cache_bytes: int = 0  # the state pool of its DeltaNet layers as allocated (hybrid models)


@dataclass(frozen=True, slots=True)
class Stats:
    """Counters and gauges of one LLM (see the module docstring)."""

    requests_running: int  # admitted, holding KV blocks
    requests_waiting: int  # queued, or preempted and waiting to be recomputed
    requests_finished: int  # total ended: stop, length or cancelled
    prompt_tokens: int  # total prompt tokens of the requests received
    computed_tokens: int  # total tokens run through the stages (prefill, decode and recomputation)
    generated_tokens: int  # total tokens sampled
    preemptions: int  # total
    kv_blocks_total: int
    kv_blocks_used: int
    kv_block_size: int  # tokens per block
    state_slots_total: int  # recurrent-state slots per stage (hybrid models; 0 otherwise)
    state_slots_used: int
    prefix_caching: bool  # full KV blocks are reused across requests (off: disabled, or a hybrid model without snapshots)
    prefix_lookup_tokens: int  # total tokens of the sequences admitted with caching on (preempted ones again)
    prefix_cached_tokens: int  # of those, total taken from the prefix cache instead of computed
    prefix_cache_blocks: int  # KV blocks holding a cached prefix block now (in use or evictable)
    prefix_cache_evictions: int  # total cached blocks dropped to make room
    state_snapshots_total: int  # hybrid models: state slots for prefix-cache snapshots on every stage
    state_snapshots_cached: int  # of those, holding a cached snapshot now
    load_seconds: float  # building the stages (the slowest one)
    quantize_seconds: float  # of load_seconds, quantizing at load (the slowest stage)
    stages: tuple[StageStats, ...]
    # speculative decoding (0 when off): drafts sent, drafts accepted, sequence-steps that verified drafts
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafts sent (0.0 when none was sent)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a sequence gained per step that verified drafts: accepted drafts + the one sampled
        after them (1.0 = no gain; 0.0 when no step verified drafts)."""
        return (self.accepted_tokens + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        """Share of admitted tokens taken from the prefix cache (0.0 before any lookup)."""
        return self.prefix_cached_tokens / self.prefix_lookup_tokens if self.prefix_lookup_tokens else 0.0


def snapshot(executor, scheduler: Scheduler) -> Stats:
    """The counters now (on the engine loop's thread: the executor answers between steps)."""
    blocks = scheduler.blocks
    stages = tuple(
        StageStats(i, spec.device, tuple(spec.layers), weight, kv, c.busy_seconds, c.wait_seconds, c.steps,
                   c.peak_rss_bytes, c.peak_device_bytes, state)
        for i, (spec, c, weight, kv, state) in enumerate(zip(executor.specs, executor.stats(), executor.weight_bytes,
                                                             executor.kv_bytes, executor.state_bytes)))
    slots = scheduler.slots
    snapshots = scheduler.prefix.snapshots if scheduler.prefix is not None else None
    return Stats(
        requests_running=len(scheduler.running), requests_waiting=len(scheduler.waiting),
        requests_finished=scheduler.num_finished, prompt_tokens=scheduler.num_prompt_tokens,
        computed_tokens=scheduler.num_computed_tokens, generated_tokens=scheduler.num_generated_tokens,
        preemptions=scheduler.num_preemptions, kv_blocks_total=blocks.num_blocks,
        kv_blocks_used=blocks.num_blocks - blocks.num_free, kv_block_size=blocks.block_size,
        state_slots_total=slots.num_slots if slots else 0,
        state_slots_used=slots.num_slots - slots.num_free if slots else 0,
        prefix_caching=scheduler.prefix is not None, prefix_lookup_tokens=scheduler.num_lookup_tokens,
        prefix_cached_tokens=scheduler.num_cached_tokens, prefix_cache_blocks=blocks.num_cached,
        prefix_cache_evictions=blocks.num_evictions,
        state_snapshots_total=snapshots.num_snapshots if snapshots else 0,
        state_snapshots_cached=snapshots.num_cached if snapshots else 0,
        load_seconds=executor.load_seconds, quantize_seconds=executor.quant_seconds, stages=stages,
        draft_tokens=scheduler.num_draft_tokens, accepted_tokens=scheduler.num_accepted_tokens,
        verify_steps=scheduler.num_verified)
