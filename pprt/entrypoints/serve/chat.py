"""A chat request rendered into the prompt text the model completes, and how to read its reply.

- Messages become what the chat templates read: a `developer` message is a
  `system` one (Qwen templates know no `developer`), text parts are joined,
  and an earlier call's `arguments`, which OpenAI clients send as a JSON
  string, is parsed into a mapping (the Qwen3.5 / Qwen3-Coder templates
  iterate over it; the hermes ones accept either).
- Tools are rendered by the model's template unless tool_choice is "none".
  "required" or a named function is enforced by starting the reply in the
  prompt: `<tool_call>` (and the function's name) is appended after the
  generation prompt, after closing a `<think>` the template left open (the
  reply is then a call, not reasoning). The reply parser is fed that prefix
  first, so the call it starts is read whole.
- The tool-call format is the one the template writes (`<function=` in it:
  xml; `<tool_call>`: hermes), else the family's (Qwen3.5: xml, others:
  hermes), unless the server was told (--tool-call-parser).
- Whether the reply starts inside reasoning is read from the rendered prompt
  (it ends inside an open `<think>`), not from the model family.

Knows nothing about HTTP or the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jinja2

from ...tokenizer import Tokenizer
from .output_parser import THINK_CLOSE, THINK_OPEN, OutputParser
from .protocol import ChatCompletionRequest, NamedToolChoice, RequestError
from .tool_formats import FORMATS, ToolFormat, Tools

# chat_template_kwargs may not replace what the server itself passes to the template
_RESERVED_TEMPLATE_ARGS = ("messages", "tools", "documents", "add_generation_prompt")
_XML_FAMILIES = ("qwen3_5", "qwen3_5_moe", "qwen3_next", "qwen3_coder")


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    text: str  # the prompt, forced reply start included
    forced_prefix: str  # the reply's start written into the prompt ("" when none)
    starts_in_reasoning: bool
    tool_format: ToolFormat | None  # None: the reply is not searched for calls
    tools: Tools  # name -> parameters schema

    def parser(self, reasoning: bool) -> OutputParser:
        """A reply parser for one choice, already fed the forced start."""
        parser = OutputParser(reasoning=reasoning, starts_in_reasoning=self.starts_in_reasoning,
                              tool_format=self.tool_format, tools=self.tools)
        if self.forced_prefix:
            parser.push(self.forced_prefix)  # nothing is decided before the call closes
        return parser


def pick_tool_format(tokenizer: Tokenizer, model_type: str, override: str | None = None) -> ToolFormat:
    """The call format this model writes (see the module docstring)."""
    if override is not None:
        return FORMATS[override]
    template = tokenizer.chat_template or ""
    if "<function=" in template:
        return FORMATS["xml"]
    if "<tool_call>" in template:
        return FORMATS["hermes"]
    return FORMATS["xml"] if model_type in _XML_FAMILIES else FORMATS["hermes"]


def opens_reasoning(prompt: str) -> bool:
    """True when `prompt` ends inside a `<think>` it opened and did not close."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


def template_messages(request: ChatCompletionRequest) -> list[dict]:
    """The request's messages as the chat template reads them (RequestError names a bad one)."""
    out = []
    for i, m in enumerate(request.messages):
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(m, key) is not None:
                message[key] = getattr(m, key)
        if m.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name,
                              "arguments": _arguments(c.function.arguments,
                                                      f"messages[{i}].tool_calls[{j}].function.arguments")}}
                for j, c in enumerate(m.tool_calls)]
        out.append(message)
    return out


def _arguments(arguments: str | dict, param: str) -> dict:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments)
    except ValueError as e:
        raise RequestError(400, f"{param} is not JSON ({e})", param) from None
    if not isinstance(value, dict):
        raise RequestError(400, f"{param} must be a JSON object, got {arguments[:60]!r}", param)
    return value


def build_chat_prompt(tokenizer: Tokenizer, request: ChatCompletionRequest, tool_format: ToolFormat) -> ChatPrompt:
    """Render the request with the model's chat template (RequestError for what the template refuses)."""
    if not tokenizer.has_chat_template:
        raise RequestError(400, f"model {request.model!r} has no chat template: it is a completion model "
                           "(use /v1/completions)", "messages")
    kwargs = dict(request.chat_template_kwargs or {})
    for key in _RESERVED_TEMPLATE_ARGS:
        if key in kwargs:
            raise RequestError(400, f"chat_template_kwargs may not set {key!r}", f"chat_template_kwargs.{key}")
    choice = request.tool_choice or "auto"
    use_tools = bool(request.tools) and choice != "none"
    tools = [t.model_dump(exclude_none=True) for t in request.tools] if use_tools else None
    try:
        text = tokenizer.apply_chat_template(template_messages(request), add_generation_prompt=True,
                                             tools=tools, **kwargs)
    except jinja2.TemplateError as e:  # the template's own raise_exception, or a message it cannot render
        raise RequestError(400, f"the chat template refused the messages: {e}", "messages") from None
    except (TypeError, ValueError) as e:
        raise RequestError(400, f"cannot render the chat template: {e}", "messages") from None
    schemas = {t.function.name: t.function.parameters or {} for t in request.tools or ()} if use_tools else {}
    prefix = ""
    if use_tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
        if opens_reasoning(text):
            text += "\n" + THINK_CLOSE + "\n\n"  # the template's own empty reasoning: <think>\n\n</think>\n\n
        prefix = tool_format.forced_prefix(choice.function.name if isinstance(choice, NamedToolChoice) else None)
        text += prefix
    return ChatPrompt(text, prefix, opens_reasoning(text), tool_format if use_tools else None, schemas)
