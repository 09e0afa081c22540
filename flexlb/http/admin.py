"""Admin API for worker membership and status, until (and besides) the master's poller: same Redis keys."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from flexlb.domain import Role, WorkerSpec, check_host
from flexlb.http.routes import CONTEXT, bad_request, json_response, read_object, worker_json
from flexlb.http.wire import BadRequest, int_field
from flexlb.state.codec import parse_status_value
from flexlb.state.store import WorkerNotFound


def parse_worker_spec(data: dict[str, Any]) -> WorkerSpec:
    ip = data.get("ip")
    if not isinstance(ip, str):
        raise BadRequest(f"ip: expected a string, got {type(ip).__name__}")
    try:
        check_host(ip)
    except ValueError as exc:
        raise BadRequest(f"ip: {exc}") from None
    role = data.get("role")
    if not isinstance(role, str):
        raise BadRequest(f"role: expected one of {', '.join(r.value for r in Role)}, got {role!r}")
    try:
        parsed_role = Role.parse(role)
    except ValueError as exc:
        raise BadRequest(f"role: {exc}") from None
    group = data.get("group", "")
    if not isinstance(group, str):
        raise BadRequest(f"group: expected a string, got {type(group).__name__}")
    return WorkerSpec(
        ip=ip,
        http_port=int_field(data, "http_port", required=True, low=1, high=65535),
        role=parsed_role,
        grpc_port=int_field(data, "grpc_port", required=False, low=0, high=65535),
        group=group,
        max_concurrency=int_field(data, "max_concurrency", required=False, low=0, high=1_000_000),
    )


def parse_status_changes(data: Any) -> dict[str, str]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadRequest(f"status: expected an object of status fields, got {type(data).__name__}")
    try:
        return {name: parse_status_value(name, value) for name, value in data.items()}
    except ValueError as exc:
        raise BadRequest(f"status.{exc}") from None


async def list_workers(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    return json_response({"workers": [worker_json(v) for v in await ctx.store.list_workers()]})


async def add_worker(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    try:
        data = await read_object(request)
        spec = parse_worker_spec(data)
        status = parse_status_changes(data.get("status"))
    except BadRequest as exc:
        return bad_request(exc, ctx)
    await ctx.store.register_worker(spec, status)
    return json_response({"success": True, "worker_id": spec.worker_id}, 201)


async def update_worker_status(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    worker_id = request.match_info["worker_id"]
    try:
        status = parse_status_changes(await read_object(request))
        if not status:
            raise BadRequest("expected at least one status field")
    except BadRequest as exc:
        return bad_request(exc, ctx)
    try:
        await ctx.store.update_status(worker_id, status)
    except WorkerNotFound:
        return bad_request(BadRequest(f"unknown worker {worker_id!r}", status=404), ctx)
    return json_response({"success": True, "worker_id": worker_id})


async def set_worker_cache(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    worker_id = request.match_info["worker_id"]
    try:
        data = await read_object(request)
        keys = data.get("block_cache_keys")
        if not isinstance(keys, list) or any(isinstance(k, bool) or not isinstance(k, int) for k in keys):
            raise BadRequest("block_cache_keys: expected a list of integers")
    except BadRequest as exc:
        return bad_request(exc, ctx)
    if worker_id not in {v.worker_id for v in await ctx.store.list_workers()}:
        return bad_request(BadRequest(f"unknown worker {worker_id!r}", status=404), ctx)
    await ctx.store.set_cache_blocks(worker_id, keys)
    return json_response({"success": True, "worker_id": worker_id, "blocks": len(set(keys))})


async def remove_worker(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    worker_id = request.match_info["worker_id"]
    if not await ctx.store.remove_worker(worker_id):
        return bad_request(BadRequest(f"unknown worker {worker_id!r}", status=404), ctx)
    return json_response({"success": True, "worker_id": worker_id})


def setup_admin_routes(app: web.Application) -> None:
    app.router.add_get("/rtp_llm/workers", list_workers)
    app.router.add_post("/rtp_llm/workers", add_worker)
    app.router.add_post("/rtp_llm/workers/{worker_id}/status", update_worker_status)
    app.router.add_put("/rtp_llm/workers/{worker_id}/cache", set_worker_cache)
    app.router.add_delete("/rtp_llm/workers/{worker_id}", remove_worker)
