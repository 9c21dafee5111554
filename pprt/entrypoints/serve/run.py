"""One HTTP request's engine requests: their SamplingParams, admission, submission, latency metrics.

`sampling` turns the request's fields into one choice's SamplingParams
(choice j of a seeded request draws with seed + j; without max_tokens a
choice may generate up to the rest of the context, as far as the KV pool can
hold it). `Run.start` submits every choice at once (they join the running
batch) after the model's --max-waiting admission, and maps what the LLM
refuses to a 400 naming the field, or a 503 when the model's engine has
stopped. `Run.outputs` streams (choice, RequestOutput), observing the
time-to-first-token and inter-token latency histograms, and marks the model
failed when a stage fails; `Run.close` cancels what still runs (a client gone).

Knows nothing about the OpenAI answers' shapes or HTTP.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ...engine.async_llm import RequestStream
from ...errors import RequestTooLarge, StageFailed
from ...params import SEED_LIMIT, SamplingParams
from .metrics import ServerMetrics
from .models import ServedModel
from .protocol import RequestError, SamplingRequest


def check_prompt(served: ServedModel, ids: list[int], param: str) -> None:
    """400 naming both numbers when the prompt leaves no room to generate."""
    limit = served.llm.max_context
    if len(ids) >= limit:
        raise RequestError(400, f"the prompt has {len(ids)} tokens, but model {served.name!r} has a max_context of "
                           f"{limit} tokens (at most {limit - 1} prompt tokens, to generate one)", param)


def sampling(req: SamplingRequest, served: ServedModel, prompt_len: int, limit: int | None,
             logprobs: int | None, choice: int, lora: str | None = None) -> SamplingParams:
    """The SamplingParams of one choice (RequestError 400 for what SamplingParams refuses); `lora`:
    the LoRA adapter the request's `model` named (None: the base model)."""
    if limit is None:  # the rest of the context, as far as the KV pool can hold this sequence
        blocks = served.llm.blocks
        limit = max(1, min(served.llm.max_context, blocks.num_blocks * blocks.block_size + 1) - prompt_len)
    seed = None if req.seed is None else (req.seed + choice) % SEED_LIMIT
    try:
        return SamplingParams(
            max_tokens=limit, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, seed=seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos, logprobs=logprobs, lora=lora)
    except ValueError as e:
        field_name = str(e).split(" ", 1)[0]
        raise RequestError(400, str(e), field_name) from None


@dataclass(slots=True)
class Run:
    """The engine requests of one HTTP request: admission, latency metrics, failure of the model."""

    served: ServedModel
    metrics: ServerMetrics
    stream: RequestStream
    prompt_param: str
    started: float = field(default_factory=time.monotonic)
    waiting: set[int] = field(default_factory=set)  # choices without a first token yet
    last: dict[int, float] = field(default_factory=dict)

    @classmethod
    def start(cls, served: ServedModel, metrics: ServerMetrics, requests: list, prompt_param: str,
              limit_param: str | None = None) -> Run:
        """Submit `requests` (all or none); RequestError 400 for a refused prompt, 503 for a model
        that does not serve or has too many requests waiting. `limit_param`: the field that set
        max_tokens (None when the server chose it), named when the KV pool cannot hold the request."""
        served.check_up()
        served.admit(len(requests))
        try:
            stream = served.engine.submit(requests)
        except BaseException as e:
            served.waiting -= len(requests)
            if isinstance(e, (RequestTooLarge, ValueError)):
                raise RequestError(400, str(e), _refused_param(e, prompt_param, limit_param)) from None
            if isinstance(e, RuntimeError):  # the engine loop has ended (a stage died)
                served.fail(e)
                raise RequestError(503, f"model {served.name!r} is not available: {e}", "model",
                                   kind="service_unavailable") from None
            raise
        return cls(served, metrics, stream, prompt_param, waiting=set(range(len(requests))))

    async def outputs(self) -> AsyncIterator:
        """(choice, RequestOutput) as they come; the model is marked failed when a stage fails."""
        try:
            async for index, out in self.stream:
                self._observe(index, out)
                yield index, out
        except StageFailed as e:
            self.served.fail(e)
            raise RequestError(503, f"model {self.served.name!r} failed: {e}", "model",
                               kind="service_unavailable") from None
        finally:
            self.close()

    def close(self) -> None:
        """Cancel what still runs and stop counting it as waiting (idempotent)."""
        self.stream.cancel()
        self.served.waiting -= len(self.waiting)
        self.waiting.clear()

    def _observe(self, index: int, out) -> None:
        now, name = time.monotonic(), self.served.name
        if index in self.waiting:
            self.waiting.discard(index)
            self.served.waiting -= 1
            if out.token_ids:
                self.metrics.time_to_first_token.labels(name).observe(now - self.started)
        elif out.token_ids and index in self.last:
            self.metrics.inter_token_latency.labels(name).observe((now - self.last[index]) / len(out.token_ids))
        self.last[index] = now


def _refused_param(error: Exception, prompt_param: str, limit_param: str | None) -> str:
    """The request field that LLM.submit's refusal is about."""
    message = str(error)
    if message.startswith("stop_token_ids"):
        return "stop_token_ids"
    if limit_param is not None and isinstance(error, RequestTooLarge) and "max_tokens" in message:
        return limit_param  # the prompt fits; prompt + max_tokens does not
    return prompt_param
