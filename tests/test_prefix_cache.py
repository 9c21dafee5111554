"""Prefix caching end to end: the same tokens as without it and as transformers, fewer tokens computed.

Each scenario of the issue runs on one LLM with caching on, against an LLM
with caching off (tokens equal, logprobs within 1e-5) and transformers
(greedy tokens equal, logprobs within 1e-4), on 1 and 2 stages: a second
request sharing a prefix, a multi-turn chat, prefixes ending inside a block,
a prompt that is entirely cached, concurrent requests sharing a prefix, and
eviction, preemption and cancellation under a tiny pool.
"""

from __future__ import annotations

import queue

import pytest

from models import assert_same_outputs, make_checkpoint, reference_greedy, reference_model
from pprt import LLM, SamplingParams

BS = 4  # small blocks: many full blocks in short prompts
N = 6
GREEDY = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, logprobs=0)
SYSTEM = [(7 * i) % 300 + 3 for i in range(23)]  # 23 tokens: 5 full blocks and 3 more


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("prefix") / "m", "qwen3", tokenizer=False)


@pytest.fixture(scope="module")
def oracle(model):
    return reference_model(model)


def _workload(llm: LLM, params: SamplingParams = GREEDY) -> list:
    """Every scenario in order on one LLM; returns the completions in order."""
    outs = []
    outs += llm.generate(SYSTEM + [11, 12], params)  # fills the cache
    outs += llm.generate(SYSTEM + [13], params)  # shares 5 blocks; the prefix ends inside block 5
    outs += llm.generate(SYSTEM[:20], params)  # entirely cached (5 full blocks): the last block is computed
    history = SYSTEM + [21, 22, 23]
    for turn in range(3):  # a chat: each turn is the history so far, the reply and a new message
        c = llm.generate(history, params)[0]
        outs.append(c)
        history = history + c.token_ids + [30 + turn, 31 + turn]
    outs += llm.generate([SYSTEM + [40 + k] * (k + 1) for k in range(4)], params)  # concurrent, one call
    return outs


@pytest.fixture(scope="module")
def uncached(model):
    with LLM(str(model), devices=["cpu"], block_size=BS, enable_prefix_caching=False) as llm:
        outs = _workload(llm)
        stats = llm.stats()
    assert not stats.prefix_caching and stats.prefix_cached_tokens == stats.prefix_lookup_tokens == 0
    return outs, stats


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]], ids=["1stage", "2stages"])
def test_cached_outputs_equal_uncached_and_transformers(model, oracle, uncached, devices):
    expected, plain = uncached
    with LLM(str(model), devices=devices, block_size=BS, chunk_size=16) as llm:
        outs = _workload(llm)
        stats = llm.stats()
        assert llm.blocks.num_free == llm.blocks.num_blocks and not any(llm.blocks.ref_count)
    assert_same_outputs(outs, expected, 1e-5)
    for o in outs:
        tokens, logprobs = reference_greedy(oracle, o.prompt_token_ids, N)
        assert o.token_ids == tokens
        assert max(abs(o.logprobs[i][t] - lp) for i, (t, lp) in enumerate(zip(tokens, logprobs))) < 1e-4
    assert stats.prefix_caching and stats.kv_blocks_used == 0 and stats.prefix_cache_blocks > 0
    assert stats.prompt_tokens == plain.prompt_tokens == stats.prefix_lookup_tokens
    # the tokens not computed are exactly those taken from the cache
    assert stats.computed_tokens == plain.computed_tokens - stats.prefix_cached_tokens
    assert stats.prefix_cached_tokens >= 20 + 16 + 4 * 20  # second request, entirely cached one, concurrent ones
    assert 0 < stats.prefix_hit_rate < 1


