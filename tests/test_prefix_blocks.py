"""Prefix caching in the driver, without a model: hash chains, the block map, the scheduler's reuse.

The property test drives the scheduler with random request streams that share
prefixes and keeps a logical copy of every block's contents (which token each
slot holds, written when a chunk is scheduled): a chunk may only read blocks
holding exactly its sequence's earlier tokens, a block is never free while a
table holds it, and everything returns to the pool at the end. With MTP
drafting it also keeps the MTP head's KV as the last stage writes it (at
position p: tokens p and p + 1, once p + 1 is known; the head's own drafts
past that): a chunk's head may only read positions holding its sequence's
(token, next token) pairs, also in blocks reused from another sequence.
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pprt import SamplingParams
from pprt.distributed.step import StepResult
from pprt.engine.blocks import BlockManager, SlotManager, SnapshotCache
from pprt.engine.drafts import SpeculativeConfig
from pprt.engine.prefix import PrefixCache, block_hash, cache_salt, prefix_cache_for
from pprt.engine.scheduler import Scheduler

BS = 4
SALT = cache_salt("test")


def _lookahead(kw: dict) -> int:
    spec = kw.get("speculative")
    return int(spec is not None and spec.mtp)


def _scheduler(num_blocks=32, chunk_size=64, prefix=True, **kw) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_context=1000, chunk_size=chunk_size,
                     prefix=PrefixCache(BS, SALT, lookahead=_lookahead(kw)) if prefix else None, **kw)


def _hybrid_scheduler(num_blocks=32, chunk_size=64, slots=4, snapshots=8, every=2 * BS, **kw) -> Scheduler:
    """A scheduler as a hybrid model's: running state slots [0, slots), snapshot slots after them."""
    return Scheduler(BlockManager(num_blocks, BS), max_context=1000, chunk_size=chunk_size,
                     slots=SlotManager(slots),
                     prefix=PrefixCache(BS, SALT, SnapshotCache(slots, snapshots), every, lookahead=_lookahead(kw)),
                     **kw)


def _params(n=3):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True).resolve()


def _run(s: Scheduler, seqs: dict, token=7) -> list:
    """Schedule and complete one step (every sampled token is `token`); returns the plan."""
    plan = s.schedule()
    sampled = [c.seq_id for c in plan.chunks if c.sample]
    s.complete(plan, StepResult(plan.step, sampled, [token] * len(sampled)), seqs)
    return plan


def _drain(s: Scheduler, seqs: dict) -> list:
    plans = []
    while s.has_work:
        plans.append(_run(s, seqs))
    return plans


def test_hash_chain_names_the_whole_prefix_and_the_salt():
    a = block_hash(SALT, [1, 2, 3, 4])
    assert a == block_hash(SALT, [1, 2, 3, 4]) and len(a) == 16
    assert a != block_hash(cache_salt("other rope"), [1, 2, 3, 4])  # what changes KV changes every hash
    assert a != block_hash(SALT, [1, 2, 4, 3])
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(block_hash(SALT, [0, 2, 3, 4]), [5, 6, 7, 8])  # the parent counts
    assert block_hash(SALT, [2**40, 1]) != block_hash(SALT, [1, 2**40])


