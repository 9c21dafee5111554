"""Several threads on one LLM: served together, each output equal to its solo run, no block kept.

Before: two threads calling generate on one LLM crashed a two-stage pipeline,
and on one stage returned wrong tokens, raised at random, or left a sequence
holding blocks forever (6 of 10 runs).
"""

import queue
import signal
import threading

import pytest

from models import make_checkpoint
from pprt import LLM, SamplingParams

THREADS, PER_THREAD = 4, 20


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("threads") / "m", "qwen3", eos_token_id=2)


def request(t: int, j: int) -> tuple[list[int], SamplingParams]:
    """Thread t's j-th request: prompts of 1-23 tokens, greedy, seeded sampling, logprobs, stop tokens."""
    prompt = [(7 * t + 13 * j + k * k) % 300 + 3 for k in range(1 + (5 * t + 3 * j) % 23)]
    kind = (t + j) % 4
    if kind == 0:
        params = SamplingParams(max_tokens=3 + j % 7, temperature=0, ignore_eos=True)
    elif kind == 1:
        params = SamplingParams(max_tokens=6, temperature=0.9, top_k=40, seed=1000 * t + j, ignore_eos=True)
    elif kind == 2:
        params = SamplingParams(max_tokens=8, temperature=0, logprobs=2)  # eos (id 2) may end it early
    else:
        params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True, stop_token_ids=[50, 51, 52, 53])
    return prompt, params


def run(llm: LLM, prompt, params, how: str):
    """One request through one of the public ways: generate, stream or submit (text, Completion)."""
    if how == "generate":
        out = llm.generate([prompt], params)[0]
        return out.text, out
    if how == "stream":
        pieces, stream = [], llm.stream(prompt, params)
        try:
            while True:
                pieces.append(next(stream))
        except StopIteration as stop:
            return "".join(pieces), stop.value
    outputs = queue.SimpleQueue()
    llm.submit(prompt, params, outputs.put)
    text, tokens, logprobs = "", [], []
    while True:
        out = outputs.get(timeout=120)
        text, tokens = text + out.text, tokens + list(out.token_ids)
        assert (out.logprobs is None) == (params.logprobs is None)
        logprobs += out.logprobs or ()
        if out.finished:
            break
    assert out.error is None, out.error
    # the outputs' pieces add up to the completion: tokens and, when asked, their logprobs
    assert tokens == out.completion.token_ids
    assert logprobs == (out.completion.logprobs or [])
    return text, out.completion


def same(a, b) -> bool:
    if (a.token_ids, a.text, a.finish_reason) != (b.token_ids, b.text, b.finish_reason):
        return False
    if a.logprobs is None or b.logprobs is None:
        return a.logprobs is b.logprobs
    return all(la.keys() == lb.keys() and all(abs(la[k] - lb[k]) < 1e-4 for k in la)
               for la, lb in zip(a.logprobs, b.logprobs))


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]], ids=["1stage", "2stages"])
def test_threads_share_one_llm(model, devices):
    with LLM(str(model), devices=devices, max_context=128) as llm:
        solo = {(t, j): llm.generate([request(t, j)[0]], request(t, j)[1])[0]
                for t in range(THREADS) for j in range(PER_THREAD)}
        results, errors, seen_running = {}, [], []
        start = threading.Barrier(THREADS + 1)
        done = threading.Event()

        def caller(t: int) -> None:
            try:
                start.wait()
                for j in range(PER_THREAD):
                    how = ("generate", "stream", "submit")[(t + j) % 3]
                    results[t, j] = run(llm, *request(t, j), how)
                    if j == 7:  # a stream dropped after its first piece: cancelled, the others go on
                        stream = llm.stream(*request(t, j))
                        results[t, "cut"] = next(stream, "")
                        stream.close()
            except BaseException as e:
                errors.append(e)

        def watcher() -> None:  # stats from another thread while steps are in flight
            start.wait()
            while not done.wait(0.002):  # polls, leaving the CPU to the engine
                s = llm.stats()
                assert s.kv_blocks_used <= s.kv_blocks_total
                seen_running.append(s.requests_running)

        threads = [threading.Thread(target=caller, args=(t,)) for t in range(THREADS)]
        stats_thread = threading.Thread(target=watcher)
        for th in threads + [stats_thread]:
            th.start()
        for th in threads:
            th.join(300)
        done.set()
        stats_thread.join(60)
        assert not errors, errors
        for (t, j), expected in solo.items():
            text, completion = results[t, j]
            assert same(completion, expected), (t, j, completion, expected)
            assert text == expected.text, (t, j)
        assert all(solo[t, 7].text.startswith(results[t, "cut"]) for t in range(THREADS))
        assert max(seen_running) > 1  # requests of several threads were in one batch
        stats = llm.stats()
        assert stats.kv_blocks_used == 0 and llm.blocks.num_free == llm.blocks.num_blocks
        assert stats.requests_running == stats.requests_waiting == 0
        assert stats.requests_finished == 2 * THREADS * PER_THREAD + THREADS  # solo + threaded + cut streams


def test_ctrl_c_in_one_caller_cancels_only_its_request(model):
    long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    other = ([11, 12, 13], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    with LLM(str(model), devices=["cpu", "cpu"], max_context=128) as llm:
        expected_long = llm.generate([[1, 2, 3]], long)[0]
        expected_other = llm.generate(*other)[0]
        other_result = []
        neighbour = threading.Thread(target=lambda: other_result.append(llm.generate(*other)[0]))
        pieces = []
        with pytest.raises(KeyboardInterrupt):
            for piece in llm.stream([1, 2, 3], long):
                pieces.append(piece)
                if len(pieces) == 2:
                    neighbour.start()
                    threading.Timer(0.05, signal.pthread_kill,
                                    (threading.main_thread().ident, signal.SIGINT)).start()
        neighbour.join(120)
        assert expected_long.text.startswith("".join(pieces)) and len(pieces) < 100
        assert other_result[0].token_ids == expected_other.token_ids
        assert llm.generate([[1, 2, 3]], long)[0].token_ids == expected_long.token_ids  # still usable
        stats = llm.stats()
        assert stats.kv_blocks_used == 0 and stats.requests_running == stats.requests_waiting == 0


def test_close_from_another_thread_ends_a_waiting_call(model):
    llm = LLM(str(model), devices=["cpu"], max_context=4096, kv_cache_memory=2**22)
    errors, streaming = [], threading.Event()

    def caller():
        try:
            for _ in llm.stream([1, 2, 3], SamplingParams(max_tokens=3000, temperature=0, ignore_eos=True)):
                streaming.set()
        except RuntimeError as e:
            errors.append(e)

    th = threading.Thread(target=caller)
    th.start()
    assert streaming.wait(60)
    llm.close()
    th.join(30)
    assert not th.is_alive() and len(errors) == 1 and "closed" in str(errors[0])
    with pytest.raises(RuntimeError, match="closed"):
        llm.stats()
