"""The OpenAI API's request bodies (pydantic models) and its error object.

Requests follow OpenAI's API reference for `POST /v1/completions` and
`POST /v1/chat/completions`, plus the sampling fields vLLM adds that pprt's
`SamplingParams` has (top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids) and `chat_template_kwargs`. Models are strict: a string for
a number, an unknown field, a value out of range is refused, and
`RequestError.from_validation` names the field in OpenAI's error object
(`{"error": {"message", "type", "param", "code"}}`). Checks that need the
model (the prompt's length, a tool choice's name) are the app's.

Knows nothing about HTTP routing, the engine or the chat template.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ...params import PENALTY_LIMIT, SEED_LIMIT

MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs (and the completions API's logprobs)
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names


class RequestError(Exception):
    """A request the server refuses: HTTP `status` with OpenAI's error object naming `param`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}

    @classmethod
    def from_validation(cls, error: ValidationError) -> RequestError:
        """400 naming the field of the most specific of pydantic's errors."""
        best = max(error.errors(), key=lambda e: len(_field_path(e["loc"])))
        param = _format_path(_field_path(best["loc"]))
        if best["type"] == "extra_forbidden":
            return cls(400, f"unknown parameter {param!r}", param)
        if best["type"] == "missing":
            return cls(400, f"{param} is required", param)
        where = param or "the request body"
        return cls(400, f"{where}: {best['msg']} (got {_short(best.get('input'))})", param or None)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc: tuple) -> list:
    """pydantic's error location without the tags it adds for members of a union ('str', 'list[int]', 'Tool')."""
    return [x for x in loc if isinstance(x, int) or re.fullmatch(r"[a-z_][a-z0-9_]*", x) and x not in _TYPE_TAGS]


def _format_path(path: list) -> str:
    out = ""
    for x in path:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else x)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingRequest(_Strict):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)  # None: up to the rest of the context
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)
    frequency_penalty: float | None = Field(None, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, unused

    @model_validator(mode="after")
    def _check_shared(self):
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        for i, s in enumerate(stops):
            if not s:
                raise RequestError(400, "stop strings must not be empty", "stop" if isinstance(self.stop, str)
                                   else f"stop[{i}]")
        if self.stream_options is not None and not self.stream:
            raise RequestError(400, "stream_options is only allowed when stream is true", "stream_options")
        for i, t in enumerate(self.stop_token_ids or ()):
            if t < 0:
                raise RequestError(400, f"stop_token_ids[{i}] must be >= 0, got {t}", f"stop_token_ids[{i}]")
        return self


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions`: one prompt (text or token ids) or a list of them."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _check_completion(self):
        if self.prompt == [] or self.prompt == "":
            raise RequestError(400, "prompt must not be empty", "prompt")
        if isinstance(self.prompt, list):
            for i, p in enumerate(self.prompt):
                if p == [] or p == "":
                    raise RequestError(400, f"prompt[{i}] must not be empty", f"prompt[{i}]")
        for name, unset in (("echo", not self.echo), ("suffix", self.suffix is None),
                            ("logit_bias", not self.logit_bias), ("best_of", self.best_of in (None, self.n))):
            if not unset:
                raise RequestError(400, f"{name} is not supported", name)
        return self


class ToolFunction(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: ToolFunction


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(_Strict):
    name: str
    arguments: str | dict[str, Any]  # OpenAI clients send a JSON string


class MessageToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @property
    def text(self) -> str | None:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(SamplingRequest):
    """`POST /v1/chat/completions`."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; a reply may carry several calls either way
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        names = []
        for i, tool in enumerate(self.tools or ()):
            if not TOOL_NAME.fullmatch(tool.function.name):
                raise RequestError(400, f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', got "
                                   f"{tool.function.name!r}", f"tools[{i}].function.name")
            if tool.function.name in names:
                raise RequestError(400, f"tools[{i}].function.name {tool.function.name!r} is given twice",
                                   f"tools[{i}].function.name")
            names.append(tool.function.name)
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise RequestError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                               "tool_choice.function.name")
        if choice == "required" and not names:
            raise RequestError(400, "tool_choice 'required' needs tools", "tool_choice")
        for i, m in enumerate(self.messages):
            if m.role in ("system", "developer", "user", "tool") and m.content is None:
                raise RequestError(400, f"messages[{i}].content is required for role {m.role!r}",
                                   f"messages[{i}].content")
            if m.tool_calls and m.role != "assistant":
                raise RequestError(400, f"messages[{i}].tool_calls is only for role 'assistant'",
                                   f"messages[{i}].tool_calls")
        return self

    @property
    def completion_limit(self) -> int | None:
        """max_completion_tokens, else max_tokens (deprecated by OpenAI but still sent)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
