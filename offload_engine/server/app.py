"""The HTTP routes: OpenAI's /v1/models, /v1/chat/completions and /v1/completions, plus /health and /metrics.

    app = create_app(engine, model_name="mixtral-8x7b", api_key=None, max_queue=32)

Handlers validate and tokenize on the event loop, then hand a Job to the Worker (which generates up to
`max_batch` jobs together, continuous batching) and relay its events: as server-sent events for `stream: true`
(`data: {chunk}` ... `data: [DONE]`), else as one JSON body. A stream's response starts when the worker starts its
job, so a request still waiting when the server shuts down gets a plain 503 whether it streams or not. Every error
is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`; no request can take the server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import threading
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2.exceptions import TemplateError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from ..batch import MAX_BATCH
from ..chat import encode_chat
from . import protocol as p
from .metrics import Metrics
from .worker import Done, Event, Failed, Job, Piece, QueueFull, ShuttingDown, Started, Unavailable, Worker

DISCONNECT_POLL_S = 0.2  # how often a non-streaming request checks that its client is still there
ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics")


SHUTTING_DOWN = "server_shutting_down"  # the error code of a request the server stops serving at shutdown


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, p.error_body(message, type_, param, code), headers


class Outbox:
    """Events from the worker thread to the per-request queues on their event loops, one wake-up of a loop per
    batch of them: a step's tokens for all of its sequences cross in one call_soon_threadsafe (one write to the
    loop's self-pipe, one hand-over of the GIL) instead of one per sequence."""

    def __init__(self) -> None:
        self.pending: dict[asyncio.AbstractEventLoop, list[tuple[Job, asyncio.Queue, Event]]] = {}
        self.lock = threading.Lock()

    def put(self, loop: asyncio.AbstractEventLoop, job: Job, queue: asyncio.Queue, event: Event) -> None:
        """On the worker thread."""
        with self.lock:
            waiting = self.pending.setdefault(loop, [])
            waiting.append((job, queue, event))
            if len(waiting) > 1:  # a flush is already scheduled on that loop and will take this one too
                return
        try:
            loop.call_soon_threadsafe(self._flush, loop)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            with self.lock:
                gone = self.pending.pop(loop, [])
            for job, _, _ in gone:
                job.cancel()

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            pending = self.pending.pop(loop, [])
        for _, queue, event in pending:
            queue.put_nowait(event)


