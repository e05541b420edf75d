"""The OpenAI-compatible HTTP app: routes, SSE streaming, disconnect handling and error mapping.

Every request becomes a Job for the single engine worker (see worker.py). A handler waits for the
job's first event before answering, so errors the engine raises up front (prompt too long, ...) get
their real status code even on streaming requests; a client that leaves, whether queued, mid-prefill
or mid-stream, cancels its job so the engine moves on to the next request at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from ..engine.request import GenerationStats, TokenEvent
from ..errors import InvalidRequestError, TiermoeError
from .guard import DEFAULT_MAX_BODY_BYTES, Guard
from .metrics import ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    ChatShape,
    CompletionRequest,
    CompletionShape,
    ErrorBody,
    ErrorResponse,
)
from .reasoning import reasoning_of
from .tool_calls import format_for
from .worker import EngineWorker, Job, JobAborted, ServerShuttingDown

log = logging.getLogger("tiermoe.server")

GENERATION_ENDPOINTS = (ChatShape.endpoint, CompletionShape.endpoint)
# Proxies (nginx) buffer responses unless told not to, which would hold every token back.
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


_ERROR_MEANINGS = {
    400: "invalid request: malformed JSON, a wrong or out-of-range field, a prompt beyond the context",
    401: "missing or incorrect API key (with --api-key)",
    404: "the model is not served here",
    413: "request body beyond --max-request-mib",
    500: "internal error",
    503: "the server is shutting down",
}


def _errors(*statuses: int) -> dict:
    return {s: {"model": ErrorResponse, "description": _ERROR_MEANINGS[s]} for s in statuses}


# Whole JSON, or with "stream": true an SSE stream of chunks ending in "data: [DONE]".
GENERATION_RESPONSES = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **_errors(400, 401, 404, 413, 500, 503),
}


def _openapi(app: FastAPI, with_key: bool) -> dict:
    """FastAPI's document without the 422 it adds to every body (validation errors are 400s here), and
    the key's 401 only where a key is required."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                operation["responses"].pop("422", None)
                if not (with_key and path.startswith("/v1")):
                    operation["responses"].pop("401", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


class ModelNotFoundError(TiermoeError):
    http_status = 404
    error_type = "invalid_request_error"


def create_app(
    llm,
    served_names: str | list[str] | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    seed: int | None = None,
) -> FastAPI:
    """The app serving `llm` under `served_names` (default: llm.model_name), each one an id clients may
    send; the first is the one /health reports. api_key: required on every /v1 route (None: open).
    seed: the sampling seed of every request that sends none, so that a request's output depends on the
    request alone, as llama.cpp's server does with --seed (None: fresh randomness per request).
    The engine worker thread starts and stops with the app's lifespan."""
    names = [served_names] if isinstance(served_names, str) else list(served_names or [llm.model_name])
    model_name = names[0]
    metrics = ServerMetrics()
    worker = EngineWorker(llm, metrics)
    reasoning = reasoning_of(llm.tokenizer)  # the model's: found once, not per request
    keep_reasoning_markers = reasoning is not None and reasoning.keeps_special_tokens()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="tiermoe", summary="OpenAI-compatible MoE inference server", lifespan=lifespan)
    app.openapi = lambda: _openapi(app, api_key is not None)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.state.drain = worker.drain  # the server calls it when its shutdown grace runs out
    _add_error_handlers(app, metrics)

    def check_model(name: str) -> str:
        if name not in names:
            served = ", ".join(map(repr, names))
            raise ModelNotFoundError(f"model {name!r} is not served here; this server serves {served}")
        return name

    def card(name: str) -> dict:
        return {
            "id": name, "object": "model", "created": 0, "owned_by": "tiermoe", "max_model_len": llm.max_model_len
        }  # fmt: skip

    def submit(
        prompt: Callable[[], list[int]],
        body: ChatCompletionRequest | CompletionRequest,
        echo_scores: int | None = None,
        **overrides,
    ) -> Job:
        # Sampling values are checked here, so a bad request fails before it waits in the queue.
        params = replace(body.sampling_params(llm.sampling_defaults), **overrides)
        if params.seed is None and seed is not None:
            params = replace(params, seed=seed)
        return worker.submit(prompt, params, echo_scores)

    def token_text(body) -> Callable[[int], str] | None:
        """How log-probabilities name a token: its own text (None: the request asked for none)."""
        if body.requested_logprobs() is None:
            return None
        if llm.tokenizer is None:
            raise InvalidRequestError(
                "logprobs name tokens by their text, and this checkpoint has no tokenizer", "logprobs"
            )
        return lambda token_id: llm.tokenizer.decode([token_id])

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "queued": worker.queued}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card(name) for name in names]}

    @app.get("/v1/models/{model_id:path}", responses=_errors(404))  # :path: ids may hold slashes (org/model)
    async def model(model_id: str) -> dict:
        return card(check_model(model_id))

    @app.get(
        "/metrics", response_class=PlainTextResponse, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}}
    )
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post(ChatShape.endpoint, responses=GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        name = check_model(body.model)
        messages, template_kwargs = body.template_messages(), body.template_kwargs()
        tools = format_for(body.tools, body.tool_choice, getattr(llm.tokenizer, "chat_template", None))

        def prompt() -> list[int]:
            text = llm.apply_chat_template(
                messages, enable_thinking=body.enable_thinking, chat_template_kwargs=template_kwargs
            )
            return llm.encode(text, add_special_tokens=False)  # the template wrote the special tokens

        # The text keeps special tokens where markers are: some tool-call formats' ([TOOL_CALLS]), gpt-oss's
        # channels.
        keep = tools is not None or keep_reasoning_markers
        job = submit(prompt, body, skip_special_tokens=not keep)
        shape = ChatShape(name, token_text(body), tools, reasoning)
        return await _respond(request, job, shape, body.stream, body.include_usage, metrics)

    @app.post(CompletionShape.endpoint, responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        name = check_model(body.model)
        job = submit(lambda: llm.encode(body.prompt), body, body.requested_logprobs() if body.echo else None)
        if body.echo and llm.tokenizer is None:
            raise InvalidRequestError(
                "echo gives the prompt's text, and this checkpoint has no tokenizer", "echo"
            )
        shape = CompletionShape(name, token_text(body), body.echo, body.echo and llm.tokenizer.decode)
        return await _respond(request, job, shape, body.stream, body.include_usage, metrics)

    return app


async def _respond(
    request: Request,
    job: Job,
    shape: ChatShape | CompletionShape,
    stream: bool,
    include_usage: bool,
    metrics: ServerMetrics,
) -> Response:
    try:
        async with _cancel_on_disconnect(request, job):
            first = await job.next_event()
            if not stream:
                events = await _collect(job, first)
    except JobAborted:
        metrics.requests.labels(shape.endpoint, "aborted").inc()
        return Response(status_code=499)  # nginx's "client closed request"; nobody is there to read it
    if stream:
        body = _sse(job, first, shape, include_usage, metrics)
        # The background task runs however the response ends, disconnect included: a second guard
        # besides the generator's finally, which a cancelled StreamingResponse may never resume.
        return StreamingResponse(
            body, media_type="text/event-stream", headers=_SSE_HEADERS, background=BackgroundTask(job.cancel)
        )
    metrics.finished(shape.endpoint, events[-1].stats)
    return JSONResponse(shape.whole(events, job.prompt_ids, job.prompt_scores))


@asynccontextmanager
async def _cancel_on_disconnect(request: Request, job: Job) -> AsyncIterator[None]:
    """Cancel the job if the client disconnects inside this block. FastAPI has read the whole body, so
    the next ASGI message is http.disconnect. Leave the block before a StreamingResponse starts: it
    listens for the disconnect itself, and two listeners would steal each other's message."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()


async def _collect(job: Job, event: TokenEvent) -> list[TokenEvent]:
    events = [event]
    while event.finish_reason is None:
        event = await job.next_event()
        events.append(event)
    return events


def _sse_line(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse(
    job: Job,
    event: TokenEvent,
    shape: ChatShape | CompletionShape,
    include_usage: bool,
    metrics: ServerMetrics,
) -> AsyncIterator[str]:
    outcome = "aborted"  # until the engine finishes: a cancelled generator only runs its finally
    try:
        for chunk in shape.opening(job.prompt_ids, job.prompt_scores):
            yield _sse_line(chunk)
        while True:
            if (chunk := shape.delta(event)) is not None:
                yield _sse_line(chunk)
            if event.finish_reason is not None:
                break
            event = await job.next_event()
        stats: GenerationStats = event.stats
        outcome = "success"
        metrics.finished(shape.endpoint, stats)
        for chunk in shape.closing():
            yield _sse_line(chunk)
        yield _sse_line(shape.finish(event.finish_reason, stats))
        if include_usage:
            yield _sse_line(shape.usage(stats))
        yield "data: [DONE]\n\n"
    except JobAborted:
        pass
    except ServerShuttingDown as exc:  # expected: one line in the log, the error event to the client
        log.warning("stream ended: %s", exc)
        yield _sse_line(_error_body(exc).model_dump())
        yield "data: [DONE]\n\n"
    except Exception as exc:  # the 200 header is gone, so the error travels in the stream, as OpenAI's do
        log.exception("generation failed mid-stream")
        outcome = "error"
        yield _sse_line(_error_body(exc).model_dump())
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()
        if outcome != "success":
            metrics.requests.labels(shape.endpoint, outcome).inc()


def _error_body(exc: Exception) -> ErrorResponse:
    if isinstance(exc, TiermoeError):
        return ErrorResponse(
            error=ErrorBody(
                message=str(exc),
                type=exc.error_type,
                param=getattr(exc, "param", None),
                code=getattr(exc, "code", None),
            )
        )
    return ErrorResponse(error=ErrorBody(message=f"internal error: {exc!r}", type="server_error"))


def _is_union_branch(loc_part) -> bool:
    """pydantic names the branch of a union in an error's location ("str", "list[ContentPart]")."""
    return isinstance(loc_part, str) and (loc_part in ("str", "int", "float", "bool") or "[" in loc_part)


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def reply(request: Request, status: int, body: ErrorResponse) -> JSONResponse:
        if request.url.path in GENERATION_ENDPOINTS:
            metrics.requests.labels(request.url.path, "error").inc()
        return JSONResponse(body.model_dump(), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # Of a union's failed branches (str | list[ContentPart]), the one our own check refused says why.
        err = next((e for e in errors if e["type"] == "value_error"), errors[0])
        param = ".".join(str(p) for p in err["loc"] if p != "body" and not _is_union_branch(p)) or None
        if err["type"] == "json_invalid":
            param = None
            message = f"malformed JSON body: {err.get('ctx', {}).get('error', err['msg'])}"
        elif param is None:  # no body, not an object, or not declared JSON (curl -d without -H)
            message = "the body must be a JSON object sent with Content-Type: application/json"
        else:
            message = f"{param}: {err['msg'].removeprefix('Value error, ')}"
        error = ErrorBody(message=message, type="invalid_request_error", param=param)
        return reply(request, 400, ErrorResponse(error=error))

    @app.exception_handler(ModelNotFoundError)
    async def model_not_found(request: Request, exc: ModelNotFoundError) -> JSONResponse:
        error = ErrorBody(message=str(exc), type=exc.error_type, param="model", code="model_not_found")
        return reply(request, 404, ErrorResponse(error=error))

    @app.exception_handler(TiermoeError)
    async def engine_error(request: Request, exc: TiermoeError) -> JSONResponse:
        return reply(request, exc.http_status, _error_body(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        response = reply(
            request, exc.status_code, ErrorResponse(error=ErrorBody(message=str(exc.detail), type=kind))
        )
        response.headers.update(exc.headers or {})  # a 405's Allow
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback and re-raises after this reply; the server keeps serving.
        return reply(request, 500, _error_body(exc))