def test_block_map_keeps_freed_blocks_until_their_space_is_needed():
    bm = BlockManager(4, BS)
    table = bm.reserve(0, 12)  # 3 blocks
    hashes = [bytes([i]) * 16 for i in range(3)]
    for b, h in zip(table, hashes):
        assert bm.register(b, h)
    assert not bm.register(table[0], hashes[1])  # one hash per block
    assert bm.match(hashes) == table and bm.match([hashes[0], b"x" * 16, hashes[2]]) == table[:1]
    bm.release(0)
    assert bm.num_free == 4 and bm.num_cached == 3 and list(bm.evictable) == table[::-1]  # tail first
    bm.reserve(1, 4)  # the empty block goes first
    assert bm.num_cached == 3 and bm.num_evictions == 0
    bm.reserve(2, 4)  # then the least recently released cached block: the chain's tail
    assert bm.num_evictions == 1 and bm.match(hashes) == table[:2]
    # a new sequence takes the cached head: shared, out of the evictable set, counted as used
    assert bm.extra_blocks(3, 12, table[:2]) == 2 + 1 and not bm.can_hold(3, 12, table[:2])
    got = bm.reserve(3, 8, table[:2])
    assert got == table[:2] and bm.num_free == 0 and [bm.ref_count[b] for b in got] == [1, 1]
    with pytest.raises(ValueError, match="already has blocks"):
        bm.reserve(3, 12, table[:1])
    bm.forget(table[1])  # e.g. its step was undone: no longer found
    assert bm.match(hashes) == table[:1]
    for seq in (1, 2, 3):
        bm.release(seq)
    assert bm.num_free == 4 and not any(bm.ref_count)
    assert sorted(bm.free + list(bm.evictable)) == list(range(4)) and not set(bm.free) & set(bm.evictable)


def test_a_shared_prefix_is_computed_once_and_the_last_token_always_is():
    s = _scheduler()
    shared = list(range(100, 110))  # 10 tokens: 2 full blocks and 2 more
    first = s.add(shared + [1, 2, 3], _params())
    seqs = {first.seq_id: first}
    _drain(s, seqs)
    second = s.add(shared + [4, 5], _params())
    seqs[second.seq_id] = second
    plan = _run(s, seqs)
    (c,) = plan.chunks
    assert c.start == 8 and c.token_ids == [110 - 2, 110 - 1, 4, 5]  # blocks 0-1 reused; the block ending inside is not
    assert c.blocks_from == 0 and c.new_blocks[:2] == s.blocks.tables[second.seq_id][:2]
    assert s.num_lookup_tokens == 13 + 12 and s.num_cached_tokens == 8
    _drain(s, seqs)
    # the whole prompt cached (3 full blocks): its last block is computed again, in a block of its own
    again = s.add(first.prompt_ids[:12], _params())
    seqs[again.seq_id] = again
    (c,) = _run(s, seqs).chunks
    assert (c.start, len(c.token_ids)) == (8, 4)
    _drain(s, seqs)
    assert s.blocks.num_free == 32 and not any(s.blocks.ref_count)


def test_decoded_tokens_are_cached_for_the_next_turn():
    s = _scheduler()
    turn1 = s.add(list(range(50, 57)), _params(n=6))  # 7 + 6 tokens, the last one never fed back
    seqs = {turn1.seq_id: turn1}
    _drain(s, seqs)
    history = turn1.tokens
    turn2 = s.add(history + [9, 9, 9], _params())
    seqs[turn2.seq_id] = turn2
    (c,) = _run(s, seqs).chunks
    assert c.start == 12  # 12 of the 13 history tokens had their KV computed: 3 full blocks


def test_concurrent_requests_share_blocks_registered_in_the_same_step():
    s = _scheduler(chunk_size=64)
    prompts = [list(range(20, 36)) + [k] for k in range(3)]  # 4 shared blocks each
    seqs = {q.seq_id: q for q in (s.add(p, _params()) for p in prompts)}
    (a, b, c) = _run(s, seqs).chunks  # one step: the first registers, the others reuse
    assert (a.start, b.start, c.start) == (0, 16, 16)
    assert b.new_blocks[:4] == a.new_blocks[:4] == c.new_blocks[:4]
    _drain(s, seqs)
    assert s.blocks.num_free == 32


def test_abort_takes_the_plans_blocks_out_of_the_cache():
    s = _scheduler()
    a = s.add(list(range(60, 70)), _params())
    seqs = {a.seq_id: a}
    plan = s.schedule()
    s.abort(plan, seqs)  # never ran: its blocks hold nothing
    assert s.blocks.num_cached == 0 and a.num_scheduled == 0
    _drain(s, seqs)
    b = s.add(list(range(60, 70)) + [1], _params())
    seqs[b.seq_id] = b
    plan = s.schedule()  # takes a's cached blocks...
    assert plan.chunks[0].start == 8
    s.abort(plan, seqs)  # ...in a plan that is undone: it gives them back and looks again
    assert b.seq_id not in s.blocks.tables and b.num_scheduled == 0
    assert s.schedule().chunks[0].start == 8


