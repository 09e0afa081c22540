"""HTTP handlers of the router: the original's schedule API plus release, snapshot, health and metrics."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from flexlb.http.auth import client_of
from flexlb.http.body import request_body
from flexlb.http.wire import (
    RETRY_AFTER_S,
    BadRequest,
    error_body,
    http_status_for,
    parse_json_object,
    parse_request_id,
    schedule_body,
)
from flexlb.master.election import current_master
from flexlb.schedule_api import RouterContext, check_model, run_release, run_schedule
from flexlb.state.errors import REDIS_UNAVAILABLE
from flexlb.state.store import FleetStore

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("flexlb.http")

CONTEXT = web.AppKey("context", RouterContext)
MASTER = web.AppKey("master", "MasterService")  # in `flexlb master`, which has no router context


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def bad_request(exc: BadRequest, ctx: RouterContext) -> web.Response:
    return json_response(error_body(exc.code, exc.message, master_host=ctx.master_host), exc.status)


async def read_object(request: web.Request) -> dict[str, Any]:
    return parse_json_object(await request_body(request))


@dataclass(frozen=True, slots=True)
class Answer:
    """A JSON answer, whatever the server that sends it (aiohttp here, flexlb/http/fast_path.py for the hot
    routes)."""

    body: dict[str, Any]
    status: int = 200
    headers: dict[str, str] | None = None


async def schedule_answer(ctx: RouterContext, body: bytes, client: str) -> Answer:
    """POST /rtp_llm/schedule: raises what the app's json_errors answers (Redis unreachable: 503)."""
    try:
        req, result = await run_schedule(ctx, _object(body), client=client)
    except BadRequest as exc:
        return Answer(error_body(exc.code, exc.message, master_host=ctx.master_host), exc.status)
    retry_after = RETRY_AFTER_S.get(result.code)
    return Answer(
        schedule_body(result, req.request_id, master_host=ctx.master_host),
        http_status_for(result.code),
        None if retry_after is None else {"Retry-After": str(retry_after)},
    )


async def release_answer(ctx: RouterContext, body: bytes, client: str) -> Answer:
    """POST /rtp_llm/release."""
    try:
        data = parse_json_object(body)
        request_id = parse_request_id(data)
        check_model(ctx, data.get("model") if isinstance(data.get("model"), str) else None)
        released = await run_release(ctx, request_id, client)
    except BadRequest as exc:
        return Answer(error_body(exc.code, exc.message, master_host=ctx.master_host), exc.status)
    return Answer({"success": True, "code": 200, "request_id": request_id, "released": released})


async def _object(body: bytes) -> dict[str, Any]:
    return parse_json_object(body)


async def schedule(request: web.Request) -> web.Response:
    answer = await schedule_answer(request.app[CONTEXT], await request_body(request), client_of(request))
    return json_response(answer.body, answer.status, answer.headers)


async def release(request: web.Request) -> web.Response:
    answer = await release_answer(request.app[CONTEXT], await request_body(request), client_of(request))
    return json_response(answer.body, answer.status, answer.headers)


async def schedule_snapshot(request: web.Request) -> web.Response:
    """The fleet as this router sees it: its fleet view (every worker's status and pending load, as the change
    stream brought them), plus this router's own state. ``?source=redis`` reads every worker from Redis instead."""
    ctx = request.app[CONTEXT]
    sched = ctx.scheduler
    body: dict[str, Any] = {
        "service_id": ctx.service_id,
        "redis_up": sched.redis_up,
        "view_age_ms": sched.view_age_ms,
        "view_resyncs": sched.view_sync.resyncs,
        "view_entries": sched.view_sync.entries,
        "strategies": {r.value: s.value for r, s in sched.options.strategies.items()},
        "local_reservations": {str(rid): picks for rid, picks in sched.local_reservations().items()},
    }
    views = None
    if request.query.get("source") == "redis":
        try:
            views = await ctx.store.list_workers()
            body["source"] = "redis"
        except REDIS_UNAVAILABLE as exc:
            body["source"] = f"fleet view (Redis unreachable: {exc})"
    if views is None:
        views = sorted(sched.view.all(), key=lambda v: v.worker_id)
        body.setdefault("source", "view")
    body["workers"] = [worker_json(v) for v in views]
    return json_response(body)


