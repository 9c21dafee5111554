"""The two tool-call formats Qwen models write, each as a parser of one call's body.

A call is `<tool_call>BODY</tool_call>` in the generated text (the tags are the
output parser's business, output_parser.py); a format turns BODY into a
`ToolCall` or refuses it (None: a malformed call, which the output parser
returns as plain text). Formats, as the published Qwen chat templates render
earlier calls (tests/data/chat_templates/, and shared/QWEN.md section 9):

- hermes (Qwen2.5, Qwen3, QwQ): BODY is `\\n{"name": NAME, "arguments": {...}}\\n`,
  one JSON object; "arguments" may also be a JSON string holding the object.
- xml (Qwen3-Coder, Qwen3.5 and later):
  `\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n...</function>\\n`;
  a VALUE is text (one newline on each side belongs to the format), typed by
  the tool's JSON schema for P: integer, number, boolean, null, object and
  array values are read as JSON; strings stay text, and so does a value that
  does not read as any of its schema's types.

A call is valid only when it names one of the request's tools. Knows nothing
about HTTP, streaming or reasoning.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's `function.arguments` carries it


# name -> the JSON schema of its parameters ({"type": "object", "properties": {...}}), as the request gave it
Tools = Mapping[str, Mapping[str, Any]]


class HermesFormat:
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`."""

    name = "hermes"

    @staticmethod
    def could_start(body: str) -> bool:
        """False once `body` (a prefix of a call's body) can no longer become a valid call."""
        head = body.lstrip()
        return not head or head[0] == "{"

    @staticmethod
    def parse(body: str, tools: Tools) -> ToolCall | None:
        try:
            call = json.loads(body)
        except ValueError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or call["name"] not in tools:
            return None
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some fine-tunes write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))

    @staticmethod
    def forced_prefix(name: str | None) -> str:
        """The start of the reply that makes the model call a tool (`name`, or any when None)."""
        if name is None:
            return CALL_OPEN + "\n"
        return CALL_OPEN + "\n" + '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


_FUNCTION = re.compile(r"<function=([^>\n]+)>")
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>")
_FUNCTION_END, _PARAMETER_END = "</function>", "</parameter>"


class XmlFormat:
    """`<tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`."""

    name = "xml"

    @staticmethod
    def could_start(body: str) -> bool:
        head = body.lstrip()
        n = min(len(head), len("<function="))
        return head[:n] == "<function="[:n]

    @staticmethod
    def parse(body: str, tools: Tools) -> ToolCall | None:
        text = body.strip()
        m = _FUNCTION.match(text)
        if m is None or m.group(1).strip() not in tools:
            return None
        name = m.group(1).strip()
        properties = tools[name].get("properties") if isinstance(tools[name], Mapping) else None
        properties = properties if isinstance(properties, Mapping) else {}
        arguments: dict[str, Any] = {}
        pos = m.end()
        while True:
            pos = _skip_space(text, pos)
            if text.startswith(_FUNCTION_END, pos):
                pos += len(_FUNCTION_END)
                break
            p = _PARAMETER.match(text, pos)
            if p is None:
                return None
            end = text.find(_PARAMETER_END, p.end())
            key = p.group(1).strip()
            if end < 0 or key in arguments:
                return None
            value = text[p.end():end]
            value = value[1:] if value.startswith("\n") else value  # the newlines the format puts around it
            value = value[:-1] if value.endswith("\n") else value
            arguments[key] = typed_value(value, properties.get(key))
            pos = end + len(_PARAMETER_END)
        if text[pos:].strip():
            return None
        return ToolCall(name, json.dumps(arguments, ensure_ascii=False))

    @staticmethod
    def forced_prefix(name: str | None) -> str:
        if name is None:
            return CALL_OPEN + "\n"
        return CALL_OPEN + "\n" + f"<function={name}>\n"


FORMATS = {"hermes": HermesFormat, "xml": XmlFormat}
ToolFormat = type[HermesFormat] | type[XmlFormat]


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _schema_types(schema: Any) -> list[str]:
    """The JSON types a parameter's schema allows, in its order (type, or the types of anyOf/oneOf)."""
    if not isinstance(schema, Mapping):
        return []
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    found = []
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or ():
            found += _schema_types(sub)
    return found


def typed_value(text: str, schema: Any) -> Any:
    """`text` read as the first of its schema's non-string types it is, else as the string itself.

    integer: a JSON integer; number: a JSON number; boolean: true / false; null: null;
    object / array: a JSON object / array. No schema, or none of these: the text.
    """
    for kind in _schema_types(schema):
        if kind == "string":
            continue
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if kind == "integer" and isinstance(value, float) and value.is_integer():
            value = int(value)  # 3.0 for an integer parameter
        if kind == "integer" and isinstance(value, int) and not isinstance(value, bool) or \
                kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool) or \
                kind == "boolean" and isinstance(value, bool) or kind == "null" and value is None or \
                kind == "object" and isinstance(value, dict) or kind == "array" and isinstance(value, list):
            return value
    return text
