"""The two generation endpoints: a validated request becomes engine requests, their outputs the OpenAI answer.

`POST /v1/completions` and `POST /v1/chat/completions`, streamed (server-sent
events) or not. A request turns into `n` engine requests per prompt, all
submitted at once so they join the running batch (run.py). A chat reply
goes through the output parser (reasoning, content, tool calls); its
finish_reason is "tool_calls" when it called a tool and stopped.

Errors before the first byte are HTTP errors (RequestError); once a stream
has started, an error ends it with an `{"error": ...}` event.

Knows nothing about routing, authentication or the body's transport.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .chat import ChatPrompt, build_chat_prompt
from .metrics import ServerMetrics
from .models import ServedModel
from .output_parser import Content, OutputParser, Reasoning
from .protocol import ChatCompletionRequest, CompletionRequest, RequestError
from .responses import (SSE_DONE, Envelope, LogprobFormatter, new_id, sse, tool_call_deltas, tool_call_json,
                        usage)
from .run import Run, check_prompt, sampling
from .tool_formats import ToolCall

# ---- /v1/completions -------------------------------------------------------------------------------

def completion_prompts(req: CompletionRequest, served: ServedModel) -> list[list[int]]:
    prompts = req.prompt
    if isinstance(prompts, str) or prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    ids = []
    for i, p in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            if served.llm.tokenizer is None:
                raise RequestError(400, f"model {served.name!r} has no tokenizer: give the prompt as token ids", param)
            p = served.llm.tokenizer.encode(p)
        check_prompt(served, p, param)
        ids.append(p)
    return ids


def start_completion(req: CompletionRequest, served: ServedModel, metrics: ServerMetrics,
                     lora: str | None = None) -> tuple[Run, list]:
    """lora: the adapter of `served` that the request's `model` named (None: the base model)."""
    served.check_up()
    prompts = completion_prompts(req, served)
    requests = [(ids, sampling(req, served, len(ids), req.max_tokens, req.logprobs, j, lora))
                for ids in prompts for j in range(req.n)]
    limit_param = "max_tokens" if req.max_tokens is not None else None
    return Run.start(served, metrics, requests, "prompt", limit_param), prompts


async def _finished(run: Run) -> dict:
    """{choice index: Completion} of every request of `run`, once all have finished."""
    done = {}
    async for index, out in run.outputs():
        if out.finished:
            done[index] = out.completion
    return done


async def completion_result(req: CompletionRequest, run: Run, prompts: list) -> dict:
    env = Envelope("text_completion", req.model)
    fmt = LogprobFormatter(run.served.llm.tokenizer)
    done = await _finished(run)
    choices = []
    for index in sorted(done):
        c = done[index]
        logprobs = fmt.completion(c.token_ids, c.logprobs, req.logprobs, 0) if req.logprobs is not None else None
        choices.append({"index": index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason})
    generated = sum(len(c.token_ids) for c in done.values())
    return env.wrap(choices, usage=usage(sum(len(p) for p in prompts), generated))


async def completion_events(req: CompletionRequest, run: Run, prompts: list) -> AsyncIterator[bytes]:
    env = Envelope("text_completion", req.model)
    fmt = LogprobFormatter(run.served.llm.tokenizer)
    offsets: dict[int, int] = {}
    generated = 0
    async for index, out in _guarded(run):
        if isinstance(out, bytes):
            yield out
            return
        logprobs = None
        if req.logprobs is not None:
            logprobs = fmt.completion(list(out.token_ids), list(out.logprobs or ()), req.logprobs,
                                      offsets.get(index, 0))
        offsets[index] = offsets.get(index, 0) + len(out.text)
        generated += len(out.token_ids)
        reason = out.completion.finish_reason if out.finished else None
        yield sse(env.wrap([{"index": index, "text": out.text, "logprobs": logprobs, "finish_reason": reason}]))
    if req.stream_options and req.stream_options.include_usage:
        yield sse(env.wrap([], usage=usage(sum(len(p) for p in prompts), generated)))
    yield SSE_DONE


# ---- /v1/chat/completions ---------------------------------------------------------------------------