class CountRequests:
    """ASGI middleware counting answered requests by endpoint and status (a plain ASGI wrapper: Starlette's
    BaseHTTPMiddleware would get between a streaming response and the client's disconnect)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            path = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint=path, status=str(status)).inc()


class RequireKey:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <api_key>`, checked before the body is even read."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                body = p.error_body("invalid or missing API key: send the header 'Authorization: Bearer <key>' "
                                    "with the key the server was started with", code="invalid_api_key")
                return await JSONResponse(body, status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


class EventStream(StreamingResponse):
    """An SSE response that calls `on_close` however it ends (finished, failed, or the client went away)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            self.on_close()


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(engine, model_name: str | None = None, api_key: str | None = None, max_queue: int = 32,
               prefix_reuse: bool = True, max_batch: int = MAX_BATCH) -> FastAPI:
    """An app that serves `engine` (up to `max_batch` requests generated together; at most `max_queue` wait
    beyond those, others get 429)."""
    if engine.tokenizer is None:
        raise ValueError("the server needs a tokenizer: this model directory has no tokenizer files")
    name = model_name or (engine.model_dir.name if engine.model_dir is not None else "offload-engine")
    worker = Worker(engine, None, max_queue, prefix_reuse, max_batch)
    metrics = worker.metrics = Metrics(worker.depth, engine.layer_stats, worker.batch_size)
    tokenizer, window = engine.tokenizer, engine.context_window
    outbox = Outbox()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(worker.close)

    app = FastAPI(title="offload_engine", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker, app.state.metrics, app.state.model_name = worker, metrics, name
    if api_key is not None:
        app.add_middleware(RequireKey, api_key=api_key)
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: counts the 401s too

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        error = e.errors()[0]
        if error["type"] == "json_invalid":
            reason = error.get("ctx", {}).get("error", error["msg"])
            message = f"the body is not valid JSON ({reason}): send a JSON object"
            return JSONResponse(p.error_body(message), status_code=400)
        # The field path (e.g. messages.0.role), without the body prefix and pydantic's union-member tags.
        loc = [str(x) for x in error["loc"][1:] if isinstance(x, int) or re.fullmatch(r"[a-z_]+", x)
               and x not in ("str", "int", "float", "bool", "list", "dict")]
        param = ".".join(loc) or None
        if param:
            message = f"{param}: {error['msg'].removeprefix('Value error, ')}"
        elif error["type"] == "missing":
            message = "the request has no body: send a JSON object (Content-Type: application/json)"
        else:
            message = f"the body must be a JSON object sent with Content-Type: application/json ({error['msg']})"
        return JSONResponse(p.error_body(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(p.error_body(f"{request.method} {request.url.path}: {e.detail}", kind),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return JSONResponse(p.error_body(f"internal error: {type(e).__name__}: {e}", "server_error"),
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "waiting": worker.depth(), "running": worker.batch_size()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "offload_engine",
                "max_model_len": window}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {name!r}",
                           "not_found_error", "model", "model_not_found")
        return model_card()

    def check_model(body: p.SamplingRequest) -> None:
        if body.model is not None and body.model != name:
            raise APIError(404, f"the model {body.model!r} does not exist: this server serves {name!r} (GET "
                                f"/v1/models lists it)", "invalid_request_error", "model", "model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatRequest, request: Request):
        check_model(body)
        if getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions with a prompt")
        try:
            messages = body.chat_messages()
        except p.UnsupportedParameter as e:
            raise APIError(400, str(e), param=e.param)
        if messages[-1]["role"] != "user":
            raise APIError(400, "the last message must be the user's: the model answers it", param="messages")
        try:
            ids = encode_chat(tokenizer, messages, engine.model.family.chat == "mixtral")
        except TemplateError as e:
            raise APIError(400, f"the model's chat template refused these messages: {e}", param="messages")
        return await generate(request, body, ids, chat=True)

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request):
        check_model(body)
        try:
            ids = engine.encode(body.prompt_input())
        except ValueError as e:  # UnsupportedParameter (a batch) or an empty prompt
            raise APIError(400, str(e), param="prompt")
        vocab = engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return await generate(request, body, ids, chat=False)

    async def generate(request: Request, body: p.SamplingRequest, ids: list[int], chat: bool):
        requested = body.max_new_tokens()
        if len(ids) + (requested or 1) > window:
            wanted = f"max_tokens ({requested})" if requested else "at least 1 token to generate"
            raise APIError(400, f"the prompt ({len(ids)} tokens) + {wanted} exceeds the model's context window of "
                                f"{window} tokens: shorten the prompt or lower max_tokens",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        try:
            params = body.sampling(requested or window - len(ids))
        except p.UnsupportedParameter as e:
            raise APIError(400, str(e), param=e.param)
        except ValueError as e:
            raise APIError(400, str(e))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(ids, params, lambda event: outbox.put(loop, job, events, event))
        try:
            worker.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        except ShuttingDown as e:
            raise APIError(503, str(e), "server_error", code=SHUTTING_DOWN)
        id_ = p.new_id("chatcmpl" if chat else "cmpl")
        if not body.stream:
            try:
                return await collect(watched(events, job, request), id_, chat)
            finally:
                job.cancel()  # a no-op once finished; stops a job whose handler was cancelled
        try:
            started = await wait_for_start(watched(events, job, request))
        except BaseException:
            job.cancel()
            raise
        if not started:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return EventStream(stream_events(events, job, id_, chat, body.include_usage()), job.cancel)

    def refuse(event: Event) -> None:
        """An event that ends a request before its response has started, as the HTTP error it is."""
        if isinstance(event, Failed):
            raise APIError(500, event.message, "server_error")
        if isinstance(event, Unavailable):
            raise APIError(503, event.message, "server_error", code=SHUTTING_DOWN)

    async def watched(events: asyncio.Queue, job: Job, request: Request) -> AsyncIterator[Event]:
        """The job's events as they arrive; ends early, cancelling the job, if the client goes away meanwhile."""
        getter, checked = None, time.monotonic()
        try:
            while True:
                getter = getter or asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                if time.monotonic() - checked >= DISCONNECT_POLL_S:  # pieces may arrive faster than that: check anyway
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        job.cancel()
                        return
                if done:
                    event, getter = getter.result(), None  # none pending while the caller holds an event
                    yield event
        finally:
            if getter is not None:
                getter.cancel()

    async def wait_for_start(job_events: AsyncIterator[Event]) -> bool:
        """Whether the worker started the job (False: the client went away first). A stream's response starts
        only then, so that a job ended before it ran (shutdown, a failure) is answered with a plain HTTP error."""
        async with contextlib.aclosing(job_events):
            async for event in job_events:
                if isinstance(event, Started):
                    return True
                refuse(event)
        return False

    async def collect(job_events: AsyncIterator[Event], id_: str, chat: bool):
        """The whole answer as one body."""
        text = []
        async with contextlib.aclosing(job_events):
            async for event in job_events:
                if isinstance(event, Piece):
                    text.append(event.text)
                elif isinstance(event, Done):
                    build = p.chat_response if chat else p.completion_response
                    return build(id_, name, "".join(text), event.finish_reason, event.usage())
                else:
                    refuse(event)
        return Response(status_code=499)  # the client went away: nobody reads it

    async def stream_events(events: asyncio.Queue, job: Job, id_: str, chat: bool, include_usage: bool):
        object_ = "chat.completion.chunk" if chat else "text_completion"
        if chat:
            yield sse(p.chat_chunk(id_, name, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if isinstance(event, Piece):
                yield sse(p.chat_chunk(id_, name, {"content": event.text}) if chat
                          else p.completion_response(id_, name, event.text, None))
            elif isinstance(event, Failed):
                yield sse(p.error_body(event.message, "server_error"))
                break
            elif isinstance(event, Unavailable):  # stopped at the end of the shutdown grace period
                yield sse(p.error_body(event.message, "server_error", code=SHUTTING_DOWN))
                break
            elif isinstance(event, Done):
                yield sse(p.chat_chunk(id_, name, {}, event.finish_reason) if chat
                          else p.completion_response(id_, name, "", event.finish_reason))
                if include_usage:
                    yield sse(p.usage_chunk(id_, name, object_, event.usage()))
                break
        yield sse("[DONE]")

    return app
