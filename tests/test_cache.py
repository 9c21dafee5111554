"""Block manager and scheduler: accounting, waiting, refusal, preemption."""

import random

import pytest

from models import make_checkpoint
from pprt import LLM, SamplingParams
from pprt import RequestTooLarge
from pprt.engine.blocks import BlockManager, OutOfBlocks
from pprt.engine.scheduler import Scheduler
from pprt.models.kv import CacheSpec

import torch


def test_random_streams_return_the_pool_to_full():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=16)
    lengths: dict[int, int] = {}
    for step in range(3000):
        action = rng.random()
        if action < 0.5:  # grow a sequence (new or existing)
            seq = rng.randrange(20)
            n = lengths.get(seq, 0) + rng.randrange(1, 40)
            try:
                table = bm.reserve(seq, n)
                lengths[seq] = n
                assert len(table) == -(-n // 16)
            except OutOfBlocks:
                assert bm.extra_blocks(seq, n) > bm.num_free
        elif action < 0.6 and lengths:  # share a sequence's blocks
            parent, child = rng.choice(list(lengths)), 100 + step
            bm.fork(parent, child)
            lengths[child] = lengths[parent]
        elif lengths:
            bm.release(seq := rng.choice(list(lengths)))
            del lengths[seq]
        used = {b for t in bm.tables.values() for b in t}
        assert len(used) + bm.num_free == 64  # every block is either used or free, never both
        assert not used & set(bm.free)
    for seq in list(lengths):
        bm.release(seq)
    assert bm.num_free == 64 and sorted(bm.free) == list(range(64)) and not any(bm.ref_count)


def test_cache_spec_sizes_pool_from_budget():
    spec = CacheSpec(num_layers=3, num_kv_heads=2, head_dim=24, block_size=16, dtype=torch.float32)
    assert spec.bytes_per_block == 2 * 3 * 16 * 2 * 24 * 4
    assert spec.blocks_for(10 * spec.bytes_per_block + 5) == 10
    with pytest.raises(ValueError, match="block_size"):
        CacheSpec(1, 1, 8, 12, torch.float32)


def test_scheduler_refuses_what_can_never_fit():
    s = Scheduler(BlockManager(4, 16), max_context=1000)
    with pytest.raises(RequestTooLarge, match=r"KV for 79 tokens .* holds 64"):
        s.add(list(range(40)), SamplingParams(max_tokens=40).resolve())
    with pytest.raises(RequestTooLarge, match="max_context"):
        Scheduler(BlockManager(400, 16), max_context=50).add(list(range(50)), SamplingParams().resolve())
    s.add(list(range(40)), SamplingParams(max_tokens=25).resolve())  # 64 tokens of KV: fits exactly


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


PROMPTS = [[(13 * i + j) % 300 + 1 for j in range(10 + 7 * i)] for i in range(6)]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def test_small_pool_waits_and_preempts_with_identical_outputs(model):
    with LLM(str(model), devices=["cpu"]) as llm:
        expected = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert llm.scheduler.num_preemptions == 0
    block_bytes = 2 * 3 * 16 * 2 * 24 * 4  # layers 3, kv heads 2, head_dim 24, fp32
    with LLM(str(model), devices=["cpu"], kv_cache_memory=8 * block_bytes) as llm:
        assert llm.blocks.num_blocks == 8
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == expected
        assert llm.scheduler.num_preemptions > 0
        assert llm.blocks.num_free == 8  # everything given back


def test_request_too_large_for_pool_is_refused_at_once(model):
    block_bytes = 2 * 3 * 16 * 2 * 24 * 4
    with LLM(str(model), devices=["cpu"], kv_cache_memory=2 * block_bytes) as llm:
        with pytest.raises(ValueError, match="KV pool holds 32"):
            llm.generate([1] * 20, SamplingParams(max_tokens=20))
        assert llm.blocks.num_free == 2
        assert llm.generate([1] * 20, SamplingParams(max_tokens=5, temperature=0))[0].token_ids  # still usable


def test_cancelled_stream_gives_blocks_back(model):
    with LLM(str(model), devices=["cpu"]) as llm:
        total = llm.blocks.num_free
        stream = llm.stream(PROMPTS[3], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        next(stream)
        assert llm.blocks.num_free < total
        stream.close()  # the engine loop applies the cancel before it answers the next call
        assert llm.stats().kv_blocks_used == 0
        assert llm.blocks.num_free == total
        assert not llm.scheduler.has_work


def test_plans_carry_block_table_changes_not_whole_tables():
    from pprt.distributed.step import StepResult

    s = Scheduler(BlockManager(64, 16), max_context=1000, chunk_size=100)
    seq = s.add(list(range(1, 301)), SamplingParams(max_tokens=40, temperature=0).resolve())
    seqs = {seq.seq_id: seq}
    table: list[int] = []
    for step in range(60):
        plan = s.schedule()
        if plan is None:
            break
        (c,) = plan.chunks
        assert c.blocks_from == len(table)  # the stages' copy is exactly what was sent before
        assert len(c.new_blocks) <= -(-len(c.token_ids) // 16) + 1  # only the blocks this chunk needs
        table = table[: c.blocks_from] + c.new_blocks
        assert table == s.blocks.tables[seq.seq_id]
        s.complete(plan, StepResult(plan.step, [seq.seq_id] if c.sample else [], [7] if c.sample else []), seqs)
        if step == 10:  # a preempted sequence starts its table again
            s._preempt(seq)
            table = []
    assert seq.finish_reason == "length"


# ---- state slots (hybrid models) ----------------------------------------------------------------

def test_slot_manager_hands_out_and_takes_back():
    from pprt.engine.blocks import SlotManager

    slots = SlotManager(2)
    a, b = slots.acquire(10), slots.acquire(11)
    assert {a, b} == {0, 1} and slots.acquire(10) == a and slots.num_free == 0
    with pytest.raises(OutOfBlocks, match="state slot"):
        slots.acquire(12)
    slots.release(10)
    slots.release(10)  # twice: no-op
    assert slots.acquire(12) == a and slots.slot(11) == b and slots.slot(10) is None


def _hybrid_scheduler(num_blocks=64, num_slots=2, **kw):
    from pprt.engine.blocks import SlotManager

    return Scheduler(BlockManager(num_blocks, 16), max_context=1000, slots=SlotManager(num_slots), **kw)


def _finish_step(s, plan, seqs, token=7):
    from pprt.distributed.step import StepResult

    sampled = [c.seq_id for c in plan.chunks if c.sample]
    return s.complete(plan, StepResult(plan.step, sampled, [token] * len(sampled)), seqs)


def test_sequences_hold_one_slot_from_admission_to_finish():
    s = _hybrid_scheduler(num_slots=2)
    seqs = {q.seq_id: q for q in (s.add([1, 2, 3], SamplingParams(max_tokens=2, temperature=0).resolve())
                                  for _ in range(3))}
    plan = s.schedule()
    assert [(c.seq_id, c.state_slot) for c in plan.chunks] == [(0, 0), (1, 1)]  # the third waits for a slot
    assert [q.seq_id for q in s.waiting] == [2] and s.slots.num_free == 0
    _finish_step(s, plan, seqs)
    plan = s.schedule()
    assert [(c.seq_id, c.state_slot, c.start) for c in plan.chunks] == [(0, 0, 3), (1, 1, 3)]
    _finish_step(s, plan, seqs)  # max_tokens 2: both finish and give their slots back
    assert s.slots.num_free == 2
    plan = s.schedule()
    assert [(c.seq_id, c.start) for c in plan.chunks] == [(2, 0)] and plan.chunks[0].state_slot in (0, 1)
    _finish_step(s, plan, seqs)
    _finish_step(s, s.schedule(), seqs)
    assert not s.has_work and s.slots.num_free == 2 and s.blocks.num_free == 64


def test_preemption_frees_the_slot_and_recomputes_from_zero():
    from pprt.engine.sequence import SeqStatus

    s = _hybrid_scheduler(num_blocks=3, num_slots=2)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True).resolve()
    long, short = s.add(list(range(1, 17)), params), s.add(list(range(1, 9)), params)
    seqs = {long.seq_id: long, short.seq_id: short}
    while s.num_preemptions == 0:  # `long` grows into its third block: `short` is preempted
        _finish_step(s, s.schedule(), seqs)
    assert short.status is SeqStatus.WAITING and short.num_scheduled == 0
    assert s.slots.slot(short.seq_id) is None and s.slots.num_free == 1
    starts = []
    while s.has_work:
        plan = s.schedule()
        starts += [c.start for c in plan.chunks if c.seq_id == short.seq_id]
        _finish_step(s, plan, seqs)
    assert starts[0] == 0 and long.finish_reason == short.finish_reason == "length"
    assert s.slots.num_free == 2 and s.blocks.num_free == 3


def test_abort_sends_a_stateful_sequence_back_to_position_zero():
    """A step that may have advanced the recurrent state before failing cannot be undone: recompute."""
    s = _hybrid_scheduler(chunk_size=4)
    seq = s.add(list(range(1, 11)), SamplingParams(max_tokens=3, temperature=0).resolve())
    seqs = {seq.seq_id: seq}
    _finish_step(s, s.schedule(), seqs)  # tokens 0..3
    plan = s.schedule()
    assert plan.chunks[0].start == 4
    s.abort(plan, seqs)
    assert seq.num_scheduled == 0 and s.slots.slot(seq.seq_id) is not None
    plan = s.schedule()
    assert plan.chunks[0].start == 0  # the worker zeroes the slot for a chunk at position 0
    plain = Scheduler(BlockManager(64, 16), max_context=1000, chunk_size=4)  # no state: back to the chunk
    other = plain.add(list(range(1, 11)), SamplingParams(max_tokens=3, temperature=0).resolve())
    _finish_step(plain, plain.schedule(), {other.seq_id: other})
    plain.abort(plain.schedule(), {other.seq_id: other})
    assert other.num_scheduled == 4
