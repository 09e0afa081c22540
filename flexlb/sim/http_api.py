"""HTTP API of a simulated worker: OpenAI completions / chat, SGLang generate, health, info and metrics; and
``run_sim_worker``, which serves it beside the status gRPC (``flexlb.sim.grpc_service``).

Handlers only translate between HTTP and the engine; the engine owns every number they report.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from flexlb.blocks import tokenize
from flexlb.sim import protocol as p
from flexlb.sim.engine import (
    EngineConfig,
    EngineError,
    EngineRequest,
    EngineStopped,
    QueueFull,
    RequestTooLarge,
    SimEngine,
)
from flexlb.sim.grpc_service import GRPC_SHUTDOWN_GRACE_S, start_grpc_server
from flexlb.sim.metrics import sim_registry

log = logging.getLogger("flexlb.sim.http")

MAX_BODY_BYTES = 16 * 1024 * 1024  # a long prompt as token ids
DISCONNECT_POLL_S = 0.1  # how often a request checks that its client is still connected
HEALTH_GENERATE_TIMEOUT_S = 20.0


@dataclass(slots=True)
class SimContext:
    engine: SimEngine
    model_name: str
    registry: CollectorRegistry
    created: int  # epoch seconds: the model's "created" in /v1/models


SIM = web.AppKey("sim", SimContext)


def create_sim_app(engine: SimEngine, model_name: str = "flexlb-sim") -> web.Application:
    """The worker's app; it starts the engine on startup and stops it on cleanup."""
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY_BYTES)
    app[SIM] = SimContext(engine, model_name, sim_registry(engine, model_name), int(time.time()))
    app.cleanup_ctx.append(_engine_lifecycle)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/generate", generate)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    app.router.add_get("/get_server_info", server_info)
    app.router.add_get("/get_model_info", model_info)
    app.router.add_get("/metrics", metrics)
    return app


def default_grpc_port(http_port: int) -> int:
    """RTP-LLM's convention: the status gRPC port is the HTTP port + 1 (0, "any free port", stays 0)."""
    return http_port + 1 if http_port else 0


