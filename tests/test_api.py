"""The public API: prompt forms, streaming, chat, stop rules, seeds, logprobs, defaults."""

import json
import signal
import subprocess
import sys
import threading

import pytest

from models import make_checkpoint
from pprt import LLM, Completion, SamplingParams


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", eos_token_id=2)
    return path


@pytest.fixture(scope="module")
def llm(model):
    with LLM(str(model), devices=["cpu"]) as llm:
        yield llm


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_prompt_forms_agree(llm):
    text = "def greet(name):"
    ids = llm.tokenizer.encode(text)
    by_text = llm.generate(text, GREEDY)
    assert len(by_text) == 1 and isinstance(by_text[0], Completion)
    assert by_text[0].prompt_token_ids == ids
    by_ids = llm.generate(ids, GREEDY)
    batch = llm.generate([text, "hello world"], GREEDY)
    batch_ids = llm.generate([ids, llm.tokenizer.encode("hello world")], GREEDY)
    assert by_text[0].token_ids == by_ids[0].token_ids == batch[0].token_ids == batch_ids[0].token_ids
    assert batch[1].token_ids == batch_ids[1].token_ids
    assert by_text[0].text == llm.tokenizer.decode(by_text[0].token_ids)


def test_stream_pieces_join_to_generate_text(llm):
    pieces = list(llm.stream("The quick brown fox", GREEDY))
    assert len(pieces) > 1
    assert "".join(pieces) == llm.generate("The quick brown fox", GREEDY)[0].text


def test_chat_renders_template_and_passes_kwargs(llm):
    messages = [{"role": "user", "content": "hi"}]
    on = llm.chat(messages, GREEDY)
    off = llm.chat(messages, GREEDY, enable_thinking=False)
    think_ids = llm.tokenizer.encode("<think>\n\n</think>\n\n")
    assert off.prompt_token_ids[-len(think_ids):] == think_ids
    assert on.prompt_token_ids == off.prompt_token_ids[: -len(think_ids)]


def test_stop_strings_truncate_text(llm):
    full = llm.generate("x = 1", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    stop = full.text[5:8]
    assert stop and stop not in full.text[:5] + full.text[5:7]
    cut = llm.generate("x = 1", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    streamed = "".join(llm.stream("x = 1", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                          stop=stop)))
    assert streamed == cut.text


def test_stop_token_ids_and_eos(llm):
    full = llm.generate([5, 6, 7], GREEDY)[0]
    target = full.token_ids[4]
    first = full.token_ids.index(target)
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[target]))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: first + 1]
    # eos stops generation unless ignore_eos (the scheduler's eos set comes from config.json)
    eos = full.token_ids[2]
    saved, llm.scheduler.eos_token_ids = llm.scheduler.eos_token_ids, {eos}
    try:
        stopped = llm.generate([5, 6, 7], SamplingParams(max_tokens=12, temperature=0))[0]
        ignored = llm.generate([5, 6, 7], GREEDY)[0]
    finally:
        llm.scheduler.eos_token_ids = saved
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[: full.token_ids.index(eos) + 1]
    assert stopped.text == llm.tokenizer.decode(stopped.token_ids[:-1])  # the eos text is not output
    assert ignored.token_ids == full.token_ids


def test_seeded_sampling_is_reproducible_within_a_batch(llm):
    p = SamplingParams(max_tokens=10, temperature=1.0, seed=1234)
    alone = llm.generate("hello", p)[0].token_ids
    mixed = llm.generate(["other prompt", "hello", "third"], p)
    assert mixed[1].token_ids == alone
    other = llm.generate("hello", SamplingParams(max_tokens=10, temperature=1.0, seed=99))[0].token_ids
    assert other != alone


def test_logprobs_top_k(llm):
    out = llm.generate("abc", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3))[0]
    assert len(out.logprobs) == 5
    for lp, tok in zip(out.logprobs, out.token_ids):
        assert tok in lp and len(lp) == 3  # greedy: the chosen token is the top one
        assert lp[tok] == max(lp.values()) and all(v <= 0 for v in lp.values())
    assert llm.generate("abc", GREEDY)[0].logprobs is None


