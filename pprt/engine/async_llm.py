"""AsyncLLM: the asyncio face of an LLM, what an HTTP server awaits.

`LLM.submit` hands a request to the engine loop's thread, which calls a sink
with every `RequestOutput`; here each sink puts the output on an
`asyncio.Queue` of the caller's event loop (`call_soon_threadsafe`), so a
coroutine can `async for` over its requests' outputs while the engine serves
every other caller in the same running batch. `RequestStream.cancel` (or
leaving `async with`) cancels the requests still running, and the engine
frees their KV blocks at its next step: a server calls it when its client
goes away.

Knows nothing about HTTP or the OpenAI API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ..params import SamplingParams
from .llm import LLM
from .requests import RequestOutput


class RequestStream:
    """The outputs of requests submitted together, as (index, output) in arrival order.

    An output's error (StageFailed, ...) is raised when it comes. Iteration ends after
    every request's finished output.
    """

    def __init__(self, llm: LLM, requests: Sequence[tuple[str | list[int], SamplingParams]]) -> None:
        self._llm = llm
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self._ids: list[int] = []
        self._running: set[int] = set()

        def sink_of(index: int):
            def sink(out: RequestOutput) -> None:  # on the engine loop's thread: hand over and return
                loop.call_soon_threadsafe(self._queue.put_nowait, (index, out))
            return sink

        try:
            for index, (prompt, sampling) in enumerate(requests):
                self._ids.append(llm.submit(prompt, sampling, sink_of(index)))
                self._running.add(index)
        except BaseException:
            self.cancel()  # one refused: none of them runs
            raise

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._running:
            raise StopAsyncIteration
        index, out = await self._queue.get()
        if out.finished:
            self._running.discard(index)
        if out.error is not None:
            self.cancel()
            raise out.error
        return index, out

    @property
    def done(self) -> bool:
        return not self._running

    def cancel(self) -> None:
        """Cancel every request still running (those finished are left alone); idempotent."""
        for index in self._running:
            self._llm.cancel(self._ids[index])
        self._running.clear()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()


class AsyncLLM:
    """Submit requests to `llm` from a coroutine and stream their outputs."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    def submit(self, requests: Sequence[tuple[str | list[int], SamplingParams]]) -> RequestStream:
        """Start several requests together (they join the running batch at the next step).

        Raises at once, and starts none, when the LLM refuses one (ValueError, RequestTooLarge,
        RuntimeError once closed). Call it from a running event loop.
        """
        return RequestStream(self.llm, requests)
