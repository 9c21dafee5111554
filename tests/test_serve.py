"""python -m pprt.serve on loopback, driven by the official `openai` client.

One server serves three models: the bundled demo model ("demo", one CPU stage,
a completion model), a tiny random Qwen3 checkpoint with a chat template
("tiny", two CPU stage processes, max_context 96, n-gram speculative decoding,
which greedy answers must not show) and a tiny random Qwen3.5
hybrid ("hybrid", one CPU stage: KV blocks and recurrent-state slots), behind
an API key. Every
answer is compared with what the library computes for the same greedy request
(`LLM.generate`, one stage, in this process): text, tokens, usage, logprobs.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="the test extra (openai) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")

from models import make_checkpoint  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serve_helpers import running_server  # noqa: E402

from pprt import LLM, SamplingParams  # noqa: E402
from pprt.entrypoints.demo_model import demo_model_available, demo_model_path  # noqa: E402
from pprt.entrypoints.serve.output_parser import parse  # noqa: E402

KEY = "sk-test-key"
TINY_CONTEXT = 96
HYBRID_CONTEXT = 256
BODY_LIMIT = 100_000
PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef walk(path):", "class Stack:\n    def push(self, item):"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", "qwen3", seed=11, eos_token_id=2)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "hybrid", "qwen3_5_text", seed=4, eos_token_id=2)


@pytest.fixture(scope="module")
def server(tiny, hybrid, tmp_path_factory):
    if not demo_model_available():
        pytest.skip("the demo model has not been trained (tools/train_demo.py)")
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with running_server("--model", str(demo_model_path()), "--served-model-name", "demo", "--devices", "cpu",
                        "--model", str(tiny), "--served-model-name", "tiny", "--devices", "cpu,cpu",
                        "--max-context", str(TINY_CONTEXT), "--speculative-ngram", "3", "--model", str(hybrid), "--served-model-name", "hybrid",
                        "--devices", "cpu", "--max-context", str(HYBRID_CONTEXT),
                        "--api-key", KEY, "--max-body-bytes", str(BODY_LIMIT), log=log) as (url, proc):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def library(tiny, hybrid):
    """The same models in this process, one stage each: the reference."""
    models = {"demo": LLM(str(demo_model_path()), devices=["cpu"]),
              "tiny": LLM(str(tiny), devices=["cpu"], max_context=TINY_CONTEXT),
              "hybrid": LLM(str(hybrid), devices=["cpu"], max_context=HYBRID_CONTEXT)}
    yield models
    for llm in models.values():
        llm.close()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def get(url: str, path: str, key: str | None = KEY) -> tuple[int, dict, str]:
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def metrics(url: str) -> dict[tuple, float]:
    _, _, text = get(url, "/metrics", None)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ---- endpoints ----------------------------------------------------------------------------------

def test_models_health_and_metrics(server, client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"demo", "tiny", "hybrid"}
    assert models["tiny"].model_extra["max_model_len"] == TINY_CONTEXT
    status, _, body = get(server, "/health", None)
    assert status == 200 and json.loads(body)["models"] == {"demo": "ok", "tiny": "ok", "hybrid": "ok"}
    m = metrics(server)
    assert m[("pprt_model_up", (("model", "tiny"),))] == 1.0
    assert m[("pprt_kv_blocks_total", (("model", "demo"),))] > 0


@pytest.mark.parametrize("model", ["demo", "tiny"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_equals_the_library(client, library, model, stream):
    llm = library[model]
    for prompt in PROMPTS[:2]:
        expected = llm.generate(prompt, greedy(8))[0]
        if stream:
            chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = chunks[-1].usage
            assert chunks[-1].choices == []  # the usage chunk comes last, with no choice
        else:
            r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
            text, reasons, usage = r.choices[0].text, [r.choices[0].finish_reason], r.usage
        assert text == expected.text
        assert reasons == [expected.finish_reason]
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
            len(expected.prompt_token_ids), len(expected.token_ids),
            len(expected.prompt_token_ids) + len(expected.token_ids))


def test_completion_of_token_ids_and_a_batch(client, library):
    ids = library["demo"].tokenizer.encode(PROMPTS[0])
    expected = library["demo"].generate(ids, greedy(5)) + library["demo"].generate(PROMPTS[1], greedy(5))
    r = client.completions.create(model="demo", prompt=[ids], max_tokens=5, temperature=0)
    assert r.choices[0].text == expected[0].text
    r = client.completions.create(model="demo", prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=5, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [e.text for e in expected]
    assert r.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_equals_the_library(client, library, stream):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fox."}]
    llm = library["tiny"]
    prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    expected = llm.generate(prompt, greedy(10))[0]
    reply = parse(expected.text, reasoning=True)
    kw = dict(model="tiny", messages=messages, max_completion_tokens=10, temperature=0,
              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert deltas[0].role == "assistant"
        content = "".join(d.content or "" for d in deltas)
        reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
    else:
        r = client.chat.completions.create(**kw)
        content, finish, usage = r.choices[0].message.content, [r.choices[0].finish_reason], r.usage
        reasoning = (r.choices[0].message.model_extra or {}).get("reasoning_content") or ""
    assert content == (reply.content or "")
    assert reasoning == (reply.reasoning or "")
    assert finish == [expected.finish_reason]
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(expected.prompt_token_ids), len(expected.token_ids))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_strings(client, library, stream):
    llm = library["demo"]
    full = llm.generate(PROMPTS[0], greedy(12))[0].text
    stop = full[4:6]
    expected = llm.generate(PROMPTS[0], greedy(12, stop=[stop, "never written"]))[0]
    assert expected.finish_reason == "stop" and stop not in expected.text
    kw = dict(model="demo", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop, "never written"])
    if stream:
        chunks = list(client.completions.create(**kw, stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(**kw)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert (text, finish) == (expected.text, "stop")


def test_n_choices_share_the_prompt(client, library):
    llm = library["demo"]
    r = client.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=6, temperature=0, n=2)
    expected = llm.generate(PROMPTS[1], greedy(6))[0]
    assert [c.index for c in r.choices] == [0, 1] and all(c.text == expected.text for c in r.choices)
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)  # the prompt is counted once
    assert r.usage.completion_tokens == 2 * len(expected.token_ids)
    # seeded sampling: choice j draws with seed + j
    r = client.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=6, temperature=1.0, seed=7, n=2)
    for choice in r.choices:
        ref = llm.generate(PROMPTS[1], SamplingParams(max_tokens=6, temperature=1.0, seed=7 + choice.index))[0]
        assert choice.text == ref.text
    chunks = list(client.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=6, temperature=0, n=2,
                                            stream=True))
    for index in (0, 1):
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == index) == expected.text


SAMPLING = dict(temperature=0.8, top_p=0.9, seed=123, presence_penalty=0.5, frequency_penalty=0.3)
EXTRA = dict(top_k=20, min_p=0.05, repetition_penalty=1.1)  # vLLM's fields beside OpenAI's


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_every_sampling_field_reaches_the_sampler(client, library, stream):
    """A seeded request with every sampling field set equals the library's with the same SamplingParams
    (and differs from greedy and from another seed: the fields are not dropped on the way)."""
    llm = library["demo"]
    expected = llm.generate(PROMPTS[0], SamplingParams(max_tokens=10, **SAMPLING, **EXTRA))[0]
    other_seed = llm.generate(PROMPTS[0], SamplingParams(max_tokens=10, **{**SAMPLING, "seed": 124}, **EXTRA))[0]
    kw = dict(model="demo", prompt=PROMPTS[0], max_tokens=10, **SAMPLING, extra_body=EXTRA)
    if stream:
        text = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    else:
        text = client.completions.create(**kw).choices[0].text
    assert text == expected.text
    assert other_seed.text != expected.text
    # the chat endpoint, on the two-stage model
    messages = [{"role": "user", "content": "Say something."}]
    tiny = library["tiny"]
    prompt = tiny.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ref = parse(tiny.generate(prompt, SamplingParams(max_tokens=8, **SAMPLING, **EXTRA))[0].text, reasoning=True)
    r = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8, **SAMPLING,
                                       extra_body=EXTRA)
    assert r.choices[0].message.content == (ref.content or "")


def test_metrics_count_what_was_served(server, client):
    before = metrics(server)
    r = client.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=5, temperature=0, extra_body={
        "ignore_eos": True})
    after = metrics(server)
    m = (("model", "demo"),)
    assert after[("pprt_prompt_tokens_total", m)] - before[("pprt_prompt_tokens_total", m)] == r.usage.prompt_tokens
    assert after[("pprt_generation_tokens_total", m)] - before[("pprt_generation_tokens_total", m)] == 5
    assert after[("pprt_time_to_first_token_seconds_count", m)] == before.get(
        ("pprt_time_to_first_token_seconds_count", m), 0) + 1
    assert after[("pprt_inter_token_latency_seconds_count", m)] > before.get(
        ("pprt_inter_token_latency_seconds_count", m), 0)
    assert after[("pprt_requests_finished_total", m)] > before[("pprt_requests_finished_total", m)]


def test_the_n_choices_share_their_prompt_through_the_prefix_cache(server, client, library):
    demo = (("model", "demo"),)
    prompt = "def fibonacci(n):\n    " * 12
    n_tokens = len(library["demo"].tokenizer.encode(prompt))
    before = metrics(server)
    r = client.completions.create(model="demo", prompt=prompt, max_tokens=3, temperature=0, n=2)
    after = metrics(server)
    assert r.usage.prompt_tokens == n_tokens  # counted once
    hits = after[("pprt_prefix_cache_hit_tokens_total", demo)] - before[("pprt_prefix_cache_hit_tokens_total", demo)]
    assert hits >= n_tokens // 16 * 16 - 16  # the second choice found the first one's full blocks


def test_completion_logprobs(client, library):
    expected = library["demo"].generate(PROMPTS[2], greedy(6, logprobs=3))[0]
    r = client.completions.create(model="demo", prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(expected.token_ids) and "".join(lp.tokens) == r.choices[0].text
    for i, (token, d) in enumerate(zip(expected.token_ids, expected.logprobs)):
        assert math.isclose(lp.token_logprobs[i], d[token], abs_tol=1e-4)
        assert len(lp.top_logprobs[i]) == 3
        assert max(lp.top_logprobs[i].values()) == pytest.approx(max(d.values()), abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_logprobs(client, library, stream):
    messages = [{"role": "user", "content": "Count."}]
    llm = library["tiny"]
    prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    expected = llm.generate(prompt, greedy(5, logprobs=2))[0]
    kw = dict(model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    if stream:
        entries = [e for c in client.chat.completions.create(**kw, stream=True)
                   if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        entries = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert len(entries) == len(expected.token_ids)
    for entry, token, d in zip(entries, expected.token_ids, expected.logprobs):
        assert entry.logprob == pytest.approx(d[token], abs=1e-4)
        assert bytes(entry.bytes) == llm.tokenizer.token_bytes(token)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(sorted(d.values(), reverse=True)[:2],
                                                                        abs=1e-4)


def test_without_max_tokens_a_reply_may_fill_the_context(client, library):
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], temperature=0, extra_body={"ignore_eos": True})
    prompt_tokens = len(library["tiny"].tokenizer.encode(PROMPTS[0]))
    assert r.usage.prompt_tokens == prompt_tokens
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (TINY_CONTEXT - prompt_tokens, "length")


# ---- limits and bad requests --------------------------------------------------------------------

def _post(url: str, path: str, body, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMP = {"model": "demo", "prompt": "x", "max_tokens": 2}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
LONG = " ".join(["fox"] * 200)

# (id, path, body, status, text the error message must hold, param)
BAD = [
    ("no-model", "/v1/completions", {"prompt": "x"}, 400, "model is required", "model"),
    ("unknown-model", "/v1/completions", {**COMP, "model": "gpt-9"}, 404, "'gpt-9' does not exist", "model"),
    ("temperature-string", "/v1/completions", {**COMP, "temperature": "0.5"}, 400, "temperature", "temperature"),
    ("temperature-negative", "/v1/completions", {**COMP, "temperature": -1}, 400, "temperature", "temperature"),
    ("top-p-zero", "/v1/completions", {**COMP, "top_p": 0}, 400, "top_p", "top_p"),
    ("top-k-below", "/v1/completions", {**COMP, "top_k": -5}, 400, "top_k", "top_k"),
    ("min-p-above", "/v1/completions", {**COMP, "min_p": 1.5}, 400, "min_p", "min_p"),
    ("presence-penalty", "/v1/completions", {**COMP, "presence_penalty": 3}, 400, "presence_penalty",
     "presence_penalty"),
    ("frequency-penalty", "/v1/completions", {**COMP, "frequency_penalty": -2.5}, 400, "frequency_penalty",
     "frequency_penalty"),
    ("repetition-penalty", "/v1/completions", {**COMP, "repetition_penalty": 0}, 400, "repetition_penalty",
     "repetition_penalty"),
    ("max-tokens-zero", "/v1/completions", {**COMP, "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("n-zero", "/v1/completions", {**COMP, "n": 0}, 400, "n", "n"),
    ("seed-negative", "/v1/completions", {**COMP, "seed": -1}, 400, "seed", "seed"),
    ("logprobs-too-many", "/v1/completions", {**COMP, "logprobs": 50}, 400, "logprobs", "logprobs"),
    ("stop-not-string", "/v1/completions", {**COMP, "stop": ["a", 3]}, 400, "stop[1]", "stop[1]"),
    ("stop-empty", "/v1/completions", {**COMP, "stop": ""}, 400, "stop", "stop"),
    ("prompt-empty", "/v1/completions", {**COMP, "prompt": ""}, 400, "prompt", "prompt"),
    ("prompt-token-outside-vocab", "/v1/completions", {**COMP, "prompt": [1, 99999]}, 400, "99999", "prompt"),
    ("stop-token-outside-vocab", "/v1/completions", {**COMP, "stop_token_ids": [99999]}, 400, "99999",
     "stop_token_ids"),
    ("max-tokens-over-the-kv-pool", "/v1/completions", {**COMP, "max_tokens": 10**9}, 400, "the KV pool holds",
     "max_tokens"),
    ("stream-options-without-stream", "/v1/completions", {**COMP, "stream_options": {"include_usage": True}}, 400,
     "stream_options", "stream_options"),
    ("echo", "/v1/completions", {**COMP, "echo": True}, 400, "echo", "echo"),
    ("unknown-field", "/v1/completions", {**COMP, "frobnicate": 1}, 400, "frobnicate", "frobnicate"),
    ("prompt-over-context", "/v1/completions", {**COMP, "model": "tiny", "prompt": LONG}, 400,
     f"max_context of {TINY_CONTEXT}", "prompt"),
    ("messages-empty", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", "messages"),
    ("role-unknown", "/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role", "messages[0].role"),
    ("content-image", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0]", "messages[0].content[0].type"),
    ("user-without-content", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, 400,
     "messages[0].content", "messages[0].content"),
    ("arguments-not-json", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
         {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     400, "not JSON", "messages[1].tool_calls[0].function.arguments"),
    ("tool-choice-unknown-name", "/v1/chat/completions",
     {**CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "'g'",
     "tool_choice.function.name"),
    ("tool-choice-required-without-tools", "/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400,
     "tool_choice", "tool_choice"),
    ("tool-name-bad", "/v1/chat/completions",
     {**CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]}, 400, "tools[0].function.name",
     "tools[0].function.name"),
    ("top-logprobs-without-logprobs", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs",
     "top_logprobs"),
    ("template-kwargs-reserved", "/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"messages": []}}, 400,
     "messages", "chat_template_kwargs.messages"),
    ("response-format-json", "/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400,
     "response_format", "response_format.type"),
    ("chat-on-a-completion-model", "/v1/chat/completions", {**CHAT, "model": "demo"}, 400, "no chat template",
     "messages"),
    ("body-not-an-object", "/v1/completions", [1, 2], 400, "JSON object", None),
]


@pytest.mark.parametrize("path, body, status, text, param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_an_error_naming_the_field(server, path, body, status, text, param):
    code, _, answer = _post(server, path, body)
    assert code == status, answer
    error = answer["error"]
    assert text in error["message"], error
    assert error["param"] == param and error["code"] == status and error["type"]


def test_bad_requests_leave_the_server_serving(server, client):
    code, _, _ = _post(server, "/v1/completions", None, raw=b"{not json")
    assert code == 400
    assert client.completions.create(model="demo", prompt="x", max_tokens=2, temperature=0).choices[0].text
    assert get(server, "/health", None)[0] == 200


def test_api_key_body_limit_and_routes(server):
    assert _post(server, "/v1/completions", COMP, key=None)[0] == 401
    code, _, answer = _post(server, "/v1/completions", COMP, key="wrong")
    assert code == 401 and answer["error"]["type"] == "authentication_error"
    assert get(server, "/v1/models", key=None)[0] == 401
    assert get(server, "/health", key=None)[0] == 200  # probes and scrapers need no key
    body = json.dumps({**COMP, "prompt": "x" * (BODY_LIMIT + 10)}).encode()
    for chunked in (False, True):  # a declared Content-Length, and a chunked body counted as it is read
        code, answer = _send_big(server, body, chunked)
        assert code == 413 and f"limit of {BODY_LIMIT}" in answer["error"]["message"]
    assert get(server, "/v1/nothing")[0] == 404


def _send_big(url: str, body: bytes, chunked: bool) -> tuple[int, dict]:
    """POST `body` and read the answer, which may come (and the connection close) before it is all sent."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(body)))))
    conn.endheaders()
    try:
        for i in range(0, len(body), 65536):
            piece = body[i:i + 65536]
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            conn.send(b"0\r\n\r\n")
    except OSError:  # the server answered and hung up first
        pass
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_prompt_over_the_context_names_both_numbers(client, library):
    n = len(library["tiny"].tokenizer.encode(LONG))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=LONG, max_tokens=1)
    assert f"{n} tokens" in str(e.value) and f"{TINY_CONTEXT} tokens" in str(e.value)