def worker_json(view: Any) -> dict[str, Any]:
    spec, status = view.spec, view.status
    return {
        "worker_id": view.worker_id,
        "role": spec.role.value,
        "ip": spec.ip,
        "http_port": spec.http_port,
        "grpc_port": spec.effective_grpc_port,
        "group": spec.group,
        "max_concurrency": spec.max_concurrency,
        "engine": spec.engine.value,
        "alive": status.alive,
        "available": status.available,
        "running": status.running,
        "waiting": status.waiting,
        "queued_tokens": status.queued_tokens,
        "kv_used": status.kv_used,
        "kv_total": status.kv_total,
        "block_size": status.block_size,
        "step_latency_ms": status.step_latency_ms,
        "prefill_tokens_per_ms": status.prefill_tokens_per_ms,
        "status_version": status.status_version,
        "updated_ms": status.updated_ms,
        "pending_count": view.pending_count,
        "pending_tokens": view.pending_tokens,
    }


async def lock_info(store: FleetStore) -> dict[str, Any]:
    """Who holds the master lock now, and its epoch (None when Redis cannot be asked)."""
    try:
        holder, epoch = await current_master(store.redis, store.keys)
    except REDIS_UNAVAILABLE:
        return {"master_lock_holder": None, "master_epoch": None}
    return {"master_lock_holder": holder, "master_epoch": epoch}


async def master_info(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    # Every router schedules on the shared state, so each names itself as real_master_host (see the reference's
    # flexlb note); the lock holder that polls the workers, and its epoch, are reported beside it for operators.
    body: dict[str, Any] = {"real_master_host": ctx.master_host, "queue_length": len(ctx.queue), "code": 200}
    body |= await lock_info(ctx.store)
    body["this_process_is_master"] = ctx.master is not None and ctx.master.election.is_master
    return json_response(body)


async def queue_snapshot(request: web.Request) -> web.Response:
    return json_response(request.app[CONTEXT].queue.snapshot())


async def health(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    sched = ctx.scheduler
    if not ctx.ready:  # Redis never answered: no scripts, no snapshot to degrade to
        return json_response({"status": "starting", "redis_up": False, "degraded": False, "pid": os.getpid()}, 503)
    # Redis counts as up only while the view's tail follows the stream too: with no request in a while, a slot or
    # primary gone (reshard, failover) shows there first; past the staleness bound the view is of no use
    redis_up = sched.redis_up and sched.view_sync.running
    ready = sched.can_schedule() and (redis_up or _view_fresh(sched))
    body = {
        "status": "ok" if ready else "unavailable",
        "redis_up": redis_up,
        "degraded": not redis_up,
        "pid": os.getpid(),  # which process answered, when several share the port (flexlb serve --processes)
    }
    return json_response(body, 200 if ready else 503)


def _view_fresh(sched: Any) -> bool:
    age = sched.view_age_ms
    return age is not None and age <= sched.options.max_staleness_ms


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    registry = ctx.metrics_registry or ctx.metrics.registry
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/rtp_llm/schedule", schedule)
    app.router.add_post("/rtp_llm/release", release)
    app.router.add_post("/rtp_llm/schedule_snapshot", schedule_snapshot)
    app.router.add_post("/rtp_llm/master/info", master_info)
    app.router.add_get("/rtp_llm/queue_snapshot", queue_snapshot)
    app.router.add_post("/rtp_llm/queue_snapshot", queue_snapshot)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)


async def master_health(request: web.Request) -> web.Response:
    """``flexlb master``: 200 while Redis answers (master or standby), 503 when it does not."""
    master = request.app[MASTER]
    body = master.info() | await lock_info(master.store)
    up = body["master_epoch"] is not None
    return json_response({"status": "ok" if up else "unavailable", **body}, 200 if up else 503)


def setup_master_routes(app: web.Application, registry: CollectorRegistry) -> None:
    async def master_metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/health", master_health)
    app.router.add_post("/rtp_llm/master/info", master_health)
    app.router.add_get("/metrics", master_metrics)
