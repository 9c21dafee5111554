"""Chat templates rendered exactly as transformers' `apply_chat_template` renders them.

A checkpoint's chat template is a Jinja program. `ChatTemplates` holds a
checkpoint's templates (one, or several by name) and renders them in the
environment transformers sets up (transformers/utils/chat_template_utils.py,
`_compile_jinja_template` and `render_jinja_template`), so a fine-tune's
template renders here whenever it renders there:
- a sandboxed, immutable environment with trim_blocks and lstrip_blocks;
- `{% break %}` / `{% continue %}` (jinja2's loop controls);
- `{% generation %} ... {% endgeneration %}`, which TRL-trained checkpoints put
  around assistant turns to mark them for training masks: it renders its body
  unchanged (the markers print nothing);
- `raise_exception(message)` (a jinja2.TemplateError), `strftime_now(format)`
  (local time), `dict(...)`, and a `namespace(...)` that refuses attributes
  starting with an underscore;
- a `tojson` filter that does not HTML-escape and takes `ensure_ascii`,
  `indent`, `separators` and `sort_keys`.

The template sees `messages`, `tools` and `documents` (None when not given),
`add_generation_prompt`, the tokenizer's named special tokens (`eos_token`,
`pad_token`, ...; only those that are set) and the caller's keyword arguments,
which win over the special tokens. Messages are prepared as transformers
prepares them: keys whose value is None are dropped, and a reasoning given
as `reasoning_content`, `thinking` or `reasoning` is passed under
`reasoning_content` (and `thinking`), the names templates read.

Knows nothing about token ids, files or models.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The names a message's reasoning may come under; the first is what Qwen templates read.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}` renders `body` unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` in a template, without the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes (no reach into internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat template namespace attribute {name!r} starts with '_'")


def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in transformers' environment (see the module docstring).

    Raises jinja2.TemplateSyntaxError for a template that does not parse.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def prepare_messages(messages: Any) -> list[dict]:
    """Copies of `messages` as transformers passes them to a template: None values dropped,
    reasoning aliased under `reasoning_content` and `thinking`. Raises TypeError for a
    message that is not a mapping and ValueError for an empty conversation."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("cannot render a chat template over an empty conversation: give at least one message")
    prepared = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"each message must be a dict, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


class ChatTemplates:
    """A checkpoint's chat templates: one, or several by name ("default", "tool_use", ...)."""

    def __init__(self, templates: Mapping[str, str], special_tokens: Mapping[str, str] | None = None,
                 source: str = "tokenizer") -> None:
        if not templates:
            raise ValueError(f"{source}: no chat template given")
        for name, text in templates.items():
            if not isinstance(text, str):
                raise ValueError(f"{source}: chat template {name!r} must be a string, got {type(text).__name__}")
        self.templates = dict(templates)
        self.special_tokens = dict(special_tokens or {})
        self._source = source
        self._compiled: dict[str, jinja2.Template] = {}

    def pick(self, tools: Any = None) -> str:
        """The name of the template to render: the only one; else "tool_use" when tools are
        given and there is one; else "default" (transformers' `get_chat_template` rule)."""
        if len(self.templates) == 1:
            return next(iter(self.templates))
        if tools is not None and "tool_use" in self.templates:
            return "tool_use"
        if "default" in self.templates:
            return "default"
        raise ValueError(f"{self._source}: the model has several chat templates {sorted(self.templates)} "
                         "and none is named 'default'")

    def render(self, messages: Any, add_generation_prompt: bool = True, tools: Any = None,
               documents: Any = None, **kwargs: Any) -> str:
        """The prompt text of `messages`; kwargs reach the template as variables
        (enable_thinking, ...). Raises jinja2.TemplateError from the template itself."""
        name = self.pick(tools)
        if name not in self._compiled:
            self._compiled[name] = compile_template(self.templates[name])
        variables = {**self.special_tokens, **kwargs}
        return self._compiled[name].render(messages=prepare_messages(messages), tools=tools, documents=documents,
                                           add_generation_prompt=add_generation_prompt, **variables)