# ---- many clients at once ------------------------------------------------------------------------

def test_concurrent_streaming_clients_each_get_their_solo_result(server, library):
    """64 clients stream at once from the two-stage model: every stream completes, equals its request's
    greedy result computed alone, and the KV pool is whole again afterwards."""
    llm = library["tiny"]
    words = ["fox", "dog", "tree", "def", "class", "return", "print", "index"]
    prompts = [f"{words[i % 8]} {words[(i // 8) % 8]} {i}" for i in range(64)]
    solo = [llm.generate(p, greedy(6))[0] for p in prompts]  # one at a time
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(prompt: str) -> tuple[str, str, int]:
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        text, reason, used = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage:
                used = chunk.usage.completion_tokens
        return text, reason, used

    async def all_of_them():
        return await asyncio.gather(*(one(p) for p in prompts))

    t0 = time.monotonic()
    results = asyncio.run(asyncio.wait_for(all_of_them(), timeout=120))
    elapsed = time.monotonic() - t0
    assert [r[0] for r in results] == [s.text for s in solo]
    assert [r[1] for r in results] == [s.finish_reason for s in solo]
    assert [r[2] for r in results] == [len(s.token_ids) for s in solo]
    m = metrics(server)
    assert m[("pprt_draft_tokens_total", (("model", "tiny"),))] > 0  # the server's tiny speculates
    assert m[("pprt_kv_blocks_used", (("model", "tiny"),))] == 0
    assert m[("pprt_requests_running", (("model", "tiny"),))] == 0
    assert elapsed < 120


