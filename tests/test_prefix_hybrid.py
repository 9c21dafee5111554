"""Prefix caching for hybrid Gated DeltaNet models: KV blocks plus state snapshots.

A tiny random Qwen3.5 text model (8 layers: 3 DeltaNet + 1 full attention,
twice) runs the scenarios of tests/test_prefix_cache.py with caching on, and
its tokens must equal those with caching off (logprobs within 1e-5) and
transformers' (within 1e-4), on 1 stage and on 2 stages cut so that stage 0
holds DeltaNet layers only. The second turn of a chat resumes from the
snapshot taken when the first turn ended and computes only its new tokens;
a pool of 2 snapshots evicts and still gives the same tokens; afterwards
every block, running slot and snapshot slot is back.
"""

from __future__ import annotations

import logging

import pytest
import torch

from models import assert_same_outputs, make_checkpoint, reference_greedy, reference_model
from pprt import LLM, SamplingParams

BS = 4
N = 5
GREEDY = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, logprobs=0)
SYSTEM = [(7 * i) % 300 + 3 for i in range(23)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("prefix-hybrid") / "m", "qwen3_5_text", tokenizer=False)


def _workload(llm: LLM, params: SamplingParams = GREEDY) -> list:
    outs = []
    outs += llm.generate(SYSTEM + [11, 12], params)  # snapshots at 8, 16 (every 8) and 20 (last full block)
    outs += llm.generate(SYSTEM + [13], params)  # resumes at 20
    outs += llm.generate(SYSTEM[:18] + [14, 15], params)  # diverges inside block 4: resumes at 16
    history = SYSTEM + [21, 22, 23]
    for turn in range(3):  # each turn resumes where the previous one's tail snapshot was taken
        c = llm.generate(history, params)[0]
        outs.append(c)
        history = history + c.token_ids + [30 + turn]
    outs += llm.generate([SYSTEM + [40 + k] * (k + 1) for k in range(3)], params)  # concurrent
    return outs


def _assert_everything_back(llm: LLM) -> None:
    snaps = llm.scheduler.prefix.snapshots
    assert llm.blocks.num_free == llm.blocks.num_blocks and not any(llm.blocks.ref_count)
    assert llm.slots.num_free == llm.slots.num_slots
    held = sorted(snaps.free + list(snaps.cached.values()))
    assert held == list(range(snaps.first, snaps.first + snaps.num_snapshots))  # none held by a sequence


@pytest.fixture(scope="module")
def uncached(model):
    with LLM(str(model), devices=["cpu"], block_size=BS, chunk_size=8, enable_prefix_caching=False) as llm:
        assert llm.scheduler.prefix is None
        return _workload(llm), llm.stats()


@pytest.mark.parametrize("devices, split", [(["cpu"], None), (["cpu", "cpu"], [3, 5])],
                         ids=["1stage", "2stages-deltanet-only-stage0"])
def test_hybrid_cached_outputs_equal_uncached_and_transformers(model, uncached, devices, split):
    expected, plain = uncached
    with LLM(str(model), devices=devices, split=split, block_size=BS, chunk_size=8) as llm:
        assert llm.scheduler.prefix.snapshot_every == 8
        outs = _workload(llm)
        stats = llm.stats()
        _assert_everything_back(llm)
    assert_same_outputs(outs, expected, 1e-5)
    oracle = reference_model(model)
    for o in outs:
        tokens, logprobs = reference_greedy(oracle, o.prompt_token_ids, N)
        assert o.token_ids == tokens
        assert max(abs(o.logprobs[i][t] - lp) for i, (t, lp) in enumerate(zip(tokens, logprobs))) < 1e-4
    assert stats.prefix_caching and stats.state_snapshots_total > 0 and stats.state_snapshots_cached > 0
    assert stats.computed_tokens == plain.computed_tokens - stats.prefix_cached_tokens
    # second request 20, the diverging one 16, turns 2 and 3 past their history, concurrent ones 20 each
    assert stats.prefix_cached_tokens >= 20 + 16 + 2 * 28 + 2 * 20


def test_hybrid_second_turn_resumes_from_the_first_turns_end(model):
    with LLM(str(model), devices=["cpu"], block_size=BS, chunk_size=8) as llm:
        first = llm.generate(SYSTEM, GREEDY)[0]
        known = SYSTEM + first.token_ids  # KV and state computed for all but the last reply token
        before = llm.stats()
        second = llm.generate(known + [50, 51, 52], GREEDY)[0]
        after = llm.stats()
    cached = after.prefix_cached_tokens - before.prefix_cached_tokens
    assert cached == (len(known) - 1) // BS * BS == 24  # the tail snapshot taken while decoding
    assert after.computed_tokens - before.computed_tokens - (N - 1) == len(known) + 3 - cached
    with LLM(str(model), devices=["cpu"], block_size=BS, enable_prefix_caching=False) as llm:
        assert llm.generate(known + [50, 51, 52], GREEDY)[0].token_ids == second.token_ids


def test_hybrid_tiny_snapshot_pool_evicts_and_preempts_with_the_same_outputs(model, uncached):
    from pprt.distributed.worker import WorkerSpec, cache_spec
    from pprt.weights.checkpoint import ModelSource, load_config

    expected, _ = uncached
    config = load_config(ModelSource(model))
    per_block = cache_spec(WorkerSpec(str(model), config, (0, 8), "cpu", torch.float32, block_size=BS)).bytes_per_block
    with LLM(str(model), devices=["cpu"], block_size=BS, chunk_size=8, state_snapshots=2,
             kv_cache_memory=12 * per_block, max_num_seqs=3) as llm:
        assert llm.scheduler.prefix.snapshots.num_snapshots == 2 and llm.blocks.num_blocks == 12
        outs = _workload(llm)
        stats = llm.stats()
        _assert_everything_back(llm)
    assert_same_outputs(outs, expected, 1e-5)
    assert stats.prefix_cached_tokens > 0 and stats.preemptions > 0
    assert llm.scheduler.prefix.snapshots.num_evictions > 0


def test_no_snapshot_slots_turns_hybrid_caching_off(model, caplog):
    with caplog.at_level(logging.INFO, logger="pprt"):
        with LLM(str(model), devices=["cpu"], block_size=BS, state_snapshots=0) as llm:
            assert llm.scheduler.prefix is None and not llm.stats().prefix_caching
            llm.generate(SYSTEM, GREEDY)
            llm.generate(SYSTEM + [1], GREEDY)
            assert llm.stats().prefix_cached_tokens == 0
    assert any("prefix caching is off" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="state_snapshots must be an int >= 0"):
        LLM(str(model), devices=["cpu"], state_snapshots=-1)


def test_hybrid_caching_with_speculative_decoding(model, uncached):
    """Drafts (verified in the step, the state rolled back from the speculation snapshot on a
    rejection) beside prefix-cache snapshots (never saved after drafts): the same greedy tokens."""
    expected, _ = uncached
    plain = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)  # requests with logprobs are not drafted
    with LLM(str(model), devices=["cpu"], block_size=BS, chunk_size=8,
             speculative={"method": "ngram", "num_speculative_tokens": 3}) as llm:
        outs = _workload(llm, plain)
        stats = llm.stats()
        _assert_everything_back(llm)
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected]
    assert stats.draft_tokens > 0 and stats.prefix_cached_tokens > 0