async def run_sim_worker(
    config: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "flexlb-sim",
    *,
    grpc_port: int | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve one simulated worker: HTTP on ``port`` and the status gRPC on ``grpc_port`` (default ``port + 1``),
    on this event loop, until ``stop`` is set or the task is cancelled; then shut both down and stop the engine."""
    engine = SimEngine(config)
    grpc_port = default_grpc_port(port) if grpc_port is None else grpc_port
    runner = web.AppRunner(create_sim_app(engine, model_name), access_log=None, handler_cancellation=True)
    await runner.setup()  # starts the engine
    try:
        # gRPC before the HTTP listener: once /health answers, the status RPCs answer too.
        server = await start_grpc_server(engine, host, grpc_port)
        try:
            await web.TCPSite(runner, host, port).start()
            log.info("simulated %s worker for %r on http://%s:%d", config.role.value, model_name, host, port)
            await (stop or asyncio.Event()).wait()
        finally:
            await server.stop(GRPC_SHUTDOWN_GRACE_S)
    finally:
        await runner.cleanup()


async def _engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    engine = app[SIM].engine
    await engine.start()
    yield
    await engine.stop()


# ---- errors ----


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as OpenAI's JSON error object: no HTML pages, no stack traces."""
    try:
        return await handler(request)
    except p.ApiError as exc:
        return json_response(exc.body(), exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = f"{exc.reason}: {request.method} {request.path}"
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        return json_response(p.error_body(message, type_=kind), exc.status)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        body = p.error_body(f"internal error in {request.method} {request.path}", type_="server_error")
        return json_response(body, 500)


def _submit(engine: SimEngine, params: p.GenerationParams) -> EngineRequest:
    try:
        return engine.submit(params.tokens, params.max_tokens, request_id=params.request_id)
    except QueueFull as exc:
        raise p.ApiError(503, str(exc), type_="server_error", code="queue_full") from None
    except EngineStopped as exc:
        raise p.ApiError(503, str(exc), type_="server_error", code="engine_stopped") from None
    except RequestTooLarge as exc:
        raise p.ApiError(400, str(exc), code="context_length_exceeded") from None
    except ValueError as exc:
        raise p.ApiError(400, str(exc)) from None


async def _read_object(request: web.Request) -> dict[str, Any]:
    return p.parse_json_object(await request.read())


# ---- generation ----


async def completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[SIM]
    params = p.parse_completion_request(await _read_object(request), ctx.model_name)
    req = _submit(ctx.engine, params)
    rid, model, created = f"cmpl-{req.request_id}", ctx.model_name, int(time.time())
    if not params.stream:
        text = await _collect(request, ctx.engine, req)
        return json_response(p.completion_body(rid, model, created, text, req.finish_reason, _usage(req)))

    async def events() -> AsyncIterator[dict[str, Any]]:
        usage_field = params.include_usage
        async for piece in req.stream():
            yield p.completion_chunk(rid, model, created, piece, None, include_usage=usage_field)
        yield p.completion_chunk(rid, model, created, "", req.finish_reason, include_usage=usage_field)
        if params.include_usage:
            yield p.usage_chunk("text_completion", rid, model, created, _usage(req))

    return await _sse(request, ctx.engine, req, events())


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[SIM]
    params = p.parse_chat_request(await _read_object(request), ctx.model_name)
    req = _submit(ctx.engine, params)
    rid, model, created = f"chatcmpl-{req.request_id}", ctx.model_name, int(time.time())
    if not params.stream:
        text = await _collect(request, ctx.engine, req)
        return json_response(p.chat_body(rid, model, created, text, req.finish_reason, _usage(req)))

    async def events() -> AsyncIterator[dict[str, Any]]:
        usage_field = params.include_usage
        role = {"role": "assistant", "content": ""}
        yield p.chat_chunk(rid, model, created, role, None, include_usage=usage_field)
        async for piece in req.stream():
            yield p.chat_chunk(rid, model, created, {"content": piece}, None, include_usage=usage_field)
        yield p.chat_chunk(rid, model, created, {}, req.finish_reason, include_usage=usage_field)
        if params.include_usage:
            yield p.usage_chunk("chat.completion.chunk", rid, model, created, _usage(req))

    return await _sse(request, ctx.engine, req, events())


async def generate(request: web.Request) -> web.StreamResponse:
    """SGLang's native API; streamed events carry the text so far."""
    ctx = request.app[SIM]
    params = p.parse_generate_request(await _read_object(request))
    req = _submit(ctx.engine, params)
    rid = str(req.request_id)

    def body(text: str, produced: int, finish: str | None) -> dict[str, Any]:
        cached = req.cached_tokens
        return p.generate_body(text, rid, req.prompt_tokens, produced, cached, finish)

    if not params.stream:
        text = await _collect(request, ctx.engine, req)
        return json_response(body(text, req.completion_tokens, req.finish_reason))

    async def events() -> AsyncIterator[dict[str, Any]]:
        text, produced = "", 0
        async for piece in req.stream():
            text, produced = text + piece, produced + 1
            # The engine may be ahead of this reader: the event reports what it carries.
            yield body(text, produced, "length" if produced == req.max_tokens else None)
        if produced < req.max_tokens:
            yield body(text, produced, req.finish_reason or "abort")

    return await _sse(request, ctx.engine, req, events())


def _usage(req: EngineRequest) -> dict[str, Any]:
    return p.usage(req.prompt_tokens, req.completion_tokens, req.cached_tokens)


@contextlib.asynccontextmanager
async def _cancel_if_abandoned(request: web.Request, engine: SimEngine, req: EngineRequest) -> AsyncIterator[None]:
    """Cancel ``req`` in the engine when its client goes away, even while it waits in the queue with nothing to
    write (a write to a closed stream would notice only at the next token)."""

    async def watch() -> None:
        while not req.done:
            if request.transport is None or request.transport.is_closing():
                log.debug("client of request %s went away: cancelling it", req.request_id)
                engine.cancel(req)
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        engine.cancel(req)  # no-op once finished; frees an abandoned request's slot and KV at once


async def _collect(request: web.Request, engine: SimEngine, req: EngineRequest) -> str:
    async with _cancel_if_abandoned(request, engine, req):
        try:
            return await req.text()
        except EngineError as exc:
            raise p.ApiError(503, str(exc), type_="server_error", code="engine_stopped") from None


async def _sse(
    request: web.Request, engine: SimEngine, req: EngineRequest, events: AsyncIterator[dict[str, Any]]
) -> web.StreamResponse:
    """Server-sent events: ``data: {json}`` per event, then ``data: [DONE]``."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    async with _cancel_if_abandoned(request, engine, req), contextlib.aclosing(events):
        try:
            await response.prepare(request)
            try:
                async for event in events:
                    await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
            except EngineError as exc:  # headers are sent: the error goes in the stream, as OpenAI does
                error = p.error_body(str(exc), type_="server_error", code="engine_stopped")
                await response.write(b"data: " + orjson.dumps(error) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            log.debug("client of request %s went away mid-stream", req.request_id)
    return response


# ---- health, info, metrics ----


async def health(request: web.Request) -> web.Response:
    engine = request.app[SIM].engine
    if not engine.alive:
        return json_response(p.error_body("the engine is not running", type_="server_error"), 503)
    return json_response({"status": "ok"})


async def health_generate(request: web.Request) -> web.Response:
    """Healthy when a one-token generation completes (SGLang's deep health check)."""
    engine = request.app[SIM].engine
    try:
        req = engine.submit(tokenize("health check"), 1)
    except EngineError as exc:
        return json_response(p.error_body(str(exc), type_="server_error"), 503)
    try:
        async with asyncio.timeout(HEALTH_GENERATE_TIMEOUT_S):
            await req.text()
    except (TimeoutError, EngineError) as exc:
        engine.cancel(req)
        return json_response(p.error_body(f"generation failed: {exc!r}", type_="server_error"), 503)
    return json_response({"status": "ok"})


async def models(request: web.Request) -> web.Response:
    ctx = request.app[SIM]
    card = {
        "id": ctx.model_name,
        "object": "model",
        "created": ctx.created,
        "owned_by": "flexlb-sim",
        "max_model_len": ctx.engine.config.total_kv_tokens,
    }
    return json_response({"object": "list", "data": [card]})


async def server_info(request: web.Request) -> web.Response:
    """SGLang-style server info: the engine's configuration and live state."""
    ctx = request.app[SIM]
    engine, cfg = ctx.engine, ctx.engine.config
    config = {**dataclasses.asdict(cfg), "role": cfg.role.value}
    return json_response(
        {
            "version": "flexlb-sim",
            "model_path": ctx.model_name,
            "served_model_name": ctx.model_name,
            "role": cfg.role.value,
            "page_size": cfg.block_size,
            "max_running_requests": cfg.max_concurrency,
            "max_total_num_tokens": cfg.total_kv_tokens,
            "engine_config": config,
            "internal_states": [
                {
                    "running": engine.running_count,
                    "waiting": engine.waiting_count,
                    "available_kv_cache": engine.available_kv_tokens,
                    "total_kv_cache": cfg.total_kv_tokens,
                    "cache_version": engine.cache.version,
                    "last_step_latency_ms": engine.last_step_ms,
                    "counters": dataclasses.asdict(engine.counters),
                }
            ],
        }
    )


async def model_info(request: web.Request) -> web.Response:
    name = request.app[SIM].model_name
    return json_response({"model_path": name, "tokenizer_path": None, "is_generation": True})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[SIM].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
