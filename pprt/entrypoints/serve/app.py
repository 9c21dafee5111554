"""The ASGI app: routes, the bearer token, the body limit, errors as OpenAI error objects.

Routes: GET /health, GET /metrics, GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (generation.py). With an API key, every /v1 route
needs `Authorization: Bearer KEY` (401 otherwise); /health and /metrics stay
open for probes and scrapers. A body over `max_body_bytes` is refused with
413 before it is read whole. The request's `model` picks the served model
(404 for an unknown one; 503 while it does not serve), or one of its LoRA
adapters: as vLLM does, /v1/models lists each loaded adapter as a model of
its own whose `parent` is its base model, and a request naming it runs on
that base model with the adapter (SamplingParams.lora). A streamed answer
stops as soon as its client disconnects, which cancels its requests.

Knows nothing about the command line or how the models were loaded.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

import anyio
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .generation import (chat_events, chat_result, completion_events, completion_result, start_chat,
                         start_completion)
from .metrics import CONTENT_TYPE, ServerMetrics
from .models import ServedModel
from .protocol import ChatCompletionRequest, CompletionRequest, RequestError

log = logging.getLogger("pprt.serve")
DEFAULT_MAX_BODY_BYTES = 8 * 2**20


class EventStream(StreamingResponse):
    """Server-sent events that stop when the client disconnects, whatever ASGI spec version the
    server speaks (Starlette notices a gone client only at the next write under spec 2.4);
    `on_close` runs however the response ends, even one that never started."""

    media_type = "text/event-stream"

    def __init__(self, body, on_close) -> None:
        super().__init__(body)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def respond() -> None:
                    await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(respond)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self._on_close()


class Server:
    """The app's state: the served models, the key, the limit, the metrics."""

    def __init__(self, models: dict[str, ServedModel], *, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, metrics: ServerMetrics | None = None) -> None:
        self.models = models
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics or ServerMetrics()
        self.created = int(time.time())
        for name, served in models.items():
            self.metrics.add_model(name, served.stats)

    def app(self) -> Starlette:
        routes = [Route("/health", self.health), Route("/metrics", self.prometheus),
                  Route("/v1/models", self.list_models),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={
            RequestError: _error_response, 404: _not_found, 405: _not_allowed, Exception: _internal_error})

    # ---- endpoints -------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        states = {name: "ok" if m.up else m.error for name, m in self.models.items()}
        ok = all(m.up for m in self.models.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "models": states}, status_code=200 if ok else 503)

    async def prometheus(self, request: Request) -> Response:
        return Response(await asyncio.to_thread(self.metrics.render), media_type=CONTENT_TYPE)

    async def list_models(self, request: Request) -> Response:
        self._authorize(request)
        data = []
        for name, m in self.models.items():
            card = {"object": "model", "created": self.created, "owned_by": "pprt",
                    "max_model_len": m.llm.max_context if m.up else None}
            data.append({"id": name, **card, "parent": None})
            data += [{"id": lora, **card, "parent": name} for lora in m.adapters]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        req = _validate(CompletionRequest, await self._body(request))
        served, lora = self._model(req.model)
        run, prompts = start_completion(req, served, self.metrics, lora)
        if req.stream:
            return EventStream(completion_events(req, run, prompts), run.close)
        return await _unless_disconnected(request, run, completion_result(req, run, prompts))

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        req = _validate(ChatCompletionRequest, await self._body(request))
        served, lora = self._model(req.model)
        run, prompt, prompt_len = start_chat(req, served, self.metrics, lora)
        if req.stream:
            return EventStream(chat_events(req, run, prompt, prompt_len), run.close)
        return await _unless_disconnected(request, run, chat_result(req, run, prompt, prompt_len))

    # ---- helpers ---------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise RequestError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'", None,
                               kind="authentication_error")

    async def _body(self, request: Request) -> object:
        """The JSON body, read up to the limit (413 past it, 400 when it is not JSON)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"the request body has {declared} bytes, more than the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the request body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except ValueError as e:
            raise RequestError(400, f"the request body is not JSON: {e}") from None

    def _model(self, name: str) -> tuple[ServedModel, str | None]:
        """The served model a request's `model` names and the LoRA adapter it names (None: the base
        model); RequestError 404 naming it when nothing is served under that name."""
        served, lora = self.models.get(name), None
        if served is None:
            served, lora = next((m for m in self.models.values() if name in m.adapters), None), name
        if served is None:
            adapters = [f"{a!r} (an adapter of {n!r})" for n, m in self.models.items() for a in m.adapters]
            raise RequestError(404, f"model {name!r} does not exist; this server serves "
                               f"{', '.join([repr(n) for n in self.models] + adapters)}", "model",
                               kind="not_found_error")
        served.check_up()
        return served, lora


def _validate(model, body: object):
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise RequestError.from_validation(e) from None


async def _unless_disconnected(request: Request, run, result) -> Response:
    """Await the non-streamed `result`; a client that disconnects first cancels the run."""
    work = asyncio.ensure_future(result)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
        run.close()
    if not work.done() or work.cancelled():
        return Response(status_code=499)  # nobody is there to read it
    return JSONResponse(work.result())


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _error_response(request: Request, exc: RequestError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse(RequestError(404, f"no route {request.url.path!r}", None, kind="not_found_error").body(),
                        status_code=404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return JSONResponse(RequestError(405, f"{request.method} is not allowed on {request.url.path!r}", None).body(),
                        status_code=405)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("request failed", exc_info=exc)
    body = RequestError(500, f"internal error: {type(exc).__name__}: {exc}", None, kind="server_error").body()
    return JSONResponse(body, status_code=500)