def test_clients_that_disconnect_leave_no_blocks_behind(server):
    """20 clients start long streams and hang up after two chunks: their requests are cancelled and
    their KV blocks freed at once (had they run on, 20 x 400 tokens would take far longer)."""
    before = metrics(server)[("pprt_generation_tokens_total", (("model", "demo"),))]
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def hang_up(i: int) -> int:
        stream = await client.completions.create(model="demo", prompt=f"def f{i}(", max_tokens=400, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
        await stream.close()
        return seen

    async def all_of_them():
        return await asyncio.gather(*(hang_up(i) for i in range(20)))

    assert asyncio.run(asyncio.wait_for(all_of_them(), timeout=120)) == [2] * 20
    deadline = time.monotonic() + 15
    while True:
        m = metrics(server)
        used = m[("pprt_kv_blocks_used", (("model", "demo"),))]
        running = m[("pprt_requests_running", (("model", "demo"),))] + m[("pprt_requests_waiting", (("model", "demo"),))]
        if used == 0 and running == 0:
            break
        assert time.monotonic() < deadline, f"{used} KV blocks and {running} requests are left after the clients left"
        time.sleep(0.2)
    generated = m[("pprt_generation_tokens_total", (("model", "demo"),))] - before
    assert generated < 20 * 400 / 2, f"the cancelled requests generated {generated} tokens"


def test_a_client_that_hangs_up_on_a_whole_answer_cancels_it(server):
    """Not streamed: the server notices the closed connection while it waits and cancels the request."""
    demo = (("model", "demo"),)
    before = metrics(server)[("pprt_generation_tokens_total", demo)]
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"model": "demo", "prompt": "def g(", "max_tokens": 3000, "temperature": 0,
                       "ignore_eos": True})  # alone: half a minute of generation on CPU
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}",
                                                   "Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    while metrics(server)[("pprt_requests_running", demo)] == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)
    conn.close()
    deadline = time.monotonic() + 15
    while (m := metrics(server))[("pprt_requests_running", demo)] or m[("pprt_kv_blocks_used", demo)]:
        assert time.monotonic() < deadline, "the request of a client that hung up went on"
        time.sleep(0.1)
    assert m[("pprt_generation_tokens_total", demo)] - before < 3000 / 2