def test_generation_config_defaults_apply(tmp_path):
    path = make_checkpoint(tmp_path, "qwen3")
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": [2, 0]}))
    with LLM(str(path), devices=["cpu"]) as llm:
        assert llm.config.eos_token_ids == (2, 0)
        a = llm.generate("hello", SamplingParams(max_tokens=8, ignore_eos=True))[0]
        b = llm.generate("hello", SamplingParams(max_tokens=8, ignore_eos=True, temperature=0))[0]
        assert a.token_ids == b.token_ids  # do_sample false -> greedy by default


def test_bad_arguments(llm, model):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 100000]])
    with pytest.raises(ValueError, match="token ids must be ints, element 1 is 'a'"):
        llm.generate([1, "a"])
    free = llm.blocks.num_free
    with pytest.raises(ValueError, match="max_context"):  # the second prompt is refused...
        llm.generate([[1, 2], [1] * llm.max_context])
    assert not llm.scheduler.has_work and llm.blocks.num_free == free  # ...and the first is not left behind
    closed = LLM(str(model), devices=["cpu"])
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.generate("hi")


def test_minimal_cli(model):
    out = subprocess.run([sys.executable, "-m", "pprt.generate", "--model", str(model), "--prompt", "def f(",
                          "--max-new-tokens", "5", "--temperature", "0"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    with LLM(str(model), devices=["cpu"]) as llm:
        expected = llm.generate("def f(", SamplingParams(max_tokens=5, temperature=0))[0].text
    assert out.stdout.rstrip("\n") == expected


def test_interrupt_while_waiting_and_a_failing_step_leave_the_llm_usable(llm, monkeypatch):
    expected = llm.generate(["abc", "hello"], GREEDY)
    total = llm.blocks.num_free
    real_result, real_execute = llm.executor.result, llm.executor.worker.execute
    calls = {"result": 0, "execute": 0}

    def interrupted_once():  # Ctrl-C reaches the caller's thread while the engine loop waits on a result
        calls["result"] += 1
        if calls["result"] == 3:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return real_result()

    monkeypatch.setattr(llm.executor, "result", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["abc", "hello"], GREEDY)
    assert [c.token_ids for c in llm.generate(["abc", "hello"], GREEDY)] == [c.token_ids for c in expected]

    def fails_once(plan, x=None):  # e.g. out of memory in the middle of a step
        calls["execute"] += 1
        if calls["execute"] == 2:
            raise RuntimeError("simulated failure")
        return real_execute(plan, x)

    monkeypatch.setattr(llm.executor.worker, "execute", fails_once)
    with pytest.raises(RuntimeError, match="simulated"):
        llm.generate(["abc", "hello"], GREEDY)
    assert [c.token_ids for c in llm.generate(["abc", "hello"], GREEDY)] == [c.token_ids for c in expected]
    stats = llm.stats()
    assert llm.blocks.num_free == total and stats.kv_blocks_used == 0
    assert stats.requests_running == stats.requests_waiting == 0


# ---- arguments are checked before anything is queued ---------------------------------------------


@pytest.mark.parametrize("prompts, words", [
    (b"hello", "got bytes"),
    ({"prompt": "hi"}, "got dict"),
    (True, "got bool"),
    (7, "got int"),
    ([[1, "2", 3]], "prompt 0: token ids must be ints, element 1 is '2' (str)"),
    ([1, "2"], "element 1 is '2'"),
    ([[1, 2.0]], "element 1 is 2.0 (float)"),
    ([[1, True]], "element 1 is True (bool)"),
    ([True, False], "prompt 0 is bool"),
    (["a", b"b"], "prompt 1 is bytes"),
    (["a", {"x": 1}], "prompt 1 is dict"),
    ([[1, 2], []], "prompt 1 is empty"),
    ([], "no prompts given"),
    ([[1, 2, 320]], "prompt token id 320 is outside the vocabulary [0, 320)"),
    ([[-1]], "prompt token id -1 is outside the vocabulary [0, 320)"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_bad_prompts_are_refused_and_nothing_is_queued(llm, prompts, words):
    free = llm.blocks.num_free
    with pytest.raises(ValueError) as err:
        llm.generate(prompts, GREEDY)
    assert words in str(err.value), str(err.value)
    with pytest.raises(ValueError):
        llm.stream(prompts, GREEDY)  # refused at the call, not at the first next()
    assert not llm.scheduler.has_work and llm.blocks.num_free == free


def test_digit_strings_are_text_and_numpy_ids_are_ids(llm):
    import numpy as np

    assert llm.generate(["12", "3"], GREEDY)[0].prompt_token_ids == llm.tokenizer.encode("12")
    assert llm.generate(np.array([5, 6, 7]).tolist(), GREEDY)[0].prompt_token_ids == [5, 6, 7]
    assert llm.generate([[np.int64(5), np.int32(6)]], GREEDY)[0].prompt_token_ids == [5, 6]


@pytest.mark.parametrize("kwargs, words", [
    (dict(seed=2**64), r"seed must be an int in \[0, 2\*\*63\)"),
    (dict(seed=2**63), "seed"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.0), "seed"),
    (dict(ignore_eos="yes"), "ignore_eos must be True or False"),
    (dict(ignore_eos=1), "ignore_eos"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(stop={"a": 1}), "stop must be"),
    (dict(stop=["ok", 5]), "stop must be"),
    (dict(stop_token_ids=5), "stop_token_ids must be a list"),
    (dict(stop_token_ids="12"), "stop_token_ids must be a list"),
    (dict(max_tokens=True), "max_tokens"),
])
def test_bad_sampling_params_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kwargs)


def test_checks_run_again_at_the_call_and_ids_against_the_vocabulary(llm):
    p = SamplingParams(max_tokens=3)
    p.seed = 2**64  # changed after construction
    with pytest.raises(ValueError, match="seed"):
        llm.generate([5, 6], p)
    with pytest.raises(ValueError, match="stop_token_ids: token id 999 is outside the vocabulary"):
        llm.generate([5, 6], SamplingParams(stop_token_ids=[999]))
    with pytest.raises(ValueError, match="sampling must be a SamplingParams"):
        llm.generate([5, 6], {"temperature": 0})
    assert not llm.scheduler.has_work


def test_stream_takes_one_prompt_and_chat_needs_messages(llm):
    with pytest.raises(ValueError, match="stream\\(\\) takes one prompt, got 2: use generate\\(\\) for a batch"):
        llm.stream(["a", "b"], GREEDY)
    for bad in ([], "hi", [{"content": "hi"}], ["hi"], None):
        with pytest.raises(ValueError, match="chat\\(\\) needs a non-empty list of messages"):
            llm.chat(bad, GREEDY)
    assert not llm.scheduler.has_work


def test_every_call_after_close_says_closed(model):
    llm = LLM(str(model), devices=["cpu"])
    pending = llm.stream("abc", GREEDY)
    started = llm.stream("abc", GREEDY)
    next(started)
    llm.close()
    calls = {"generate": lambda: llm.generate("hi"), "stream": lambda: llm.stream("hi"),
             "chat": lambda: llm.chat([{"role": "user", "content": "hi"}]), "stats": llm.stats,
             "pending stream": lambda: next(pending), "started stream": lambda: list(started)}
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="this LLM is closed"):
            call()
    llm.close()  # twice is fine


@pytest.mark.parametrize("kwargs, words", [
    (dict(seed=2**64), "seed"), (dict(max_context=0), "max_context"), (dict(max_context=True), "max_context"),
    (dict(block_size=16.0), "block_size"), (dict(stage_timeout=0), "stage_timeout"),
    (dict(stage_timeout=True), "stage_timeout"),
])
def test_bad_llm_arguments_fail_before_loading(model, kwargs, words, monkeypatch):
    import pprt.engine.llm as llm_module

    monkeypatch.setattr(llm_module, "load_config", lambda *a: pytest.fail("loaded before checking arguments"))
    with pytest.raises(ValueError, match=words):
        LLM(str(model), devices=["cpu"], **kwargs)
