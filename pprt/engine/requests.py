"""One request as the engine loop serves it, and what its caller receives.

A `Request` holds a sequence (scheduler.py), its text so far (incremental
detokenization, stop strings) and its sink: the function the loop calls with
each `RequestOutput`. Outputs carry the new text and tokens since the
previous one; the last one carries the `Completion` or the error that ended
the request. Knows nothing of threads or stages: the loop calls all of this
from its own thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..tokenizer import IncrementalDetokenizer
from .sequence import Sequence


@dataclass(slots=True)
class Completion:
    text: str
    token_ids: list[int]  # generated tokens only
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" or "length" ("cancelled" only in outputs of a request cancelled by LLM.cancel)
    logprobs: list[dict[int, float]] | None = None  # one dict per generated token, when asked


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """An update of one request, delivered in order on the engine loop's thread.

    text: text added since the previous output (never a split character; a tail
    that could still become a stop string is held back until it cannot).
    token_ids: tokens generated since the previous output; logprobs: theirs
    (token id -> logprob, as Completion.logprobs), when the request asked. The last output of a
    request is `finished`: it has either `completion`, or `error`, the exception
    that ended the request (StageFailed, the step that raised, the LLM closing).
    """

    request_id: int
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[dict[int, float], ...] | None = None  # one dict per token of token_ids, when asked
    completion: Completion | None = None
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.completion is not None or self.error is not None


# Called on the engine loop's thread with every output of a request: must return at once
# (e.g. queue.SimpleQueue.put, or an asyncio loop's call_soon_threadsafe).
OutputSink = Callable[[RequestOutput], None]


@dataclass(slots=True, eq=False)
class Request:
    seq: Sequence
    sink: OutputSink
    detok: IncrementalDetokenizer | None  # None: the model has no tokenizer, outputs carry no text
    text: str = ""
    emitted: int = 0  # characters of `text` already sent
    tokens_sent: int = 0  # generated tokens already sent

    @property
    def id(self) -> int:
        return self.seq.seq_id

    def push_token(self, token: int, is_stop_token: bool, last: bool = True) -> bool:
        """Add the text of one new token of the sequence; True when a stop string ends the request here.
        last: no newer token came in the same step (a finished sequence's text is flushed after it)."""
        if self.detok is None:
            return False
        if not is_stop_token:  # the text of a stop token is not output
            self.text += self.detok.push(token)
        if last and self.seq.finish_reason is not None:
            self.text += self.detok.flush()
        cut = _find_stop(self.text, self.seq.params.stop, since=self.emitted)
        if cut is None:
            return False
        self.text = self.text[:cut]
        return True

    def output(self) -> RequestOutput | None:
        """What is new since the previous output (None if nothing); final once the sequence finished."""
        seq = self.seq
        done = seq.finish_reason is not None
        hold = 0 if done else max((len(s) - 1 for s in seq.params.stop), default=0)
        end = max(self.emitted, len(self.text) - hold)
        text, self.emitted = self.text[self.emitted:end], end
        sent, self.tokens_sent = self.tokens_sent, len(seq.output_ids)
        tokens = tuple(seq.output_ids[sent:])
        logprobs = tuple(seq.logprobs[sent:]) if seq.params.logprobs is not None else None
        if done:
            return RequestOutput(self.id, text, tokens, logprobs, completion=self.completion())
        return RequestOutput(self.id, text, tokens, logprobs) if text or tokens else None

    def completion(self) -> Completion:
        seq = self.seq
        logprobs = list(seq.logprobs) if seq.params.logprobs is not None else None
        return Completion(self.text, list(seq.output_ids), list(seq.prompt_ids), seq.finish_reason, logprobs)


def _find_stop(text: str, stops: tuple[str, ...], since: int) -> int | None:
    """Index where the earliest stop string starts in `text` (searching from near `since`)."""
    found = [i for s in stops if (i := text.find(s, max(0, since - len(s)))) >= 0]
    return min(found) if found else None