def test_preempted_sequence_finds_its_own_blocks_again():
    s = _scheduler(num_blocks=8, chunk_size=64)
    seq = s.add(list(range(1, 21)), _params(n=5))
    seqs = {seq.seq_id: seq}
    _run(s, seqs)
    s._preempt(seq)
    (c,) = _run(s, seqs).chunks
    assert c.start == 20 and s.num_preemptions == 1


def test_no_prefix_cache_no_reuse():
    s = _scheduler(prefix=False)
    seqs = {}
    for _ in range(2):
        q = s.add(list(range(1, 20)), _params())
        seqs[q.seq_id] = q
        _drain(s, seqs)
    assert s.blocks.num_cached == 0 and s.num_cached_tokens == 0 and s.num_computed_tokens == 2 * (19 + 2)


def test_hybrid_models_cache_prefixes_only_with_snapshot_slots(caplog):
    from hybrid_configs import QWEN3_NEXT_80B_A3B, QWEN35_27B, QWEN15_MOE_A27B

    from pprt.config import ModelConfig

    hybrid, plain = ModelConfig.from_dict(QWEN35_27B), ModelConfig.from_dict(QWEN15_MOE_A27B)
    assert prefix_cache_for(plain, enabled=False, block_size=BS, salt=SALT) is None
    assert prefix_cache_for(plain, enabled=True, block_size=BS, salt=SALT).snapshots is None
    with_snapshots = prefix_cache_for(hybrid, enabled=True, block_size=BS, salt=SALT, snapshots=SnapshotCache(4, 8))
    assert with_snapshots.snapshots.num_snapshots == 8
    with caplog.at_level(logging.INFO, logger="pprt"):
        for cfg in (hybrid, ModelConfig.from_dict(QWEN3_NEXT_80B_A3B)):
            assert prefix_cache_for(cfg, enabled=True, block_size=BS, salt=SALT) is None
            assert prefix_cache_for(cfg, enabled=True, block_size=BS, salt=SALT, snapshots=SnapshotCache(4, 0)) is None
    assert sum("prefix caching is off for" in r.getMessage() for r in caplog.records) == 4
    with pytest.raises(ValueError, match="multiple of block_size"):
        PrefixCache(BS, SALT, SnapshotCache(1, 1), snapshot_every=6)


def test_snapshot_points_cut_prefill_and_the_next_turn_resumes_from_the_tail():
    s = _hybrid_scheduler(chunk_size=64, every=2 * BS)
    first = s.add(list(range(100, 119)), _params(n=6))  # 19 tokens: last full block ends at 16
    seqs = {first.seq_id: first}
    plans = _drain(s, seqs)
    prefill = [(c.start, c.end, c.save_to >= 0) for p in plans for c in p.chunks][:3]
    assert prefill == [(0, 8, True), (8, 16, True), (16, 19, False)]  # cut at 8 and 16, saved there
    snaps = s.prefix.snapshots
    assert snaps.num_cached == 3  # 8, 16, and the tail: 19 + 6 - 1 = 24 tokens fed, state after 24 saved
    again = s.add(first.tokens + [1, 2], _params())
    seqs[again.seq_id] = again
    (c,) = _run(s, seqs).chunks
    assert c.start == 24 and c.restore_from == snaps.find(again.block_hashes[5])
    _drain(s, seqs)
    other = s.add(list(range(100, 112)) + [7, 7, 7], _params())  # shares 12 tokens: resumes at 8
    seqs[other.seq_id] = other
    (c,) = _run(s, seqs).chunks
    assert (c.start, c.restore_from >= 0) == (8, True)
    _drain(s, seqs)
    assert s.slots.num_free == 4 and s.blocks.num_free == 32


