"""AsyncLLM (pprt.engine.async_llm): coroutines submit to the engine loop and stream their outputs.

The server awaits this: requests of many coroutines join one running batch,
each result equals its request run alone, a request that is refused starts
nothing, and cancelling (a client gone) frees the request's KV blocks before
the next step.
"""

from __future__ import annotations

import asyncio

import pytest

from models import make_checkpoint
from pprt import LLM, SamplingParams
from pprt.engine.async_llm import AsyncLLM


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("async") / "m", "qwen3", seed=5, eos_token_id=2)
    with LLM(str(path), devices=["cpu"], max_context=256) as llm:
        yield llm


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


async def collect(engine: AsyncLLM, requests) -> dict[int, tuple[list[int], str, object]]:
    """index -> (tokens from the outputs, text from the outputs, the Completion)."""
    got: dict[int, tuple[list[int], str, object]] = {}
    async with engine.submit(requests) as stream:
        async for index, out in stream:
            tokens, text, _ = got.get(index, ([], "", None))
            got[index] = (tokens + list(out.token_ids), text + out.text, out.completion)
    return got


def test_coroutines_share_the_batch_and_get_their_solo_results(llm):
    prompts = [[3 + i, 40 + 2 * i, 7] for i in range(6)]
    params = [greedy(4 + i % 3) if i % 2 else greedy(5, logprobs=2) for i in range(6)]
    solo = [llm.generate([p], s)[0] for p, s in zip(prompts, params)]
    engine = AsyncLLM(llm)

    async def main():
        # three coroutines, two requests each (submitted together), all at once
        return await asyncio.gather(*(collect(engine, [(prompts[i], params[i]), (prompts[i + 3], params[i + 3])])
                                      for i in range(3)))

    results = asyncio.run(asyncio.wait_for(main(), 120))
    for i in range(3):
        for index, k in ((0, i), (1, i + 3)):
            tokens, text, completion = results[i][index]
            assert tokens == completion.token_ids == solo[k].token_ids
            assert text == completion.text == solo[k].text
            if params[k].logprobs is not None:
                assert len(completion.logprobs) == len(solo[k].logprobs)
                for a, b in zip(completion.logprobs, solo[k].logprobs):
                    assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)
    assert llm.stats().kv_blocks_used == 0


def test_a_request_submitted_later_joins_the_running_batch(llm):
    """Continuous batching: a short request sent while a long one runs ends long before it."""
    engine = AsyncLLM(llm)

    async def main():
        order = []
        long = engine.submit([([1, 2, 3], greedy(120))])
        async for _, out in long:
            if out.finished:
                order.append("long")
                break
            if not order:  # the long request is running: send the short one now
                order.append("sent")
                short = await collect(engine, [([5, 6], greedy(3))])
                order.append(("short", len(short[0][0])))
        return order

    assert asyncio.run(asyncio.wait_for(main(), 120)) == ["sent", ("short", 3), "long"]


def test_cancel_frees_the_blocks_before_the_next_step(llm):
    engine = AsyncLLM(llm)
    before = llm.stats().generated_tokens

    async def main():
        stream = engine.submit([([1, 2, 3], greedy(200)), ([4, 5], greedy(200))])
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                used = (await asyncio.to_thread(llm.stats)).kv_blocks_used
                stream.cancel()
                break
        after = await asyncio.to_thread(llm.stats)  # taken between two steps, after the cancel
        return used, after, stream.done

    used, after, done = asyncio.run(asyncio.wait_for(main(), 120))
    assert used > 0 and done
    assert after.kv_blocks_used == 0 and after.requests_running == after.requests_waiting == 0
    assert after.generated_tokens - before < 20  # of the 400 asked for


def test_leaving_the_stream_early_cancels_it(llm):
    engine = AsyncLLM(llm)
    before = llm.stats().generated_tokens

    async def main():
        async with engine.submit([([9, 8, 7], greedy(200))]) as stream:
            async for _, out in stream:
                if out.token_ids:
                    break  # `async with` cancels on the way out

    asyncio.run(asyncio.wait_for(main(), 120))
    stats = llm.stats()
    assert stats.kv_blocks_used == 0 and stats.generated_tokens - before < 100


def test_a_refused_request_starts_none_of_its_batch(llm):
    engine = AsyncLLM(llm)
    finished = llm.stats().requests_finished

    async def main():
        engine.submit([([1, 2], greedy(3)), ([1, 10**6], greedy(3))])  # the second id is outside the vocabulary

    with pytest.raises(ValueError, match="1000000"):
        asyncio.run(main())
    stats = llm.stats()
    # the first request was cancelled at once
    assert stats.kv_blocks_used == 0 and stats.requests_running == stats.requests_waiting == 0
    assert stats.requests_finished == finished + 1
