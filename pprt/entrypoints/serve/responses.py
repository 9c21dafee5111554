"""The JSON the server answers with, in the OpenAI API's shapes.

Non-streamed: `chat.completion` and `text_completion` objects with `usage`.
Streamed: `chat.completion.chunk` / `text_completion` chunks as server-sent
events (`data: {...}\\n\\n`, ending with `data: [DONE]\\n\\n`). Logprobs: the
chat shape (`logprobs.content`: token, logprob, bytes, top_logprobs) and the
completions shape (tokens, token_logprobs, top_logprobs, text_offset).

Knows nothing about the engine beyond token ids and logprob dicts.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

from ...tokenizer import Tokenizer
from .tool_formats import ToolCall


def new_id(prefix: str) -> str:
    """An id as OpenAI writes them: "cmpl-...", "chatcmpl-...", "call_..."."""
    return prefix + secrets.token_hex(12)


def sse(payload: dict | str) -> bytes:
    """One server-sent event carrying `payload` (JSON, or the literal [DONE])."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(slots=True)
class Envelope:
    """What every object of one response repeats: id, creation time, model name, kind."""

    kind: str  # "chat.completion", "chat.completion.chunk" or "text_completion"
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or new_id("chatcmpl-" if self.kind.startswith("chat") else "cmpl-")

    def wrap(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}


def tool_call_json(call: ToolCall, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def tool_call_deltas(call: ToolCall, index: int, call_id: str) -> list[dict]:
    """A call streamed as OpenAI streams one: id and name first, then the arguments."""
    return [{"tool_calls": [{"index": index, "id": call_id, "type": "function",
                             "function": {"name": call.name, "arguments": ""}}]},
            {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]


class LogprobFormatter:
    """Token strings and logprob objects of one tokenizer (None: the model has none, ids are shown)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self._tokenizer = tokenizer

    def token_bytes(self, token_id: int) -> bytes:
        tok = self._tokenizer
        if tok is None:
            return str(token_id).encode()
        if tok.byte_level:
            return tok.token_bytes(token_id)
        return tok.decode([token_id]).encode()

    def token(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def chat(self, token_ids: list[int], logprobs: list[dict[int, float]], top: int) -> list[dict]:
        """`logprobs.content` entries: the chosen token and the `top` most likely."""
        out = []
        for token_id, lp in zip(token_ids, logprobs):
            ranked = sorted(lp.items(), key=lambda kv: -kv[1])[:top]
            out.append({**self._entry(token_id, lp[token_id]),
                        "top_logprobs": [self._entry(t, v) for t, v in ranked]})
        return out

    def _entry(self, token_id: int, logprob: float) -> dict:
        raw = self.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def completion(self, token_ids: list[int], logprobs: list[dict[int, float]], top: int, offset: int) -> dict:
        """The completions API's logprobs object; text_offset counts from `offset` characters."""
        tokens, values, tops, offsets = [], [], [], []
        for token_id, lp in zip(token_ids, logprobs):
            text = self.token(token_id)
            tokens.append(text)
            values.append(lp[token_id])
            ranked = sorted(lp.items(), key=lambda kv: -kv[1])[:top]
            tops.append({self.token(t): v for t, v in ranked})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