# ---- random request streams ----------------------------------------------------------------------

def _check_pool(s: Scheduler) -> None:
    bm = s.blocks
    holders: dict[int, int] = {}
    for table in bm.tables.values():
        for b in table:
            holders[b] = holders.get(b, 0) + 1
    for b in range(bm.num_blocks):
        assert bm.ref_count[b] == holders.get(b, 0)  # no block freed (or leaked) while in use
    assert not set(holders) & (set(bm.free) | set(bm.evictable))
    assert not set(bm.free) & set(bm.evictable)
    assert len(holders) + bm.num_free == bm.num_blocks
    assert all(bm.hash_of[b] == h and bm.cached[h] == b for h, b in bm.cached.items())
    assert all(b in bm.hash_of for b in bm.evictable)


@pytest.mark.parametrize("speculative", [None, "ngram", "mtp"], ids=["", "ngram", "mtp"])
@pytest.mark.parametrize("hybrid", [False, True], ids=["attention", "hybrid"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), num_blocks=st.integers(6, 24), chunk_size=st.integers(1, 24))
def test_random_streams_with_shared_prefixes(hybrid, speculative, data, num_blocks, chunk_size):
    spec = None
    if speculative:
        spec = SpeculativeConfig(speculative, num_speculative_tokens=data.draw(st.integers(1, 3)))
    if hybrid:
        s = _hybrid_scheduler(num_blocks=num_blocks, chunk_size=chunk_size, slots=data.draw(st.integers(1, 6)),
                              snapshots=data.draw(st.integers(1, 6)), every=BS * data.draw(st.integers(1, 3)),
                              speculative=spec)
    else:
        s = _scheduler(num_blocks=num_blocks, chunk_size=chunk_size, speculative=spec)
    stems = [[100 + 10 * k + j for j in range(data.draw(st.integers(0, 14)))] for k in range(3)]
    content: dict[int, dict[int, int]] = {}  # block -> offset -> the token whose KV it holds
    content[-1] = {}  # state slot -> the tokens its state has consumed (a tuple under key 0)
    content[-2] = {}  # MTP: (block, offset) -> the (token, next token) pair whose head KV it holds
    seqs, live = {}, []
    for _ in range(data.draw(st.integers(1, 40))):
        action = data.draw(st.sampled_from(["add", "add", "step", "step", "step", "cancel"]))
        if action == "add":
            prompt = data.draw(st.sampled_from(stems)) + data.draw(st.lists(st.integers(1, 9), max_size=6))
            if not prompt:
                continue
            try:
                q = s.add(prompt, _params(data.draw(st.integers(1, 6))))
            except ValueError:
                continue  # never fits this pool
            seqs[q.seq_id] = q
            live.append(q)
        elif action == "cancel" and live:
            s.finish(data.draw(st.sampled_from(live)), "cancelled")
        elif action == "step" and s.has_work:
            _step_checked(s, seqs, content, token=data.draw(st.integers(1, 9)), data=data)
        _check_pool(s)
    while s.has_work:
        _step_checked(s, seqs, content, token=3, data=data)
        _check_pool(s)
    assert s.blocks.num_free == num_blocks and not any(s.blocks.ref_count) and not s.blocks.tables
    if hybrid:  # every running slot back; every snapshot slot free or cached, none held
        assert s.slots.num_free == s.slots.num_slots and not s.slots.owner
        snaps = s.prefix.snapshots
        assert sorted(snaps.free + list(snaps.cached.values())) == list(range(snaps.first, snaps.first + snaps.num_snapshots))
        assert all(q.tail_snapshot == -1 for q in seqs.values())