def test_a_hybrid_model_streams_its_solo_results_and_gives_its_state_slots_back(server, library):
    """Qwen3.5's DeltaNet layers hold a state slot per sequence beside the KV blocks: streams that run
    to the end equal their greedy results alone, streams cut short by their clients are cancelled, and
    afterwards no block and no slot is held."""
    llm = library["hybrid"]
    solo = [llm.generate(p, greedy(6, ignore_eos=True))[0] for p in PROMPTS]
    assert all(len(s.token_ids) == 6 for s in solo) and any(s.text for s in solo)
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def whole(prompt: str) -> str:
        stream = await client.completions.create(model="hybrid", prompt=prompt, max_tokens=6, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream])

    async def cut(i: int) -> None:
        stream = await client.completions.create(model="hybrid", prompt=f"x{i}", max_tokens=200, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        async for _ in stream:
            break
        await stream.close()

    async def all_of_them():
        return await asyncio.gather(*(whole(p) for p in PROMPTS), *(cut(i) for i in range(6)))

    texts = asyncio.run(asyncio.wait_for(all_of_them(), timeout=120))[:len(PROMPTS)]
    assert texts == [s.text for s in solo]
    hybrid = (("model", "hybrid"),)
    deadline = time.monotonic() + 15
    while True:
        m = metrics(server)
        held = (m[("pprt_kv_blocks_used", hybrid)], m[("pprt_state_slots_used", hybrid)],
                m[("pprt_requests_running", hybrid)])
        if held == (0, 0, 0):
            break
        assert time.monotonic() < deadline, f"blocks, slots and requests held: {held}"
        time.sleep(0.2)
    assert m[("pprt_state_slots_total", hybrid)] > 0

