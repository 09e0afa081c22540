"""Admin API for worker membership and status, until (and besides) the master's poller: same Redis keys.

Every route here is an admin route (``FLEXLB_ADMIN_TOKEN``, flexlb/http/auth.py). Status values are checked against
sane bounds before anything is stored (flexlb/status_bounds.py). A registration is checked against the worker's own
status reply when it identifies the worker (``identity_refusal``). A registration may carry where the worker publishes
its KV events (``kv_events``, ``kv_events_replay``: as in MODEL_SERVICE_CONFIG); the master polling it subscribes.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from aiohttp import web

from flexlb.domain import EngineKind, Role, WorkerSpec, check_host
from flexlb.http.routes import CONTEXT, bad_request, json_response, read_object, worker_json
from flexlb.http.wire import BadRequest, int_field
from flexlb.kv_events.endpoint import KvEventsEndpoint, kv_events_endpoint
from flexlb.master.worker_client import WorkerStatusClient, WorkerUnreachable
from flexlb.state.store import WorkerNotFound
from flexlb.status_bounds import check_status

log = logging.getLogger("flexlb.admin")

IDENTITY_DEADLINE_S = 1.0  # one status call at registration; a worker not up yet costs its registration this much
NO_FINISHED_TASKS = (1 << 63) - 1  # latest_finished_version asking for no finished tasks: only the identity matters
# vLLM's own examples bind tcp://*:5557: given at registration, that is the worker's host
_WILDCARD_HOST = re.compile(r"^\s*tcp://(\*|0\.0\.0\.0|\[::\]):")
_NONE = ("", "none", "false")


def parse_kv_events(value: object, replay: object, ip: str) -> KvEventsEndpoint | None:
    """A registration's ``kv_events`` and ``kv_events_replay``, meaning what MODEL_SERVICE_CONFIG's do:
    ``kv_events`` ``"tcp://host:port"`` (``*`` or ``0.0.0.0``: the worker's ``ip``) or a port on ``ip``; unset (or
    null): none; ``kv_events_replay`` ``"tcp://host:port"``, false / ``"none"`` for none, unset: the publisher's
    port + 1 (vLLM's convention). Text such as a query string or a flag gives (``"5557"``, ``"none"``) work too.
    Raises ValueError naming the field."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        if replay is not None and replay is not False and str(replay).strip().lower() not in _NONE:
            raise ValueError("kv_events_replay: given without kv_events (the publisher's address)")
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    elif isinstance(value, str):
        value = _WILDCARD_HOST.sub(f"tcp://{ip}:", value, count=1)
    if isinstance(replay, str) and replay.strip().lower() in _NONE:
        replay = False
    elif isinstance(replay, str):
        replay = _WILDCARD_HOST.sub(f"tcp://{ip}:", replay, count=1)
    return kv_events_endpoint(value, replay, ip, "kv_events", single=True)


def kv_events_json(spec: WorkerSpec) -> dict[str, str | None]:
    """The worker's registered KV events endpoints, for the listings (None: none registered)."""
    events = spec.kv_events
    return {"kv_events": events.publisher if events else None, "kv_events_replay": events.replay if events else None}


def parse_worker_spec(data: dict[str, Any]) -> WorkerSpec:
    ip = data.get("ip")
    if not isinstance(ip, str):
        raise BadRequest(f"ip: expected a string, got {type(ip).__name__}")
    try:
        check_host(ip)
    except ValueError as exc:
        raise BadRequest(f"ip: {exc}") from None
    parsed_role = _enum_field(data, "role", Role, None)
    group = data.get("group", "")
    if not isinstance(group, str):
        raise BadRequest(f"group: expected a string, got {type(group).__name__}")
    parsed_engine = _enum_field(data, "engine", EngineKind, EngineKind.RTP_LLM)
    try:
        kv_events = parse_kv_events(data.get("kv_events"), data.get("kv_events_replay"), ip)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return WorkerSpec(
        ip=ip,
        http_port=int_field(data, "http_port", required=True, low=1, high=65535),
        role=parsed_role,
        grpc_port=int_field(data, "grpc_port", required=False, low=0, high=65535),
        group=group,
        max_concurrency=int_field(data, "max_concurrency", required=False, low=0, high=1_000_000),
        engine=parsed_engine,
        kv_events=kv_events,
    )


def _enum_field(data: dict[str, Any], name: str, kind: type[Role] | type[EngineKind], default: Any) -> Any:
    """``data[name]`` through ``kind.parse`` (``default`` when absent and not None); BadRequest naming the field."""
    value = data.get(name, None if default is None else default.value)
    if not isinstance(value, str):
        raise BadRequest(f"{name}: expected one of {', '.join(k.value for k in kind)}, got {value!r}")
    try:
        return kind.parse(value)
    except ValueError as exc:
        raise BadRequest(f"{name}: {exc}") from None


def parse_status_changes(data: Any) -> dict[str, str]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadRequest(f"status: expected an object of status fields, got {type(data).__name__}")
    try:
        return check_status(data)
    except ValueError as exc:
        raise BadRequest(f"status.{exc}") from None


async def identity_refusal(spec: WorkerSpec, deadline_s: float = IDENTITY_DEADLINE_S) -> str | None:
    """Why ``spec`` must not be registered: its status port answers for another worker (the reply's ``http_port``,
    which flexlb's simulator sends, names another HTTP port). None when it answers for this one, does not say which
    worker it is (RTP-LLM engines do not), or does not answer (a worker not started yet: the master marks it down).
    A vLLM or SGLang worker has no status port: nothing to check."""
    if not spec.engine.speaks_status_rpc:
        return None
    try:
        async with WorkerStatusClient.for_worker(spec) as client:
            reply = await client.get_worker_status(NO_FINISHED_TASKS, deadline_s)
    except WorkerUnreachable as exc:
        log.info("registering %s: its status port does not answer (%s); not checked", spec.worker_id, exc)
        return None
    if reply.http_port and reply.http_port != spec.http_port:
        return (
            f"the status port {spec.ip}:{spec.effective_grpc_port} answers for the worker on HTTP port"
            f" {reply.http_port}, not {spec.http_port}: refusing to register {spec.worker_id} (requests sent to it"
            " would not reach the worker whose status is polled)"
        )
    return None


async def list_workers(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    views = await ctx.store.list_workers()
    return json_response({"workers": [worker_json(v) | kv_events_json(v.spec) for v in views]})


async def add_worker(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    try:
        data = await read_object(request)
        spec = parse_worker_spec(data)
        status = parse_status_changes(data.get("status"))
    except BadRequest as exc:
        return bad_request(exc, ctx)
    refusal = await identity_refusal(spec)
    if refusal is not None:
        log.warning("POST /rtp_llm/workers from %s: %s", request.remote, refusal)
        return bad_request(BadRequest(refusal, status=409), ctx)
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