def _step_checked(s: Scheduler, seqs: dict, content: dict, token: int, data) -> None:
    """One step, checked as the stages would run it: the KV every chunk reads holds its tokens and
    (hybrid models) its state slot has consumed exactly the tokens before it (zeroed at position 0,
    restored from a prefix-cache snapshot, rolled back from and copied to the speculation snapshot
    before the step, prefix-cache snapshots saved after it). Drafts are accepted at random."""
    plan = s.schedule()
    assert plan is not None
    bs, state = s.blocks.block_size, content[-1]
    for c in plan.chunks:  # as the worker does, for every chunk of the step before it runs
        if c.start == 0 and c.state_slot >= 0:
            state[c.state_slot] = ()
        if c.restore_from >= 0:
            state[c.state_slot] = state[c.restore_from]
        if c.restore_state:
            state[c.state_slot] = state[c.snapshot_slot]
        if c.num_drafts and c.state_slot >= 0:
            state[c.snapshot_slot] = state[c.state_slot]
    for c in plan.chunks:  # every token before the chunk is where the table says, as the chunk reads it
        seq, table = seqs[c.seq_id], s.blocks.tables[c.seq_id]
        for p in range(c.start):
            assert content.get(table[p // bs], {}).get(p % bs) == seq.tokens[p], (c, p)
        known = len(c.token_ids) - c.num_drafts
        for i, (p, t) in enumerate(zip(range(c.start, c.end), c.token_ids)):
            assert i >= known or t == seq.tokens[p]
            content.setdefault(table[p // bs], {})[p % bs] = t
        if c.state_slot >= 0:
            assert state.get(c.state_slot) == tuple(seq.tokens[:c.start]), c
            state[c.state_slot] = tuple(seq.tokens[:c.start]) + tuple(c.token_ids)
    for c in plan.chunks:  # then the saves
        if c.save_to >= 0:
            assert c.end % bs == 0 and not c.num_drafts
            state[c.save_to] = state[c.state_slot]
    sampled = [c for c in plan.chunks if c.sample]
    accepted = [c.token_ids[len(c.token_ids) - c.num_drafts:][:data.draw(st.integers(0, c.num_drafts))]
                for c in sampled]
    mtp = s.speculative is not None and s.speculative.mtp
    drafts = [[data.draw(st.integers(1, 9)) for _ in range(c.propose)] for c in sampled] if mtp else None
    if mtp:
        _mtp_step(s, plan, seqs, content[-2], {c.seq_id: (a, token) for c, a in zip(sampled, accepted)})
    s.complete(plan, StepResult(plan.step, [c.seq_id for c in sampled], [token] * len(sampled),
                                accepted=accepted if any(c.num_drafts for c in sampled) else None,
                                drafts=drafts if any(c.propose for c in sampled) else None), seqs)


def _mtp_step(s: Scheduler, plan, seqs: dict, head: dict, sampled: dict) -> None:
    """The MTP head's KV as the last stage writes it in `plan` (pprt.distributed.mtp_drafts): one
    fill of every chunk's positions (written, then read, in one pass), checked as each chunk's head
    reads it: every position before the chunk holds its sequence's (token, next token) pair; then
    the draft steps."""
    bs = s.blocks.block_size
    for c in plan.chunks:
        table, known = s.blocks.tables[c.seq_id], c.token_ids[:len(c.token_ids) - c.num_drafts]
        acc, bonus = sampled.get(c.seq_id, ([], None))
        assert c.sample or c.next_token == seqs[c.seq_id].tokens[c.end], c
        after = known + acc + [bonus if c.sample else c.next_token]
        for i in range(len(known) + len(acc)):
            p = c.start + i
            head[(table[p // bs], p % bs)] = (after[i], after[i + 1])
    for c in plan.chunks:
        table, tokens = s.blocks.tables[c.seq_id], seqs[c.seq_id].tokens
        for p in range(c.start):
            assert head.get((table[p // bs], p % bs)) == (tokens[p], tokens[p + 1]), (c, p)
    for c in plan.chunks:
        table = s.blocks.tables[c.seq_id]
        base = c.start + len(c.token_ids) - c.num_drafts + len(sampled.get(c.seq_id, ([], None))[0])
        for p in range(base, base + c.propose - 1):  # the sampled token's position on: drafts' KV
            if p < len(table) * bs:
                head[(table[p // bs], p % bs)] = "draft"
