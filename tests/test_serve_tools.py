"""Tool calls and reasoning end to end: the real server, the `openai` client, real Qwen chat templates.

tests/data/tool_model/ is a tiny Qwen3 checkpoint that has learnt a few replies
by heart (tools/make_tool_test_model.py): under the published Qwen3 template it
thinks and then writes a hermes call, under the Qwen3.5 one (which opens
`<think>` itself) an XML call; after the tool's result it answers. The server
serves it twice, once per template, and must return the reasoning, the typed
call and the answer the OpenAI way, streamed and not, and render the client's
next turn (arguments as a JSON string, a tool message) as the model learnt it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the test extra (openai) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")

from serve_helpers import running_server  # noqa: E402

DATA = Path(__file__).parent / "data"
MODEL = DATA / "tool_model"
SPEC = json.loads((MODEL / "conversations.json").read_text())
FORMATS = {"hermes": "qwen3-tools", "xml": "qwen35-tools"}  # format -> served name


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("tool-models")
    args = []
    for fmt, name in FORMATS.items():
        d = root / fmt
        shutil.copytree(MODEL, d)
        shutil.copy(DATA / "chat_templates" / SPEC["templates"][fmt], d / "chat_template.jinja")
        args += ["--model", str(d), "--served-model-name", name, "--devices", "cpu"]
    with running_server(*args, log=root / "server.log") as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


USER = [{"role": "user", "content": "What is the weather in Paris?"}]
ARGUMENTS = SPEC["arguments"]


def _reply(client, model: str, stream: bool, **kw) -> dict:
    """The message, finish reason and usage, assembled from the stream as a client does."""
    kw = {"model": model, "temperature": 0, "max_tokens": 200, "tools": [SPEC["tool"]], **kw}
    if not stream:
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        calls = [(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ()]
        return dict(content=m.content, reasoning=(m.model_extra or {}).get("reasoning_content"), calls=calls,
                    finish=r.choices[0].finish_reason, usage=r.usage.prompt_tokens)
    content, reasoning, calls, finish, usage = "", "", {}, None, None
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage.prompt_tokens
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for c in delta.tool_calls or ():
            if c.index not in calls:  # the first delta of a call names it
                assert c.id and c.function.name and not calls.get(c.index)
                calls[c.index] = [c.id, c.function.name, ""]
            calls[c.index][2] += c.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return dict(content=content or None, reasoning=reasoning or None, calls=[tuple(c) for c in calls.values()],
                finish=finish, usage=usage)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_reasoning_then_a_typed_call_then_the_answer(client, fmt, stream):
    model = FORMATS[fmt]
    first = _reply(client, model, stream, messages=USER)
    assert first["reasoning"] == SPEC["reasoning"]
    assert first["content"] is None and first["finish"] == "tool_calls"
    [(call_id, name, arguments)] = first["calls"]
    assert call_id.startswith("call_") and name == "get_weather"
    assert json.loads(arguments) == ARGUMENTS  # days is 2, an integer, in both formats
    # the client's next turn: its call with the arguments as the JSON string it got, and the tool's result
    turn = USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 24 C"}]
    second = _reply(client, model, stream, messages=turn)
    assert (second["reasoning"], second["content"], second["calls"], second["finish"]) == (
        SPEC["later"], SPEC["answer"], [], "stop")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_named_tool_choice_makes_the_reply_a_call(client, fmt):
    reply = _reply(client, FORMATS[fmt], False, messages=USER,
                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert reply["reasoning"] is None and reply["content"] is None and reply["finish"] == "tool_calls"
    assert [(n, json.loads(a)) for _, n, a in reply["calls"]] == [("get_weather", ARGUMENTS)]
    auto = _reply(client, FORMATS[fmt], False, messages=USER)
    assert reply["usage"] > auto["usage"]  # the call's opening is part of the prompt


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_tool_choice_none_renders_no_tools_and_finds_no_calls(client, fmt):
    reply = _reply(client, FORMATS[fmt], False, messages=USER, tool_choice="none", max_tokens=20)
    auto = _reply(client, FORMATS[fmt], False, messages=USER)
    assert reply["calls"] == [] and reply["finish"] != "tool_calls"
    assert reply["usage"] < auto["usage"] - 50  # the tool instructions were left out
