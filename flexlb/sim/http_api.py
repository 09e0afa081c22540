"""HTTP API of a simulated worker: OpenAI completions / chat, SGLang generate, health, info and metrics, plus what
sglang-router and vllm-router call on real engines (load, tokenize, render, PD hand-over); and ``run_sim_worker``,
which serves it beside the status gRPC (``flexlb.sim.grpc_service``).

Handlers only translate between HTTP and the engine; the engine owns every number they report.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from flexlb.blocks import tokenize
from flexlb.domain import Role
from flexlb.sim import protocol as p
from flexlb.sim.engine import (
    EngineConfig,
    EngineError,
    EngineRequest,
    EngineStopped,
    KvTransferFailed,
    QueueFull,
    RequestTooLarge,
    SimEngine,
)
from flexlb.sim.grpc_service import GRPC_SHUTDOWN_GRACE_S, start_grpc_server
from flexlb.sim.kv_transfer import PdLink
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
    load_format: str  # GET /get_load's default shape: "sglang" or "vllm"
    engine_id: str  # this worker's id in the kv_transfer_params it hands out (a new one per process)
    pd: PdLink | None = None  # PD KV hand-over through the bootstrap server; None: a decode takes the KV at once


SIM = web.AppKey("sim", SimContext)
REQUEST_SIM = "flexlb.sim.context"  # request key: set by a fleet app, whose workers share one app


def sim_context(request: web.Request) -> SimContext:
    """The worker a request is for: the app's only one, or the one a fleet app resolved from the local port."""
    ctx = request.get(REQUEST_SIM)
    return ctx if ctx is not None else request.app[SIM]


def create_sim_app(
    engine: SimEngine,
    model_name: str = "flexlb-sim",
    *,
    load_format: str = "sglang",
    api_key: str | None = None,
    kv_wait_timeout_s: float = 0.0,
) -> web.Application:
    """The worker's app; it starts the engine on startup and stops it on cleanup. ``load_format`` is the default
    shape of ``GET /get_load`` (``p.LOAD_FORMATS``); ``api_key``: required as ``Authorization: Bearer`` (as an
    engine started with ``--api-key``); ``kv_wait_timeout_s`` > 0: PD requests hand their KV over through the
    bootstrap server their bootstrap fields name (``flexlb.sim.kv_transfer``), a decode waiting at most that long."""
    if load_format not in p.LOAD_FORMATS:
        raise ValueError(f"load_format: one of {', '.join(p.LOAD_FORMATS)}, not {load_format!r}")
    middlewares = [json_errors] if api_key is None else [json_errors, require_api_key(api_key)]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[SIM] = new_sim_context(engine, model_name, load_format)
    if kv_wait_timeout_s > 0:
        app[SIM].pd = PdLink(kv_wait_timeout_s)
    app.cleanup_ctx.append(_engine_lifecycle)
    add_sim_routes(app)
    return app


def new_sim_context(engine: SimEngine, model_name: str, load_format: str) -> SimContext:
    registry = sim_registry(engine, model_name)
    engine_id = f"flexlb-sim-{uuid.uuid4()}"
    return SimContext(engine, model_name, registry, int(time.time()), load_format, engine_id)


def add_sim_routes(app: web.Application) -> None:
    """Every endpoint of a simulated worker; handlers find their worker with ``sim_context``."""
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/generate", generate)
    app.router.add_post("/v1/completions/render", render_completion)
    app.router.add_post("/v1/chat/completions/render", render_chat)
    app.router.add_post("/tokenize", tokenize_handler)
    for path in ("/reset_prefix_cache", "/flush_cache"):  # vLLM's, SGLang's
        app.router.add_post(path, reset_prefix_cache)
    app.router.add_get("/sim/cache", cache_keys)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    for path in ("/get_server_info", "/server_info"):
        app.router.add_get(path, server_info)
    for path in ("/get_model_info", "/model_info"):
        app.router.add_get(path, model_info)
    app.router.add_get("/get_load", get_load)
    app.router.add_get("/metrics", metrics)


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
    load_format: str = "sglang",
    stop: asyncio.Event | None = None,
    api_key: str | None = None,
    kv_wait_timeout_s: float = 0.0,
) -> None:
    """Serve one simulated worker: HTTP on ``port`` and the status gRPC on ``grpc_port`` (default ``port + 1``),
    on this event loop, until ``stop`` is set or the task is cancelled; then shut both down and stop the engine."""
    engine = SimEngine(config)
    grpc_port = default_grpc_port(port) if grpc_port is None else grpc_port
    app = create_sim_app(
        engine, model_name, load_format=load_format, api_key=api_key, kv_wait_timeout_s=kv_wait_timeout_s
    )
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()  # starts the engine
    try:
        # gRPC before the HTTP listener: once /health answers, the status RPCs answer too.
        server = await start_grpc_server(engine, host, grpc_port, http_port=port)
        try:
            await web.TCPSite(runner, host, port).start()
            log.info("simulated %s worker for %r on http://%s:%d", config.role.value, model_name, host, port)
            await (stop or asyncio.Event()).wait()
        finally:
            await server.stop(GRPC_SHUTDOWN_GRACE_S)
    finally:
        await runner.cleanup()


