"""A chat request rendered through the published Qwen templates (pprt.entrypoints.serve.chat), no server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("pydantic", reason="the serve extra is not installed")

from tiny_tokenizer import build_tokenizer  # noqa: E402

from pprt.entrypoints.serve.chat import build_chat_prompt, opens_reasoning, pick_tool_format  # noqa: E402
from pprt.entrypoints.serve.protocol import ChatCompletionRequest, RequestError  # noqa: E402
from pprt.entrypoints.serve.tool_formats import HermesFormat, ToolCall, XmlFormat  # noqa: E402
from pprt.tokenizer import Tokenizer  # noqa: E402

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": '{"city": "Paris", "days": 2}'}}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    d = build_tokenizer(tmp_path_factory.mktemp("tok"), template=None)
    return {name: Tokenizer.from_files(d / "tokenizer.json", d / "tokenizer_config.json", TEMPLATES / f"{name}.jinja")
            for name in ("qwen2.5-instruct", "qwen3", "qwen3.5", "qwq-32b")}


def request(**kw) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}], **kw}
    return ChatCompletionRequest.model_validate(body)


@pytest.mark.parametrize("name, fmt", [("qwen2.5-instruct", HermesFormat), ("qwen3", HermesFormat),
                                       ("qwq-32b", HermesFormat), ("qwen3.5", XmlFormat)])
def test_the_call_format_is_the_one_the_template_writes(tokenizers, name, fmt):
    assert pick_tool_format(tokenizers[name], "qwen3") is fmt
    assert pick_tool_format(tokenizers[name], "qwen3", "xml") is XmlFormat  # --tool-call-parser wins


def test_earlier_calls_reach_the_template_with_parsed_arguments(tokenizers):
    """OpenAI clients send `arguments` as a JSON string; Qwen3.5's template iterates over it as a mapping."""
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    req = request(messages=messages, tools=[TOOL])
    prompt = build_chat_prompt(tokenizers["qwen3.5"], req, XmlFormat).text
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>" in prompt
    assert "<|im_start|>system\n" in prompt and "Be brief." in prompt  # developer is rendered as system
    assert "<tool_response>\nsunny\n</tool_response>" in prompt
    prompt = build_chat_prompt(tokenizers["qwen3"], req, HermesFormat).text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>' in prompt


@pytest.mark.parametrize("name, fmt, ending", [
    ("qwen3", HermesFormat, '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '),
    ("qwen3.5", XmlFormat, "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n<function=get_weather>\n"),
])
def test_a_named_tool_choice_starts_the_reply_with_the_call(tokenizers, name, fmt, ending):
    prompt = build_chat_prompt(tokenizers[name], request(tools=[TOOL], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}), fmt)
    assert prompt.text.endswith(ending) and not prompt.starts_in_reasoning
    parser = prompt.parser(reasoning=True)
    rest = '{"city": "Oslo"}}\n</tool_call>' if fmt is HermesFormat else \
        "<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>"
    assert parser.push(rest) + parser.finish() == [ToolCall("get_weather", json.dumps({"city": "Oslo"}))]


def test_required_starts_with_the_tag_and_none_renders_no_tools(tokenizers):
    prompt = build_chat_prompt(tokenizers["qwen3.5"], request(tools=[TOOL], tool_choice="required"), XmlFormat)
    assert prompt.text.endswith("</think>\n\n<tool_call>\n") and prompt.forced_prefix == "<tool_call>\n"
    prompt = build_chat_prompt(tokenizers["qwen3.5"], request(tools=[TOOL], tool_choice="none"), XmlFormat)
    assert "<tools>" not in prompt.text and prompt.tool_format is None and prompt.starts_in_reasoning
    parser = prompt.parser(reasoning=True)  # with tool_choice none a call is text
    events = parser.push("ok\n</think>\n\n<tool_call>\n<function=get_weather>\n</function>\n</tool_call>")
    assert all(not isinstance(e, ToolCall) for e in events + parser.finish())


def test_reasoning_start_is_read_from_the_rendered_prompt(tokenizers):
    assert build_chat_prompt(tokenizers["qwen3.5"], request(), XmlFormat).starts_in_reasoning
    off = request(chat_template_kwargs={"enable_thinking": False})
    assert not build_chat_prompt(tokenizers["qwen3.5"], off, XmlFormat).starts_in_reasoning
    assert not build_chat_prompt(tokenizers["qwen3"], request(), HermesFormat).starts_in_reasoning
    assert opens_reasoning("x<think>\n") and not opens_reasoning("<think>\n\n</think>\n\n") and not opens_reasoning("")


def test_what_the_template_refuses_is_a_400_naming_messages(tokenizers):
    with pytest.raises(RequestError) as e:  # Qwen3.5's template needs a user query
        build_chat_prompt(tokenizers["qwen3.5"], request(messages=[{"role": "system", "content": "s"}]), XmlFormat)
    assert e.value.status == 400 and e.value.param == "messages" and "No user query" in e.value.message
    bad = request(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "get_weather", "arguments": "[1, 2]"}}]}])
    with pytest.raises(RequestError) as e:
        build_chat_prompt(tokenizers["qwen3"], bad, HermesFormat)
    assert e.value.param == "messages[1].tool_calls[0].function.arguments"