def start_chat(req: ChatCompletionRequest, served: ServedModel, metrics: ServerMetrics,
               lora: str | None = None) -> tuple[Run, ChatPrompt, int]:
    """lora: the adapter of `served` that the request's `model` named (None: the base model)."""
    llm = served.check_up()
    if llm.tokenizer is None:
        raise RequestError(400, f"model {served.name!r} has no tokenizer: use /v1/completions with token ids",
                           "messages")
    prompt = build_chat_prompt(llm.tokenizer, req, served.tool_format)
    ids = llm.tokenizer.encode(prompt.text)
    check_prompt(served, ids, "messages")
    top = (req.top_logprobs or 0) if req.logprobs else None
    requests = [(ids, sampling(req, served, len(ids), req.completion_limit, top, j, lora)) for j in range(req.n)]
    limit_param = None if req.completion_limit is None else \
        "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    return Run.start(served, metrics, requests, "messages", limit_param), prompt, len(ids)


@dataclass(slots=True)
class _Reply:
    """One choice of a chat reply as it streams."""

    parser: OutputParser
    calls: list[tuple[str, ToolCall]] = field(default_factory=list)  # (id, call)

    def deltas(self, events: list) -> list[dict]:
        out = []
        for e in events:
            if isinstance(e, Reasoning):
                out.append({"reasoning_content": e.text})
            elif isinstance(e, Content):
                out.append({"content": e.text})
            else:
                call_id = new_id("call_")
                out += tool_call_deltas(e, len(self.calls), call_id)
                self.calls.append((call_id, e))
        return out

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls and reason == "stop" else reason


async def chat_result(req: ChatCompletionRequest, run: Run, prompt: ChatPrompt, prompt_len: int) -> dict:
    env = Envelope("chat.completion", req.model)
    fmt = LogprobFormatter(run.served.llm.tokenizer)
    done = await _finished(run)
    choices = []
    for index in sorted(done):
        c = done[index]
        reply = _Reply(prompt.parser(run.served.reasoning))
        events = reply.parser.push(c.text) + reply.parser.finish()
        reply.deltas(events)
        reasoning = "".join(e.text for e in events if isinstance(e, Reasoning)) or None
        content = "".join(e.text for e in events if isinstance(e, Content)) or None
        # OpenAI: content is null beside tool calls, a string otherwise
        message = {"role": "assistant", "content": content if content is not None or reply.calls else ""}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if reply.calls:
            message["tool_calls"] = [tool_call_json(call, call_id) for call_id, call in reply.calls]
        logprobs = {"content": fmt.chat(c.token_ids, c.logprobs, req.top_logprobs or 0)} if req.logprobs else None
        choices.append({"index": index, "message": message, "logprobs": logprobs,
                        "finish_reason": reply.finish_reason(c.finish_reason)})
    generated = sum(len(c.token_ids) for c in done.values())
    return env.wrap(choices, usage=usage(prompt_len, generated))


async def chat_events(req: ChatCompletionRequest, run: Run, prompt: ChatPrompt, prompt_len: int
                      ) -> AsyncIterator[bytes]:
    env = Envelope("chat.completion.chunk", req.model)
    fmt = LogprobFormatter(run.served.llm.tokenizer)
    replies = {j: _Reply(prompt.parser(run.served.reasoning)) for j in range(req.n)}
    for j in range(req.n):
        yield sse(env.wrap([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]))
    generated = 0
    async for index, out in _guarded(run):
        if isinstance(out, bytes):
            yield out
            return
        reply = replies[index]
        generated += len(out.token_ids)
        deltas = reply.deltas(reply.parser.push(out.text) + (reply.parser.finish() if out.finished else []))
        logprobs = None
        if req.logprobs and out.token_ids:
            logprobs = {"content": fmt.chat(list(out.token_ids), list(out.logprobs or ()), req.top_logprobs or 0)}
        if logprobs is not None and not deltas:
            deltas = [{}]
        for k, delta in enumerate(deltas):
            yield sse(env.wrap([{"index": index, "delta": delta, "logprobs": logprobs if k == 0 else None,
                                 "finish_reason": None}]))
        if out.finished:
            reason = reply.finish_reason(out.completion.finish_reason)
            yield sse(env.wrap([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}]))
    if req.stream_options and req.stream_options.include_usage:
        yield sse(env.wrap([], usage=usage(prompt_len, generated)))
    yield SSE_DONE


async def _guarded(run: Run) -> AsyncIterator:
    """run.outputs(), with an error once streaming has begun turned into (None, the last bytes to send):
    an error event and [DONE]."""
    try:
        async for item in run.outputs():
            yield item
    except RequestError as e:
        yield None, sse(e.body()) + SSE_DONE
    except Exception as e:  # a step that raised: this request ends, the server goes on
        yield None, sse(RequestError(500, f"generation failed: {type(e).__name__}: {e}", None,
                                     kind="server_error").body()) + SSE_DONE