async def _engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    ctx = app[SIM]
    await ctx.engine.start()
    yield
    await ctx.engine.stop()
    if ctx.pd is not None:
        await ctx.pd.close()


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


# Probes stay open, as SGLang's --api-key leaves them (a load balancer's health check carries no key).
UNAUTHENTICATED_PATHS = frozenset({"/health", "/health_generate", "/metrics"})


def require_api_key(api_key: str) -> Any:
    """A middleware answering 401 in OpenAI's shape to a request without ``Authorization: Bearer <api_key>``."""
    expected = hashlib.sha256(api_key.encode()).digest()

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in UNAUTHENTICATED_PATHS:
            return await handler(request)
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        digest = hashlib.sha256(presented.strip().encode("utf-8", "surrogateescape")).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, expected):
            body = p.error_body("Incorrect API key provided.", type_="invalid_request_error", code="invalid_api_key")
            return json_response(body, 401)
        return await handler(request)

    return check_api_key


def _submit(engine: SimEngine, params: p.GenerationParams, *, kv_pending: bool = False) -> EngineRequest:
    try:
        return engine.submit(params.tokens, params.max_tokens, request_id=params.request_id, kv_pending=kv_pending)
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


async def _start(
    request: web.Request, ctx: SimContext, params: p.GenerationParams, body: dict[str, Any]
) -> EngineRequest:
    """Submit the request; in a PD pair (``ctx.pd`` and usable bootstrap fields), a PREFILL worker records its
    room at the bootstrap server once the KV is computed, and a DECODE worker waits for that before it decodes.
    A decode whose prefill fails or never answers fails with 504 ``kv_transfer_failed``, naming both."""
    room = p.bootstrap_room(body) if ctx.pd is not None else None
    role = ctx.engine.config.role
    if ctx.pd is None or room is None or role is Role.PDFUSION:
        return _submit(ctx.engine, params)
    host, port = _local_address(request)
    worker = f"{host}:{port}"
    if role is Role.PREFILL:
        try:
            req = _submit(ctx.engine, params)
        except p.ApiError as exc:
            ctx.pd.report_refused(room, worker, f"HTTP {exc.status}: {exc.message}")
            raise
        ctx.pd.report_prefill(req, room, worker)
        return req
    req = _submit(ctx.engine, params, kv_pending=True)  # admitted now: its KV is allocated while it waits
    try:
        await ctx.pd.wait_prefill(room)
    except KvTransferFailed as exc:
        ctx.engine.kv_failed(req, exc)
        log.warning("request %s on decode worker %s: %s", req.request_id, worker, exc)
        raise p.ApiError(504, str(exc), type_="server_error", code="kv_transfer_failed") from None
    except BaseException:  # the client went away while it waited
        ctx.engine.cancel(req)
        raise
    ctx.engine.kv_ready(req)
    return req


# ---- generation ----


async def completions(request: web.Request) -> web.StreamResponse:
    ctx = sim_context(request)
    body = await _read_object(request)
    params = p.parse_completion_request(body, ctx.model_name)
    req = await _start(request, ctx, params, body)
    rid, model, created = f"cmpl-{req.request_id}", ctx.model_name, int(time.time())
    if not params.stream:
        text = await _collect(request, ctx.engine, req)
        kv = _handover(request, req)
        return json_response(p.completion_body(rid, model, created, text, req.finish_reason, _usage(req), kv))

    async def events() -> AsyncIterator[dict[str, Any]]:
        usage_field = params.include_usage
        async for piece in req.stream():
            yield p.completion_chunk(rid, model, created, piece, None, include_usage=usage_field)
        yield p.completion_chunk(rid, model, created, "", req.finish_reason, include_usage=usage_field)
        if params.include_usage:
            yield p.usage_chunk("text_completion", rid, model, created, _usage(req))

    return await _sse(request, ctx.engine, req, events())


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = sim_context(request)
    body = await _read_object(request)
    params = p.parse_chat_request(body, ctx.model_name)
    req = await _start(request, ctx, params, body)
    rid, model, created = f"chatcmpl-{req.request_id}", ctx.model_name, int(time.time())
    if not params.stream:
        text = await _collect(request, ctx.engine, req)
        kv = _handover(request, req)
        return json_response(p.chat_body(rid, model, created, text, req.finish_reason, _usage(req), kv))

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
    ctx = sim_context(request)
    body = await _read_object(request)
    params = p.parse_generate_request(body)
    req = await _start(request, ctx, params, body)
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


def _handover(request: web.Request, req: EngineRequest) -> dict[str, Any] | None:
    """On a PREFILL worker, the ``kv_transfer_params`` a vLLM-style PD router passes on to the decode worker.

    A DECODE worker needs nothing from them: its engine takes every prompt's KV as transferred (no prefill compute;
    SGLang-style requests can wait for it, see ``_start``), so the ``kv_transfer_params`` a decode request carries
    are accepted and otherwise ignored."""
    ctx = sim_context(request)
    if ctx.engine.config.role is not Role.PREFILL:
        return None
    host, port = _local_address(request)
    return p.kv_transfer_params(ctx.engine_id, list(req.block_keys), host, port)


