"""Generated chat text split, as it streams, into reasoning, content and tool calls.

`OutputParser` takes the reply's text in pieces of any size and returns
events: `Reasoning(text)`, `Content(text)` and `ToolCall`s. The result never
depends on where the pieces break: every decision waits until the text that
decides it has arrived (a tail that could still become a tag is held back),
and `parse(text)` is the same machine fed one piece.

The rules (shared/QWEN.md sections 6 and 9):
- Reasoning is the text between `<think>` and `</think>`. The reply opens it
  with `<think>` (leading whitespace allowed), or the prompt already did
  (`starts_in_reasoning`: the rendered prompt ends inside an open `<think>`,
  as Qwen3.5's template and the thinking-only Qwen3 templates leave it); then
  only `</think>` appears. An unclosed reasoning (the reply cut by max_tokens)
  stays reasoning.
- A tool call is `<tool_call>BODY</tool_call>` whose BODY the request's tool
  format reads as a call to one of the request's tools (tool_formats.py).
  Calls are found in the content and inside the reasoning (Qwen3.5 with
  thinking on sometimes writes its call there without closing `</think>`);
  they are taken out of the text around them.
- Anything else is text of the part it is in: a `<tool_call>` whose body is
  not a valid call (bad JSON, an unknown tool, no closing tag) is plain text,
  and the text after its opening tag is read again for tags.
- Whitespace that touches a tag (`<think>`, `</think>`, a valid call) is
  dropped, as the chat templates strip it when they render the turn again;
  whitespace elsewhere is kept.

Knows nothing about HTTP, tokens or models.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .tool_formats import CALL_CLOSE, CALL_OPEN, ToolCall, ToolFormat, Tools

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# A format judges whether a body can start a call from its first characters: this many are
# plenty (whitespace and "<function="), and the check stays O(1) while a long call streams.
_START_WINDOW = 64


@dataclass(frozen=True, slots=True)
class Reasoning:
    text: str


@dataclass(frozen=True, slots=True)
class Content:
    text: str


Event = Reasoning | Content | ToolCall


class _Mode(enum.Enum):
    START = "start"  # nothing decided yet: the reply may open <think>
    REASONING = "reasoning"
    CONTENT = "content"
    CALL = "call"  # inside <tool_call>, waiting for </tool_call>


@dataclass(slots=True)
class ParsedReply:
    """A whole reply: reasoning and content are None when empty."""

    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall]


class OutputParser:
    """Incremental split of one reply (see the module docstring).

    reasoning: recognise <think> ... </think> (the model has a `</think>` token).
    starts_in_reasoning: the prompt ends inside an open <think>.
    tool_format, tools: recognise calls to these tools in this format (None: no calls).
    """

    def __init__(self, *, reasoning: bool = False, starts_in_reasoning: bool = False,
                 tool_format: ToolFormat | None = None, tools: Tools | None = None) -> None:
        self._reasoning = reasoning or starts_in_reasoning
        self._format = tool_format if tools else None
        self._tools = tools or {}
        self._buf = ""  # text not yet decided
        self._mode = _Mode.REASONING if starts_in_reasoning else _Mode.START if reasoning else _Mode.CONTENT
        self._strip = starts_in_reasoning  # drop whitespace until the next other character (after a tag)
        self._space = ""  # whitespace at the end of the current part, kept until what follows decides
        self._outer = _Mode.CONTENT  # in CALL: the part the call is in (REASONING or CONTENT)
        self._body = ""  # in CALL: the call's text after <tool_call>
        self._events: list[Event] = []
        self._done = False

    def push(self, text: str) -> list[Event]:
        """Take the next piece; returns the events it decides (possibly none)."""
        if self._done:
            raise RuntimeError("push() after finish()")
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[Event]:
        """The reply has ended: decide everything held back."""
        if not self._done:
            self._done = True
            self._run(final=True)
            if self._space:
                self._emit(self._space)
                self._space = ""
        return self._take()

    def _take(self) -> list[Event]:
        """The events since the last call, neighbours of one part merged."""
        merged: list[Event] = []
        for e in self._events:
            if merged and type(e) is type(merged[-1]) and not isinstance(e, ToolCall):
                merged[-1] = type(e)(merged[-1].text + e.text)
            else:
                merged.append(e)
        self._events = []
        return merged

    # ---- the machine --------------------------------------------------------------------------
    def _run(self, final: bool) -> None:
        while True:
            mode = self._mode
            if mode is _Mode.START:
                if not self._start(final):
                    return
            elif mode is _Mode.CALL:
                if not self._call(final):
                    return
            elif not self._text(final):
                return

    def _start(self, final: bool) -> bool:
        head = self._buf.lstrip()
        if head.startswith(THINK_OPEN):
            self._buf = head[len(THINK_OPEN):]
            self._mode, self._strip = _Mode.REASONING, True
            return True
        if not final and THINK_OPEN.startswith(head):  # "", "<", "<th", ...: not decided yet
            return False
        self._mode = _Mode.CONTENT
        return True

    def _markers(self) -> tuple[str, ...]:
        markers = (THINK_CLOSE,) if self._mode is _Mode.REASONING else ()
        return markers + ((CALL_OPEN,) if self._format is not None else ())

    def _text(self, final: bool) -> bool:
        """REASONING or CONTENT: pass text on up to the next tag. False: wait for more text."""
        markers = self._markers()
        found = [(i, m) for m in markers if (i := self._buf.find(m)) >= 0]
        if not found:
            hold = 0 if final else _held_tail(self._buf, markers)
            self._part_text(self._buf[:len(self._buf) - hold])
            self._buf = self._buf[len(self._buf) - hold:]
            return False
        i, marker = min(found)
        self._part_text(self._buf[:i])
        self._buf = self._buf[i + len(marker):]
        if marker == THINK_CLOSE:
            self._space, self._strip = "", True
            self._mode = _Mode.CONTENT
        else:  # <tool_call>: the space before it waits for the verdict on the call
            self._outer, self._mode, self._body = self._mode, _Mode.CALL, ""
        return True

    def _call(self, final: bool) -> bool:
        """CALL: wait for </tool_call>, then keep the call or give its opening tag back as text."""
        searched = max(0, len(self._body) - len(CALL_CLOSE) + 1)  # no </tool_call> ends before this
        self._body += self._buf
        self._buf = ""
        end = self._body.find(CALL_CLOSE, searched)
        if end >= 0:
            call = self._format.parse(self._body[:end], self._tools)
            if call is not None:
                self._events.append(call)
                self._buf = self._body[end + len(CALL_CLOSE):]
                self._space, self._strip = "", True
                self._mode = self._outer
                return True
        elif not final and self._format.could_start(self._body[:_START_WINDOW]):
            return False  # maybe a call: wait for its end
        # not a call: "<tool_call>" is text, and what follows it is read again
        self._mode = self._outer
        self._part_text(CALL_OPEN)
        self._buf = self._body
        return True

    def _part_text(self, text: str) -> None:
        """Text of the current part, whitespace at its edges held or dropped (module docstring)."""
        if self._strip:
            text = text.lstrip()
            if not text:
                return
            self._strip = False
        if not text:
            return
        text = self._space + text
        kept = text.rstrip()
        self._space = text[len(kept):]
        if kept:
            self._emit(kept)

    def _emit(self, text: str) -> None:
        part = self._outer if self._mode is _Mode.CALL else self._mode
        self._events.append(Reasoning(text) if part is _Mode.REASONING else Content(text))


def _held_tail(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of a marker (it may still become one)."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


def parse(text: str, **options) -> ParsedReply:
    """A whole reply at once (the same machine as streaming; options as OutputParser's)."""
    parser = OutputParser(**options)
    return collect(parser.push(text) + parser.finish())


def collect(events: list[Event]) -> ParsedReply:
    """The reply that a stream of events adds up to."""
    reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
    content = "".join(e.text for e in events if isinstance(e, Content))
    return ParsedReply(reasoning or None, content or None, [e for e in events if isinstance(e, ToolCall)])