def test_second_chat_turn_computes_only_its_new_tokens(model):
    for caching in (True, False):
        with LLM(str(model), devices=["cpu"], block_size=BS, enable_prefix_caching=caching) as llm:
            first = llm.generate(SYSTEM, GREEDY)[0]
            known = SYSTEM + first.token_ids  # KV computed for all but the last reply token
            second_prompt = known + [50, 51, 52]
            before = llm.stats()
            second = llm.generate(second_prompt, GREEDY)[0]
            after = llm.stats()
        computed = after.computed_tokens - before.computed_tokens - (N - 1)  # less the decode steps
        cached = after.prefix_cached_tokens - before.prefix_cached_tokens
        if caching:
            assert cached == (len(known) - 1) // BS * BS  # every full block of the first turn
            assert computed == len(second_prompt) - cached <= 3 + BS
            with_cache = second.token_ids
        else:
            assert cached == 0 and computed == len(second_prompt)
            assert second.token_ids == with_cache


def _tiny_pool_workload(llm: LLM):
    prompts = [SYSTEM[: 9 + 3 * k] + [60 + k] * 5 for k in range(6)]
    outs = llm.generate(prompts, GREEDY)  # concurrent: the pool cannot hold them all
    outs += [llm.generate(p[:-2] + [70, 71], GREEDY)[0] for p in prompts]  # one by one: evictions
    return outs


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]], ids=["1stage", "2stages"])
def test_tiny_pool_evicts_and_preempts_with_the_same_outputs(model, devices):
    per_layer = 2 * BS * 2 * 24 * 4  # K and V of one layer's block: 2 kv heads, head_dim 24, fp32
    layers = 3 if len(devices) == 1 else 2  # the fullest stage decides (a 1 + 2 split)
    kw = dict(block_size=BS, chunk_size=8, kv_cache_memory=12 * layers * per_layer)
    with LLM(str(model), devices=devices, **kw) as llm:
        assert llm.blocks.num_blocks == 12
        outs = _tiny_pool_workload(llm)
        stats = llm.stats()
        assert llm.blocks.num_free == 12 and not any(llm.blocks.ref_count)
    with LLM(str(model), devices=["cpu"], enable_prefix_caching=False, block_size=BS, chunk_size=8,
             kv_cache_memory=12 * 3 * per_layer) as llm:
        expected = _tiny_pool_workload(llm)
    assert_same_outputs(outs, expected, 1e-5)
    assert stats.prefix_cached_tokens > 0 and stats.prefix_cache_evictions > 0 and stats.kv_blocks_used == 0
    assert stats.preemptions > 0


def test_cancelled_request_leaves_its_computed_blocks_cached(model):
    with LLM(str(model), devices=["cpu"], block_size=BS) as llm:
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        request = llm.submit(SYSTEM, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), outputs.put)
        assert outputs.get(timeout=60).token_ids  # its prompt is computed
        llm.cancel(request)
        while not (last := outputs.get(timeout=60)).finished:
            pass
        assert last.completion.finish_reason == "cancelled"
        stats = llm.stats()
        assert stats.kv_blocks_used == 0 and stats.prefix_cache_blocks >= 5  # the prompt's full blocks
        out = llm.generate(SYSTEM + [99], GREEDY)[0]
        assert llm.stats().prefix_cached_tokens - stats.prefix_cached_tokens == 20
    with LLM(str(model), devices=["cpu"], block_size=BS, enable_prefix_caching=False) as llm:
        assert llm.generate(SYSTEM + [99], GREEDY)[0].token_ids == out.token_ids


def test_enable_prefix_caching_must_be_a_bool(model):
    with pytest.raises(ValueError, match="enable_prefix_caching must be a bool"):
        LLM(str(model), devices=["cpu"], enable_prefix_caching="no")


def test_caching_with_speculative_decoding_on_two_stages(model, uncached):
    """Drafts write KV past the known tokens; only known tokens' blocks are cached: the same tokens."""
    expected, _ = uncached
    plain = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)  # requests with logprobs are not drafted
    with LLM(str(model), devices=["cpu", "cpu"], block_size=BS, chunk_size=16,
             speculative={"method": "ngram", "num_speculative_tokens": 3}) as llm:
        outs = _workload(llm, plain)
        stats = llm.stats()
        assert llm.blocks.num_free == llm.blocks.num_blocks and not any(llm.blocks.ref_count)
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected]
    assert stats.draft_tokens > 0 and stats.prefix_cached_tokens > 0