def _local_address(request: web.Request) -> tuple[str, int]:
    """The address this request reached the worker on (so the hand-over names a reachable host and port)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return str(sockname[0]), int(sockname[1])
    return request.url.host or "127.0.0.1", request.url.port or 0


# ---- router compatibility: tokenize, render, load ----


async def tokenize_handler(request: web.Request) -> web.Response:
    """``POST /tokenize`` (vLLM and SGLang): the simulator's tokens for a prompt, a batch of prompts or messages."""
    ctx = sim_context(request)
    tok = p.parse_tokenize_request(await _read_object(request), ctx.model_name)
    return json_response(p.tokenize_body(tok, ctx.engine.config.total_kv_tokens))


async def cache_keys(request: web.Request) -> web.Response:
    """The simulator's own: the block keys its cache holds now (what an exact index must hold), and its version."""
    cache = sim_context(request).engine.cache
    return json_response({"keys": sorted(cache.keys()), "version": cache.version})


async def reset_prefix_cache(request: web.Request) -> web.Response:
    """vLLM ``POST /reset_prefix_cache`` / SGLang ``POST /flush_cache``: drop every cached block (AllBlocksCleared);
    400 while running requests hold some, as vLLM refuses then."""
    if not sim_context(request).engine.reset_prefix_cache():
        raise p.ApiError(400, "cannot reset the prefix cache while requests are running")
    return web.Response(text="")


async def render_completion(request: web.Request) -> web.Response:
    """vLLM ``POST /v1/completions/render``: a list, one rendered request per prompt, as vLLM answers."""
    ctx = sim_context(request)
    body = await _read_object(request)
    rendered = p.parse_completion_render(body, ctx.model_name)
    kv = p.request_kv_transfer(body)
    return json_response([p.render_body(f"cmpl-{uuid.uuid4().hex}", ctx.model_name, r, kv) for r in rendered])


async def render_chat(request: web.Request) -> web.Response:
    """vLLM ``POST /v1/chat/completions/render``: the chat request's prompt token ids, one object."""
    ctx = sim_context(request)
    body = await _read_object(request)
    params = p.parse_chat_request(body, ctx.model_name)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    return json_response(p.render_body(rid, ctx.model_name, params, p.request_kv_transfer(body)))


async def get_load(request: web.Request) -> web.Response:
    """``GET /get_load``: SGLang's per-rank list by default, vLLM router's ``{"load": n}`` with ``?format=vllm`` (or
    the worker's ``--load-format vllm``)."""
    ctx = sim_context(request)
    fmt = request.query.get("format", ctx.load_format)
    if fmt not in p.LOAD_FORMATS:
        raise p.ApiError(400, f"format: one of {', '.join(p.LOAD_FORMATS)}, not {fmt!r}", param="format")
    engine = ctx.engine
    if fmt == "vllm":
        return json_response(p.vllm_load_body(engine.running_count, engine.waiting_count))
    used = engine.config.total_kv_tokens - engine.available_kv_tokens
    body = p.sglang_load_body(engine.running_count, engine.waiting_count, used, engine.config.block_size)
    return json_response(body)


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

_DISAGGREGATION_MODE = {Role.PREFILL: "prefill", Role.DECODE: "decode", Role.PDFUSION: "null"}  # SGLang's names


async def health(request: web.Request) -> web.Response:
    engine = sim_context(request).engine
    if not engine.alive:
        return json_response(p.error_body("the engine is not running", type_="server_error"), 503)
    return json_response({"status": "ok"})


async def health_generate(request: web.Request) -> web.Response:
    """Healthy when a one-token generation completes (SGLang's deep health check)."""
    engine = sim_context(request).engine
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
    ctx = sim_context(request)
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
    ctx = sim_context(request)
    engine, cfg = ctx.engine, ctx.engine.config
    config = {**dataclasses.asdict(cfg), "role": cfg.role.value}
    return json_response(
        {
            "version": "flexlb-sim",
            "model_path": ctx.model_name,
            "tokenizer_path": None,  # nothing for a router to download: /tokenize serves the simulator's tokens
            "served_model_name": ctx.model_name,
            "role": cfg.role.value,
            "disaggregation_mode": _DISAGGREGATION_MODE[cfg.role],
            "dp_size": 1,
            "tp_size": 1,
            "page_size": cfg.block_size,
            "max_running_requests": cfg.max_concurrency,
            "max_prefill_tokens": cfg.prefill_batch_tokens,
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
    """SGLang's model info: ``model_path`` is the served name and there is no tokenizer path to fetch."""
    name = sim_context(request).model_name
    return json_response(
        {
            "model_path": name,
            "tokenizer_path": None,
            "served_model_name": name,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(sim_context(request).registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
