"""Reasoning and tool-call parsing of generated chat text (pprt.entrypoints.serve.output_parser).

The texts are written from the published formats: Qwen2.5 / Qwen3 hermes calls
and Qwen3-Coder / Qwen3.5 XML calls as their chat templates render an
assistant turn (tests/data/chat_templates/), Qwen3's `<think>` block, and
Qwen3.5's reply that starts inside the `<think>` its template opened. Every
case is also streamed in random pieces: the parsed reply must not depend on
where the pieces break.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pprt.entrypoints.serve.output_parser import OutputParser, Reasoning, collect, parse
from pprt.entrypoints.serve.tool_formats import HermesFormat, ToolCall, XmlFormat, typed_value

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "detailed": {"type": "boolean"},
    "options": {"type": "object"}, "ratio": {"type": "number"}, "tags": {"type": "array"},
    "note": {"type": ["string", "null"]}}, "required": ["city"]}
WRITE = {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}
TOOLS = {"get_weather": WEATHER, "write_file": WRITE}


def call(name: str, **arguments) -> ToolCall:
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def hermes(name: str, arguments: dict) -> str:
    """A call as the Qwen3 template renders one."""
    return '<tool_call>\n{"name": "' + name + '", "arguments": ' + json.dumps(arguments) + '}\n</tool_call>'


def xml(name: str, arguments: dict) -> str:
    """A call as the Qwen3.5 template renders one."""
    params = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
                     for k, v in arguments.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


QWEN3 = dict(reasoning=True, tool_format=HermesFormat, tools=TOOLS)
QWEN35 = dict(reasoning=True, starts_in_reasoning=True, tool_format=XmlFormat, tools=TOOLS)

# (id, text, parser options, reasoning, content, calls)
CASES = [
    ("qwen3-think-then-answer", "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?",
     QWEN3, "The user greets me.", "Hello! How can I help?", []),
    ("qwen3-empty-think (enable_thinking=false rendered it)", "Hello!", QWEN3, None, "Hello!", []),
    ("qwen3-think-then-call",
     "<think>\nI need the weather in Paris.\n</think>\n\n" + hermes("get_weather", {"city": "Paris", "days": 2}),
     QWEN3, "I need the weather in Paris.", None, [call("get_weather", city="Paris", days=2)]),
    ("hermes-several-calls-after-content",
     "Checking both cities.\n\n" + hermes("get_weather", {"city": "Paris"}) + "\n"
     + hermes("get_weather", {"city": "Tokyo", "detailed": True}),
     QWEN3, None, "Checking both cities.",
     [call("get_weather", city="Paris"), call("get_weather", city="Tokyo", detailed=True)]),
    ("hermes-arguments-as-json-string",
     '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n</tool_call>',
     QWEN3, None, None, [call("get_weather", city="Oslo")]),
    ("hermes-bad-json-is-content", '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
     QWEN3, None, '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', []),
    ("hermes-unknown-tool-is-content", hermes("launch_rocket", {"when": "now"}),
     QWEN3, None, hermes("launch_rocket", {"when": "now"}), []),
    ("hermes-unclosed-call-is-content", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}',
     QWEN3, None, 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}', []),
    ("hermes-malformed-then-valid",
     '<tool_call>\n{"name": "get_weather"\n</tool_call>\n' + hermes("get_weather", {"city": "Lima"}),
     QWEN3, None, '<tool_call>\n{"name": "get_weather"\n</tool_call>', [call("get_weather", city="Lima")]),
    ("tool-tag-in-prose-stays-reasoning",
     "<think>\nI could answer with <tool_call> tags, but no tool fits.\n</think>\n\nIt is sunny.",
     QWEN3, "I could answer with <tool_call> tags, but no tool fits.", "It is sunny.", []),
    ("hermes-call-inside-reasoning",
     "<think>\nLet me look it up.\n" + hermes("get_weather", {"city": "Paris"}) + "\n</think>\n\nDone.",
     QWEN3, "Let me look it up.", "Done.", [call("get_weather", city="Paris")]),
    ("truncated-reasoning-stays-reasoning", "<think>\nStep one: read the question.\nStep two",
     QWEN3, "Step one: read the question.\nStep two", None, []),
    ("no-tools-call-text-is-content", hermes("get_weather", {"city": "Paris"}),
     dict(reasoning=True), None, hermes("get_weather", {"city": "Paris"}), []),
    ("no-reasoning-parser-keeps-think-tags", "<think>x</think>y", dict(), None, "<think>x</think>y", []),
    ("qwen3.5-reasoning-then-typed-call",
     "The user wants a forecast.\n</think>\n\n" + xml("get_weather", {
         "city": "Paris", "days": 3, "detailed": True, "options": {"units": ["C", "F"]}, "ratio": 0.5,
         "tags": ["a", 1], "note": "null"}),
     QWEN35, "The user wants a forecast.", None,
     [call("get_weather", city="Paris", days=3, detailed=True, options={"units": ["C", "F"]}, ratio=0.5,
           tags=["a", 1], note=None)]),
    ("qwen3.5-call-inside-reasoning-without-close",
     "Let me check the weather first.\n\n" + xml("get_weather", {"city": "Berlin"}),
     QWEN35, "Let me check the weather first.", None, [call("get_weather", city="Berlin")]),
    ("xml-several-calls-multiline-code",
     "\n</think>\n\nWriting two files.\n\n"
     + xml("write_file", {"path": "a.py", "content": "def f():\n    return 1\n"}) + "\n"
     + xml("write_file", {"path": "b.txt", "content": "  two  "}),
     QWEN35, None, "Writing two files.",
     [call("write_file", path="a.py", content="def f():\n    return 1\n"), call("write_file", path="b.txt", content="  two  ")]),
    ("xml-value-not-of-its-type-stays-text",
     "</think>" + xml("get_weather", {"city": "7", "days": "three"}),
     QWEN35, None, None, [call("get_weather", city="7", days="three")]),
    ("xml-missing-parameter-end-is-content",
     "</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>",
     QWEN35, None, "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>", []),
    ("xml-json-body-is-content-for-an-xml-model",
     "</think>\n\n" + hermes("get_weather", {"city": "Paris"}),
     QWEN35, None, hermes("get_weather", {"city": "Paris"}), []),
    ("xml-unknown-function-is-content", "</think>" + xml("nope", {"x": 1}), QWEN35, None, xml("nope", {"x": 1}), []),
    ("forced-named-hermes-prefix",
     HermesFormat.forced_prefix("get_weather") + '{"city": "Quito"}}\n</tool_call>',
     QWEN3, None, None, [call("get_weather", city="Quito")]),
    ("forced-named-xml-prefix", XmlFormat.forced_prefix("get_weather")
     + "<parameter=city>\nQuito\n</parameter>\n</function>\n</tool_call>",
     dict(QWEN35, starts_in_reasoning=False), None, None, [call("get_weather", city="Quito")]),
    ("whitespace-inside-content-is-kept", "<think>\n\n</think>\n\nline one\n\n  line two\n",
     QWEN3, None, "line one\n\n  line two\n", []),
]


@pytest.mark.parametrize("text, options, reasoning, content, calls", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_parse_published_formats(text, options, reasoning, content, calls):
    reply = parse(text, **options)
    assert (reply.reasoning, reply.content, reply.tool_calls) == (reasoning, content, calls)


def _stream(text: str, cuts: list[int], options: dict):
    parser = OutputParser(**options)
    events, last = [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        events += parser.push(text[last:cut])
        last = cut
    return events + parser.finish()


@settings(max_examples=300, deadline=None, database=None)
@given(case=st.sampled_from(CASES), data=st.data())
def test_streamed_in_random_pieces_parses_the_same(case, data):
    _, text, options, *_ = case
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)), label="cuts")
    events = _stream(text, cuts, options)
    assert collect(events) == parse(text, **options)


def test_one_character_pieces_stream_calls_as_soon_as_they_close():
    text = "<think>\nPlan.\n</think>\n\n" + hermes("get_weather", {"city": "Paris"}) + "\nAfter."
    parser = OutputParser(**QWEN3)
    seen = []
    for i, ch in enumerate(text):
        for e in parser.push(ch):
            seen.append((i, e))
    seen += [(len(text), e) for e in parser.finish()]
    (at, _), = [(i, e) for i, e in seen if isinstance(e, ToolCall)]
    assert at == text.index("</tool_call>") + len("</tool_call>") - 1  # emitted on its last character
    assert [e for _, e in seen if isinstance(e, Reasoning)][0] == Reasoning("P")  # reasoning streams at once


def test_push_after_finish_raises():
    parser = OutputParser()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.push("x")


@pytest.mark.parametrize("text, schema, value", [
    ("3", {"type": "integer"}, 3), ("3.0", {"type": "integer"}, 3), ("3.5", {"type": "integer"}, "3.5"),
    ("-2.5e1", {"type": "number"}, -25.0), ("true", {"type": "boolean"}, True), ("True", {"type": "boolean"}, "True"),
    ("null", {"type": ["integer", "null"]}, None), ("[1, 2]", {"type": "array"}, [1, 2]),
    ('{"a": 1}', {"anyOf": [{"type": "string"}, {"type": "object"}]}, {"a": 1}),
    ("42", {"type": "string"}, "42"), ("42", None, "42"), ("42", {"enum": ["42"]}, "42"),
])
def test_xml_values_typed_by_schema(text, schema, value):
    assert typed_value(text, schema) == value
