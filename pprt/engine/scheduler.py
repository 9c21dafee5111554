"""Admission, chunked prefill, micro-batches in flight, preemption (the Sequence record is sequence.py).

Every sequence has tokens (prompt + generated) and a count of tokens already
sent into the pipeline (`num_scheduled`). Its pending tokens
`tokens[num_scheduled:]` go out in chunks; the chunk that reaches the end of
the known tokens asks for a sample, and the sequence then waits for that
token. Prefill and decode are therefore the same thing: a decode step is a
chunk of one token.

Several micro-batches may be in flight (one per pipeline stage). A sequence
waiting for a sample is not schedulable, so micro-batches are disjoint groups
of sequences; the next prefill chunk of a long prompt may enter the pipeline
while its previous chunk is still in it (each stage runs micro-batches in
order, so the cached prefix is always there when needed).

When blocks run out, the most recently admitted running sequence that is not
in flight is preempted: its blocks are freed and it is recomputed later from
its tokens. A request that could never fit the pool is refused at `add`.

With a `PrefixCache`, a sequence that holds no blocks (new, or preempted)
starts its table with the cached blocks `PrefixCache.reusable` chooses and
its first chunk at the first token they do not hold (the chunk carries the
whole table, so every stage reads the same cached blocks); every block a
scheduled chunk fills is registered. A plan undone by `abort` unregisters
the blocks it filled, and a sequence that took cached blocks in it gives
them back and looks again. Hybrid models take a state snapshot with the
blocks (restored into the sequence's slot before its first chunk runs) and
save snapshots where `PrefixCache` says, committed when the step completes.

Hybrid models (a `SlotManager` is given): a sequence also holds one state slot
from admission until it finishes or is preempted; admission waits for a free
slot. Its recurrent state cannot be rewound, so a chunk undone by `abort`
after it may have run sends the sequence back to position 0 (recomputed, the
state zeroed), and preemption recomputes from position 0 as for blocks.
Speculative decoding (`speculative` given): a chunk that ends a sequence's
known tokens also carries up to k drafts (drafts.py); the sequence gets back
its accepted drafts and one more token. Its KV is valid up to the last
accepted position: the next chunk starts there and overwrites the rejected
positions, and blocks past them return to the pool. DeltaNet state cannot be
cut back, so a hybrid sequence holds a second slot, a snapshot of its state
taken by every stage before a chunk with drafts; when a draft was rejected the
next chunk restores that snapshot and recomputes from the chunk's start (the
accepted tokens again, at most k + 1 more tokens; chosen over keeping every
position's state because it needs no change to the DeltaNet kernels, which
update their state in place, and costs memory of one slot, not k + 1).
A hybrid sequence speculates only while a spare slot is free for it (free
slots beyond the waiting requests' needs), and only on chunks of at most
k + 1 known tokens (decode steps and recomputations), so that a rejection
never recomputes a long prefill chunk.
MTP drafting (`speculative.method == "mtp"`): the drafts are the last stage's
(pprt.distributed.mtp_drafts): a sampling chunk asks for k of them
(`SeqChunk.propose`) and its table holds k - 1 positions more for the head's
draft steps (fewer when blocks are short); they come back with the step's
tokens, kept on the Sequence and sent with its next chunk if it still ends
there. A chunk that does not sample carries the token after it
(`SeqChunk.next_token`), the head's input at its last position.

Planning a micro-batch costs O(its sequences), not O(running sequences):
running sequences that have tokens to send wait in a heap ordered by
admission (a sequence joins it when admitted, when its sampled tokens arrive
and when an aborted plan gives its tokens back), so `schedule` never walks the
sequences that are in flight.
Knows nothing of devices or tensors.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque

from ..distributed.step import NewSequence, SeqChunk, StepPlan, StepResult
from ..errors import RequestTooLarge
from ..params import SamplingParams
from .blocks import BlockManager, SlotManager
from .drafts import SpeculativeConfig, can_draft, mtp_next_token, mtp_propose, propose_ngram
from .loras import LoraRegistry
from .prefix import PrefixCache, Reuse
from .sequence import SeqStatus, Sequence


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_context: int, chunk_size: int = 2048,
                 max_num_seqs: int = 256, eos_token_ids: tuple[int, ...] = (), slots: SlotManager | None = None,
                 loras: LoraRegistry | None = None, speculative: SpeculativeConfig | None = None,
                 prefix: PrefixCache | None = None):
        if chunk_size <= 0 or max_num_seqs <= 0:
            raise ValueError("chunk_size and max_num_seqs must be positive")
        if slots is not None and slots.num_slots <= 0:
            raise ValueError("a model with recurrent state needs at least one state slot")
        if prefix is not None and prefix.block_size != blocks.block_size:
            raise ValueError(f"the prefix cache's block_size {prefix.block_size} is not the pool's {blocks.block_size}")
        if prefix is not None and (slots is not None) != (prefix.snapshots is not None):
            raise ValueError("a prefix cache serves a model with recurrent state with state snapshots, and "
                             "one without, without")
        if prefix is not None and speculative is not None and prefix.lookahead != int(speculative.mtp):
            raise ValueError("with MTP drafting a prefix cache names each block with the token after it "
                             "(lookahead=1; the head's KV at a block's last position depends on it), and "
                             "without, with lookahead=0")
        self.blocks, self.slots, self.prefix, self.max_context = blocks, slots, prefix, max_context
        self.loras = loras
        self.chunk_size, self.max_num_seqs = chunk_size, max_num_seqs
        self.eos_token_ids = set(eos_token_ids)
        self.speculative = speculative
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        # heap of (admitted, seq): running sequences with tokens to send (an `admitted` is queued once at most)
        self._ready: list[tuple[int, Sequence]] = []
        self._admissions = itertools.count()
        self._ids = itertools.count()
        self._steps = itertools.count()
        self._removed: list[int] = []
        # counters since the start (LLM.stats())
        self.num_preemptions = 0
        self.num_finished = 0
        self.num_prompt_tokens = 0
        self.num_computed_tokens = 0
        self.num_generated_tokens = 0
        self.num_lookup_tokens = 0  # tokens of sequences admitted while prefix caching is on
        self.num_cached_tokens = 0  # of those, taken from the prefix cache instead of computed
        self.num_draft_tokens = 0  # drafts sent for verification
        self.num_accepted_tokens = 0  # of those, accepted
        self.num_verified = 0  # sequence-steps that verified drafts

    # ---- requests -------------------------------------------------------
    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Refuse a request that could never be served; returns its max_len (prompt + generated tokens).

        Reads only settings fixed at construction, so any thread may call it.
        Raises ValueError (empty prompt) or RequestTooLarge.
        """
        if not prompt_ids:
            raise ValueError("a prompt needs at least one token")
        if len(prompt_ids) >= self.max_context:
            raise RequestTooLarge(f"prompt of {len(prompt_ids)} tokens does not fit max_context {self.max_context}: "
                                  f"at most {self.max_context - 1} prompt tokens (one position is for the first "
                                  "generated token)")
        max_len = min(len(prompt_ids) + params.max_tokens, self.max_context)
        pool_tokens = self.blocks.num_blocks * self.blocks.block_size
        # The last generated token is never fed back, so max_len - 1 tokens need KV.
        if self.blocks.blocks_needed(max_len - 1) > self.blocks.num_blocks:
            raise RequestTooLarge(f"request needs KV for {max_len - 1} tokens (prompt {len(prompt_ids)} + "
                                  f"max_tokens {params.max_tokens} - 1, at most max_context {self.max_context} - 1); "
                                  f"the KV pool holds {pool_tokens} tokens ({self.blocks.num_blocks} blocks of "
                                  f"{self.blocks.block_size}): lower max_tokens or give the KV cache more memory")
        return max_len

    def add(self, prompt_ids: list[int], params: SamplingParams, seq_id: int | None = None) -> Sequence:
        """Queue a request (checked as by `check`). seq_id: the caller's id for it (default: the next free one)."""
        max_len = self.check(prompt_ids, params)
        key = b""
        if params.lora is not None:  # unloaded since the caller checked: ValueError
            key = (self.loras or LoraRegistry(0)).cache_key(params.lora)
        seq = Sequence(next(self._ids) if seq_id is None else seq_id, list(prompt_ids), params, max_len,
                       cache_key=key)
        self.waiting.append(seq)
        self.num_prompt_tokens += len(prompt_ids)
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` (stop rule met, or cancelled). Its blocks return once nothing of it is in flight."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        self.num_finished += 1
        self._release_if_idle(seq)

    def _release_if_idle(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.FINISHED and seq.in_flight == 0 and not seq.released:
            seq.released = True
            self.blocks.release(seq.seq_id)
            if self.prefix is not None:
                self.prefix.release_tail(seq)
            if self.slots is not None:
                self.slots.release(seq.seq_id)
                seq.restore_state = False
            if seq in self.running:
                self.running.remove(seq)
            if seq.registered:
                self._removed.append(seq.seq_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning ----------------------------------------------------------
    def schedule(self, max_seqs: int | None = None) -> StepPlan | None:
        """The next micro-batch from sequences not waiting on a sample, or None."""
        chunks: list[SeqChunk] = []
        added: list[NewSequence] = []
        budget = self.chunk_size
        limit = max_seqs or self.max_num_seqs
        later = []  # queued again after this plan: no blocks for them now, or a prompt with chunks left
        while budget > 0 and len(chunks) < limit:
            seq = self._pop_ready()
            if seq is None:
                break
            chunk = self._chunk(seq, budget, preempt=True)
            if chunk is None or not chunk.sample:
                later.append(seq)  # (one chunk per sequence and plan)
            if chunk is not None:
                chunks.append(chunk)
                budget -= len(chunk.token_ids)
        for seq in later:
            self._mark_ready(seq)
        while self.waiting and budget > 0 and len(chunks) < limit and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.slots is not None and self.slots.num_free == 0:
                break  # a hybrid sequence runs only with a state slot
            chunk = self._chunk(seq, budget, preempt=False)
            if chunk is None:
                break  # first come, first served: later requests wait too
            self.waiting.popleft()
            seq.status, seq.admitted = SeqStatus.RUNNING, next(self._admissions)
            self.running.append(seq)
            chunks.append(chunk)
            budget -= len(chunk.token_ids)
            if not chunk.sample:
                self._mark_ready(seq)
            if not seq.registered:
                seq.registered = True
                added.append(NewSequence(seq.seq_id, seq.params, list(seq.prompt_ids)))
        if not chunks:
            return None
        plan = StepPlan(next(self._steps), chunks, added, self._removed,
                        self.loras.take_changes() if self.loras is not None else [])
        self._removed = []
        return plan

    def _mark_ready(self, seq: Sequence) -> None:
        """Queue a running sequence that has tokens to send (once)."""
        if seq.queued is None and seq.status is SeqStatus.RUNNING and seq.schedulable:
            seq.queued = seq.admitted
            heapq.heappush(self._ready, (seq.admitted, seq))

    def _pop_ready(self) -> Sequence | None:
        """The first-admitted queued sequence that can still be scheduled (entries of sequences
        preempted or finished since they were queued are dropped on the way)."""
        while self._ready:
            admitted, seq = heapq.heappop(self._ready)
            if seq.queued == admitted:
                seq.queued = None
                if seq.status is SeqStatus.RUNNING and seq.schedulable:
                    return seq
        return None

    def _chunk(self, seq: Sequence, budget: int, preempt: bool) -> SeqChunk | None:
        lookup = self.prefix is not None and seq.seq_id not in self.blocks.tables
        reuse = self.prefix.reusable(seq, self.blocks) if lookup else Reuse()
        cached = reuse.blocks
        start = len(cached) * self.blocks.block_size if cached else seq.num_scheduled
        end = start + min(budget, seq.num_tokens - start)
        if self.prefix is not None:
            end = self.prefix.cut(seq, start, end)  # hybrid models: at a snapshot point
        while not self.blocks.can_hold(seq.seq_id, end, cached):
            victim = self._victim(exclude=seq) if preempt else None
            if victim is None:
                return None
            self._preempt(victim)
        slot = self.slots.acquire(seq.seq_id) if self.slots is not None else -1
        n = end - start
        drafts = self._drafts(seq, end, budget - n)
        snapshot = -1
        if drafts and slot >= 0 and n > self.speculative.num_speculative_tokens + 1:
            drafts = []  # a rejection would recompute the whole chunk: hybrids draft after short chunks only
        if drafts and slot >= 0:
            snapshot = self.slots.acquire_snapshot(seq.seq_id, spare=len(self.waiting))
            if snapshot is None:
                drafts, snapshot = [], -1
        if drafts and not self.blocks.can_hold(seq.seq_id, end + len(drafts), cached):
            drafts = []  # no preemption for drafts
        propose, need = mtp_propose(self.speculative, seq, end, end + len(drafts),
                                    lambda n: self.blocks.can_hold(seq.seq_id, n, cached))
        table = self.blocks.reserve(seq.seq_id, need, cached)
        if lookup:
            self.num_lookup_tokens += seq.num_tokens
            self.num_cached_tokens += start
            seq.num_scheduled, seq.blocks_registered = start, len(cached)
        if self.prefix is not None:
            self.prefix.register(seq, table, end, self.blocks)  # the known tokens' blocks, never drafts'
        restore = seq.restore_state and seq.num_scheduled > 0  # a chunk at position 0 starts from zero state
        if restore or drafts:
            snapshot = self.slots.snapshot(seq.seq_id) if slot >= 0 else -1
        # prefix-cache snapshot of the state after `end` (not after drafts, whose state may be rejected)
        save_to = self.prefix.save_target(seq, end) if self.prefix is not None and slot >= 0 and not drafts else -1
        chunk = SeqChunk(seq.seq_id, seq.token_slice(start, end) + drafts, start,
                         blocks_from=seq.blocks_sent, new_blocks=table[seq.blocks_sent:], sample=end == seq.num_tokens,
                         state_slot=slot, num_drafts=len(drafts), snapshot_slot=snapshot, restore_state=restore,
                         restore_from=reuse.snapshot, save_to=save_to,
                         lora_slot=self.loras.slot_of(seq.params.lora) if self.loras is not None else -1,
                         propose=propose, next_token=mtp_next_token(self.speculative, seq, end))
        seq.num_scheduled, seq.blocks_sent, seq.restore_state = end, len(table), False
        seq.in_flight += 1
        return chunk

    def _drafts(self, seq: Sequence, end: int, budget: int) -> list[int]:
        """Drafts for a chunk that ends at `end` (none unless it ends the known tokens)."""
        spec = self.speculative
        if spec is None or end != seq.num_tokens or not can_draft(seq.params):
            return []
        # every emitted token (drafts + 1) must fit max_tokens and max_len
        room = min(seq.params.max_tokens - len(seq.output_ids), seq.max_len - seq.num_tokens) - 1
        k = min(spec.num_speculative_tokens, room, budget)
        if k <= 0:
            return []
        if spec.mtp:
            return seq.drafts[:k] if seq.drafts_at == seq.num_tokens else []
        return propose_ngram(seq.tokens, k, spec.prompt_lookup_max, spec.prompt_lookup_min)

    def uses_lora(self, name: str) -> int:
        """Requests not yet released (waiting, running or with steps in flight) that use adapter `name`."""
        return sum(1 for seq in [*self.waiting, *self.running] if seq.params.lora == name)

    def _victim(self, exclude: Sequence) -> Sequence | None:
        for seq in reversed(self.running):
            if seq is not exclude and seq.in_flight == 0:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq.seq_id)
        if self.prefix is not None:
            self.prefix.release_tail(seq)  # it may resume from there
        if self.slots is not None:
            self.slots.release(seq.seq_id)
        self.running.remove(seq)
        seq.status, seq.num_scheduled, seq.blocks_sent, seq.blocks_registered = SeqStatus.WAITING, 0, 0, 0
        seq.queued = None
        seq.restore_state = False
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def abort(self, plan: StepPlan, seqs: dict[int, Sequence]) -> None:
        """Undo a plan that never reached the stages: its tokens are pending again."""
        bs = self.blocks.block_size
        for chunk in plan.chunks:  # blocks this plan filled hold no KV: out of the cache
            table = self.blocks.tables.get(chunk.seq_id, [])
            for block in table[chunk.start // bs: chunk.end // bs]:
                self.blocks.forget(block)
        for chunk in reversed(plan.chunks):
            seq = seqs[chunk.seq_id]
            seq.in_flight -= 1
            if chunk.save_to >= 0:
                self.prefix.unsaved(seq, chunk.save_to)
            if chunk.blocks_from == 0 and chunk.start > 0:  # it took cached blocks in this plan
                self.blocks.release(seq.seq_id)  # (perhaps blocks forgotten above): look again
                seq.num_scheduled = seq.blocks_sent = seq.blocks_registered = 0
            else:
                # a state the step may have advanced cannot be rewound: recompute from position 0
                restart = self.slots is not None and chunk.start > 0
                seq.num_scheduled = 0 if restart else min(seq.num_scheduled, chunk.start)
                seq.blocks_sent = min(seq.blocks_sent, chunk.blocks_from)
                seq.blocks_registered = min(seq.blocks_registered, chunk.start // bs)
            self._release_if_idle(seq)
            self._mark_ready(seq)
        for new in plan.added:
            seqs[new.seq_id].registered = False  # the sampler never heard of it
        self._removed.extend(plan.removed)  # nor of these removals
        if self.loras is not None:
            self.loras.requeue(plan.loras)

    def _roll_back(self, seq: Sequence, chunk: SeqChunk, accepted: int) -> None:
        """Drop what a verified chunk computed past its last accepted draft (see the module docstring)."""
        self.num_draft_tokens += chunk.num_drafts
        self.num_accepted_tokens += accepted
        self.num_verified += 1
        if seq.num_scheduled != chunk.end - chunk.num_drafts:
            return  # preempted or restarted since: it recomputes anyway
        if self.slots is not None and accepted < chunk.num_drafts:
            seq.num_scheduled, seq.restore_state = chunk.start, True  # the state ran past: recompute from the snapshot
        else:
            seq.num_scheduled += accepted  # KV of the accepted drafts is in the cache
        table = self.blocks.truncate(seq.seq_id, seq.num_scheduled)
        seq.blocks_sent = min(seq.blocks_sent, len(table))
        seq.blocks_registered = min(seq.blocks_registered, len(table))

    # ---- results -------------------------------------------------------------
    def is_stop_token(self, seq: Sequence, token: int) -> bool:
        return token in seq.params.stop_token_ids or (token in self.eos_token_ids and not seq.params.ignore_eos)

    def complete(self, plan: StepPlan, result: StepResult, seqs: dict[int, Sequence]) -> list[tuple[Sequence, int]]:
        """Apply a finished step: append sampled (and accepted draft) tokens, apply token stop rules.

        Returns the sequences that received tokens, each with how many (the last ones of its output_ids).
        """
        if result.step != plan.step:
            raise RuntimeError(f"step {result.step} came back while step {plan.step} was expected")
        for chunk in plan.chunks:
            seqs[chunk.seq_id].in_flight -= 1
            if chunk.save_to >= 0:  # the step ran on every stage: its snapshots hold
                self.prefix.saved(seqs[chunk.seq_id], chunk.save_to, chunk.end)
        self.num_computed_tokens += plan.num_tokens
        updated = []
        logprobs = result.logprobs or [None] * len(result.seq_ids)
        accepted = result.accepted or [[] for _ in result.seq_ids]
        proposed = result.drafts or [[] for _ in result.seq_ids]
        drafted = {c.seq_id: c for c in plan.chunks if c.num_drafts}
        for seq_id, token, lp, acc, mtp in zip(result.seq_ids, result.token_ids, logprobs, accepted, proposed):
            seq = seqs[seq_id]
            if seq_id in drafted:
                self._roll_back(seq, drafted[seq_id], len(acc))
            if seq.status is SeqStatus.FINISHED:
                continue  # cancelled while in flight
            new = 0
            for t, t_lp in [(t, None) for t in acc] + [(token, lp)]:
                seq.output_ids.append(t)
                seq.logprobs.append(t_lp)
                new += 1
                if self.is_stop_token(seq, t):
                    self.finish(seq, "stop")
                elif len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= seq.max_len:
                    self.finish(seq, "length")
                if seq.finish_reason is not None:
                    break
            self.num_generated_tokens += new
            seq.drafts, seq.drafts_at = mtp, seq.num_tokens  # MTP drafts follow exactly these tokens
            updated.append((seq, new))
            self._mark_ready(seq)  # (not when it finished)
        for chunk in plan.chunks:
            self._release_if_idle(seqs[chunk.seq_id])
        return updated
