"""Planning a micro-batch costs O(its sequences): the scheduler never walks the sequences in flight.

Before issue 18 `schedule` scanned the whole running list for every micro-batch
(and checked membership in it per sequence): 1.0-1.2 ms per step at 256
sequences. Now running sequences with tokens to send wait in a heap by
admission order. Checked here: how many sequences one `schedule` looks at, and
that the plans are those of the old rule (the first schedulable running
sequences in admission order, then waiting ones), through random admissions,
chunked prefill, finishes, aborts and preemptions.
"""

from __future__ import annotations

import random

import pytest

from pprt.distributed.step import StepResult
from pprt.engine.blocks import BlockManager
from pprt.engine.scheduler import Scheduler, Sequence, SeqStatus
from pprt.params import SamplingParams

GREEDY = SamplingParams(max_tokens=10**6, temperature=0, ignore_eos=True).resolve()


def test_a_micro_batch_looks_at_its_own_sequences_only(monkeypatch):
    running, depth = 256, 4
    sched = Scheduler(BlockManager(running * 8, 16), max_context=4096, chunk_size=8192, max_num_seqs=running)
    seqs = {s.seq_id: s for s in (sched.add([1, 2, 3], GREEDY) for _ in range(running))}
    in_flight = []

    def fill():
        while len(in_flight) < depth:
            in_flight.append(sched.schedule(max_seqs=running // depth))

    def complete_oldest():
        plan = in_flight.pop(0)
        ids = [c.seq_id for c in plan.chunks]
        sched.complete(plan, StepResult(plan.step, ids, [7] * len(ids)), seqs)

    for _ in range(2 * depth):  # prefill, then decode
        fill()
        complete_oldest()
    fill()
    looked = []
    prop = Sequence.schedulable
    monkeypatch.setattr(Sequence, "schedulable", property(lambda s: looked.append(s) or prop.fget(s)))
    assert sched.schedule(max_seqs=running // depth) is None  # every sequence is in flight
    assert looked == []  # and none was looked at
    complete_oldest()  # one micro-batch of 64 comes back ...
    fill()  # ... and goes out again
    assert len(in_flight) == depth and len(in_flight[-1].chunks) == running // depth
    assert len(looked) <= 4 * running // depth  # a few looks per sequence of the micro-batch, not per running one


@pytest.mark.parametrize("seed", range(4))
def test_plans_follow_admission_order_through_preemption_and_aborts(seed):
    rng = random.Random(seed)
    sched = Scheduler(BlockManager(40, 4), max_context=100, chunk_size=24, max_num_seqs=12)
    seqs: dict[int, Sequence] = {}
    in_flight = []
    for _ in range(400):
        if rng.random() < 0.3 and len(seqs) < 60:
            p = SamplingParams(max_tokens=rng.randrange(1, 12), temperature=0, ignore_eos=True).resolve()
            seq = sched.add([rng.randrange(100) for _ in range(rng.randrange(1, 30))], p)
            seqs[seq.seq_id] = seq
        if in_flight and (len(in_flight) >= 3 or rng.random() < 0.5):
            plan = in_flight.pop(0)
            if rng.random() < 0.1 and not in_flight:  # the plan never reached the stages
                sched.abort(plan, seqs)
            else:
                ids = [c.seq_id for c in plan.chunks if c.sample]
                sched.complete(plan, StepResult(plan.step, ids, [5] * len(ids)), seqs)
        live = [s for s in seqs.values() if s.status is not SeqStatus.FINISHED]
        if live and rng.random() < 0.05:
            sched.finish(rng.choice(live), "cancelled")
        # the old rule: running sequences with tokens to send, in admission order
        eligible = [s.seq_id for s in sched.running if s.schedulable]
        preemptions = sched.num_preemptions
        plan = sched.schedule(max_seqs=rng.randrange(1, 8))
        if plan is None:
            continue
        in_flight.append(plan)
        ids = [c.seq_id for c in plan.chunks]
        assert len(set(ids)) == len(ids)
        if sched.num_preemptions == preemptions:  # (a preemption may drop an eligible sequence)
            first = [i for i in ids if i in eligible]
            assert first == eligible[:len(first)]
            assert ids[:len(first)] == first  # running ones first, then admissions
    while in_flight:
        plan = in_flight.pop(0)
        ids = [c.seq_id for c in plan.chunks if c.sample]
        sched.complete(plan, StepResult(plan.step, ids, [5] * len(ids)), seqs)
    for seq in seqs.values():
        sched.finish(seq, "cancelled")
    assert sched.blocks.num_free == 40 and not sched.running


def test_a_sequence_gets_one_chunk_per_plan():
    """A chunk that ends before the budget does (a prompt's chunk cut short, e.g. at a hybrid's
    snapshot point) leaves its sequence for the next plan, as the scan over running sequences did."""
    sched = Scheduler(BlockManager(64, 4), max_context=200, chunk_size=10, max_num_seqs=4)
    sched.add(list(range(1, 30)), GREEDY)
    sched.add([7, 8], GREEDY)
    first = sched.schedule()
    assert [c.seq_id for c in first.chunks] == [0]  # the whole budget on the first prompt
    sched.chunk_size = 100  # room for more than one chunk of it
    cut = sched._chunk
    sched._chunk = lambda seq, budget, preempt: cut(seq, min(budget, 5), preempt)  # chunks cut short
    plan = sched.schedule()
    ids = [c.seq_id for c in plan.chunks]
    assert len(ids) == len(set(ids)) and ids == [0, 1]
